"""An exponential moving average of a model's weights and buffers (ema.decay).

The same average as torch's AveragedModel(use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn):
the first update copies the model, every later one is ema += (1 - decay) * (model - ema), one
torch._foreach_lerp_ over all floating-point tensors. Hand-written because AveragedModel keeps
its update count on the device and reads it (`n_averaged == 0`) at every update: a host-device
sync per training step. Here the count is a host integer, so an update only queues kernels."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    def __init__(self, model: nn.Module, decay: float, n_averaged: int = 0):
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.decay, self.n_averaged = float(decay), int(n_averaged)

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        return [t.detach() for t in (*model.parameters(), *model.buffers())]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Averages `model` (the one being trained, or its DDP / compiled wrapper) in."""
        ema, current = self._tensors(self.module), self._tensors(model)
        if self.n_averaged == 0:
            torch._foreach_copy_(ema, current)
        else:
            floats = [(e, c) for e, c in zip(ema, current) if e.is_floating_point()]
            if floats:
                torch._foreach_lerp_(
                    [e for e, _ in floats], [c for _, c in floats], 1.0 - self.decay
                )
            self._average_integers(ema, current)
        self.n_averaged += 1

    def _average_integers(self, ema: list[torch.Tensor], current: list[torch.Tensor]) -> None:
        """Integer buffers (BatchNorm's num_batches_tracked), as AveragedModel averages them:
        ema * decay + model * (1 - decay) in float, truncated back. Flattened into one tensor per
        dtype first: a loop over them launched 4 tiny kernels per buffer per step (~80 on
        ResNet-18), and a foreach op would too, since int * float changes the dtype and so leaves
        the foreach fast path. Here it is a handful of kernels whatever the buffer count, with
        the same values (the same float32 arithmetic per element, the same truncation)."""
        by_dtype: dict[torch.dtype, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for e, c in zip(ema, current):
            if not e.is_floating_point():
                by_dtype.setdefault(e.dtype, []).append((e, c))
        for pairs in by_dtype.values():
            mine = [e for e, _ in pairs]
            old = torch.cat([e.reshape(-1) for e in mine])
            new = torch.cat([c.reshape(-1) for _, c in pairs])
            mixed = (old * self.decay + new * (1.0 - self.decay)).to(old.dtype)
            parts = mixed.split([e.numel() for e in mine])
            torch._foreach_copy_(mine, [p.view_as(e) for p, e in zip(parts, mine)])
