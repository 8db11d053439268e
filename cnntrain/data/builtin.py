"""MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100, read from their real on-disk formats by
torchvision's dataset classes and returned as whole uint8 tensors (N, C, H, W)."""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from dataclasses import dataclass

import torch
from torchvision import datasets
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.datasets.utils import extract_archive

from cnntrain import distributed
from cnntrain.errors import UserError


class _CIFAR10(datasets.CIFAR10):
    # torchvision checks the md5 of every batch file, which rejects re-packed subsets and test
    # fixtures in the same format; None keeps the existence check. A download is still verified
    # through the archive's md5 (tgz_md5), and unreadable pickles are reported when loading.
    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


class _CIFAR100(datasets.CIFAR100):
    train_list = [[name, None] for name, _ in datasets.CIFAR100.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR100.test_list]
    meta = {**datasets.CIFAR100.meta, "md5": None}


BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion_mnist_mini")


class _FashionMNISTMini(datasets.FashionMNIST):
    """A Fashion-MNIST sample as made by scripts/make_fashion_mnist_mini.py: gzipped IDX files
    directly in `root` (the package's BUNDLED). torchvision reads only uncompressed IDX files, so
    each is unpacked into a temporary folder (a few ms) and read there by torchvision's own
    readers, with their format checks; `root` itself is never written to."""

    FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

    @property
    def raw_folder(self) -> str:
        return self.root

    @property
    def processed_folder(self) -> str:  # torchvision's legacy .pt files: never here
        return os.path.join(self.root, "processed")

    def _check_exists(self) -> bool:
        return all(os.path.isfile(os.path.join(self.root, f)) for f in self.FILES)

    def _load_data(self):
        prefix = "train" if self.train else "t10k"
        with tempfile.TemporaryDirectory() as tmp:
            images = extract_archive(os.path.join(self.root, f"{prefix}-images-idx3-ubyte.gz"), tmp)
            labels = extract_archive(os.path.join(self.root, f"{prefix}-labels-idx1-ubyte.gz"), tmp)
            return read_image_file(images), read_label_file(labels)


@dataclass(frozen=True)
class _Spec:
    title: str
    cls: type
    folder: str  # where the files live under root (bundled: the absolute folder in the package)
    files: tuple[str, ...]
    shape: tuple[int, int, int]  # (channels, image size, classes), known without reading the files
    bundled: bool = False  # shipped inside the package: root and download do not apply


BUILTIN = {
    "mnist": _Spec("MNIST", datasets.MNIST, "MNIST/raw",
                   ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"), (1, 28, 10)),
    "fashion_mnist": _Spec("Fashion-MNIST", datasets.FashionMNIST, "FashionMNIST/raw",
                           ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                            "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"), (1, 28, 10)),
    "fashion_mnist_mini": _Spec("Fashion-MNIST sample", _FashionMNISTMini, BUNDLED, _FashionMNISTMini.FILES,
                                (1, 28, 10), bundled=True),
    "cifar10": _Spec("CIFAR-10", _CIFAR10, "cifar-10-batches-py",
                     ("data_batch_1", "...", "data_batch_5", "test_batch", "batches.meta"), (3, 32, 10)),
    "cifar100": _Spec("CIFAR-100", _CIFAR100, "cifar-100-python", ("train", "test", "meta"), (3, 32, 100)),
}


def load_builtin(name: str, root: str, train: bool, download: bool):
    """Return (images uint8 (N,C,H,W), labels int64 (N,), class names) of one split. Under
    torchrun one process per machine reads (and downloads) first, and the others then read the
    files it put there: ranks downloading into one folder at once would corrupt each other's files."""
    return distributed.local_first(lambda: _load(name, root, train, download))


def _load(name: str, root: str, train: bool, download: bool):
    spec = BUILTIN[name]
    where = os.path.join(os.path.abspath(root), spec.folder)
    files = ", ".join(spec.files)
    try:
        ds = spec.cls(spec.folder if spec.bundled else root, train=train, download=False)
    except Exception as e:
        if spec.bundled:  # a broken installation, not something data.root or a download can fix
            missing = [f for f in spec.files if not os.path.isfile(os.path.join(where, f))]
            problem = f"lacks {', '.join(missing)}" if missing else f"cannot be read ({type(e).__name__}: {e})"
            raise UserError(f"{spec.title} in {where} {problem}: the installation is damaged; "
                            "reinstall cnntrain (pip install --force-reinstall cnntrain) or use "
                            "another dataset, e.g. data=fashion_mnist") from None
        if "not found" not in str(e):  # truncated/garbled files fail inside torchvision's readers
            raise UserError(f"{spec.title} files in {where} could not be read ({type(e).__name__}: "
                            f"{e}); delete them and download again") from None
        if not download:
            raise UserError(f"{spec.title} not found: expected {files} in {where} "
                            "(set data.root=, or data.download=true to fetch it)") from None
        ds = _download(spec, root, train, f"put {files} into {where}")
    images = torch.as_tensor(ds.data)
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long), list(ds.classes)


def _download(spec: _Spec, root: str, train: bool, fix: str):
    log = io.StringIO()  # torchvision prints every failed mirror; keep that out of the console
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            return spec.cls(root, train=train, download=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(f"could not download {spec.title} ({reason}): {fix} (torchvision's "
                        "layout), or set data.root= to where they are") from None
