"""Test-time augmentation: the logits of a batch averaged over views of it (`tta`, of cnneval and
of training's final test; schema.TTA_MODES names them).

flip: each image and its mirror image, equally weighted.
flip_shift: airbench94's six views (its tta_level=2): half the weight on the flip pair, a
quarter each on the flip pair shifted 1 px up-left and the one shifted 1 px down-right (the
image padded by reflection, as airbench does). Six forward passes per batch instead of one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def tta_logits(model: nn.Module, x: torch.Tensor, tta: str | None) -> torch.Tensor:
    if tta is None:
        return model(x)
    if tta not in ("flip", "flip_shift"):
        raise ValueError(f"tta={tta!r}: want None, flip or flip_shift")
    out = _flip_pair(model, x)
    if tta == "flip_shift":
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        # the views as the batch is laid out (channels_last or not), not as strided slices
        layout = (
            torch.channels_last
            if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            else torch.contiguous_format
        )
        views = [padded[..., :h, :w], padded[..., 2:, 2:]]
        shifted = [_flip_pair(model, v.contiguous(memory_format=layout)) for v in views]
        out = (out + (shifted[0] + shifted[1]) / 2) / 2
    return out


def _flip_pair(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (model(x) + model(x.flip(-1))) / 2
