"""ImageFolder data: <root>/train/<class>/..., optional <root>/val/ and <root>/test/."""
from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets

from cnntrain.errors import UserError


def open_split(root: str, split: str, transform=None, required: bool = False):
    """The ImageFolder of root/split, or None when that folder does not exist (and not required)."""
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        if required:
            raise UserError(f"image folder {path} not found: expected {root}/{split}/<class>/<image> "
                            "(set data.root= to a folder with train/ and optional val/, test/)")
        return None
    try:
        return datasets.ImageFolder(path, transform=transform)
    except FileNotFoundError as e:  # no class folders, or class folders without images
        raise UserError(f"{path}: {e}; expected one sub-folder of images per class") from None


def check_same_classes(expected: list[str], found: list[str], where: str) -> None:
    if list(found) != list(expected):
        raise UserError(f"class folders in {where} differ from the others: "
                        f"expected {list(expected)}, found {list(found)}")


def measure_mean_std(dataset, num_workers: int, max_images: int = 1000):
    """Channel mean/std over (up to max_images evenly spaced) images of a dataset that yields
    un-normalized float tensors."""
    step = max(1, len(dataset) // max_images)
    subset = Subset(dataset, range(0, len(dataset), step))
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    for x, _ in DataLoader(subset, batch_size=64, num_workers=num_workers):
        x = x.double()
        total += x.sum((0, 2, 3))
        total_sq += (x * x).sum((0, 2, 3))
        count += x.numel() // 3
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(1e-12).sqrt()
    return [round(v, 4) for v in mean.tolist()], [round(v, 4) for v in std.tolist()]
