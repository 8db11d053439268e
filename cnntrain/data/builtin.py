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
from torchvision.datasets.vision import VisionDataset

from cnntrain import distributed
from cnntrain.data.datafiles import (
    BadFile,
    check_idx_pair,
    check_regular,
    gunzip,
    read_cifar,
    read_idx,
)
from cnntrain.errors import UserError


class _CheckedCIFAR:
    """torchvision's CIFAR classes (folder layout, download, archive md5) with their loading
    replaced: torchvision unpickles the batches with plain pickle.load, which runs whatever
    code a crafted batch names, and takes any rows and labels; data.datafiles reads them with a
    restricted unpickler and checks them against each other and the meta file."""

    label_key = "labels"
    num_classes = 10

    def __init__(self, root, train: bool = True, download: bool = False) -> None:
        VisionDataset.__init__(self, root)
        self.train = train
        folder = os.path.join(self.root, self.base_folder)
        names = [name for name, _ in self.train_list + self.test_list] + [self.meta["filename"]]
        check_regular(
            os.path.join(folder, name) for name in names
        )  # before download's checks read them
        if download:
            self.download()
        if not self._check_integrity():
            raise RuntimeError(
                "Dataset not found or corrupted. You can use download=True to download it"
            )
        batches = [name for name, _ in (self.train_list if train else self.test_list)]
        self.data, self.targets, self.classes = read_cifar(
            folder,
            batches,
            self.meta["filename"],
            self.label_key,
            self.meta["key"],
            self.num_classes,
        )
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class _CIFAR10(_CheckedCIFAR, datasets.CIFAR10):
    # torchvision checks the md5 of every batch file, which rejects re-packed subsets and test
    # fixtures in the same format; None keeps the existence check. A download is still verified
    # through the archive's md5 (tgz_md5), and every file is checked when loading.
    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


class _CIFAR100(_CheckedCIFAR, datasets.CIFAR100):
    label_key = "fine_labels"
    num_classes = 100
    train_list = [[name, None] for name, _ in datasets.CIFAR100.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR100.test_list]
    meta = {**datasets.CIFAR100.meta, "md5": None}


class _CheckedIDX:
    """torchvision's MNIST-like classes with each split's files checked: regular files, headers
    that agree with the files' sizes, 28x28 images, as many labels as images, labels in range."""

    folder = "MNIST"  # torchvision's folder under root: its class's name, not this one's

    @property
    def raw_folder(self) -> str:
        return os.path.join(self.root, self.folder, "raw")

    @property
    def processed_folder(self) -> str:
        return os.path.join(self.root, self.folder, "processed")

    def _split_files(self) -> tuple[str, str]:
        prefix = "train" if self.train else "t10k"
        return (
            os.path.join(self.raw_folder, f"{prefix}-images-idx3-ubyte"),
            os.path.join(self.raw_folder, f"{prefix}-labels-idx1-ubyte"),
        )

    def _check_exists(self) -> bool:  # torchvision asks before downloading and before reading
        check_regular(
            os.path.join(self.raw_folder, os.path.basename(url).removesuffix(".gz"))
            for url, _ in self.resources
        )
        return super()._check_exists()

    def _load_data(self):
        images, labels = self._split_files()
        return self._checked(read_idx(images, 3), read_idx(labels, 1), images, labels)

    def _checked(self, images, labels, images_name, labels_name):
        check_idx_pair(images, labels, images_name, labels_name, len(self.classes))
        return images, labels

    def _load_legacy_data(self):
        # torchvision's own .pt files of old versions (processed/), read with weights_only
        path = os.path.join(
            self.processed_folder, self.training_file if self.train else self.test_file
        )
        try:
            images, labels = super()._load_legacy_data()
        except Exception as e:
            raise BadFile(f"{path} cannot be read ({type(e).__name__}: {e})") from None
        if not (
            isinstance(images, torch.Tensor)
            and images.dtype == torch.uint8
            and images.shape[1:] == (28, 28)
            and isinstance(labels, torch.Tensor)
            and labels.ndim == 1
            and not labels.is_floating_point()
        ):
            raise BadFile(f"{path} does not hold uint8 28x28 images and their labels")
        return self._checked(images, labels, path, path)


class _MNIST(_CheckedIDX, datasets.MNIST):
    pass


class _FashionMNIST(_CheckedIDX, datasets.FashionMNIST):
    folder = "FashionMNIST"


BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion_mnist_mini")
# the largest file of the full Fashion-MNIST (60,000 images): the sample's are smaller
_LARGEST_IDX = 16 + 60_000 * 28 * 28


class _FashionMNISTMini(_CheckedIDX, datasets.FashionMNIST):
    """A Fashion-MNIST sample as made by scripts/make_fashion_mnist_mini.py: gzipped IDX files
    directly in `root` (the package's BUNDLED). torchvision reads only uncompressed IDX files, so
    each is unpacked (bounded) into a temporary folder (a few ms) and read there by torchvision's
    own readers, with their format checks; `root` itself is never written to."""

    FILES = (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    )

    @property
    def raw_folder(self) -> str:
        return self.root

    @property
    def processed_folder(self) -> str:  # torchvision's legacy .pt files: never here
        return os.path.join(self.root, "processed")

    def _check_exists(self) -> bool:
        files = [os.path.join(self.root, f) for f in self.FILES]
        check_regular(files)
        return all(os.path.isfile(f) for f in files)

    def _load_data(self):
        images, labels = (f"{path}.gz" for path in self._split_files())
        with tempfile.TemporaryDirectory() as tmp:
            read = [
                read_idx(gunzip(gz, os.path.join(tmp, str(ndim)), _LARGEST_IDX), ndim, shown=gz)
                for gz, ndim in ((images, 3), (labels, 1))
            ]
            return self._checked(*read, images, labels)


@dataclass(frozen=True)
class _Spec:
    title: str
    cls: type
    folder: str  # where the files live under root (bundled: the absolute folder in the package)
    files: tuple[str, ...]
    shape: tuple[int, int, int]  # (channels, image size, classes), known without reading the files
    bundled: bool = False  # shipped inside the package: root and download do not apply


BUILTIN = {
    "mnist": _Spec(
        "MNIST",
        _MNIST,
        "MNIST/raw",
        (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        ),
        (1, 28, 10),
    ),
    "fashion_mnist": _Spec(
        "Fashion-MNIST",
        _FashionMNIST,
        "FashionMNIST/raw",
        (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        ),
        (1, 28, 10),
    ),
    "fashion_mnist_mini": _Spec(
        "Fashion-MNIST sample",
        _FashionMNISTMini,
        BUNDLED,
        _FashionMNISTMini.FILES,
        (1, 28, 10),
        bundled=True,
    ),
    "cifar10": _Spec(
        "CIFAR-10",
        _CIFAR10,
        "cifar-10-batches-py",
        ("data_batch_1", "...", "data_batch_5", "test_batch", "batches.meta"),
        (3, 32, 10),
    ),
    "cifar100": _Spec(
        "CIFAR-100", _CIFAR100, "cifar-100-python", ("train", "test", "meta"), (3, 32, 100)
    ),
}


def load_builtin(name: str, root: str, train: bool, download: bool):
    """Return (images uint8 (N,C,H,W), labels int64 (N,), class names) of one split. Under
    torchrun one process per machine reads (and downloads) first, and the others then read the
    files it put there: ranks downloading into one folder at once would corrupt each other's files."""
    return distributed.local_first(lambda: _load(name, root, train, download))


REINSTALL = (
    "the installation is damaged; reinstall cnntrain (pip install --force-reinstall cnntrain) "
    "or use another dataset, e.g. data=fashion_mnist"
)
REDOWNLOAD = (
    "replace them with the original files, or delete them and download again (data.download=true)"
)


def _load(name: str, root: str, train: bool, download: bool):
    spec = BUILTIN[name]
    where = os.path.join(os.path.abspath(root), spec.folder)
    files = ", ".join(spec.files)
    try:
        ds = spec.cls(spec.folder if spec.bundled else root, train=train, download=False)
    except BadFile as e:
        raise UserError(f"{e}: {REINSTALL if spec.bundled else REDOWNLOAD}") from None
    except Exception as e:
        if spec.bundled:  # a broken installation, not something data.root or a download can fix
            missing = [f for f in spec.files if not os.path.isfile(os.path.join(where, f))]
            problem = (
                f"lacks {', '.join(missing)}"
                if missing
                else f"cannot be read ({type(e).__name__}: {e})"
            )
            raise UserError(f"{spec.title} in {where} {problem}: {REINSTALL}") from None
        if "not found" not in str(e):  # what the checked readers do not foresee
            raise UserError(
                f"{spec.title} files in {where} could not be read ({type(e).__name__}: "
                f"{e}); delete them and download again"
            ) from None
        if not download:
            raise UserError(
                f"{spec.title} not found: expected {files} in {where} "
                "(set data.root=, or data.download=true to fetch it)"
            ) from None
        ds = _download(spec, root, train, f"put {files} into {where}")
    images = torch.as_tensor(ds.data)
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long), list(ds.classes)


def _download(spec: _Spec, root: str, train: bool, fix: str):
    log = io.StringIO()  # torchvision prints every failed mirror; keep that out of the console
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            return spec.cls(root, train=train, download=True)
    except BadFile as e:  # downloaded, and then refused by the checks
        raise UserError(f"{e}: {REDOWNLOAD}") from None
    except Exception as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(
            f"could not download {spec.title} ({reason}): {fix} (torchvision's "
            "layout), or set data.root= to where they are"
        ) from None
