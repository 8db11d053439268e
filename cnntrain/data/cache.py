"""An image folder split decoded once into a uint8 array on disk, memory-mapped by later runs.

Layout of a cache folder (data.cache_dir):
    <key>/images.npy, labels.npy, meta.json   one decoded split; key: files, classes, size, mode
    <key>.lock                                 held while <key> is built (flock)
    facts-<key>.json                           header facts of a file list (folder_facts)
    tmp-<pid>@<host>-*                         a build under way, renamed when done

An entry is trusted only for what it proves when it is opened: its meta.json (written last)
names the key, the files and the digests of its arrays, and all of them, the labels and the
files recorded as unreadable are checked against the scan; anything else is decoded again with
one warning. A build happens in a temporary folder renamed into place, so a build that dies
leaves at worst a temporary folder, which a later build removes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from cnntrain.data.folder import (
    DECODE_ERRORS,
    BadImage,
    class_folders,
    class_samples,
    image_mode,
    log_mixed_modes,
    open_file,
    open_image,
    read_image,
    split_folder,
)
from cnntrain.errors import UserError
from cnntrain.files import atomic_write

log = logging.getLogger("cnntrain")

FORMAT = 2  # bump when decoding or the entry layout changes: old entries then never match
STALE_S = 3600  # a temporary folder this old belongs to no build that is still running
GRAY_MODES = ("1", "L", "LA", "La", "F")  # and I, I;16...: to_mode keeps them gray
DIGEST = "sha256"  # 1.3 GB/s here with SHA-NI, blake2b 0.56 GB/s
ARRAYS = ("images.npy", "labels.npy")


# ---------------------------------------------------------------- scanning


@dataclass
class FolderSplit:
    """A scanned split, nothing decoded."""

    root: str  # <root>/<split>, absolute
    classes: list[str]
    files: list[str]  # image paths, in the sorted order ImageFolder would give
    labels: list[int]
    # _file_list, taken once per scan: the facts and the decoded cache are keyed by the same stats
    stats: list | None = field(default=None, repr=False, compare=False)


def scan_split(root: str, split: str, required: bool = False) -> FolderSplit | None:
    """The files of root/split by the rules of folder.class_samples (hidden files ignored,
    symbolic links followed but not around a loop, empty class folders named); None when the
    folder does not exist and is not required."""
    path = split_folder(os.path.abspath(os.path.expanduser(root)), split, required)
    if path is None:
        return None
    classes = class_folders(path)
    samples = class_samples(path, {c: i for i, c in enumerate(classes)})
    return FolderSplit(path, classes, [f for f, _ in samples], [c for _, c in samples])


def _file_list(split: FolderSplit) -> list[tuple[str, int, int, int, int, int]]:
    """(path relative to the split, label, size, mtime_ns, ctime_ns, inode) of every file (of
    its target, for a link), taken once per scan: what a cache key covers. A user can set mtime
    back (touch -r, cp -p, tar, rsync -t) but not ctime, which any write or rename into place
    sets to now; the inode tells a file replaced by another apart. Not the device number, which
    changes across reboots and remounts (NFS, overlayfs, USB disks) and would re-decode it all.
    A copied folder (cp -a) is decoded again; a moved one (mv) keeps inodes and ctimes."""
    if split.stats is None:
        split.stats = _stat_rows(split)
    return split.stats


def _stat_rows(split: FolderSplit) -> list[tuple[str, int, int, int, int, int]]:
    rows = []
    prefix = os.path.join(split.root, "")
    for path, label in zip(split.files, split.labels):
        try:
            st = os.stat(path)
            facts = st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino
        except OSError:  # a dangling link: keyed as such, and reported as unreadable when decoded
            facts = -1, -1, -1, -1
        # scan_split's paths start with the split folder: slicing is 10x faster than relpath
        rel = path[len(prefix) :] if path.startswith(prefix) else os.path.relpath(path, split.root)
        rows.append((rel, label, *facts))
    return rows


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps([FORMAT, *parts]).encode()).hexdigest()[:32]


# ---------------------------------------------------------------- the cache folder


def default_cache_dir() -> str:
    """$CNNTRAIN_CACHE, else $XDG_CACHE_HOME/cnntrain, else ~/.cache/cnntrain."""
    if os.environ.get("CNNTRAIN_CACHE"):
        return os.path.expanduser(os.environ["CNNTRAIN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cnntrain")


def _unusable(cache_dir: str, e: OSError) -> UserError:
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return UserError(
            f"data.cache_dir={cache_dir} is full ({e.strerror}); free space or set "
            "data.cache_dir= (or $CNNTRAIN_CACHE) to a folder with room"
        )
    return UserError(
        f"data.cache_dir={cache_dir} cannot be written ({e.strerror or e}); set "
        "data.cache_dir= (or $CNNTRAIN_CACHE) to a writable folder"
    )


def _make_cache_dir(cache_dir: str) -> str:
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    try:
        os.makedirs(cache_dir, exist_ok=True)
        if not os.access(cache_dir, os.W_OK | os.X_OK):
            raise PermissionError(13, "permission denied")
    except OSError as e:
        raise _unusable(cache_dir, e) from None
    return cache_dir


def _temp_prefix() -> str:
    # the pid and host tell a later build whether the process that owns it is gone
    return f"tmp-{os.getpid()}@{socket.gethostname()}-"


def _is_stale(path: str) -> bool:
    try:
        if time.time() - os.stat(path).st_mtime > STALE_S:
            return True
    except OSError:
        return False  # already gone
    owner, _, rest = os.path.basename(path)[len("tmp-") :].partition("@")
    host = rest.rsplit("-", 1)[0]
    if not owner.isdigit() or host != socket.gethostname():
        return False  # another machine's (a shared cache): only age tells
    try:
        os.kill(int(owner), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        pass
    return False


def _remove_stale_temps(cache_dir: str) -> None:
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        if name.startswith("tmp-") and _is_stale(path):
            log.debug("removing %s, left by a build that did not finish", path)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                _remove(path)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_json(path: str):
    """A JSON file of the cache folder, read as the data it is: a FileNotFoundError, or a
    ValueError or OSError saying why it is not JSON (a FIFO or a link in its place included)."""
    with open_file(path, follow=False) as f:
        try:
            return json.load(f)
        except RecursionError:  # [[[[... nested deeper than the parser's stack
            raise ValueError("nested too deeply") from None


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def _locked(path: str):
    """An exclusive flock on `path`: a second process building the same entry waits here. The
    lock files stay: removing one another process waits on would let a third lock a new one."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------- header facts


@dataclass
class Facts:
    """What the image headers of a split say (no pixel is decoded)."""

    gray: bool  # every readable image is gray (to_mode to L loses nothing)
    sizes: dict[tuple[int, int], int]  # (width, height) -> number of images
    modes: dict[str, int]  # image_mode (mode, "with transparency") -> number of images
    examples: dict[str, str] = field(default_factory=dict)  # mode -> its first file
    root: str = ""  # the split folder

    def native_size(self) -> int:
        """The images' short side when all have one size, else the median short side (at most
        224: larger images are mostly photos that train at ImageNet sizes)."""
        if not self.sizes:
            raise UserError(
                f"no readable image in {self.root} to take an image size from; set data.image_size="
            )
        if len(self.sizes) == 1:
            return min(next(iter(self.sizes)))
        shorts = np.repeat([min(s) for s in self.sizes], list(self.sizes.values()))
        return min(224, int(round(float(np.median(shorts)))))

    def warn_mixed_modes(self, target: str = "RGB") -> None:
        """Today's mixed-modes warning (folder.log_mixed_modes), when the split mixes modes."""
        log_mixed_modes(self.root, self.modes, self.examples, target)


def _is_gray(img: Image.Image) -> bool:
    if img.mode in GRAY_MODES or img.mode.startswith("I"):
        return True
    if img.mode not in ("P", "PA") or img.palette is None:
        return False
    # the palette as read from the header (PNG PLTE, GIF colour table), not decoded pixels
    pal = img.palette
    channels = len(pal.rawmode or pal.mode)
    entries = np.frombuffer(bytes(pal.palette), np.uint8)
    entries = entries[: len(entries) // channels * channels].reshape(-1, channels)
    return channels < 3 or bool((entries[:, :3] == entries[:, :1]).all())


def _read_header(path: str):
    try:
        with open_file(path) as f, open_image(f) as img:
            return image_mode(img), img.size, _is_gray(img)
    except DECODE_ERRORS:
        return None  # reported when it is decoded


def _read_facts(split: FolderSplit) -> dict:
    raw = {"gray": True, "sizes": {}, "modes": {}, "examples": {}}
    for path in split.files:
        header = _read_header(path)
        if header is None:
            continue
        mode, (w, h), gray = header
        raw["gray"] &= gray
        raw["sizes"][f"{w}x{h}"] = raw["sizes"].get(f"{w}x{h}", 0) + 1
        raw["modes"][mode] = raw["modes"].get(mode, 0) + 1
        raw["examples"].setdefault(mode, os.path.relpath(path, split.root))
    raw["gray"] &= bool(raw["sizes"])
    return raw


def _counts(raw, name: str, key_ok) -> dict:
    counts = raw.get(name)
    if not isinstance(counts, dict) or not all(
        key_ok(k) and type(n) is int and n > 0 for k, n in counts.items()
    ):
        raise ValueError(f"{name} is not a table of positive counts")
    return counts


def _check_facts(raw, n_files: int) -> None:
    """A stored facts file is data: a ValueError saying what in it cannot be what _read_facts wrote."""
    if not isinstance(raw, dict) or not isinstance(raw.get("gray"), bool):
        raise ValueError("gray is not true or false")
    sizes = _counts(
        raw,
        "sizes",
        lambda k: (
            isinstance(k, str)
            and len(k.split("x")) == 2
            and all(v.isdigit() and int(v) > 0 for v in k.split("x"))
        ),
    )
    modes = _counts(raw, "modes", lambda k: isinstance(k, str))
    if not sum(sizes.values()) == sum(modes.values()) <= n_files:
        raise ValueError(f"its counts do not add up to at most the {n_files} files")
    examples = raw.get("examples")
    if (
        not isinstance(examples, dict)
        or set(examples) != set(modes)
        or not all(isinstance(p, str) for p in examples.values())
    ):
        raise ValueError("examples do not name one file per mode")


def folder_facts(split: FolderSplit, cache_dir: str) -> Facts:
    """Facts of a split from its image headers, stored in the cache folder under the file list
    (_file_list), so that a second run opens no image."""
    cache_dir = _make_cache_dir(cache_dir)
    stored = os.path.join(cache_dir, f"facts-{_key('facts', _file_list(split))}.json")
    try:
        raw = _read_json(stored)
        _check_facts(raw, len(split.files))
    except FileNotFoundError:
        raw = None
    except (OSError, ValueError) as e:
        log.warning(
            "cache file %s is not valid (%s); reading the image headers again",
            stored,
            str(e).splitlines()[0] if str(e) else type(e).__name__,
        )
        raw = None
    if raw is None:
        raw = _read_facts(split)
        with atomic_write(
            stored, what="cache file", setting="data.cache_dir= (or $CNNTRAIN_CACHE)"
        ) as f:
            json.dump(raw, f)
    sizes = {tuple(int(v) for v in k.split("x")): n for k, n in raw["sizes"].items()}
    examples = {m: os.path.join(split.root, p) for m, p in raw["examples"].items()}
    return Facts(raw["gray"], sizes, raw["modes"], examples, split.root)


# ---------------------------------------------------------------- decoding


def decode(path: str, mode: str, size: int) -> np.ndarray | BadImage:
    """uint8 (C, size, size) pixels of one file as torchvision's usual evaluation preset gives
    them (to_mode, then Resize(size, antialias=True) + CenterCrop(size) on the uint8 tensor, as
    cnnpredict's Preprocess does; on the PIL image a few pixels would differ by 1), or a BadImage."""
    from torchvision.transforms.v2 import functional as TF

    img = read_image(path, mode)
    if isinstance(img, BadImage):
        return img
    pixels = TF.center_crop(TF.resize(TF.pil_to_tensor(img), [size], antialias=True), [size, size])
    return pixels.numpy()


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # the pool is the parallelism; more threads per process only fight


def _decode_chunk(task):
    """Decode files[start:...] into rows start... of the .npy file; -> (count, [(row, reason)])."""
    npy, start, files, mode, size, stop_at_bad = task
    out = np.load(npy, mmap_mode="r+")
    bad = []
    for row, path in enumerate(files, start):
        pixels = decode(path, mode, size)
        if isinstance(pixels, BadImage):
            bad.append((row, pixels.reason))
            if stop_at_bad:
                break
        else:
            out[row] = pixels
    out.flush()
    return len(files), bad


def _decode_all(
    files: list[str], npy: str, mode: str, size: int, workers: int, stop_at_bad: bool, desc: str
) -> dict[int, str]:
    """Fill the preallocated npy with every file; -> {row: reason} of the unreadable ones (the
    first one found only, when stop_at_bad)."""
    from tqdm import tqdm

    n = len(files)
    chunk = max(
        16, min(512, -(-n // (max(workers, 1) * 8)))
    )  # ~8 chunks per worker balance the load
    tasks = [(npy, i, files[i : i + chunk], mode, size, stop_at_bad) for i in range(0, n, chunk)]
    workers = min(workers, len(tasks))
    bad: dict[int, str] = {}
    with tqdm(total=n, unit="img", desc=desc, disable=None, leave=False) as bar:
        if workers <= 1:
            results = map(_decode_chunk, tasks)
            pool = None
        else:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            pool = ctx.Pool(workers, initializer=_worker_init)
            results = pool.imap_unordered(_decode_chunk, tasks)
        try:
            for count, chunk_bad in results:
                bar.update(count)
                bad.update(chunk_bad)
                if bad and stop_at_bad:
                    break
        finally:
            if pool is not None:
                pool.terminate()  # after a bad image the other chunks are not wanted
                pool.join()
    if stop_at_bad and bad:
        first = min(bad)
        bad = {first: bad[first]}
    return bad


# ---------------------------------------------------------------- the decoded splits


@dataclass
class CachedSplit:
    images: np.ndarray  # uint8 (N, C, S, S), memory-mapped from the entry
    labels: np.ndarray  # int64 (N,)
    files: list[str]  # the file of each image (readable ones only)
    classes: list[str]
    skipped: list[str]  # unreadable files left out (skip_bad=True)
    path: str  # the cache entry folder
    reasons: dict[str, str] = field(default_factory=dict, repr=False)  # skipped file -> why

    def pixels(self):
        """`images` as a torch tensor over the same memory map (no copy)."""
        import warnings

        import torch

        with warnings.catch_warnings():  # read-only memory map: never written through the tensor
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(self.images)


class Untrusted(Exception):
    """Why an entry that is there is not trusted: one line, for the warning that rebuilds it."""


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def file_digest(path: str) -> str:
    """The hex DIGEST of a file of an entry (never a link or a special file)."""
    with open_file(path, follow=False) as f:
        return hashlib.file_digest(f, DIGEST).hexdigest()


META_FIELDS = {
    "format": int,
    "key": str,
    "classes": list,
    "files": list,
    "skipped": list,
    "digests": dict,
}


def _read_meta(entry: str, key: str) -> dict | None:
    """meta.json of an entry, checked as the data it is; None when there is no entry."""
    try:
        meta = _read_json(os.path.join(entry, "meta.json"))
    except FileNotFoundError:
        if os.path.lexists(entry):
            raise Untrusted("it has no meta.json") from None
        return None
    except (OSError, ValueError) as e:
        raise Untrusted(f"meta.json cannot be read: {_first_line(e)}") from None
    if (
        not isinstance(meta, dict)
        or not all(isinstance(meta.get(k), t) for k, t in META_FIELDS.items())
        or not all(isinstance(f, str) for f in meta["files"])
        or not all(
            isinstance(s, list) and len(s) == 2 and all(isinstance(v, str) for v in s)
            for s in meta["skipped"]
        )
        or not all(isinstance(meta["digests"].get(name), str) for name in ARRAYS)
    ):
        raise Untrusted("meta.json is not valid: a field is missing or of the wrong type")
    if meta["format"] != FORMAT or meta["key"] != key:
        raise Untrusted("meta.json is not valid: it names another format or key")
    return meta


def _kept_rows(meta: dict, split: FolderSplit) -> list[int]:
    """The rows of the scan the entry holds: all but those it records as unreadable."""
    if meta["classes"] != split.classes:
        raise Untrusted("its classes differ from the folder's")
    names = [row[0] for row in _file_list(split)]
    skipped = {name for name, _ in meta["skipped"]}
    kept = [i for i, name in enumerate(names) if name not in skipped]
    if (
        len(skipped) != len(meta["skipped"])
        or len(kept) + len(skipped) != len(names)
        or meta["files"] != [names[i] for i in kept]
    ):
        raise Untrusted("its file list differs from the folder's")
    return kept


def _open_arrays(entry: str, meta: dict, shape: tuple, verify: bool):
    """(images memory-mapped, labels) of an entry, checked against its digests when `verify`."""
    for name in ARRAYS if verify else ():
        try:
            if file_digest(os.path.join(entry, name)) != meta["digests"][name]:
                raise Untrusted(f"{name} does not match its digest")
        except OSError as e:
            raise Untrusted(f"{name} cannot be read: {_first_line(e)}") from None
    try:
        images = np.load(os.path.join(entry, "images.npy"), mmap_mode="r")
        labels = np.load(os.path.join(entry, "labels.npy"))
    except (OSError, ValueError) as e:
        raise Untrusted(f"its arrays cannot be read: {_first_line(e)}") from None
    n = len(meta["files"])
    if (
        images.shape != (n, *shape)
        or images.dtype != np.uint8
        or labels.shape != (n,)
        or labels.dtype != np.int64
    ):
        raise Untrusted("its arrays are not of the shape and type meta.json gives")
    return images, labels


def _check_labels(labels: np.ndarray, split: FolderSplit, kept: list[int]) -> None:
    outside = labels[(labels < 0) | (labels >= len(split.classes))]
    if len(outside):
        raise Untrusted(f"label {outside[0]} is not one of the {len(split.classes)} classes")
    if not np.array_equal(labels, np.asarray(split.labels, dtype=np.int64)[kept]):
        raise Untrusted("its labels differ from the folder's")


def _open_entry(
    entry: str, key: str, split: FolderSplit, channels: int, size: int, verify: bool = True
) -> CachedSplit | None:
    """The entry's arrays; None when there is no entry; Untrusted when it does not prove what it
    holds: its meta.json, files, classes, array digests (`verify`), labels, and (`verify`) that
    every file it records as unreadable still is (they are few)."""
    meta = _read_meta(entry, key)
    if meta is None:
        return None
    kept = _kept_rows(meta, split)
    images, labels = _open_arrays(entry, meta, (channels, size, size), verify)
    _check_labels(labels, split, kept)
    index = {row[0]: i for i, row in enumerate(_file_list(split))}
    skipped = {split.files[index[name]]: why for name, why in meta["skipped"]}
    for path in skipped if verify else ():
        if not isinstance(read_image(path), BadImage):
            raise Untrusted(
                f"{os.path.relpath(path, split.root)}, recorded as unreadable, now reads"
            )
    files = [split.files[i] for i in kept]
    return CachedSplit(images, labels, files, list(meta["classes"]), list(skipped), entry, skipped)


def _trusted(
    entry: str, key: str, split: FolderSplit, channels: int, size: int, warn: bool
) -> CachedSplit | None:
    """_open_entry, None for an entry not trusted, with a warning when `warn` (under the lock,
    where it is rebuilt: an entry being replaced by another process is not worth one)."""
    try:
        return _open_entry(entry, key, split, channels, size)
    except Untrusted as e:
        if warn:
            log.warning("decoded cache %s is not trusted (%s); decoding it again", entry, e)
        return None


def _report_skipped(cached: CachedSplit, skip_bad: bool, fix: str | None) -> None:
    if not cached.skipped:
        return
    if not skip_bad:
        first = cached.skipped[0]
        raise BadImage(first, cached.reasons[first]).error(*[fix] if fix else [])
    n = len(cached.files) + len(cached.skipped)
    log.warning(
        "skipped %d unreadable image(s) of %d (data.skip_bad_images=true): %s%s",
        len(cached.skipped),
        n,
        ", ".join(cached.skipped[:5]),
        ", ..." if len(cached.skipped) > 5 else "",
    )


def load_split(
    split: FolderSplit,
    *,
    size: int,
    channels: int,
    cache_dir: str,
    workers: int | None = None,
    skip_bad: bool = False,
    fix: str | None = None,
    prune: bool = True,
) -> CachedSplit:
    """The split decoded (decode) into a memory-mapped uint8 (N, channels, size, size) array: from
    the cache entry of exactly these files, classes, size and channels when there is one, else
    decoded now over `workers` processes (None: one per core; 0 or 1: in this process) and
    stored. An unreadable file stops with a UserError naming it, or with skip_bad is left out,
    listed in one warning each time the split is loaded. `fix`: what that UserError tells the
    user to do (default: remove or replace it, or set data.skip_bad_images=true). `prune`: remove
    the entries this one replaces (the split's files changed); not for arbitrary file lists
    (cnnpredict's), several of which may share a folder."""
    mode = "L" if channels == 1 else "RGB"
    files = _file_list(split)
    key = _key(files, split.classes, size, mode)
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    entry = os.path.join(cache_dir, key)
    cached = _trusted(
        entry, key, split, channels, size, warn=False
    )  # no lock: entries appear whole
    if cached is None:
        cache_dir = _make_cache_dir(cache_dir)
        try:
            with _locked(entry + ".lock"):
                cached = _trusted(
                    entry, key, split, channels, size, warn=True
                )  # built while we waited?
                if cached is None:
                    _remove_stale_temps(cache_dir)
                    cached = _build(split, files, key, entry, mode, size, workers, skip_bad, fix)
                    if prune:
                        _prune(cache_dir, key, split.root, split.classes, size, mode)
                    _report_skipped(cached, skip_bad, fix)
                    return cached
        except OSError as e:
            raise _unusable(cache_dir, e) from None
    log.info("reusing decoded cache %s (%d images of %s)", entry, len(cached.files), split.root)
    _report_skipped(cached, skip_bad, fix)
    return cached


def _build(
    split: FolderSplit,
    files,
    key: str,
    entry: str,
    mode: str,
    size: int,
    workers: int | None,
    skip_bad: bool,
    fix: str | None,
) -> CachedSplit:
    """The split decoded into a fresh temp folder beside `entry`, proved to read back, then
    renamed over `entry`: an entry appears whole or not at all."""
    cache_dir = os.path.dirname(entry)
    channels = 1 if mode == "L" else 3
    tmp = tempfile.mkdtemp(prefix=_temp_prefix(), dir=cache_dir)
    try:
        start = time.perf_counter()
        bad = _decode_into(tmp, split, channels, mode, size, workers, skip_bad, fix)
        keep = [i for i in range(len(split.files)) if i not in bad]
        digests = _write_labels(tmp, split, keep)
        # stated again now that all is decoded: a file written meanwhile may have given its new
        # pixels, or its old ones, to an entry keyed by its old stats
        changed = [now[0] for now, then in zip(_stat_rows(split), files) if now != then]
        elapsed = time.perf_counter() - start
        meta = _entry_meta(key, split, files, keep, bad, size, mode, digests, elapsed)
        _write_json(os.path.join(tmp, "meta.json"), meta)  # last: what makes the entry trusted
        _fsync(tmp)
        cached = _read_back(tmp, key, split, channels, size)
        if changed:
            log.warning(
                "decoded cache %s not stored: %s changed while being decoded (the next run "
                "decodes the folder again)",
                entry,
                ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else ""),
            )
            return cached
        _put_in_place(tmp, entry)
        cached.path = entry
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed
    n = len(split.files)
    log.info(
        "decoded %d images of %s in %.1f s (%.0f img/s) into %s",
        n,
        split.root,
        elapsed,
        n / max(elapsed, 1e-9),
        entry,
    )
    return cached


def _put_in_place(tmp: str, entry: str) -> None:
    """The built entry renamed to its key, over the one there, and the rename flushed."""
    if os.path.exists(entry):  # not trusted (checked under the lock): replace it
        shutil.rmtree(entry)
    os.replace(tmp, entry)
    _fsync(os.path.dirname(entry))


def _write_labels(tmp: str, split: FolderSplit, keep: list[int]) -> dict[str, str]:
    """The kept rows' labels beside the decoded images, both flushed to disk; -> each array's
    digest, which meta.json records so that a later load can prove the arrays unchanged."""
    np.save(os.path.join(tmp, "labels.npy"), np.asarray(split.labels, dtype=np.int64)[keep])
    digests = {}
    for name in ARRAYS:
        _fsync(os.path.join(tmp, name))
        digests[name] = file_digest(os.path.join(tmp, name))
    return digests


def _entry_meta(
    key: str,
    split: FolderSplit,
    files,
    keep: list[int],
    bad: dict[int, str],
    size: int,
    mode: str,
    digests: dict[str, str],
    elapsed: float,
) -> dict:
    """An entry's meta.json: what it was built from and holds, which _open_entry checks."""
    return {
        "format": FORMAT,
        "key": key,
        "root": split.root,
        "classes": split.classes,
        "files": [files[i][0] for i in keep],
        "skipped": [[files[i][0], reason] for i, reason in sorted(bad.items())],
        "size": size,
        "channels": 1 if mode == "L" else 3,
        "mode": mode,
        "digest": DIGEST,
        "digests": digests,
        "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(elapsed, 3),
    }


def _read_back(tmp: str, key: str, split: FolderSplit, channels: int, size: int) -> CachedSplit:
    """The entry just written, opened before the rename: the memory map follows the file,
    whatever happens to the name. One that does not read back is an OSError (unusable cache)."""
    try:
        return _open_entry(tmp, key, split, channels, size, verify=False)
    except Untrusted as e:
        raise OSError(f"the entry just written in {tmp} does not read back ({e})") from None


def _decode_into(
    tmp: str,
    split: FolderSplit,
    channels: int,
    mode: str,
    size: int,
    workers: int | None,
    skip_bad: bool,
    fix: str | None,
) -> dict[int, str]:
    """Every file decoded into tmp/images.npy; -> {row: reason} of the unreadable ones, left
    out (skip_bad), else a UserError naming the first."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    npy = os.path.join(tmp, "images.npy")
    # preallocated, so that every worker writes its rows in place
    _new_npy(npy, (len(split.files), channels, size, size))
    bad = _decode_all(split.files, npy, mode, size, workers, not skip_bad, f"decoding {split.root}")
    if bad and not skip_bad:
        row, reason = next(iter(bad.items()))
        raise BadImage(split.files[row], reason).error(*[fix] if fix else [])
    if bad:
        _drop_rows(npy, [i for i in range(len(split.files)) if i not in bad])
    return bad


def _new_npy(path: str, shape: tuple) -> np.memmap:
    """A uint8 .npy of `shape` memory-mapped for writing, its blocks allocated now: on a full disk
    (or tmpfs) the sparse file numpy makes fails in the first write through the map with a
    SIGBUS, which kills a build without a word, or a decoding process, whose pool then waits
    for it forever; allocated, it fails here with ENOSPC."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    if hasattr(os, "posix_fallocate"):  # not on macOS
        with open(path, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # a filesystem without it
                    raise
    return out


def _drop_rows(npy: str, keep: list[int], chunk: int = 1024) -> None:
    """Rewrite npy with only the rows `keep` (the readable images), a chunk at a time."""
    src = np.load(npy, mmap_mode="r")
    out_path = npy + ".kept.npy"
    out = _new_npy(out_path, (len(keep), *src.shape[1:]))
    for i in range(0, len(keep), chunk):
        out[i : i + chunk] = src[keep[i : i + chunk]]
    out.flush()
    del src, out
    os.replace(out_path, npy)


def _prune(cache_dir: str, key: str, root: str, classes: list[str], size: int, mode: str) -> None:
    """Remove the entries of the same split folder, classes, size and mode under another key:
    built from files since changed, added or removed, they would never be used again (a run
    still reading one keeps its memory map: the data goes when it closes it)."""
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        if name == key or name.startswith("tmp-") or not os.path.isdir(path):
            continue
        try:
            meta = _read_json(os.path.join(path, "meta.json"))
        except (OSError, ValueError):
            continue  # not an entry, or one being replaced: leave it
        if isinstance(meta, dict) and (
            meta.get("root"),
            meta.get("classes"),
            meta.get("size"),
            meta.get("mode"),
        ) == (root, classes, size, mode):
            log.debug("removing cache entry %s: its files have changed", path)
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- statistics


def measure_mean_std(images: np.ndarray, max_images: int = 10000):
    """Channel mean/std (values 0..1, rounded to 4 digits) over up to max_images evenly spaced
    images of a uint8 (N, C, H, W) array, read a chunk at a time (it may be a large memory map)."""
    if len(images) == 0:
        raise UserError(
            "no readable image to measure mean/std; check the files or set data.mean= and data.std="
        )
    step = max(1, len(images) // max_images)
    channels = images.shape[1]
    chunk = max(1, 4_000_000 // images[0].size)  # images per read: ~32 MB as float64
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    count = 0
    for start in range(0, len(images), step * chunk):
        x = np.asarray(images[start : start + step * chunk : step], dtype=np.float64) / 255
        total += x.sum((0, 2, 3))
        total_sq += np.square(x).sum((0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]
