"""Augmentation of whole uint8 batches with tensor ops on the batch's device.

torchvision's v2 transforms draw one set of random parameters per call, so applied to a batch
every image would get the same shift/flip/box. Here each image gets its own, in one batched op
per transform (the way airbench and other fast trainers do it)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms import v2


class Normalize:
    """uint8 or float pixels (B,C,H,W) in 0..255 -> float (x/255 - mean) / std, in two in-place ops."""

    def __init__(self, mean, std, device):
        std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = mean / std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mul_(self.scale).sub_(self.shift)


class BatchAugment:
    """Per-image random shift (zero fill, = crop with padding) and horizontal flip, plus rotation
    (then all three as one affine grid_sample); optional RandAugment/AutoAugment per image;
    per-image random erasing."""

    def __init__(self, normalize: Normalize, shift: int = 0, degrees: float = 0, hflip: bool = False,
                 policy: str | None = None, random_erasing: float = 0.0):
        self.normalize = normalize
        self.shift, self.degrees, self.hflip = int(shift), float(degrees), bool(hflip)
        self.policy = {None: None, "randaugment": v2.RandAugment, "autoaugment": v2.AutoAugment}[policy]
        self.policy = self.policy() if self.policy else None
        self.erase_p = float(random_erasing)

    def __call__(self, x: torch.Tensor, generator: torch.Generator, replay: bool = False) -> torch.Tensor:
        """`replay`: a batch skipped by a resumed epoch, augmented only to advance `generator`;
        the policies draw from torch's global generator, which the resumed run restored to its
        state after this batch, so they must not run again."""
        if self.policy is not None and not replay:  # they draw one op per call: call them per image
            x = torch.stack([self.policy(img) for img in x])
        if self.degrees > 0:  # before normalizing, so the zero fill is black as in RandomCrop
            x = self._affine(x.float(), generator)
        elif self.shift > 0 or self.hflip:
            x = self._shift_flip(x, generator)
        x = self.normalize(x)
        if self.erase_p > 0:
            x = self._erase(x, generator)
        return x

    def _shift_flip(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Integer shifts and flips are pure re-indexing: two gathers on the uint8 pixels, several
        times cheaper than resampling with grid_sample."""
        b, c, h, w = x.shape
        dev, p = x.device, self.shift
        if p:
            x = F.pad(x, (p, p, p, p))
        dy, dx = torch.randint(0, 2 * p + 1, (2, b, 1), generator=generator, device=dev)
        rows = torch.arange(h, device=dev) + dy
        cols = torch.arange(w, device=dev).expand(b, w)
        if self.hflip:
            flip = torch.rand(b, 1, generator=generator, device=dev) < 0.5
            cols = torch.where(flip, cols.flip(1), cols)
        cols = cols + dx
        x = x.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w + 2 * p))
        return x.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))

    def _uniform(self, n, generator, device, low=-1.0, high=1.0):
        return torch.rand(n, generator=generator, device=device) * (high - low) + low

    def _affine(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        dev = x.device
        # Normalized coordinates span 2 units over h (w) pixels, so a shift of k pixels is 2k/h.
        # With align_corners=False, integer shifts land on pixel centres: exact copies.
        shift = torch.randint(-self.shift, self.shift + 1, (2, b), generator=generator, device=dev)
        angle = self._uniform(b, generator, dev) * math.radians(self.degrees)
        flip = torch.ones(b, device=dev)
        if self.hflip:
            flip = torch.where(torch.rand(b, generator=generator, device=dev) < 0.5, -flip, flip)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([
            torch.stack([cos * flip, -sin, 2 * shift[0] / w], 1),
            torch.stack([sin * flip, cos, 2 * shift[1] / h], 1),
        ], 1).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _erase(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # RandomErasing's defaults: area 2-33 % of the image, aspect ratio 0.3-3.3, value 0.
        b, _, h, w = x.shape
        dev = x.device
        area = self._uniform(b, generator, dev, 0.02, 0.33) * h * w
        ratio = torch.exp(self._uniform(b, generator, dev, math.log(0.3), math.log(3.3)))
        eh = torch.sqrt(area * ratio).round().clamp(1, h)
        ew = torch.sqrt(area / ratio).round().clamp(1, w)
        top = (torch.rand(b, generator=generator, device=dev) * (h - eh + 1)).floor()
        left = (torch.rand(b, generator=generator, device=dev) * (w - ew + 1)).floor()
        apply = torch.rand(b, generator=generator, device=dev) < self.erase_p
        rows = torch.arange(h, device=dev).view(1, h, 1)
        cols = torch.arange(w, device=dev).view(1, 1, w)
        box = ((rows >= top.view(b, 1, 1)) & (rows < (top + eh).view(b, 1, 1))
               & (cols >= left.view(b, 1, 1)) & (cols < (left + ew).view(b, 1, 1)))
        return x.masked_fill_((box & apply.view(b, 1, 1)).unsqueeze(1), 0.0)


def batch_mix(aug, num_classes: int):
    """torchvision's batch-level MixUp / CutMix (or a random choice of the two per batch) for
    `aug.mixup_alpha` / `aug.cutmix_alpha` > 0, else None. It takes (images, labels) and returns
    mixed images with soft targets of shape (batch, num_classes), which CrossEntropyLoss takes
    as class probabilities; it runs on the batch where it lives (the GPU for built-in data)."""
    if aug is None:
        return None
    mixes = []
    if aug.get("mixup_alpha", 0) > 0:
        mixes.append(v2.MixUp(alpha=float(aug.mixup_alpha), num_classes=num_classes))
    if aug.get("cutmix_alpha", 0) > 0:
        mixes.append(v2.CutMix(alpha=float(aug.cutmix_alpha), num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
