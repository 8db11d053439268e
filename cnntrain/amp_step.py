"""GradScaler's optimizer step without the host reading the device, for optimizers without
fused kernels (optim.fused=false).

torch's `GradScaler.step` decides on the host whether to skip a step with inf/NaN gradients: for
an unfused optimizer it reads found_inf with `.item()` every step (`_maybe_opt_step`), so the
host waits for the GPU at every fp16 step. Here the step always runs, and where found_inf is
set the parameters and the optimizer state are put back from a copy taken before it, chosen on
the device: the same weights and state, bit for bit, as torch's skipped step. Fused optimizers
keep torch's own path, which hands grad_scale and found_inf to the kernel."""

from __future__ import annotations

import torch
from torch.amp.grad_scaler import OptState


def prepare(optimizer: torch.optim.Optimizer) -> None:
    """Unfused Adam/AdamW count their steps in a CPU tensor and compute the bias correction on
    the host from it, so a skipped step would have to be known there; `capturable` keeps the
    count (and the correction) on the device. Only on CUDA: torch has no capturable CPU step."""
    for group in optimizer.param_groups:
        if "capturable" in group and not group.get("fused"):
            group["capturable"] = all(p.is_cuda for p in group["params"])
    place_steps(optimizer)


def place_steps(optimizer: torch.optim.Optimizer) -> None:
    """Puts each `step` counter where the group's current flags want it: on the parameter's
    device (float32) under capturable or fused, else on the CPU. `load_state_dict` places it by
    the flags the state was saved with; a capturable step without one would fail, and a
    host-counted step read from the GPU would wait for it every step."""
    for group in optimizer.param_groups:
        on_device = group.get("capturable") or group.get("fused")
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                where = (p.device, torch.float32) if on_device else (torch.device("cpu"),)
                state["step"] = state["step"].to(*where)


class ScaledStep:
    """`scaler.step(optimizer)`, with the same result, without a host read of found_inf.
    torch's own path where it needs none (fused kernels, a disabled scaler) or where the copy
    could not be chosen on found_inf's device (tensors elsewhere, non-tensor state). The copy's
    buffers and views are kept from step to step while the tensors stay the same: building the
    views costs the host a few microseconds per tensor."""

    def __init__(self, scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer):
        self.scaler, self.optimizer = scaler, optimizer
        self.snapshot: _Snapshot | None = None
        prepare(optimizer)

    @torch.no_grad()  # the copies of the parameters are no part of the graph
    def __call__(self) -> None:
        scaler, optimizer = self.scaler, self.optimizer
        if not scaler.is_enabled() or getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.step(optimizer)
            return
        # GradScaler keeps found_inf per optimizer in private state: there is no public accessor
        per_optimizer = scaler._per_optimizer_states[id(optimizer)]
        if per_optimizer["stage"] is OptState.READY:
            scaler.unscale_(optimizer)
        found_per_device = per_optimizer["found_inf_per_device"]
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        states = {p: dict(optimizer.state[p]) for p in params if p in optimizer.state}
        values = [v for s in states.values() for v in s.values()]
        kept = params + values
        devices = set(found_per_device) | {t.device for t in kept if torch.is_tensor(t)}
        snapshot = self._snapshot(kept) if len(devices) == 1 else None
        if snapshot is None:
            scaler.step(optimizer)
            return
        found = next(iter(found_per_device.values())).bool()
        snapshot.save()
        optimizer.step()
        snapshot.restore_where(found)
        if any(set(optimizer.state.get(p, ())) != set(states.get(p, ())) for p in params):
            # The step made state that was not there (the first step: a momentum buffer cloned
            # from the gradient, Adam's moments): no copy can undo that on the device, so this
            # step reads found_inf, as torch's would; later ones find the state there.
            if found.item():
                _restore_keys(optimizer, params, states)
        per_optimizer["stage"] = OptState.STEPPED

    def _snapshot(self, tensors: list) -> _Snapshot | None:
        """The copy of these tensors, None where they cannot have one."""
        if self.snapshot is not None and self.snapshot.holds(tensors):
            return self.snapshot
        fits = all(torch.is_tensor(t) and _dense(t) for t in tensors)
        self.snapshot = _Snapshot(tensors) if fits else None
        return self.snapshot


def _dense(t: torch.Tensor) -> bool:
    """Each element at its own place in a block of numel() (parameters and optimizer state are
    contiguous or channels_last): what lets _Snapshot lay the tensor into a flat buffer with
    the tensor's own strides."""
    layouts = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)
    return any(t.is_contiguous(memory_format=f) for f in layouts)


class _Snapshot:
    """Copies of `tensors`, one flat buffer per dtype, each copy a view of it with its tensor's
    sizes and strides (so that _foreach_copy_ takes its one-kernel path, channels_last
    included). Putting back is then a few kernels whatever the number of tensors: gather the
    current values into a second buffer, one torch.where between the two, scatter back.
    torch.where, not a lerp or a 0/1 product: those turn the stepped NaNs into NaNs
    (NaN * 0 = NaN) and flip -0.0 into +0.0."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors, self.shapes = tensors, [t.shape for t in tensors]
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault(t.dtype, []).append(t)
        self.groups = [(ts, _buffer(ts), _buffer(ts)) for ts in groups.values()]

    def holds(self, tensors: list) -> bool:
        return len(tensors) == len(self.tensors) and all(
            a is b and a.shape == shape for a, b, shape in zip(tensors, self.tensors, self.shapes)
        )

    def save(self) -> None:
        for tensors, (_, saved), _ in self.groups:
            torch._foreach_copy_(saved, tensors)

    def restore_where(self, found: torch.Tensor) -> None:
        """Every tensor back to its copy where `found` (a 0-dim bool on the device) is set."""
        for tensors, (saved, _), (current, views) in self.groups:
            torch._foreach_copy_(views, tensors)
            torch.where(found, saved, current, out=current)
            torch._foreach_copy_(tensors, views)


def _buffer(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A flat buffer for `tensors` and their views of it, with their sizes and strides."""
    flat = torch.empty(
        sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device
    )
    views, offset = [], 0
    for t in tensors:
        views.append(flat.as_strided(t.shape, t.stride(), offset))
        offset += t.numel()
    return flat, views


def _restore_keys(optimizer, params: list, states: dict) -> None:
    """The optimizer's state as it was before a skipped step that created some."""
    for p in params:
        if p not in states:
            optimizer.state.pop(p, None)
        else:
            optimizer.state[p] = states[p]
