"""Datasets -> loaders. `build_data(cfg.data, cfg.aug, ...)` is the one entry point.

Every dataset becomes the same thing first: per split, uint8 pixels (N, C, S, S) with labels
(built-in datasets: torchvision's readers; image folders: the decoded cache of data/cache.py).
Then one BatchLoader per split, with one batched transform (augment.BatchTransform, a list of
ops built from the aug keys)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from cnntrain import distributed
from cnntrain.data.augment import BatchTransform
from cnntrain.data.builtin import BUILTIN, load_builtin
from cnntrain.data.loaders import BatchLoader
from cnntrain.errors import UserError

log = logging.getLogger("cnntrain")

DATASETS = (*BUILTIN, "imagefolder")
SPLITS = ("train", "val", "test")


@dataclass
class Data:
    classes: list[str]
    in_channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    loaders: dict = field(
        default_factory=dict
    )  # "train" / "val" / "test" -> Loader (absent: no such data)


def stratified_split(labels: torch.Tensor, fraction: float, seed: int):
    """Indices (train, held_out): `fraction` of every class held out, chosen with `seed`. A
    fraction that would leave no training image is a UserError."""
    gen = torch.Generator().manual_seed(seed)
    held = []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        held.append(idx[torch.randperm(len(idx), generator=gen)][: round(len(idx) * fraction)])
    held = torch.cat(held).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held] = False
    if len(labels) and not keep.any():
        raise UserError(
            f"data.val_split={fraction} holds out all {len(labels)} training images; "
            "lower it (e.g. data.val_split=0.1)"
        )
    return keep.nonzero().flatten(), held


# Crop-based recipes (random-resized-crop) store images larger than they train: a crop then
# keeps detail, and evaluation takes the central image_size square, as torchvision's
# resize-256-then-crop-224 presets do (224 x 1.14 = 256).
CROP_STORAGE = 1.14


def geometry(aug: DictConfig, data: DictConfig) -> DictConfig:
    """The aug section (shift, rotation, zoom, flip, crop) for these images: aug.<data.kind>."""
    return aug[data.kind]


def describe(aug: DictConfig, data: DictConfig) -> str:
    """The augmentation preset and the geometry it applies to this data, in one short phrase:
    `aug=basic (digits: shift 2, rotate 10, scale 0.9-1.1)`."""
    geo = geometry(aug, data)
    parts = [
        f"shift {geo.shift}" if geo.shift else "",
        f"rotate {geo.degrees:g}" if geo.degrees else "",
        "scale {:g}-{:g}".format(*geo.scale) if geo.get("scale") else "",
        "crop {:g}-{:g}".format(*geo.crop_scale) if geo.get("crop_scale") else "",
        "flip" if geo.hflip else "",
    ]
    return f"aug={aug.name} ({data.kind}: {', '.join(filter(None, parts)) or 'no geometry'})"


def storage_size(data: DictConfig, size: int, aug: DictConfig | None) -> int:
    """The size images are stored (image folders: decoded) at for a model input of `size`."""
    crop = aug is not None and geometry(aug, data).get("crop_scale")
    return round(size * CROP_STORAGE) if data.get("name") == "imagefolder" and crop else size


@dataclass
class _Split:
    """One split as stored: rows `index` (None: all) of uint8 `images` (N, C, S, S) on the host."""

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor | None = None
    names: list[str] | None = None  # each sample's file (image folders)
    where: str = ""  # what the images are, for the log
    mapped: bool = False  # images are a memory map of a cache file


@dataclass
class _Source:
    classes: list[str]
    channels: int
    size: int  # the model's input size
    parts: dict  # split -> _Split
    mean: list[float] | None = None
    std: list[float] | None = None


def data_shape(data: DictConfig) -> tuple[int, int, int]:
    """(in_channels, image_size, num_classes) without decoding any image (image folders: their
    class folders and image headers), for the model summary."""
    if data.name == "imagefolder":
        from cnntrain.data.cache import scan_split

        split = scan_split(_folder_root(data), "train", required=True)
        channels, size = _folder_geometry(data, split)
        return channels, size, len(split.classes)
    channels, size, classes = _builtin(data.name).shape
    return channels, _size(data) or size, classes


def build_data(
    data: DictConfig,
    aug: DictConfig | None,
    *,
    device: torch.device,
    seed: int,
    splits=SPLITS,
    evaluation: bool = False,
    channels_last: bool = False,
) -> Data:
    """Loaders for the requested splits. The training split is augmented as `aug` says unless
    `evaluation` (cnneval) or `aug` is None; `aug` also decides how large image folders are
    stored (CROP_STORAGE), so cnneval passes the training run's. `channels_last`: batches come
    out in NHWC (runtime.input_layout), normalized straight into it."""
    if data.name == "imagefolder":
        source = _folder_source(data, aug, splits, seed)
    else:
        source = _builtin_source(data, _builtin(data.name), splits, seed)
    _check_channels(data, source.channels)
    mean = list(source.mean or data.mean)
    std = list(source.std or data.std)
    out = Data(source.classes, source.channels, source.size, mean, std)
    layout = {"channels_last": channels_last}
    evaluate = BatchTransform(mean, std, device, size=source.size, **layout)
    train = (
        evaluate
        if evaluation or aug is None
        else _train_transform(aug, data, source, mean, std, device, layout)
    )
    budget, placed = memory_budget(data, device), {}
    for split in splits:
        part = source.parts.get(split)
        if part is None:
            continue
        if id(part.images) not in placed:  # train and a val split held out of it share storage
            placed[id(part.images)] = _place(part, device, budget)
            budget -= part.images.nbytes if placed[id(part.images)][1] else 0
        images, resident = placed[id(part.images)]
        training = split == "train"
        out.loaders[split] = BatchLoader(
            images,
            part.labels,
            data.batch_size,
            train if training else evaluate,
            device=device,
            index=part.index,
            names=part.names,
            streamed=not resident,
            shuffle=training,
            drop_last=training,
            seed=seed,
            sampler=data.get("sampler", "random") if training and not evaluation else "random",
            **distributed.shard(),
        )
    return out


def _place(part: _Split, device: torch.device, budget: int) -> tuple[torch.Tensor, bool]:
    """(storage, resident): on the device when it fits the budget, else left in host memory."""
    size = f"{part.images.nbytes / 2**20:.1f} MiB"
    if part.images.nbytes > budget:
        log.info(
            "%s: %s > the memory budget (data.memory_budget_gb): streamed from host memory",
            part.where,
            size,
        )
        return part.images, False
    log.info("%s: %d images, %s on %s", part.where, len(part.images), size, device)
    # a memory-mapped cache is read into memory once, not paged in by every pass's steps
    return part.images.to(device, copy=part.mapped), True


def memory_budget(data: DictConfig, device: torch.device) -> int:
    """Bytes of images that may live on the training device: data.memory_budget_gb, or half of
    what is free there now (the model, its activations and the optimizer need the rest)."""
    gb = data.get("memory_budget_gb")
    if gb is not None:
        return int(gb * 2**30)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:  # Linux: what can be had without swapping, page cache included
        with open("/proc/meminfo") as f:
            available = next(
                int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")
            )
    except (OSError, StopIteration):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return available // 2


def _builtin(name: str):
    if name not in BUILTIN:
        raise UserError(
            f"unknown dataset data.name={name} (one of {', '.join(DATASETS)}; pick one "
            "with data=<name>)"
        )
    return BUILTIN[name]


def _size(data: DictConfig) -> int | None:
    """data.image_size as a number, None for null/auto."""
    size = data.get("image_size")
    return None if size in (None, "auto") else int(size)


def _check_channels(data: DictConfig, channels: int) -> None:
    if data.mean is not None and len(data.mean) != channels:
        raise UserError(
            f"data.mean/std have {len(data.mean)} value(s) but data={data.name} has "
            f"{channels} channel(s): give {channels}"
        )


def _train_transform(
    aug: DictConfig, data: DictConfig, source: _Source, mean, std, device, layout: dict
) -> BatchTransform:
    return BatchTransform(
        mean,
        std,
        device,
        size=source.size,
        num_classes=len(source.classes),
        **layout,
        **settings(aug, data),
    )


def settings(aug: DictConfig, data: DictConfig) -> dict:
    """The aug keys as augment.create_ops reads them: those of every op, the geometry's from
    the aug.<kind> section of these images (the other kinds' sections are left out)."""
    ops = {k: v for k, v in aug.items() if k != "name" and not isinstance(v, DictConfig)}
    return {**ops, **geometry(aug, data)}


def _downsize(images: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """Images larger than `size` resized to it; smaller ones are kept, and BatchTransform resizes
    each batch up on the device (a 32 px set held at 224 px would take 49 times the memory)."""
    from torchvision.transforms.v2 import functional as TF

    if images.shape[-1] <= size and images.shape[-2] <= size:
        return images
    return torch.cat(
        [
            TF.resize(images[i : i + chunk], [size, size], antialias=True)
            for i in range(0, len(images), chunk)
        ]
    )


def _builtin_source(data: DictConfig, spec, splits, seed) -> _Source:
    root = os.path.expanduser(str(data.root))
    size = _size(data) or spec.shape[1]
    parts, classes = {}, None
    if "train" in splits or "val" in splits or data.mean is None:
        images, labels, classes = load_builtin(data.name, root, train=True, download=data.download)
        images = _downsize(images, size)
        train_idx, val_idx = stratified_split(labels, data.val_split, seed)
        where = f"{spec.title} train"
        parts["train"] = _Split(images, labels[train_idx], train_idx, where=where)
        if len(val_idx):
            parts["val"] = _Split(images, labels[val_idx], val_idx, where=where)
    if "test" in splits:
        images, labels, classes = load_builtin(data.name, root, train=False, download=data.download)
        parts["test"] = _Split(_downsize(images, size), labels, where=f"{spec.title} test")
    channels = spec.shape[0]
    source = _Source(classes, channels, size, parts)
    if data.mean is None:
        source.mean, source.std = _measure(parts["train"])
    return source


def _folder_root(data: DictConfig) -> str:
    return os.path.abspath(os.path.expanduser(str(data.root)))


def _folder_geometry(data: DictConfig, split, facts=None) -> tuple[int, int]:
    """(channels, image size) of a folder: data.channels / data.image_size, or from the image
    headers (auto): 1 channel when every image is gray (and data.mean does not give 3 values,
    as a pretrained RGB model's does), the images' common size or their median short side."""
    from cnntrain.data.cache import folder_facts

    channels, size = data.get("channels", "auto"), _size(data)
    if channels == "auto" and data.mean is not None:
        channels = len(data.mean)
    if channels == "auto" or size is None:
        facts = facts or folder_facts(split, _cache_dir(data))
        channels = (1 if facts.gray else 3) if channels == "auto" else channels
        size = size or facts.native_size()
    return int(channels), int(size)


def _cache_dir(data: DictConfig) -> str:
    from cnntrain.data.cache import default_cache_dir

    return os.path.expanduser(str(data.get("cache_dir") or default_cache_dir()))


def _folder_source(data: DictConfig, aug: DictConfig | None, splits, seed) -> _Source:
    from cnntrain.data.cache import folder_facts, scan_split
    from cnntrain.data.folder import check_same_classes

    root = _folder_root(data)
    scanned = {split: scan_split(root, split) for split in SPLITS}
    wanted, split_val = _wanted_folders(data, root, scanned, splits)
    classes = scanned[wanted[0]].classes
    for split in SPLITS:
        if scanned[split] is not None:
            check_same_classes(classes, scanned[split].classes, f"{root}/{split}")
    # header facts are cached with the file list: cheap after the first run
    facts = {split: folder_facts(scanned[split], _cache_dir(data)) for split in wanted}
    channels, size = _folder_geometry(data, scanned[wanted[0]], facts[wanted[0]])
    for split in wanted:
        facts[split].warn_mixed_modes("L" if channels == 1 else "RGB")
    storage = storage_size(data, size, aug)
    cache = {split: _decoded(data, scanned[split], storage, channels) for split in wanted}
    parts = _folder_parts(cache, root, split_val, data.val_split, seed)
    source = _Source(classes, channels, size, parts)
    if data.mean is None:
        source.mean, source.std = _measure(parts["train"])
    return source


def _wanted_folders(data: DictConfig, root: str, scanned: dict, splits) -> tuple[list[str], bool]:
    """The split folders to read, in SPLITS order, and whether val is held out of train/ (no
    val/ folder): train/ is read too when it is needed for another split or for mean/std. A
    needed folder that is missing is a UserError."""
    from cnntrain.data.cache import scan_split

    # train/ is needed to train, to measure mean/std, and to hold out a val split without val/
    split_val = scanned["val"] is None and data.val_split > 0
    needs_train = "train" in splits or data.mean is None or ("val" in splits and split_val)
    if scanned["train"] is None and needs_train:
        scan_split(root, "train", required=True)  # raises, naming the expected layout
    wanted = [
        s
        for s in SPLITS
        if scanned[s] is not None and (s in splits or s == "train" and needs_train)
    ]
    if not wanted:
        raise UserError(
            f"no {' or '.join(splits)} folder in {root} (expected {root}/<split>/<class>/<image>)"
        )
    return wanted, split_val


def _decoded(data: DictConfig, scanned, storage: int, channels: int) -> tuple:
    """A split folder's (pixels, labels, files) from the decoded cache (load_split)."""
    from cnntrain.data.cache import load_split

    cached = load_split(
        scanned,
        size=storage,
        channels=channels,
        cache_dir=_cache_dir(data),
        workers=data.get("num_workers"),
        skip_bad=bool(data.get("skip_bad_images", False)),
    )
    return cached.pixels(), torch.from_numpy(cached.labels), cached.files


def _folder_parts(cache: dict, root: str, split_val: bool, val_split, seed) -> dict[str, _Split]:
    """The decoded folders as the run's splits; with `split_val`, train/ is divided (stratified)
    into train and val, both views of the same memory-mapped pixels."""
    parts = {}
    for split, (images, labels, files) in cache.items():
        where = f"{root}/{split}"
        if split == "train" and split_val:
            train_idx, val_idx = stratified_split(labels, val_split, seed)
            for name, idx in (("train", train_idx), ("val", val_idx)):
                if len(idx) or name == "train":
                    parts[name] = _Split(
                        images, labels[idx], idx, [files[i] for i in idx], where, mapped=True
                    )
        else:
            parts[split] = _Split(images, labels, None, files, where, mapped=True)
    return parts


def _measure(part: _Split, max_images: int = 10_000):
    """Channel mean/std of (up to max_images evenly spaced) images of a split."""
    from cnntrain.data.cache import measure_mean_std

    rows = part.index if part.index is not None else torch.arange(len(part.images))
    rows = rows[:: max(1, len(rows) // max_images)]
    return measure_mean_std(part.images[rows].numpy())
