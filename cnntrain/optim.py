"""Optimizer and LR-schedule factories over the `optim` and `sched` configs (timm style): the
class comes from the option's name in a fixed table, never from a class path in the config
(Hydra's `instantiate` would import whatever a stored config names; see stored.py)."""

from __future__ import annotations

import functools
import inspect
import warnings

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim import Optimizer, lr_scheduler

from cnntrain.errors import UserError

# optim=<name> and sched=<name> (schema.OPTIMIZER_NAMES / SCHEDULE_NAMES declare the same names)
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
SCHEDULES = {
    "cosine": lr_scheduler.CosineAnnealingLR,
    "step": lr_scheduler.StepLR,
    "multistep": lr_scheduler.MultiStepLR,
    "onecycle": lr_scheduler.OneCycleLR,
    "none": lr_scheduler.ConstantLR,
}


def create_optimizer(cfg: DictConfig, model: nn.Module) -> Optimizer:
    """The optimizer `cfg.name` with the other keys as its arguments. Biases and normalization
    weights (1-D tensors) get no weight decay, as in timm; frozen parameters are left out.
    `fused: auto` picks the fused kernels where this optimizer has them for these parameters.
    `norm_lr_scale` != 1: the normalization layers' parameters are a group of their own with
    lr x that factor (its `lr_scale`, which re-planned schedules keep); the first group is
    always the plain one, whose lr the logs show."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    cls = OPTIMIZERS[kwargs.pop("name")]
    scale = float(kwargs.pop("norm_lr_scale", 1.0))
    if kwargs.get("fused") == "auto":
        kwargs["fused"] = True if _fused_available(cls, params) else None
    if kwargs.get("weight_decay", 0) or scale != 1:
        norm = _norm_parameters(model) if scale != 1 else set()
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1 and id(p) not in norm]
        scaled = [p for p in params if id(p) in norm]
        params = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        if scaled:
            lr = kwargs["lr"] * scale
            params.append({"params": scaled, "weight_decay": 0.0, "lr": lr, "lr_scale": scale})
    return _construct("optim", functools.partial(cls, **kwargs), params)


# the layers whose parameters norm_lr_scale scales: BatchNorm, InstanceNorm (_NormBase),
# GroupNorm and LayerNorm (torchvision's and timm's LayerNorm2d derive from it)
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _norm_parameters(model: nn.Module) -> set[int]:
    """The ids of the normalization layers' parameters (a tensor's `in` would compare values)."""
    return {
        id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(False)
    }


def _fused_available(cls: type, params: list) -> bool:
    """One kernel launch for all parameters instead of several per parameter: on the GPU the
    fastest update (PyTorch's own advice), and measurably faster on the CPU too (LeNet-5 SGD
    step: 7 %, scripts/bench.py). Torch has fused SGD/Adam/AdamW for float CUDA and CPU tensors."""
    return (
        "fused" in inspect.signature(cls).parameters
        and bool(params)
        and all(p.is_floating_point() and p.device.type in ("cuda", "cpu") for p in params)
    )


def create_scheduler(cfg: DictConfig, optimizer: Optimizer, *, epochs: int, steps_per_epoch: int):
    """Returns (scheduler, interval) where interval is "step" (call scheduler.step() after every
    batch) or "epoch". Counts left null in the config are filled from the run's length; an
    optional linear warmup of `warmup_epochs` is chained in front with SequentialLR."""
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    name = kwargs.pop("name")
    interval = kwargs.pop("interval", "epoch")
    warmup_epochs = kwargs.pop("warmup_epochs", 0) or 0
    per_epoch = steps_per_epoch if interval == "step" else 1
    total, warmup = epochs * per_epoch, round(warmup_epochs * per_epoch)
    if warmup >= total and warmup > 0:  # the schema checks epochs; this is the rounded step count
        raise UserError(
            f"sched.warmup_epochs={warmup_epochs} leaves nothing of epochs={epochs}; lower it"
        )
    if name == "onecycle":
        kwargs["total_steps"] = kwargs.get("total_steps") or total
        peak = kwargs.get("max_lr")  # a group with an lr_scale (norm_lr_scale) keeps its factor
        kwargs["max_lr"] = [
            peak * g.get("lr_scale", 1.0) if peak else g["lr"] for g in optimizer.param_groups
        ]
    if "T_max" in kwargs and kwargs["T_max"] is None:
        kwargs["T_max"] = total - warmup
    if "milestones" in kwargs:  # fractions of the run, or epochs
        kwargs["milestones"] = [
            round((m * epochs if m < 1 else m) * per_epoch) - warmup for m in kwargs["milestones"]
        ]
    main = _construct("sched", functools.partial(SCHEDULES[name], **kwargs), optimizer)
    if warmup:
        warm = lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
        main = lr_scheduler.SequentialLR(optimizer, [warm, main], milestones=[warmup])
    return main, interval


def _construct(group: str, partial, *args):
    """torch's own argument checks (a ValueError) are a bad config value, not a crash."""
    try:
        return partial(*args)
    except ValueError as e:
        raise UserError(f"{group}: {e} (check the {group}.* values)") from None


def fast_forward(scheduler, steps: int) -> None:
    """Steps a new scheduler `steps` times without training, so that a re-planned schedule
    continues from the step the run has reached."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": on purpose
        for _ in range(steps):
            scheduler.step()
