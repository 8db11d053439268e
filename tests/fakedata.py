"""Tiny datasets written in the real on-disk formats (IDX, CIFAR python pickles, PNG/JPEG image
folders), read back by the same torchvision code as the real ones. Each class has its own
bright square plus noise, so a small CNN learns them in an epoch or two."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def make_images(n: int, num_classes: int, size: int, channels: int, seed: int):
    """uint8 (n, size, size, channels) images and int labels (every class equally often)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    images = rng.integers(0, 60, (n, size, size, channels), dtype=np.uint8)
    cell = max(2, size // 6)
    for i, c in enumerate(labels):
        r, col = divmod(int(c) % 16, 4)  # one of 16 positions in a 4x4 grid
        y, x = size // 8 + r * (size // 5), size // 8 + col * (size // 5)
        images[i, y : y + cell, x : x + cell, :] = 140 + (int(c) // 16) * 18
    return images, labels.astype(np.int64)


def make_color_images(n: int, num_classes: int, size: int, channels: int, seed: int):
    """As make_images, but each class is a colour (channels x 3 levels: 27 for RGB), painted as
    a square at a random place: classes a translation-invariant network (global pooling, no
    position left, as airbench94) tells apart at once."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    images = rng.integers(0, 60, (n, size, size, channels), dtype=np.uint8)
    cell = max(2, size // 4)
    for i, c in enumerate(labels):
        colour = [(80, 160, 240)[(int(c) // 3**k) % 3] for k in range(channels)]
        y, x = rng.integers(0, size - cell + 1, 2)
        images[i, y : y + cell, x : x + cell, :] = colour
    return images, labels.astype(np.int64)


def write_idx(path: Path, array: np.ndarray) -> None:
    # IDX: zero bytes, type code 0x08 (ubyte), number of dims, big-endian dims, raw bytes
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 400, n_test: int = 200) -> Path:
    """root/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (folder MNIST or FashionMNIST)."""
    train, test = (make_images(n, 10, 28, 1, seed) for n, seed in ((n_train, 0), (n_test, 1)))
    return write_idx_dataset(root, folder, (train[0][..., 0], train[1]), (test[0][..., 0], test[1]))


def write_idx_dataset(root: Path, folder: str, train, test) -> Path:
    """Given (images uint8 (N, 28, 28), labels) for train and test, the IDX files of an
    MNIST-like dataset under root/<folder>/raw."""
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, (images, labels) in (("train", train), ("t10k", test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return Path(root)


def write_pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar(
    root: Path, num_classes: int = 10, n_train: int = 500, n_test: int = 200, make=make_images
) -> Path:
    """CIFAR-10 (5 data batches + test_batch + batches.meta) or CIFAR-100 (train, test, meta),
    images drawn by `make` (make_images or make_color_images)."""

    def rows(images):  # CIFAR stores each image as 1024 R, then 1024 G, then 1024 B bytes
        return images.transpose(0, 3, 1, 2).reshape(len(images), -1)

    train = make(n_train, num_classes, 32, 3, 0)
    test = make(n_test, num_classes, 32, 3, 1)
    if num_classes == 10:
        base = Path(root) / "cifar-10-batches-py"
        base.mkdir(parents=True, exist_ok=True)
        for b, idx in enumerate(np.array_split(np.arange(n_train), 5), 1):
            write_pickle(
                base / f"data_batch_{b}",
                {"data": rows(train[0][idx]), "labels": train[1][idx].tolist()},
            )
        write_pickle(base / "test_batch", {"data": rows(test[0]), "labels": test[1].tolist()})
        write_pickle(base / "batches.meta", {"label_names": CIFAR10_CLASSES})
    else:
        base = Path(root) / "cifar-100-python"
        base.mkdir(parents=True, exist_ok=True)
        for name, (images, labels) in (("train", train), ("test", test)):
            write_pickle(
                base / name,
                {
                    "data": rows(images),
                    "fine_labels": labels.tolist(),
                    "coarse_labels": (labels // 5).tolist(),
                },
            )
        write_pickle(
            base / "meta", {"fine_label_names": [f"class{i:02d}" for i in range(num_classes)]}
        )
    return Path(root)


def write_image_folder(
    root: Path, classes=("cat", "dog", "fox"), per_class: dict | None = None, size: int = 48
) -> Path:
    """root/{train,val,test}/<class>/*.png|jpg (mixed formats, sizes and modes, as real folders are)."""
    from PIL import Image

    per_class = per_class or {"train": 30, "val": 8, "test": 10}
    for s, (split, n) in enumerate(per_class.items()):
        images, labels = make_images(n * len(classes), len(classes), size, 3, seed=10 + s)
        for i, (img, c) in enumerate(zip(images, labels)):
            folder = Path(root) / split / classes[c]
            folder.mkdir(parents=True, exist_ok=True)
            pic = Image.fromarray(img)
            if i % 3 == 0:
                pic.resize((size + 16, size + 8)).save(folder / f"{i:04d}.jpg", quality=95)
            elif i % 3 == 1:
                pic.convert("L").save(folder / f"{i:04d}.png")
            else:
                pic.save(folder / f"{i:04d}.png")
    return Path(root)


def export_folder(
    images,
    labels,
    classes,
    dest,
    split: str,
    fmt: str = "png",
    size: int | None = None,
    rgb: bool = False,
) -> Path:
    """Write uint8 images (N, H, W) gray, or (N, H, W, 3)) as dest/<split>/<class>/<index>.<fmt>
    (png or jpg): a real dataset laid out as an image folder. size: resized to size x size
    (bicubic); rgb: gray images stored as RGB, as photos of gray things often are."""
    from PIL import Image

    images = np.asarray(images)
    labels = np.asarray(labels)
    for c in sorted(set(labels.tolist())):
        (Path(dest) / split / classes[c]).mkdir(parents=True, exist_ok=True)
    for i, (img, c) in enumerate(zip(images, labels.tolist())):
        pic = Image.fromarray(img)
        if size is not None and pic.size != (size, size):
            pic = pic.resize((size, size), Image.BICUBIC)
        if rgb:
            pic = pic.convert("RGB")
        options = {"quality": 95} if fmt == "jpg" else {}
        pic.save(Path(dest) / split / classes[c] / f"{i:05d}.{fmt}", **options)
    return Path(dest)
