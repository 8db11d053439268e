"""The one loader of every dataset: in memory or streamed, the same batches; folders decoded once,
with their channels and size found from the images; evaluation and cnnpredict see the same pixels."""

import threading

import pytest
import torch
from fakedata import make_images, write_image_folder
from omegaconf import OmegaConf
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from cnntrain.data import build_data
from cnntrain.data.augment import BatchTransform
from cnntrain.data.loaders import BatchLoader, Loader, batch_seed, to_device
from cnntrain.inference import Preprocess

CPU = torch.device("cpu")


def cfg(name, root, **kw):
    base = dict(
        name=name,
        kind="digits" if name == "mnist" else "natural",
        root=str(root),
        download=False,
        batch_size=16,
        num_workers=0,
        val_split=0.2,
        image_size=None,
        channels="auto",
        mean=[0.5],
        std=[0.25],
        skip_bad_images=False,
        cache_dir=None,
        memory_budget_gb=None,
    )
    if name == "imagefolder":
        base.update(mean=None, std=None)
    return OmegaConf.create({**base, **kw})


def strong(**kw):
    """Every random operation at once, mixing included."""
    geo = dict(shift=2, degrees=10.0, scale=[0.9, 1.1], hflip=True, crop_scale=None)
    return OmegaConf.create(
        {
            "digits": geo,
            "natural": geo,
            "policy": "randaugment",
            "color_jitter": 0.3,
            "hue": 0.05,
            "random_erasing": 0.5,
            "mixup_alpha": 0.2,
            "cutmix_alpha": 1.0,
            **kw,
        }
    )


def epoch(loader, epoch=1, start=0):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader.iter_from(start)]


def same(a, b):
    assert len(a) == len(b) and len(a) > 0
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_the_loader_is_what_the_protocol_says():
    assert all(
        hasattr(BatchLoader, name)
        for name in (
            "num_samples",
            "set_epoch",
            "iter_from",
            "sample",
            "sample_name",
            "__len__",
            "__iter__",
        )
    )
    assert {n for n in vars(Loader) if not n.startswith("_")} <= set(dir(BatchLoader))


@pytest.mark.parametrize("kind", ["builtin", "folder"])
def test_streaming_gives_the_batches_of_the_in_memory_path(data_root, folder_root, kind):
    """Augmented with every operation, with a val split held out of train, from a batch on."""
    base = (
        cfg("mnist", data_root)
        if kind == "builtin"
        else cfg("imagefolder", folder_root, image_size=24)
    )
    loaders = [
        build_data(
            OmegaConf.merge(base, {"memory_budget_gb": budget}), strong(), device=CPU, seed=3
        ).loaders
        for budget in (None, 0)
    ]
    assert loaders[0]["train"].resident and not loaders[1]["train"].resident
    for split in ("train", "val", "test"):
        same(epoch(loaders[0][split]), epoch(loaders[1][split]))
    same(epoch(loaders[0]["train"], 2, start=2), epoch(loaders[1]["train"], 2)[2:])
    assert not torch.equal(epoch(loaders[0]["train"], 1)[0][0], epoch(loaders[0]["train"], 2)[0][0])


def everything(**kw):
    """A BatchTransform with every random operation, mixing included."""
    return BatchTransform(
        [0.5] * 3,
        [0.25] * 3,
        CPU,
        size=24,
        shift=2,
        degrees=10.0,
        hflip=True,
        policy="randaugment",
        color_jitter=0.3,
        hue=0.05,
        random_erasing=0.5,
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
        num_classes=10,
        **kw,
    )


def ranks_loaders(n, batch_size, world, transform, **kw):
    """A shuffled loader of n images (rows `index` of a larger set) for each rank of `world`."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n + 7, 3, 28, 28), dtype=torch.uint8, generator=gen)
    index = torch.randperm(n + 7, generator=gen)[:n]
    labels = torch.randint(0, 10, (n + 7,), generator=gen)[index]
    return [
        BatchLoader(
            images,
            labels,
            batch_size,
            transform,
            device=CPU,
            index=index,
            shuffle=True,
            drop_last=True,
            seed=3,
            rank=rank,
            world=world,
            **kw,
        )
        for rank in range(world)
    ]


@pytest.mark.parametrize("streamed", [False, True], ids=["resident", "streamed"])
@pytest.mark.parametrize("n", [100, 12, 6], ids=["full", "short", "an_empty_rank"])
def test_ranks_together_see_the_batches_of_one_process(streamed, n):
    """Two ranks of 8 give exactly one process's batches of 16, augmented and mixed, from a
    resumed batch too; a split smaller than the global batch makes one short batch, which a
    rank may have no share of."""
    (one,) = ranks_loaders(n, 16, 1, everything(), streamed=streamed, prefetch=2)
    ranks = ranks_loaders(n, 8, 2, everything(), streamed=streamed, prefetch=2)
    for start in (0, 2) if n == 100 else (0,):
        together = [
            (torch.cat(xs), torch.cat(ys))
            for xs, ys in (zip(*b) for b in zip(*(epoch(r, 2, start) for r in ranks)))
        ]
        same(epoch(one, 2, start), together)


def test_a_rank_transforms_only_its_share_of_the_global_batch():
    class Counting:
        def __init__(self, transform):
            self.transform, self.sizes = transform, []

        def positions(self, batch, part):
            return self.transform.positions(batch, part)

        def __call__(self, x, y, seed, **part):
            self.sizes.append(len(x))
            return self.transform(x, y, seed, **part)

    for mix, share in ((True, 9), (False, 8)):  # a mix needs one partner image more
        transform = Counting(
            everything() if mix else BatchTransform([0.5] * 3, [0.25] * 3, CPU, size=24, shift=2)
        )
        rank, _ = ranks_loaders(100, 8, 2, transform)
        assert [len(y) for _, y in epoch(rank)] == [8] * 6
        assert transform.sizes == [share] * 6


def test_a_stream_cut_short_stops_its_thread(data_root):
    loader = build_data(
        cfg("mnist", data_root, memory_budget_gb=0), None, device=CPU, seed=0
    ).loaders["train"]
    batches = loader.iter_from(0)
    next(batches)
    batches.close()  # what islice(max_steps) and a signal do
    assert not [t for t in threading.enumerate() if t.name == "cnntrain-prefetch"]


def write_folder(root, size, mode, n=4, sizes=None):
    for split in ("train", "test"):
        for c, name in enumerate(("a", "b")):
            folder = root / split / name
            folder.mkdir(parents=True)
            images, _ = make_images(n, 1, size, 3, seed=c)
            for i, pixels in enumerate(images):
                image = Image.fromarray(pixels).convert(mode)
                if sizes:
                    image = image.resize(sizes[i % len(sizes)])
                image.save(folder / f"{i}.png")
    return root


def test_a_gray_folder_trains_with_one_channel_at_its_own_size(tmp_path):
    gray = build_data(
        cfg("imagefolder", write_folder(tmp_path / "g", 20, "L")), None, device=CPU, seed=0
    )
    assert gray.in_channels == 1 and gray.image_size == 20 and len(gray.mean) == 1
    x, _ = next(iter(gray.loaders["test"]))
    assert x.shape[1:] == (1, 20, 20)
    rgb = build_data(
        cfg("imagefolder", write_folder(tmp_path / "c", 20, "RGB")), None, device=CPU, seed=0
    )
    assert rgb.in_channels == 3
    forced = build_data(
        cfg("imagefolder", tmp_path / "g", channels=3, image_size=12), None, device=CPU, seed=0
    )
    assert forced.in_channels == 3 and next(iter(forced.loaders["test"]))[0].shape[1:] == (
        3,
        12,
        12,
    )


def test_image_size_auto_of_mixed_sizes_is_the_median_short_side(tmp_path):
    root = write_folder(tmp_path, 20, "RGB", sizes=[(30, 40), (50, 36), (300, 300), (16, 18)])
    assert (
        build_data(cfg("imagefolder", root, image_size="auto"), None, device=CPU, seed=0).image_size
        == 33
    )


def test_crop_recipes_store_larger_images_and_evaluate_their_center_as_cnnpredict_does(tmp_path):
    root = write_folder(tmp_path, 40, "RGB", sizes=[(60, 45), (45, 60)])
    aug = strong(
        policy=None,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        natural=dict(shift=0, degrees=0.0, scale=None, hflip=True, crop_scale=[0.3, 1.0]),
    )
    data_cfg = cfg("imagefolder", root, image_size=28, mean=[0.5] * 3, std=[0.25] * 3)
    data = build_data(data_cfg, aug, device=CPU, seed=0)
    test = data.loaders["test"]
    assert test.images.shape[-1] == 32  # round(28 x 1.14)
    x, _ = next(iter(data.loaders["train"]))
    assert x.shape[-1] == 28
    evaluated = torch.cat([x for x, _ in test])
    prep = Preprocess(OmegaConf.create({"data": data_cfg, "aug": aug}), CPU)
    predicted = prep(
        torch.stack([prep.pixels(test.sample_name(i)) for i in range(test.num_samples)])
    )
    torch.testing.assert_close(evaluated, predicted, atol=1e-6, rtol=0)


def test_a_val_split_shares_the_training_storage(tmp_path):
    root = write_image_folder(tmp_path, per_class={"train": 10})  # no val/: val_split of train
    data = build_data(cfg("imagefolder", root, image_size=16), None, device=CPU, seed=0)
    images = data.loaders["train"].images
    assert (
        data.loaders["train"].resident and data.loaders["val"].images is images
    )  # shared with val


def test_cnnpredict_decodes_its_inputs_once_into_the_cache(tmp_path, monkeypatch):
    from cnntrain.data import cache

    root = write_folder(tmp_path, 40, "RGB", sizes=[(60, 45), (45, 60)])
    crop = strong(natural=dict(shift=0, degrees=0.0, scale=None, hflip=True, crop_scale=[0.3, 1.0]))
    prep = Preprocess(
        OmegaConf.create(
            {
                "data": cfg("imagefolder", root, image_size=28, mean=[0.5] * 3, std=[0.25] * 3),
                "aug": crop,
            }
        ),
        CPU,
    )
    files = sorted(root.rglob("*.png"))
    first = prep.decoded(files)
    assert first.shape == (len(files), 3, 28, 28)
    assert torch.equal(first, torch.stack([prep.pixels(f) for f in files]))
    monkeypatch.setattr(cache, "decode", lambda *args: pytest.fail("decoded again"))
    assert torch.equal(prep.decoded(files), first)


def test_cnnpredict_on_a_split_folder_leaves_the_training_cache_alone(tmp_path, monkeypatch):
    """Both decode the same folder at the same size under different keys: neither replaces the other."""
    from cnntrain.data import cache

    root = write_folder(tmp_path, 20, "RGB")
    data_cfg = cfg("imagefolder", root, image_size=20, mean=[0.5] * 3, std=[0.25] * 3)
    build_data(data_cfg, None, device=CPU, seed=0, splits=("test",))
    prep = Preprocess(OmegaConf.create({"data": data_cfg}), CPU)
    files = sorted((root / "test").rglob("*.png"))
    prep.decoded(files[:3])
    prep.decoded(files[3:])  # another subset of the same folder
    monkeypatch.setattr(cache, "decode", lambda *args: pytest.fail("decoded again"))
    build_data(data_cfg, None, device=CPU, seed=0, splits=("test",))
    prep.decoded(files[:3])


class _Copies(TorchDispatchMode):
    """Counts the tensor copies to another device (aten._to_copy) made under it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._to_copy.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("indexed", [False, True])
def test_a_pass_copies_its_indices_to_the_device_once(indexed):
    # The meta device stands in for a GPU: a copy to it is dispatched as aten._to_copy, as one to
    # CUDA is, where a pageable copy per batch (two, before) made each step wait for the host.
    n, meta = 40, torch.device("meta")
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8, device=meta)
    index = torch.arange(n).flip(0) if indexed else None
    loader = BatchLoader(
        images,
        torch.arange(n) % 3,
        4,
        lambda x, y, seed: (x, y),
        device=meta,
        index=index,
        shuffle=True,
    )
    with _Copies() as copies:
        batches = list(loader.iter_from(0))
    assert len(batches) == 10
    assert copies.count == (2 if indexed else 1)  # positions, and the rows they name


def test_indices_go_to_the_device_pinned_in_one_piece(monkeypatch):
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(len(t)) or t)
    parts = [torch.arange(5), torch.arange(5, 8)]
    with _Copies() as copies:
        out = to_device(parts, torch.device("meta"), pin=True)
    assert pinned == [8] and copies.count == 1
    assert [o.shape[0] for o in out] == [5, 3] and all(o.is_meta for o in out)
    assert to_device(parts, CPU, pin=False) is parts  # nothing to copy on the CPU


def test_shuffled_batches_are_the_same_after_the_one_copy():
    n = 37
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1)
    loader = BatchLoader(
        images, torch.arange(n), 8, lambda x, y, seed: (x, y), device=CPU, shuffle=True, seed=3
    )
    loader.set_epoch(2)
    gen = torch.Generator().manual_seed(batch_seed(3, 2, -1))
    order = torch.randperm(n, generator=gen)
    got = torch.cat([y for _, y in loader.iter_from(0)])
    assert torch.equal(got, order[: len(got)])
    assert torch.equal(
        torch.cat([x.flatten() for x, _ in loader.iter_from(1)]).long(), order[8 : len(got)]
    )
