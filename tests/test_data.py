"""Datasets read from files in their real formats through torchvision, and the batched pipeline."""

import copy

import pytest
import torch
from fakedata import write_image_folder, write_mnist
from omegaconf import OmegaConf

from cnntrain.data import build_data, stratified_split
from cnntrain.data.builtin import load_builtin
from cnntrain.errors import UserError

CPU = torch.device("cpu")


def data_cfg(name, root, **kw):
    base = dict(
        name=name,
        kind={"mnist": "digits", "fashion_mnist": "clothing"}.get(name, "natural"),
        root=str(root),
        download=False,
        batch_size=32,
        num_workers=0,
        val_split=0.1,
        image_size=None,
        mean=[0.5],
        std=[0.25],
    )
    if name.startswith("cifar"):
        base.update(mean=[0.5] * 3, std=[0.25] * 3)
    if name == "imagefolder":
        base.update(image_size=40, mean=None, std=None)
    return OmegaConf.create({**base, **kw})


def aug_cfg(name="basic"):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        return compose(config_name="train", overrides=[f"aug={name}"]).aug


@pytest.mark.parametrize(
    "name,shape,n_classes,n_train,n_test",
    [
        ("mnist", (1, 28, 28), 10, 400, 200),
        ("fashion_mnist", (1, 28, 28), 10, 400, 200),
        ("cifar10", (3, 32, 32), 10, 500, 200),
        ("cifar100", (3, 32, 32), 100, 600, 200),
    ],
)
def test_builtin_datasets_load_from_real_formats(
    data_root, name, shape, n_classes, n_train, n_test
):
    images, labels, classes = load_builtin(name, str(data_root), train=True, download=False)
    assert images.dtype == torch.uint8 and tuple(images.shape) == (n_train, *shape)
    assert labels.dtype == torch.long and len(classes) == n_classes
    assert set(labels.tolist()) == set(range(n_classes))
    test_images, _, _ = load_builtin(name, str(data_root), train=False, download=False)
    assert len(test_images) == n_test
    if name == "cifar10":
        assert classes[0] == "airplane"
    if name == "fashion_mnist":
        assert classes[0] == "T-shirt/top"


def test_fake_images_survive_the_format_round_trip(data_root):
    from fakedata import make_images

    expected, expected_labels = make_images(400, 10, 28, 1, 0)
    images, labels, _ = load_builtin("mnist", str(data_root), train=True, download=False)
    assert torch.equal(images[:, 0], torch.from_numpy(expected[..., 0]))
    assert labels.tolist() == expected_labels.tolist()
    expected, _ = make_images(500, 10, 32, 3, 0)
    images, _, _ = load_builtin("cifar10", str(data_root), train=True, download=False)
    assert torch.equal(images.permute(0, 2, 3, 1), torch.from_numpy(expected))


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_files_name_what_is_expected_where(tmp_path, name):
    with pytest.raises(UserError) as info:
        load_builtin(name, str(tmp_path), train=True, download=False)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path) in msg
    assert ("train-images-idx3-ubyte" if name == "mnist" else "data_batch_1") in msg


def test_impossible_download_ends_in_one_line(tmp_path, monkeypatch):
    from urllib.error import URLError

    import torchvision.datasets.mnist as tv_mnist

    def offline(url, *args, **kwargs):
        print("Downloading", url)  # what torchvision prints: must not reach the user
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    with pytest.raises(UserError) as info:
        load_builtin("mnist", str(tmp_path), train=True, download=True)
    msg = str(info.value)
    assert "\n" not in msg and "could not download MNIST" in msg
    assert str(tmp_path / "MNIST" / "raw") in msg and "t10k-labels-idx1-ubyte" in msg


def test_truncated_idx_file_is_reported(tmp_path):
    write_mnist(tmp_path, n_train=50, n_test=20)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match="train-images-idx3-ubyte holds 1000 bytes"):
        load_builtin("mnist", str(tmp_path), train=True, download=False)


def test_stratified_split_is_seeded_and_keeps_class_balance():
    labels = torch.arange(1000) % 4
    train, val = stratified_split(labels, 0.2, seed=3)
    assert len(val) == 200 and len(train) == 800
    assert torch.bincount(labels[val]).tolist() == [50] * 4
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert torch.equal(val, stratified_split(labels, 0.2, seed=3)[1])
    assert not torch.equal(val, stratified_split(labels, 0.2, seed=4)[1])


def test_build_data_split_sizes_and_normalization(data_root):
    data = build_data(data_cfg("mnist", data_root), aug_cfg("none"), device=CPU, seed=0)
    assert data.in_channels == 1 and data.image_size == 28 and len(data.classes) == 10
    assert data.loaders["train"].num_samples == 360 and data.loaders["val"].num_samples == 40
    x, y = next(iter(data.loaders["test"]))
    assert x.dtype == torch.float32 and x.shape == (32, 1, 28, 28) and y.shape == (32,)
    raw, _, _ = load_builtin("mnist", str(data_root), train=False, download=False)
    torch.testing.assert_close(x, (raw[:32].float() / 255 - 0.5) / 0.25)


def test_no_val_split_means_no_val_loader(data_root):
    data = build_data(data_cfg("cifar10", data_root, val_split=0.0), None, device=CPU, seed=0)
    assert "val" not in data.loaders and data.loaders["train"].num_samples == 500


@pytest.mark.parametrize("aug", ["none", "basic", "crop"])
def test_a_larger_image_size_keeps_native_storage_and_resizes_each_batch(data_root, aug):
    """CIFAR at 64 px (224 for pretrained weights) is held at 32 px: each batch is resized on
    the device, to exactly the batches of the whole set resized on the host as it once was."""
    from torchvision.transforms.v2 import functional as TF

    augment = aug_cfg("basic" if aug == "crop" else aug)
    if aug == "crop":
        augment.natural.update(shift=0, crop_scale=[0.3, 1.0])
    data = build_data(data_cfg("cifar10", data_root, image_size=64), augment, device=CPU, seed=0)
    assert data.image_size == 64
    for loader in data.loaders.values():
        assert loader.images.shape[-1] == 32 and loader.sample(0).shape == (32, 32, 3)
        old = copy.copy(loader)
        old.images = TF.resize(loader.images, [64, 64], antialias=True)  # per image: chunks alike
        for epoch in (1, 2):
            loader.set_epoch(epoch)
            old.set_epoch(epoch)
            batches = list(zip(loader, old))
            assert len(batches) > 0
            for (x, y), (want, want_y) in batches:
                assert x.shape[-2:] == (64, 64)
                assert torch.equal(x, want) and torch.equal(y, want_y)


def test_a_smaller_image_size_is_stored_small(data_root):
    data = build_data(data_cfg("mnist", data_root, image_size=16), None, device=CPU, seed=0)
    assert data.image_size == 16 and data.loaders["train"].images.shape[-1] == 16
    x, _ = next(iter(data.loaders["val"]))
    assert x.shape[-2:] == (16, 16)


def test_train_order_depends_on_seed_and_epoch_only(data_root):
    def labels(epoch, seed=0):
        loader = build_data(data_cfg("mnist", data_root), aug_cfg(), device=CPU, seed=seed).loaders[
            "train"
        ]
        loader.set_epoch(epoch)
        return torch.cat([y for _, y in loader])

    assert torch.equal(labels(1), labels(1))
    assert not torch.equal(labels(1), labels(2))
    assert len(labels(1)) == 352  # drop_last at batch 32 of 360


def test_imagefolder_train_val_test(folder_root):
    data = build_data(data_cfg("imagefolder", folder_root), aug_cfg("strong"), device=CPU, seed=0)
    assert data.classes == ["cat", "dog", "fox"] and data.in_channels == 3 and data.image_size == 40
    assert len(data.mean) == 3 and all(0 < s for s in data.std)
    assert data.loaders["train"].num_samples == 90 and data.loaders["val"].num_samples == 24
    x, y = next(iter(data.loaders["test"]))
    assert x.shape == (30, 3, 40, 40) and y.tolist()[:1] == [0]


def test_imagefolder_without_val_is_split(tmp_path):
    write_image_folder(tmp_path, per_class={"train": 20})
    data = build_data(
        data_cfg("imagefolder", tmp_path, val_split=0.25, mean=[0.5] * 3, std=[0.2] * 3),
        aug_cfg(),
        device=CPU,
        seed=0,
    )
    assert data.loaders["train"].num_samples == 45 and data.loaders["val"].num_samples == 15
    assert "test" not in data.loaders


def test_imagefolder_errors(tmp_path):
    with pytest.raises(UserError, match="train"):
        build_data(data_cfg("imagefolder", tmp_path), None, device=CPU, seed=0)
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError, match="class"):
        build_data(data_cfg("imagefolder", tmp_path), None, device=CPU, seed=0)
    write_image_folder(tmp_path / "other", per_class={"train": 4, "val": 2})
    (tmp_path / "other" / "val" / "fox").rename(tmp_path / "other" / "val" / "wolf")
    with pytest.raises(UserError, match="wolf"):
        build_data(data_cfg("imagefolder", tmp_path / "other"), None, device=CPU, seed=0)


def test_imagefolder_with_only_test_images_can_be_evaluated(tmp_path):
    write_image_folder(tmp_path, per_class={"test": 5})
    cfg = data_cfg("imagefolder", tmp_path, mean=[0.5] * 3, std=[0.2] * 3)
    data = build_data(cfg, None, device=CPU, seed=0, splits=("test",))
    assert data.classes == ["cat", "dog", "fox"] and data.loaders["test"].num_samples == 15
    with pytest.raises(UserError, match="train"):
        build_data(cfg, None, device=CPU, seed=0, splits=("val",))


def test_imagefolder_order_depends_on_seed_and_epoch_only(folder_root):
    """Also with persistent workers, whose first pass draws their seeds, and from a resumed
    batch on (iter_from)."""
    cfg = data_cfg("imagefolder", folder_root, num_workers=2, mean=[0.5] * 3, std=[0.2] * 3)
    loader = build_data(cfg, None, device=CPU, seed=0, splits=("train",)).loaders["train"]

    def labels(epoch, start=0):
        loader.set_epoch(epoch)
        return torch.cat([y for _, y in loader.iter_from(start)])

    first = labels(1)
    assert torch.equal(labels(1), first) and not torch.equal(labels(2), first)
    assert torch.equal(labels(1, start=1), first[32:])


def test_the_bundled_sample_is_real_stratified_fashion_mnist():
    images, labels, classes = load_builtin(
        "fashion_mnist_mini", "/nonexistent", train=True, download=True
    )
    assert images.shape == (6000, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [600] * 10 and classes[0] == "T-shirt/top"
    test_images, test_labels, _ = load_builtin(
        "fashion_mnist_mini", "", train=False, download=False
    )
    assert (
        test_images.shape == (1000, 1, 28, 28)
        and torch.bincount(test_labels).tolist() == [100] * 10
    )
    # real photographs of clothes on black: half the pixels exactly 0, a garment's shades between
    assert (images == 0).float().mean() > 0.3 and len(images[0].unique()) > 40


@pytest.mark.parametrize(
    "damage, needle",
    [
        ("missing", "lacks train-images-idx3-ubyte.gz"),
        ("truncated", "cannot be read"),
        ("garbled", "cannot be read"),
    ],
)
def test_a_damaged_bundled_sample_says_reinstall(tmp_path, monkeypatch, damage, needle):
    import dataclasses
    import shutil

    from cnntrain.data import builtin

    copy_dir = tmp_path / "fashion_mnist_mini"
    shutil.copytree(builtin.BUNDLED, copy_dir)
    images = copy_dir / "train-images-idx3-ubyte.gz"
    if damage == "missing":
        images.unlink()
    elif damage == "truncated":
        images.write_bytes(images.read_bytes()[:100_000])
    else:
        images.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 40)
    spec = dataclasses.replace(builtin.BUILTIN["fashion_mnist_mini"], folder=str(copy_dir))
    monkeypatch.setitem(builtin.BUILTIN, "fashion_mnist_mini", spec)
    with pytest.raises(UserError) as e:
        load_builtin("fashion_mnist_mini", "data", train=True, download=True)
    message = str(e.value)
    assert needle in message and "reinstall cnntrain" in message and str(copy_dir) in message, (
        message
    )
    assert "\n" not in message
