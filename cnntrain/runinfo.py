"""What a run says about itself: its header (with the settings an `experiment=` recipe turns
on), its settings as TensorBoard HParams columns, and what to run next."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from cnntrain.data import describe
from cnntrain.data.builtin import BUILTIN
from cnntrain.imbalance import log_balance
from cnntrain.logs import shown
from cnntrain.optim import OPTIMIZERS, SCHEDULES
from cnntrain.summary import format_summary

log = logging.getLogger("cnntrain")


def experiment_settings(cfg: DictConfig | None = None) -> str | None:
    """What `experiment=<name>` turns on, read from its file: the recipe is otherwise invisible
    in the run's header (overrides on the command line win over it). Its aug preset comes with
    the geometry it applies to the run's data (`cfg`), unless the command line chose another."""
    from hydra.core.hydra_config import HydraConfig

    name = (
        HydraConfig.get().runtime.choices.get("experiment") if HydraConfig.initialized() else None
    )
    if not name:
        return None
    import importlib.resources

    path = importlib.resources.files("cnntrain.configs") / "experiment" / f"{name}.yaml"
    if not path.is_file():  # an experiment from another config search path
        return f"experiment={name}"
    recipe = OmegaConf.to_container(OmegaConf.load(str(path)))
    settings = [
        f"{group.rpartition('/')[2]}={option}"
        for entry in recipe.pop("defaults", [])
        if isinstance(entry, dict)
        for group, option in entry.items()
    ]
    if cfg is not None and f"aug={cfg.aug.name}" in settings:
        settings[settings.index(f"aug={cfg.aug.name}")] = describe(cfg.aug, cfg.data)

    def flat(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}={json.dumps(v) if isinstance(v, (bool, list)) or v is None else v}"

    settings += flat(recipe)
    return f"experiment={name} sets {' '.join(settings)} (command-line overrides win)"


# TensorBoard HParams columns: name -> config key (class names for optim and sched)
HPARAMS = {
    "model": "model.name",
    "data": "data.name",
    "optim": "optim.name",
    "optim.lr": "optim.lr",
    "optim.weight_decay": "optim.weight_decay",
    "sched": "sched.name",
    "aug": "aug.name",
    "data.batch_size": "data.batch_size",
    "epochs": "epochs",
    "seed": "seed",
    "amp": "amp",
    "name": "name",
}
CLASSES = {"optim.name": OPTIMIZERS, "sched.name": SCHEDULES}  # columns that show the torch class
# overrides that say where things are, not what was trained: not columns
NOT_HPARAMS = (
    "data.root",
    "data.cache_dir",
    "data.download",
    "data.num_workers",
    "resume",
    "debug",
)


def _hparam_value(value):
    """A value as TensorBoard's hparams plugin takes it: bool, int, float or str (the rest as text)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return json.dumps(OmegaConf.to_container(value, resolve=True))
    if value is None:
        return "null"
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def _overridden_keys() -> dict:
    """The keys the command line set (a sweep's varied keys among them), with the group
    choices (model=resnet18, experiment=...) as the group's name: key -> the config key or None."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hydra = HydraConfig.get()
    keys = {}
    for override in hydra.overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra.") or key in NOT_HPARAMS:
            continue
        keys[key] = None if key in hydra.runtime.choices else key
    return keys


def hparams(cfg: DictConfig) -> dict:
    """The run's settings for TensorBoard's HParams tab, each with its own type: the model, data,
    optimizer and schedule (class names), lr, weight decay, augmentation, batch size, epochs,
    seed, amp, `name` when set, and every key set on the command line (what a sweep varies),
    with its resolved value."""
    from hydra.core.hydra_config import HydraConfig

    out = {}
    for column, key in HPARAMS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            out[column] = _hparam_value(CLASSES[key][value].__name__ if key in CLASSES else value)
    for key, config_key in _overridden_keys().items():
        if key in out or key in HPARAMS:
            continue
        if config_key is None:  # a group choice (model=, optim=: already columns; experiment=, ...)
            out[key] = _hparam_value(HydraConfig.get().runtime.choices.get(key))
        else:
            out[key] = _hparam_value(OmegaConf.select(cfg, key, default=None))
    return out


def log_header(cfg: DictConfig, plan, data, trainer) -> None:
    """The run's first lines: model, data, input, images, augmentation, device, the model
    summary, the run folder, the training split's classes when they are imbalanced (and the
    class weights in use) and what its experiment= recipe turns on."""
    val = data.loaders.get("val")
    log.info(
        "%s on %s: %s classes, input %dx%dx%d, %d train / %d val images, %s; device %s%s\n%s",
        cfg.model.name,
        cfg.data.name,
        plan.num_classes,
        plan.in_channels,
        plan.image_size,
        plan.image_size,
        data.loaders["train"].num_samples,
        val.num_samples if val else 0,
        describe(cfg.aug, plan.data_cfg),
        trainer.device,
        f", amp {trainer.dtype}".replace("torch.", "") if trainer.dtype else "",
        format_summary(trainer.summary),
    )
    log.info("run dir: %s", trainer.run_dir)
    weights = list(plan.class_weights) if plan.class_weights is not None else None
    counts = list(plan.class_counts)
    log_balance(counts, plan.classes, weights, cfg.loss.class_weights, cfg.data.sampler)
    recipe = experiment_settings(cfg)
    if recipe:
        log.info("%s", recipe)


def next_steps(data: DictConfig, run_dir: Path, best: Path) -> list[str]:
    """What to run after a run: evaluate its best checkpoint, look at its curves, and after a run
    on the bundled sample (the default, the first run of most users) the full datasets, which
    are one override away."""
    steps = [f"cnneval ckpt={shown(best)}", f"tensorboard --logdir {shown(run_dir)}"]
    if not getattr(BUILTIN.get(data.name), "bundled", False):
        return steps
    log.info(
        "this run trained on the small %s that ships with cnntrain; the full sets are one "
        "override away (downloaded into %s/, or data.root=):",
        BUILTIN[data.name].title,
        shown(data.root),
    )
    return [
        *steps,
        "cnntrain data=fashion_mnist   # all 60,000 Fashion-MNIST images",
        "cnntrain data=mnist           # handwritten digits",
    ]
