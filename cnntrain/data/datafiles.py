"""Checked readers of the built-in datasets' files (IDX for MNIST-like sets, CIFAR's python
pickles). A dataset folder is input like any other: a file may be truncated, disagree with its
partner, not be a regular file, or be a pickle crafted to run code. Every such file is a
BadFile whose message names it; the caller adds the fix (download again, or reinstall)."""

from __future__ import annotations

import array
import gzip
import io
import math
import os
import pickle
import struct
import zlib

import numpy as np
import torch
from numpy._core import multiarray as _multiarray
from numpy._core import numeric as _numeric

from cnntrain.files import irregular


class BadFile(Exception):
    """A dataset file that cannot be used as it is; the message names it and what is wrong."""


def check_regular(paths) -> None:
    """Refuse, before anything opens them, files that are there but are not regular files:
    reading a FIFO waits for a writer forever and a device such as /dev/zero never ends."""
    for path in paths:
        kind = irregular(path)
        if kind:
            raise BadFile(f"{path} is not a regular file ({kind})")


# ---- IDX --------------------------------------------------------------------------------------

_IDX_TYPES = {
    0x08: "unsigned bytes",
    0x09: "signed bytes",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}


def read_idx(path: str, ndim: int, shown: str | None = None) -> torch.Tensor:
    """The uint8 tensor of an IDX file of `ndim` dimensions (3: 28x28 images, 1: labels), read by
    torchvision's reader once its header agrees with the file's size (the reader itself would
    report a header's 2^31 images as an unnamed reshape error). `shown`: the name to report."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    shown = shown or path
    with open(path, "rb") as f:
        header = f.read(4 + 4 * ndim)
    if (
        len(header) < 4
        or header[:2] != b"\0\0"
        or header[2] not in _IDX_TYPES
        or not 1 <= header[3] <= 3
    ):
        raise BadFile(
            f"{shown} is not an IDX file (it starts {header[:4].hex() or 'empty'}; "
            f"an IDX file of bytes starts 000008 and its number of dimensions)"
        )
    if header[2] != 0x08:
        raise BadFile(
            f"{shown} holds {_IDX_TYPES[header[2]]}, not the unsigned bytes of MNIST's files"
        )
    if header[3] != ndim:
        plural = "s" if header[3] > 1 else ""
        raise BadFile(
            f"{shown} holds {header[3]} dimension{plural}, not {ndim} "
            f"({'images x 28 x 28' if ndim == 3 else 'one label per image'})"
        )
    if len(header) < 4 + 4 * ndim:
        raise BadFile(f"{shown} ends inside its header ({len(header)} bytes)")
    dims = struct.unpack(f">{ndim}I", header[4:])
    size, promised = os.path.getsize(path), len(header) + math.prod(dims)
    if size != promised:
        raise BadFile(
            f"{shown} holds {size} bytes but its header promises {'x'.join(map(str, dims))} "
            f"values ({promised} bytes)"
        )
    if ndim == 3 and dims[1:] != (28, 28):
        raise BadFile(f"{shown} holds {dims[1]}x{dims[2]} images, not 28x28")
    try:
        return (read_image_file if ndim == 3 else read_label_file)(path)
    except Exception as e:
        raise BadFile(f"{shown} cannot be read ({type(e).__name__}: {e})") from None


def check_idx_pair(
    images: torch.Tensor, labels: torch.Tensor, images_name: str, labels_name: str, classes: int
) -> None:
    if len(images) != len(labels):
        raise BadFile(
            f"{images_name} holds {len(images)} images but {labels_name} holds {len(labels)} labels"
        )
    bad = out_of_range(labels, classes)
    if bad:
        raise BadFile(
            f"{labels_name} holds label {bad[1]} (for image {bad[0]} of {images_name}), "
            f"outside the dataset's {classes} classes (0..{classes - 1})"
        )


def out_of_range(labels, classes: int) -> tuple[int, int] | None:
    """(index, value) of the first label outside 0..classes-1, or None."""
    labels = torch.as_tensor(labels)
    bad = ((labels < 0) | (labels >= classes)).nonzero()
    return (int(bad[0]), int(labels[bad[0]])) if len(bad) else None


def gunzip(src: str, dest: str, limit: int) -> str:
    """src unpacked into dest, refused once it passes `limit` bytes: a few bytes of gzip can
    unpack to gigabytes."""
    try:
        with gzip.open(src) as f, open(dest, "wb") as out:
            while chunk := f.read(1 << 20):
                if out.tell() + len(chunk) > limit:
                    raise BadFile(
                        f"{src} unpacks to more than {limit} bytes, larger than any "
                        "Fashion-MNIST file"
                    )
                out.write(chunk)
    except (OSError, EOFError, zlib.error) as e:
        raise BadFile(f"{src} cannot be read ({type(e).__name__}: {e})") from None
    return dest


# ---- CIFAR ------------------------------------------------------------------------------------

ROW = 3 * 32 * 32  # one CIFAR image: 1024 red, then 1024 green, then 1024 blue bytes


class _NdarrayClass:
    """Stands for numpy.ndarray in a pickle: only _reconstruct may use it, since calling the
    class itself would allocate any shape the file asks for."""


def _reconstruct(cls, shape, dtype):
    # numpy pickles make an empty array here and fill it from the file's bytes (BUILD)
    if cls is not _NdarrayClass or math.prod(shape) != 0:
        raise pickle.UnpicklingError("an array not pickled by numpy")
    return _multiarray._reconstruct(np.ndarray, shape, dtype)


def _latin1(text, encoding="latin1"):
    # how Python 3 pickles bytes at protocol 2: _codecs.encode(str, 'latin1')
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("bytes not pickled by Python")
    return text.encode("latin1")


_ALLOWED = {
    ("_codecs", "encode"): _latin1,
    ("numpy", "ndarray"): _NdarrayClass,
    ("numpy", "dtype"): np.dtype,
}
for _module in (
    "numpy.core",
    "numpy._core",
):  # Python 2 and numpy 1 wrote numpy.core; numpy 2 numpy._core
    _ALLOWED.update(
        {
            (f"{_module}.multiarray", "_reconstruct"): _reconstruct,
            (f"{_module}.multiarray", "scalar"): _multiarray.scalar,
            (f"{_module}.numeric", "_frombuffer"): _numeric._frombuffer,
        }
    )


class _CifarUnpickler(pickle.Unpickler):
    """The pickle docs' "Restricting Globals": a CIFAR file holds dicts, lists, strings, numbers
    and numpy arrays, so nothing else may be named, and nothing named can run code."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(
            f"it asks for {module}.{name}, which a CIFAR file never holds "
            "(a crafted pickle runs code this way)"
        )


def read_pickle(path: str) -> dict:
    """The dict pickled in a CIFAR file, read with encoding latin1 as torchvision does (the real
    files were written by Python 2)."""
    with open(path, "rb") as f:
        raw = f.read()  # a size claimed inside the pickle is then bounded by the file's
    try:
        entry = _CifarUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except EOFError:
        raise BadFile(f"{path} ends early (truncated)") from None
    except pickle.UnpicklingError as e:
        raise BadFile(f"{path} is not a CIFAR file: {e}") from None
    except Exception as e:
        raise BadFile(f"{path} is not a CIFAR file ({type(e).__name__}: {e})") from None
    if not isinstance(entry, dict):
        raise BadFile(f"{path} holds {_kind(entry)}, not a dict as CIFAR files do")
    return entry


def _kind(value) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    return f"a {type(value).__name__}" + (
        f" ({value!r:.40})" if isinstance(value, (str, int, float)) else ""
    )


def _entry(path: str, entry: dict, key: str):
    if key not in entry:
        raise BadFile(f"{path} has no {key!r} (it holds {', '.join(map(repr, list(entry)[:8]))})")
    return entry[key]


def _rows(path: str, data) -> np.ndarray:
    """uint8 (N, 3072) pixels of a batch's 'data': numpy's array, or a list of rows of ints."""
    if isinstance(data, (list, tuple)):
        if len(data) * ROW > os.path.getsize(path):  # memo references repeat one row for free
            raise BadFile(f"{path} lists {len(data)} images, more pixels than the file has bytes")
        rows = np.empty((len(data), ROW), np.uint8)
        for i, row in enumerate(data):
            try:
                if len(row) != ROW:
                    raise ValueError(f"{len(row)} values")
                rows[i] = np.frombuffer(array.array("B", row), np.uint8)
            except (TypeError, ValueError, OverflowError) as e:
                raise BadFile(
                    f"{path}: image {i} of its 'data' is not {ROW} pixels 0..255 ({e})"
                ) from None
        data = rows
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == ROW
    ):
        raise BadFile(
            f"{path}: its 'data' is {_kind(data)}, not uint8 rows of {ROW} pixels (3 x 32 x 32)"
        )
    return data


def _labels(path: str, labels, key: str) -> np.ndarray:
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        return labels.astype(np.int64)
    if not isinstance(labels, (list, tuple)):
        raise BadFile(f"{path}: its {key!r} is {_kind(labels)}, not a list of class numbers")
    odd = next(
        (v for v in labels if isinstance(v, bool) or not isinstance(v, (int, np.integer))), None
    )
    if odd is not None:
        raise BadFile(f"{path}: its {key!r} holds {_kind(odd)}, not a class number")
    try:
        return np.array(labels, dtype=np.int64)
    except OverflowError:
        raise BadFile(f"{path}: its {key!r} holds a number beyond any class") from None


def class_names(path: str, key: str, classes: int) -> list[str]:
    names = _entry(path, read_pickle(path), key)
    if not isinstance(names, (list, tuple)):
        raise BadFile(f"{path}: its {key!r} is {_kind(names)}, not a list of class names")
    odd = next((n for n in names if not isinstance(n, str)), None)
    if odd is not None:
        raise BadFile(f"{path}: its {key!r} holds {_kind(odd)}, not a class name")
    if len(names) != classes:
        raise BadFile(f"{path} holds {len(names)} class names; the dataset has {classes}")
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise BadFile(f"{path} names class {twice!r} twice")
    return list(names)


def read_cifar(
    folder: str, batches: list[str], meta: str, label_key: str, names_key: str, classes: int
) -> tuple[np.ndarray, list[int], list[str]]:
    """(uint8 images (N, 32, 32, 3), labels, class names) of a split's batch files, as
    torchvision's CIFAR10 gives them, each batch checked on its own and against the meta file."""
    meta_path = os.path.join(folder, meta)
    names = class_names(meta_path, names_key, classes)
    data, targets = [], []
    for name in batches:
        path = os.path.join(folder, name)
        entry = read_pickle(path)
        rows, labels = (
            _rows(path, _entry(path, entry, "data")),
            _labels(path, _entry(path, entry, label_key), label_key),
        )
        if len(rows) != len(labels):
            raise BadFile(f"{path} holds {len(rows)} images but {len(labels)} labels")
        bad = out_of_range(labels, len(names))
        if bad:
            raise BadFile(
                f"{path} holds label {bad[1]} (image {bad[0]}) but {meta_path} holds "
                f"{len(names)} class names (labels 0..{len(names) - 1})"
            )
        data.append(rows)
        targets += labels.tolist()
    images = np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, targets, names
