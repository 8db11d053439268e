"""Checks of the composed config that Hydra cannot express: each failure is one UserError
naming the key and the fix, raised before anything is built or written."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from cnntrain.errors import UserError

FIXED_ON_RESUME = ("model.name", "data.name")
CHANGEABLE_ON_RESUME = ("data.batch_size", "optim.lr")  # with resume_allow_changes=[...]


def _positive(cfg: DictConfig, key: str, kind=int) -> None:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (
            kind is int and not float(value).is_integer()):
        what = "a positive integer" if kind is int else "a positive number"
        raise UserError(f"{key} must be {what}, got {value!r} (e.g. {key}={'10' if kind is int else '0.01'})")


def validate_train(cfg: DictConfig) -> None:
    _positive(cfg, "epochs")
    _positive(cfg, "data.batch_size")
    _positive(cfg, "optim.lr", float)
    if OmegaConf.is_missing(cfg.model, "name"):
        source = cfg.model.get("source", "torchvision")
        raise UserError(f"model={'tv' if source == 'torchvision' else source} needs "
                        f"model.name=<any {source} model>, e.g. model.name=resnet18")
    if cfg.data.root is None:
        raise UserError(f"data={cfg.data.name} needs data.root=/path/to/images "
                        "(a folder with train/<class>/<image> and optional val/, test/)")
    split = cfg.data.val_split
    if isinstance(split, bool) or not isinstance(split, (int, float)) or not 0 <= split < 1:
        raise UserError(f"data.val_split must be in [0, 1), got {split!r} (e.g. data.val_split=0.1)")
    if cfg.data.num_workers is None or cfg.data.num_workers < 0:
        raise UserError(f"data.num_workers must be >= 0, got {cfg.data.num_workers!r}")
    for key in ("data.image_size", "max_steps_per_epoch", "max_eval_steps"):
        if OmegaConf.select(cfg, key) is not None:
            _positive(cfg, key)
    if cfg.on_nan not in ("stop", "skip_batch"):
        raise UserError(f"on_nan must be stop or skip_batch, got {cfg.on_nan!r}")
    k = cfg.checkpoint.keep_top_k
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise UserError(f"checkpoint.keep_top_k must be an integer >= 0, got {k!r}")
    decay = cfg.ema.decay
    if decay is not None and (isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1):
        raise UserError(f"ema.decay must be in (0, 1), e.g. 0.999, or null; got {decay!r}")
    if cfg.early_stop.patience is not None:
        _positive(cfg, "early_stop.patience")
    for key in ("aug.mixup_alpha", "aug.cutmix_alpha"):
        value = OmegaConf.select(cfg, key, default=0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise UserError(f"{key} must be >= 0 (0 = off), got {value!r}")
    for key in cfg.resume_allow_changes or []:
        if key not in CHANGEABLE_ON_RESUME:
            raise UserError(f"resume_allow_changes may list {', '.join(CHANGEABLE_ON_RESUME)}, not {key}")
    validate_runtime(cfg)


def validate_runtime(cfg: DictConfig) -> None:
    device = str(cfg.device)
    if device not in ("auto", "cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise UserError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if cfg.get("channels_last", "auto") not in ("auto", True, False):
        raise UserError(f"channels_last must be auto, true or false, got {cfg.channels_last!r}")
    if cfg.get("amp_dtype", "auto") not in ("auto", "bf16", "fp16"):
        raise UserError(f"amp_dtype must be auto, bf16 or fp16, got {cfg.amp_dtype!r}")
