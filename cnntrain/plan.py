"""The run plan: what a training run derives from its config and its data, decided once.

The config says what was asked (`data.image_size: null`, `model.stem: auto`); the plan says
what was decided (28 px, the small stem, the measured mean and std, the batches of an epoch)
and holds the config a checkpoint stores, so that a checkpoint alone rebuilds the same model
and data. The config itself is never written to: train() runs on a read-only copy of it, and
every derived value lives here, in a frozen object made in two steps: `input_config` (before
the data: the input named pretrained weights expect) and `make_plan` (after it)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cnntrain.imbalance import class_counts, class_weights
from cnntrain.models import resolve_stem
from cnntrain.schema import container
from cnntrain.stored import refuse_code

log = logging.getLogger("cnntrain")


@dataclass(frozen=True)
class RunPlan:
    data_cfg: DictConfig  # read-only: the config's data section with the input decided
    model_cfg: dict  # the model section, its stem resolved: create_model's keyword arguments
    classes: list
    in_channels: int
    image_size: int
    mean: list
    std: list
    steps_per_epoch: int  # training batches of an epoch (max_steps_per_epoch caps them)
    config: dict  # the resolved config with all of the above filled in: what checkpoints store
    class_counts: tuple = ()  # training images per class (after the val hold-out)
    class_weights: tuple | None = None  # the cross-entropy's, from loss.class_weights

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def input_config(cfg: DictConfig) -> DictConfig:
    """The data section the run uses, read-only: as configured, except that named pretrained
    weights bring the input size (unless data.image_size is set) and the normalization they
    were trained with (gray data: the mean of the three channels)."""
    from cnntrain.models.transfer import pretrained_input_spec

    data = OmegaConf.create(container(cfg.data))
    spec = pretrained_input_spec(cfg.model)
    if spec is not None:
        gray = data.get("mean") is not None and len(data.mean) == 1
        data.image_size = spec["image_size"] if data.image_size is None else data.image_size
        data.mean = [sum(spec["mean"]) / 3] if gray else spec["mean"]
        data.std = [sum(spec["std"]) / 3] if gray else spec["std"]
        log.info(
            "pretrained %s: input %s px, normalization mean %s std %s",
            cfg.model.pretrained,
            data.image_size,
            data.mean,
            data.std,
        )
    OmegaConf.set_readonly(data, True)
    return data


def make_plan(cfg: DictConfig, data_cfg: DictConfig, data) -> RunPlan:
    """The plan of `cfg` for the loaded `data` (a cnntrain.data.Data) read with `data_cfg`."""
    model = container(cfg.model)
    if "stem" in model:  # stored resolved: a checkpoint rebuilds the same network
        model["stem"] = resolve_stem(model["stem"], data.image_size, model.get("pretrained"))
    config = container(cfg)
    config["model"] = model
    config["data"] = {
        **container(data_cfg),
        "root": str(Path(data_cfg.root).expanduser().resolve()),
        "image_size": data.image_size,
        "channels": data.in_channels,
        "mean": data.mean,
        "std": data.std,
    }
    refuse_code(config, "this run")  # what every tool will refuse to read (a literal '${')
    train = data.loaders["train"]
    batches = len(train)
    counts = class_counts(train.labels, len(data.classes))
    weights = class_weights(cfg.loss.class_weights, counts, cfg.data.name)
    return RunPlan(
        data_cfg=data_cfg,
        model_cfg=model,
        classes=list(data.classes),
        in_channels=data.in_channels,
        image_size=data.image_size,
        mean=list(data.mean),
        std=list(data.std),
        steps_per_epoch=min(batches, cfg.max_steps_per_epoch or batches),
        config=config,
        class_counts=tuple(counts),
        class_weights=None if weights is None else tuple(weights),
    )
