"""Per-image transforms (torchvision v2) for ImageFolder data, decoded in DataLoader workers;
the same aug keys as the batched path in augment.py."""
from __future__ import annotations

import torch
from torchvision.transforms import v2


def eval_preset(image_size: int, mean=None, std=None) -> v2.Compose:
    steps = [v2.ToImage(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size),
             v2.ToDtype(torch.float32, scale=True)]
    if mean is not None:
        steps.append(v2.Normalize(mean, std))
    return v2.Compose(steps)


def train_preset(image_size: int, mean, std, aug) -> v2.Compose:
    """aug: the `aug` config (its `rgb` block: folders are read as RGB)."""
    geo = aug.rgb
    steps = [v2.ToImage(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    shift = round(geo.shift * image_size / 32)  # the config's shift is in 32 px units
    if shift > 0:
        steps.append(v2.RandomCrop(image_size, padding=shift))
    if geo.degrees > 0:
        steps.append(v2.RandomRotation(geo.degrees))
    if geo.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if aug.policy == "randaugment":
        steps.append(v2.RandAugment())
    elif aug.policy == "autoaugment":
        steps.append(v2.AutoAugment())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if aug.random_erasing > 0:
        steps.append(v2.RandomErasing(p=aug.random_erasing))
    return v2.Compose(steps)
