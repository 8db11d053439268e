"""A checkpoint's stored config is data, never code.

Every tool that rebuilds a model from a checkpoint (cnneval, cnnexport, cnnpredict, cnnviz) and
every resumed run reads the checkpoint's config through `validated`: it is checked against the
schema the command line is checked against (known keys, types, ranges, the cross-key rules, known
model names), and a Hydra directive (`_target_` and the other `_..._` keys of `instantiate`) or an
interpolation (`${...}`, which could read the environment or call a resolver) anywhere in it
refuses the file, in one line that names the file and the key.

Nothing in cnntrain hands a config to `hydra.utils.instantiate`: models, optimizers and schedules
are built by name (models.create_model, optim.OPTIMIZERS / SCHEDULES). `instantiate` imports and
calls whatever a `_target_` names, at any depth (`model.args` included); a checkpoint someone
handed over could run any callable. Hydra's own blocklist stops `os.system`, not the rest."""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cnntrain.errors import UserError
from cnntrain.schema import GROUP_OPTIONS, TrainConfig, check, show

# the keys hydra.utils.instantiate acts on
DIRECTIVES = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")
PLAIN = (str, int, float, bool, type(None))


def _key(prefix: str, name) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def refuse_code(node, where: str, prefix: str = "") -> None:
    """Raises a UserError naming `where` and the key when `node` (plain containers) holds a Hydra
    directive, an interpolation, or anything but str/int/float/bool/None, lists and str-keyed dicts."""
    if isinstance(node, dict):
        for name, value in node.items():
            key = _key(prefix, name)
            if not isinstance(name, str):
                raise UserError(
                    f"{where}: its stored config has a key {name!r} that is not a string "
                    f"(under {prefix or 'the top level'}); it was not written by cnntrain"
                )
            if name in DIRECTIVES:
                raise UserError(
                    f"{where}: its stored config sets {key}={show(value)}, which names code "
                    "to run; a checkpoint's config is data, so the file is refused (use a "
                    "checkpoint written by cnntrain, or train again)"
                )
            refuse_code(value, where, key)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            refuse_code(value, where, f"{prefix}[{i}]")
    elif not isinstance(node, PLAIN):
        raise UserError(
            f"{where}: its stored config holds a {type(node).__name__} at {prefix}; a "
            "config holds only text, numbers, true/false, null, lists and mappings"
        )
    elif isinstance(node, str) and "${" in node:
        raise UserError(
            f"{where}: its stored config has an interpolation at {prefix} ({node!r}); "
            "a checkpoint's config is data (cnntrain stores it resolved), so the file is "
            "refused"
        )


def _schema(config: dict, where: str) -> DictConfig:
    """TrainConfig with the optim and sched declarations of the options `config` names."""
    schema = OmegaConf.structured(TrainConfig)
    for group, options in GROUP_OPTIONS.items():
        node = config.get(group)
        name = node.get("name") if isinstance(node, dict) else None
        if name not in options:
            raise UserError(
                f"{where}: its stored config has {group}.name={show(name)}, not one of "
                f"{', '.join(options)}; it was not written by this version of cnntrain"
            )
        schema[group] = OmegaConf.structured(options[name])
    return schema


def _known_model(model: DictConfig, where: str) -> None:
    from cnntrain.models import list_models

    if model.source == "cnntrain" and model.name not in list_models():
        raise UserError(
            f"{where}: its stored config names model.name={model.name}, which cnntrain "
            "does not have; it was not written by this version of cnntrain"
        )
    if model.source == "torchvision":
        from torchvision import models

        if model.name not in models.list_models(module=models):
            raise UserError(
                f"{where}: its stored config names the torchvision model "
                f"{model.name}, which this torchvision does not have"
            )


def validated(config, where: str | os.PathLike) -> DictConfig:
    """The training config stored in a checkpoint (`where`: the file, for messages), checked as
    the command line's is; any problem is one UserError naming the file and the key."""
    where = str(where)
    if not isinstance(config, dict):
        raise UserError(
            f"{where}: its stored config is a {type(config).__name__}, not a mapping; it "
            "was not written by cnntrain"
        )
    refuse_code(config, where)
    try:
        cfg = OmegaConf.merge(_schema(config, where), config)
        check(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"{where}: its stored config is refused at {key} ({reason}); it was not "
            "written by this version of cnntrain, or it was altered"
        ) from None
    except UserError as e:
        raise UserError(f"{where}: its stored config is refused: {e}") from None
    if cfg.optim.lr == "find":  # a run stores the lr the finder found, never `find`
        raise UserError(
            f"{where}: its stored config is refused: it stores optim.lr=find, not the lr the "
            "LR finder found; it was not written by cnntrain, or it was altered"
        )
    _known_model(cfg.model, where)
    return cfg
