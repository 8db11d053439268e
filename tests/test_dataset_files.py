"""Built-in dataset files that disagree with each other, are damaged, are not regular files or
would run code are refused at load with one line naming the file(s) and the fix."""

import contextlib
import os
import pickle
import signal
import struct

import numpy as np
import pytest
from fakedata import write_cifar, write_idx, write_mnist, write_pickle

from cnntrain.data.builtin import load_builtin
from cnntrain.errors import UserError


@contextlib.contextmanager
def no_hang(seconds=10):
    """A FIFO opened for reading blocks until a writer comes: fail instead of hanging the suite."""

    def expired(*_):
        raise TimeoutError(f"still loading after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def refused(name, root, *needles, train=True):
    """The one-line message of loading `name` from `root`, which must name every needle."""
    with no_hang(), pytest.raises(UserError) as info:
        load_builtin(name, str(root), train=train, download=False)
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert str(needle) in message, (needle, message)
    return message


@pytest.fixture
def raw(tmp_path):
    write_mnist(tmp_path, "MNIST", n_train=30, n_test=10)
    return tmp_path / "MNIST" / "raw"


def idx(type_code, dims, body=b""):
    return (
        struct.pack(">HBB", 0, type_code, len(dims)) + struct.pack(f">{len(dims)}I", *dims) + body
    )


IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
PIXELS = np.zeros((30, 28, 28), np.uint8)
DIGITS = np.arange(30) % 10


@pytest.mark.parametrize(
    "broken, content, needle",
    [
        (LABELS, DIGITS[:29], "30 images but"),
        (LABELS, np.arange(31) % 10, "31 labels"),
        (LABELS, np.r_[DIGITS[:29], 10], "label 10"),
        (LABELS, np.r_[DIGITS[:29], 255], "label 255"),
    ],
)
def test_idx_files_that_disagree_name_both_files(raw, broken, content, needle):
    write_idx(raw / broken, content)
    message = refused("mnist", raw.parent.parent, raw / IMAGES, raw / LABELS, needle)
    assert "download again" in message


@pytest.mark.parametrize(
    "content, needle",
    [
        (lambda data: data[:1000], "bytes"),  # truncated
        (lambda data: data + b"\0", "bytes"),  # a byte too many
        (
            lambda data: idx(0x08, (2**31, 28, 28), data[16:]),
            "2147483648",
        ),  # a header claiming 2^31 images
        (lambda data: idx(0x0C, (30, 28, 28), data[16:] * 4), "int32"),  # another element type
        (lambda data: b"\x89PNG\r\n\x1a\n" + data[8:], "not an IDX file"),
        (lambda data: b"", "not an IDX file"),
        (np.zeros((30, 27, 28), np.uint8), "27x28"),
        (np.zeros(30 * 784, np.uint8), "1 dimension"),
    ],
)
def test_damaged_idx_file_is_named(raw, content, needle):
    path = raw / IMAGES
    if callable(content):
        path.write_bytes(content(path.read_bytes()))
    else:
        write_idx(path, content)
    message = refused("mnist", raw.parent.parent, path, needle)
    assert "download again" in message


def test_labels_in_two_dimensions_are_named(raw):
    write_idx(raw / LABELS, np.zeros((30, 1), np.uint8))
    refused("mnist", raw.parent.parent, raw / LABELS, "2 dimensions")


def test_fashion_mnist_is_checked_too(tmp_path):
    write_mnist(tmp_path, "FashionMNIST", n_train=30, n_test=10)
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(9) % 10)
    refused(
        "fashion_mnist",
        tmp_path,
        raw / "t10k-images-idx3-ubyte",
        raw / "t10k-labels-idx1-ubyte",
        "10 images but",
        train=False,
    )


@pytest.fixture
def bundled_copy(tmp_path, monkeypatch):
    import dataclasses
    import shutil

    from cnntrain.data import builtin

    copy_dir = tmp_path / "fashion_mnist_mini"
    shutil.copytree(builtin.BUNDLED, copy_dir)
    spec = dataclasses.replace(builtin.BUILTIN["fashion_mnist_mini"], folder=str(copy_dir))
    monkeypatch.setitem(builtin.BUILTIN, "fashion_mnist_mini", spec)
    return copy_dir


def test_bundled_sample_with_too_few_labels_says_reinstall(bundled_copy):
    import gzip

    labels = bundled_copy / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx(0x08, (999,), bytes(999))))
    refused(
        "fashion_mnist_mini",
        "",
        bundled_copy / "t10k-images-idx3-ubyte.gz",
        labels,
        "1000 images but",
        "reinstall cnntrain",
        train=False,
    )


def test_bundled_gzip_bomb_is_bounded(bundled_copy):
    import gzip

    # 4 GiB of zeros in 4 MB: 256 gzip members of 16 MiB each, which gzip reads as one stream
    bomb = gzip.compress(bytes(1 << 24), compresslevel=9) * 256
    (bundled_copy / "t10k-images-idx3-ubyte.gz").write_bytes(bomb)
    refused(
        "fashion_mnist_mini",
        "",
        bundled_copy / "t10k-images-idx3-ubyte.gz",
        "larger than",
        "reinstall cnntrain",
        train=False,
    )


# ---- CIFAR -------------------------------------------------------------------------------------


@pytest.fixture
def cifar(tmp_path):
    write_cifar(tmp_path, 10, n_train=50, n_test=20)
    return tmp_path / "cifar-10-batches-py"


def batch(n=10, **entries):
    return {"data": np.zeros((n, 3072), np.uint8), "labels": list(range(n)), **entries}


@pytest.mark.parametrize(
    "entry, needle",
    [
        (batch(data=np.zeros((9, 3072), np.uint8)), "9 images but 10 labels"),
        (batch(data=np.zeros((10, 3000), np.uint8)), "3000"),
        (batch(data=np.zeros((10, 3072), np.float32)), "float32"),
        (batch(labels=[0] * 9 + [10]), "label 10"),
        (batch(labels=[0] * 9 + [-1]), "label -1"),
        (batch(labels=["cat"] * 10), "str"),
        (batch(labels=[0.0] * 10), "float"),
        (batch(labels=[True] * 10), "bool"),
        (batch(labels=np.zeros(10)), "float64"),
        ({"data": np.zeros((10, 3072), np.uint8)}, "no 'labels'"),
        ([1, 2, 3], "not a dict"),
    ],
)
def test_cifar_batch_that_disagrees_names_the_batch_and_meta(cifar, entry, needle):
    write_pickle(cifar / "data_batch_2", entry)
    message = refused("cifar10", cifar.parent, cifar / "data_batch_2", needle)
    assert "download again" in message
    if "label " in needle:
        assert str(cifar / "batches.meta") in message


def test_cifar_rows_as_lists_are_read(cifar):
    write_pickle(cifar / "data_batch_2", batch(data=[[7] * 3072 for _ in range(10)]))
    images, labels, _ = load_builtin("cifar10", str(cifar.parent), train=True, download=False)
    assert images.shape == (50, 3, 32, 32) and int(images[10:20].min()) == 7 == int(
        images[10:20].max()
    )


def test_cifar_rows_as_a_list_larger_than_the_file_are_refused(cifar):
    # memo references let a small pickle name one row a million times: 3 GB from 2 MB
    row = [0] * 3072
    write_pickle(cifar / "data_batch_2", {"data": [row] * 1_000_000, "labels": [0] * 1_000_000})
    refused("cifar10", cifar.parent, cifar / "data_batch_2", "more pixels than")


@pytest.mark.parametrize(
    "names, needle",
    [
        (["a", "b", "c"], "3 class names"),
        ([f"c{i}" for i in range(9)] + [3], "int"),
        (["a"] * 10, "twice"),
        ("airplane", "not a list"),
    ],
)
def test_cifar_meta_that_disagrees_is_named(cifar, names, needle):
    write_pickle(cifar / "batches.meta", {"label_names": names})
    refused("cifar10", cifar.parent, cifar / "batches.meta", needle)


def test_cifar_class_names_are_data_whatever_they_hold(cifar):
    names = [f"odd|name\n{i}" for i in range(10)]
    write_pickle(cifar / "batches.meta", {"label_names": names})
    assert load_builtin("cifar10", str(cifar.parent), train=True, download=False)[2] == names


def test_cifar100_fine_labels_are_checked_against_fine_label_names(tmp_path):
    write_cifar(tmp_path, 100, n_train=200, n_test=100)
    base = tmp_path / "cifar-100-python"
    write_pickle(
        base / "test",
        {
            "data": np.zeros((3, 3072), np.uint8),
            "fine_labels": [0, 5, 100],
            "coarse_labels": [0, 1, 2],
        },
    )
    refused(
        "cifar100",
        tmp_path,
        base / "test",
        base / "meta",
        "label 100",
        "100 class names",
        train=False,
    )


class _Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.mark.parametrize("where", ["data_batch_1", "batches.meta"])
def test_a_cifar_pickle_never_runs_code(cifar, tmp_path, where):
    marker = tmp_path / "pwned"
    write_pickle(cifar / where, {**batch(), "data": _Touch(marker), "label_names": _Touch(marker)})
    refused("cifar10", cifar.parent, cifar / where, "system")
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, needle",
    [
        (lambda data: data[: len(data) // 2], "truncated"),
        (lambda data: b"\0garbage" * 50, "not a CIFAR"),
        (lambda data: pickle.dumps(np.zeros((3, 2)).T, protocol=5), "not a dict"),
    ],
)
def test_damaged_cifar_pickle_is_named(cifar, content, needle):
    path = cifar / "test_batch"
    path.write_bytes(content(path.read_bytes()))
    refused("cifar10", cifar.parent, path, needle, train=False)


def test_cifar_numpy_pickles_of_python_2_are_read(cifar):
    # The real files were written by Python 2's cPickle: str, not bytes, holds the array's buffer
    # (protocol 2 BINSTRING), under numpy.core.multiarray._reconstruct
    rows = np.arange(10 * 3072, dtype=np.uint8).reshape(10, 3072)
    buffer = rows.tobytes()
    py2 = (
        b"\x80\x02}q\x00(U\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\nq\x03"
        b"K\x00\x85U\x01b\x87Rq\x04(K\x01K\nM\x00\x0c\x86cnumpy\ndtype\nq\x05U\x02u1K\x00K\x01\x87Rq\x06"
        b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T"
        + struct.pack("<I", len(buffer))
        + buffer
        + b"tbU\x06labelsq\x07]q\x08("
        + b"".join(b"K" + bytes([i]) for i in range(10))
        + b"eu."
    )
    assert pickle.loads(py2, encoding="latin1")["data"].tolist() == rows.tolist()  # a valid pickle
    (cifar / "data_batch_3").write_bytes(py2)
    images, labels, _ = load_builtin("cifar10", str(cifar.parent), train=True, download=False)
    assert images[20:30].reshape(10, -1).tolist() == rows.tolist() and labels[
        20:30
    ].tolist() == list(range(10))


# ---- files that are not regular files -------------------------------------------------------


def _fifo(path):
    path.unlink()
    os.mkfifo(path)
    return "a FIFO"


def _dev_zero(path):
    path.unlink()
    path.symlink_to("/dev/zero")
    return "a character device"


def _loop(path):
    path.unlink()
    path.symlink_to(path.name)
    return "symbolic link"


def _folder(path):
    path.unlink()
    path.mkdir()
    return "a folder"


@pytest.mark.parametrize("make", [_fifo, _dev_zero, _loop, _folder])
@pytest.mark.parametrize(
    "dataset, name",
    [
        ("mnist", "MNIST/raw/train-labels-idx1-ubyte"),
        ("cifar10", "cifar-10-batches-py/data_batch_3"),
        ("cifar10", "cifar-10-batches-py/batches.meta"),
    ],
)
def test_a_dataset_file_that_is_not_a_regular_file_is_named(tmp_path, make, dataset, name):
    write_mnist(tmp_path, "MNIST", n_train=30, n_test=10)
    write_cifar(tmp_path, 10, n_train=50, n_test=20)
    path = tmp_path / name
    kind = make(path)
    message = refused(dataset, tmp_path, path, kind)
    assert "not a regular file" in message or "symbolic link" in message


def test_inputs_that_are_not_regular_files_are_named(tmp_path):
    from PIL import Image

    from cnntrain.inference import find_images

    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    fifo = tmp_path / "b.png"
    os.mkfifo(fifo)
    for inputs in (fifo, tmp_path, str(tmp_path / "*.png"), str(tmp_path / "**")):
        with no_hang(), pytest.raises(UserError) as info:
            find_images(inputs)
        message = str(info.value)
        assert f"{fifo} is not a regular file (a FIFO)" in message and "\n" not in message, message
