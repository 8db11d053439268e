"""Datasets -> loaders. `build_data(cfg.data, cfg.aug, ...)` is the one entry point."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch.utils.data import Subset

from cnntrain import distributed
from cnntrain.data.augment import BatchAugment, Normalize
from cnntrain.data.builtin import BUILTIN, load_builtin
from cnntrain.data.loaders import DeviceLoader, FolderLoader
from cnntrain.errors import UserError

DATASETS = (*BUILTIN, "imagefolder")
SPLITS = ("train", "val", "test")


@dataclass
class Data:
    classes: list[str]
    in_channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    loaders: dict = field(default_factory=dict)  # "train" / "val" / "test" -> loader (absent: no such data)


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
        raise UserError(f"data.val_split={fraction} holds out all {len(labels)} training images; "
                        "lower it (e.g. data.val_split=0.1)")
    return keep.nonzero().flatten(), held


def data_shape(data: DictConfig) -> tuple[int, int, int]:
    """(in_channels, image_size, num_classes) from the config alone (image folders: the class
    folders of train/), for the model summary without loading any images."""
    if data.name == "imagefolder":
        from cnntrain.data.folder import open_split

        return 3, int(data.image_size), len(open_split(os.path.expanduser(str(data.root)), "train",
                                                           required=True).classes)
    channels, size, classes = _builtin(data.name).shape
    return channels, int(data.image_size or size), classes


def build_data(data: DictConfig, aug: DictConfig | None, *, device: torch.device, seed: int,
               splits=SPLITS) -> Data:
    """Loaders for the requested splits. `aug` None means no augmentation (evaluation only)."""
    if data.name == "imagefolder":
        return _folder_data(data, aug, device, seed, splits)
    _builtin(data.name)
    return _builtin_data(data, aug, device, seed, splits)


def _builtin(name: str):
    if name not in BUILTIN:
        raise UserError(f"unknown dataset data.name={name} (one of {', '.join(DATASETS)}; pick one "
                        "with data=<name>)")
    return BUILTIN[name]


def _check_channels(data: DictConfig, channels: int) -> None:
    if data.mean is not None and len(data.mean) != channels:
        raise UserError(f"data.mean/std have {len(data.mean)} value(s) but data={data.name} has "
                        f"{channels} channel(s): give {channels}")


def _augment(aug, kind: str, normalize: Normalize) -> BatchAugment:
    if aug is None:
        return BatchAugment(normalize)
    geo = aug[kind]
    return BatchAugment(normalize, shift=geo.shift, degrees=geo.degrees, hflip=geo.hflip,
                        policy=aug.policy, random_erasing=aug.random_erasing)


def _resize(images: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return torch.cat([TF.resize(images[i:i + chunk], [size, size], antialias=True)
                      for i in range(0, len(images), chunk)])


def _builtin_data(data, aug, device, seed, splits) -> Data:
    root = os.path.expanduser(str(data.root))
    parts = {}
    if "train" in splits or "val" in splits:
        images, labels, classes = load_builtin(data.name, root, train=True, download=data.download)
        train_idx, val_idx = stratified_split(labels, data.val_split, seed)
        parts["train"] = (images[train_idx], labels[train_idx])
        if len(val_idx):
            parts["val"] = (images[val_idx], labels[val_idx])
    if "test" in splits:
        images, labels, classes = load_builtin(data.name, root, train=False, download=data.download)
        parts["test"] = (images, labels)
    size = int(data.image_size or images.shape[-1])
    in_channels = images.shape[1]
    _check_channels(data, in_channels)
    normalize = Normalize(data.mean, data.std, device)
    kind = "gray" if in_channels == 1 else "rgb"
    out = Data(classes, in_channels, size, list(data.mean), list(data.std))
    for split in splits:
        if split not in parts:
            continue
        x, y = parts[split]
        x, y = _resize(x, size).to(device), y.to(device)
        training = split == "train"
        out.loaders[split] = DeviceLoader(
            x, y, data.batch_size, _augment(aug if training else None, kind, normalize),
            shuffle=training, drop_last=training, seed=seed, **distributed.shard())
    return out


def _folder_data(data, aug, device, seed, splits) -> Data:
    from cnntrain.data.folder import check_same_classes, measure_mean_std, open_split, warn_mixed_modes
    from cnntrain.data.presets import eval_preset, train_preset

    root = os.path.abspath(os.path.expanduser(str(data.root)))
    size = int(data.image_size)
    sets = {split: open_split(root, split) for split in SPLITS}
    # train/ is needed to train, to measure mean/std, and to hold out a val split without val/
    split_val = sets["val"] is None and data.val_split > 0
    needs_train = "train" in splits or data.mean is None or ("val" in splits and split_val)
    if sets["train"] is None and needs_train:
        open_split(root, "train", required=True)  # raises, naming the expected layout
    present = [sets[s] for s in ("train", *splits) if sets[s] is not None]
    if not present:
        raise UserError(f"no {' or '.join(splits)} folder in {root} (expected {root}/<split>/<class>/<image>)")
    classes = present[0].classes
    for split, ds in sets.items():  # the splits this run reads
        if ds is not None and (split in splits or split == "train" and needs_train):
            warn_mixed_modes(ds)
    skip_bad = bool(data.get("skip_bad_images", False))  # absent from older checkpoints' configs
    _check_channels(data, 3)
    mean, std = data.mean, data.std
    if mean is None or std is None:
        unnormalized = copy.copy(sets["train"])
        unnormalized.transform = eval_preset(size)
        mean, std = measure_mean_std(unnormalized, data.num_workers, skip_bad)
    mean, std = list(mean), list(std)
    evaluate = eval_preset(size, mean, std)
    for split, ds in sets.items():
        if ds is not None:
            check_same_classes(classes, ds.classes, f"{root}/{split}")
            ds.transform = train_preset(size, mean, std, aug) if split == "train" and aug else evaluate
    if split_val and sets["train"] is not None:
        train_idx, val_idx = stratified_split(torch.as_tensor(sets["train"].targets), data.val_split, seed)
        val_view = copy.copy(sets["train"])  # the same files, seen through the eval transform
        val_view.transform = evaluate
        sets["val"] = Subset(val_view, val_idx.tolist())
        sets["train"] = Subset(sets["train"], train_idx.tolist())
    out = Data(classes, 3, size, mean, std)
    for split in splits:
        if sets[split] is not None:
            training = split == "train"
            out.loaders[split] = FolderLoader(sets[split], data.batch_size, data.num_workers, device,
                                              shuffle=training, drop_last=training, seed=seed,
                                              skip_bad_images=skip_bad, **distributed.shard())
    return out
