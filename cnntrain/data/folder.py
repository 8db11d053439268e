"""Image folders: <root>/train/<class>/..., optional <root>/val/ and <root>/test/: which files are
images of which class, and how one file becomes pixels (data/cache.py decodes them once)."""

from __future__ import annotations

import logging
import os
import stat
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS

from cnntrain.errors import UserError

log = logging.getLogger("cnntrain")

# What PIL raises on a file that is not a decodable image: garbage (UnidentifiedImageError, an
# OSError), truncated data (OSError), broken chunks (SyntaxError, struct.error, EOFError),
# absurd sizes (DecompressionBombError), files gone or unreadable since the scan (OSError).
DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)


def walk_files(top: str, wanted, loops: list[str]) -> list[tuple[str, str, str | None]]:
    """(path, real path, the last symbolic link on its way or None) of every file below top whose
    name is `wanted`, in os.walk's sorted order. Dot-names (.ipynb_checkpoints/, .DS_Store, ._x.jpg:
    editor, notebook and OS litter) are skipped. Symbolic links are followed, since data is often
    linked in, but no real folder is walked twice and a link to a folder at or above itself (a
    loop, which os.walk(followlinks=True) follows until the path is too long) goes into `loops`."""
    files, seen = [], set()
    stack = [(top, os.path.realpath(top), top if os.path.islink(top) else None)]
    while stack:
        path, real, link = stack.pop()
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:  # an unreadable folder is left out, as os.walk does
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                target = os.path.realpath(e.path) if e.is_symlink() else os.path.join(real, e.name)
                if e.is_symlink() and (real + os.sep).startswith(target.rstrip(os.sep) + os.sep):
                    loops.append(e.path)
                else:
                    subdirs.append((e.path, target, e.path if e.is_symlink() else link))
            elif wanted(e.name):  # dangling links too: reported as unreadable images later
                files.append(
                    (e.path, os.path.realpath(e.path), e.path)
                    if e.is_symlink()
                    else (e.path, os.path.join(real, e.name), link)
                )
        stack += reversed(subdirs)
    return sorted(files, key=lambda f: (os.path.dirname(f[0]), os.path.basename(f[0])))


def _class_holding(real: str, class_reals: dict[str, str]) -> str | None:
    """The class whose (real) folder is the nearest one above the real file `real`."""
    parent = os.path.dirname(real)
    while parent not in class_reals and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    return class_reals.get(parent)


def list_images(directory: str, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """(path, class index) of the images of a split (walk_files: links followed, no loops), each
    real file once. A file reached from two class folders would be labelled twice: a UserError."""
    folders = {c: os.path.join(directory, c) for c in class_to_idx}
    class_reals = {os.path.realpath(p): c for c, p in folders.items()}
    owner: dict[str, tuple[str, str]] = {}  # real file -> (class, path) that read it first
    samples, loops = [], []
    for c, folder in folders.items():
        for path, real, link in walk_files(
            folder, lambda name: name.lower().endswith(IMG_EXTENSIONS), loops
        ):
            held_by = _class_holding(real, class_reals)
            if held_by not in (None, c):
                if link:
                    raise UserError(
                        f"symbolic link {link} points into class folder {folders[held_by]}, so "
                        f"{path} would be labelled {c}; remove the link or move the images"
                    )
                raise UserError(
                    f"class folders {folder} and {folders[held_by]} share images ({path}) "
                    "through symbolic links; make them separate folders"
                )
            if real in owner:
                if owner[real][0] != c:
                    raise UserError(
                        f"{path} and {owner[real][1]} are the same file ({real}) in two "
                        "class folders (symbolic links); keep it in one class"
                    )
                continue  # the same file twice in one class (a link to it): read once
            owner[real] = (c, path)
            samples.append((path, class_to_idx[c]))
    if loops:
        log.warning(
            "%s: not following %d symbolic link(s) to a folder above them (a loop): %s%s",
            directory,
            len(loops),
            ", ".join(loops[:3]),
            ", ..." if len(loops) > 3 else "",
        )
    return samples


# Transparent pixels are shown on white: what an image viewer shows, and what the stored colour
# under them (often black, or anything) is not.
BACKGROUND = (255, 255, 255)
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def to_mode(img: Image.Image, mode: str = "RGB") -> Image.Image:
    """img as `mode` (RGB, or L for gray models): the one conversion of training, mean/std and
    cnnpredict/cnnviz. PIL's own convert clips 16-bit and float values to 0..255 (a 16-bit image
    turns almost white, a 0..1 float one black) and drops transparency (showing the colour stored
    under it), so: 16-bit (I;16*, and I as PNG/PGM give it) is scaled by 1/256, float F is read as
    0..1, and transparency is composited over BACKGROUND."""
    if img.mode.startswith("I"):
        img = Image.fromarray(
            (np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        )
    elif img.mode == "F":
        img = Image.fromarray(
            (np.clip(np.nan_to_num(np.asarray(img)), 0, 1) * 255 + 0.5).astype(np.uint8)
        )
    elif (
        img.mode in ALPHA_MODES or "transparency" in img.info
    ):  # or a transparent palette entry/colour
        img = Image.alpha_composite(Image.new("RGBA", img.size, BACKGROUND), img.convert("RGBA"))
    return img.convert(mode)


def image_mode(img: Image.Image) -> str:
    """The mode a mixed-modes warning names: PIL's, and whether the file is transparent."""
    return img.mode + (" with transparency" if "transparency" in img.info else "")


def log_mixed_modes(
    split_root: str, counts: dict[str, int], examples: dict[str, str], target: str = "RGB"
) -> None:
    """The mixed-modes warning of a split from its mode counts and the first file of each mode;
    nothing when the split has one mode. `target`: the mode all are converted to."""
    if len(counts) < 2:
        return
    order = sorted(counts, key=lambda m: -counts[m])
    top = os.path.dirname(split_root)
    shown = [os.path.relpath(examples[m], top) for m in order[1:4]]
    notes = [
        note
        for note, hit in (
            ("16-bit scaled to 8-bit", any(m.startswith("I") for m in counts)),
            ("float read as 0..1", "F" in counts),
            (
                "transparent pixels on white",
                any(m in ALPHA_MODES or "transparency" in m for m in counts),
            ),
        )
        if hit
    ]
    log.warning(
        "%s/ mixes image modes: %s (e.g. %s); all are converted to %s%s",
        os.path.relpath(split_root, top),
        ", ".join(f"{m} {counts[m]}" for m in order),
        ", ".join(shown),
        target,
        f" ({', '.join(notes)})" if notes else "",
    )


@dataclass(frozen=True)
class BadImage:
    """What decoding gives in place of an image it cannot decode. A value rather than an
    exception: an exception raised in a decoding process reaches the main process as a
    multi-line traceback text, while this arrives intact, whatever num_workers is."""

    path: str
    reason: str

    def error(
        self, fix: str = "remove or replace it, or set data.skip_bad_images=true"
    ) -> UserError:
        return UserError(f"image {self.path} cannot be read ({self.reason}); {fix}")


def class_folders(directory: str) -> list[str]:
    """The sorted class names of a split folder: its sub-folders, hidden ones left out."""
    classes = sorted(
        e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith(".")
    )
    if not classes:
        raise UserError(
            f"{directory}: no class folders in {directory}; expected one sub-folder of "
            "images per class"
        )
    return classes


def class_samples(directory: str, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """list_images, with every class folder that has no image named in one UserError."""
    samples = list_images(directory, class_to_idx)
    found = {target for _, target in samples}
    empty = [os.path.join(directory, name) for name, i in class_to_idx.items() if i not in found]
    if empty:
        raise UserError(
            f"class folder{'s' if len(empty) > 1 else ''} {', '.join(empty)} "
            f"{'have' if len(empty) > 1 else 'has'} no images "
            f"({' '.join(IMG_EXTENSIONS)}); add images or remove the folder"
        )
    return samples


KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


def open_file(path: str, follow: bool = True):
    """path opened for binary reading, or an OSError saying why not when it is not a regular file:
    reading a FIFO waits for a writer forever and a device node (/dev/zero) streams forever.
    O_NONBLOCK lets a FIFO be opened (and refused) without a writer; it changes nothing for a
    regular file. follow=False: a symbolic link is refused too."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW))
    kind = stat.S_IFMT(os.fstat(fd).st_mode)
    if kind != stat.S_IFREG:
        os.close(fd)
        raise OSError(f"not a regular file but {KINDS.get(kind, 'a special file')}")
    return os.fdopen(fd, "rb")


# open_image refuses what PIL only warns about (a two-line Python warning on stderr, once per
# decoding process): the warning would say less than the bad image's one line
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def open_image(f) -> Image.Image:
    """Image.open of an open file, refusing (DecompressionBombError) an image over PIL's
    Image.MAX_IMAGE_PIXELS: PIL itself refuses only twice that and decodes the rest with a warning,
    a PNG of a few hundred KB taking hundreds of MB in each decoding process."""
    img = Image.open(f)
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        raise Image.DecompressionBombError(
            f"{img.width}x{img.height}: {img.width * img.height} pixels exceed PIL's decompression "
            f"bomb limit of {limit} (Image.MAX_IMAGE_PIXELS)"
        )
    return img


def read_image(path: str, mode: str = "RGB") -> Image.Image | BadImage:
    """The file decoded and converted by to_mode, or a BadImage saying why it cannot be. The
    first frame of an animated image; EXIF orientation is not applied (as torchvision and timm)."""
    try:
        with open_file(path) as f:
            return to_mode(open_image(f), mode)  # decodes the whole file: truncation fails here
    except DECODE_ERRORS as e:
        return BadImage(path, _reason(e, path))


def _reason(e: Exception, path: str) -> str:
    if isinstance(e, UnidentifiedImageError):  # its text repeats the path as a file object repr
        return "empty file" if os.path.getsize(path) == 0 else "not an image format PIL can decode"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def split_folder(root: str, split: str, required: bool = False) -> str | None:
    """root/split, or None when that folder does not exist (a UserError when it is required)."""
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        if required:
            raise UserError(
                f"image folder {path} not found: expected {root}/{split}/<class>/<image> "
                "(set data.root= to a folder with train/ and optional val/, test/)"
            )
        return None
    return path


def check_same_classes(expected: list[str], found: list[str], where: str) -> None:
    if list(found) != list(expected):
        raise UserError(
            f"class folders in {where} differ from the others: "
            f"expected {list(expected)}, found {list(found)}"
        )
