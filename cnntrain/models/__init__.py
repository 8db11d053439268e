"""The model factory. Each family module registers its factories in `registry`
(``fn(*, in_channels, num_classes, small, **kwargs)``); ``create_model`` picks the stem from the
image size, builds torchvision/timm models by name (`hub`) and turns bad names into a
``UserError``."""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from cnntrain.errors import UserError
from cnntrain.models.registry import _REGISTRY, list_models, register_model  # noqa: F401

# Largest image size that still gets the small (CIFAR-style) stem with stem=auto.
SMALL_STEM_MAX_SIZE = 64


def resolve_stem(stem: str, image_size: int, pretrained=None) -> str:
    """`small` or `imagenet`. Named pretrained weights (not files) need the stem they were
    trained with."""
    from cnntrain.models.transfer import is_file_spec

    if stem != "auto":
        return stem
    if pretrained and not is_file_spec(pretrained):
        return "imagenet"
    return "small" if image_size <= SMALL_STEM_MAX_SIZE else "imagenet"


def create_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    stem: str = "auto",
    source: str = "cnntrain",
    pretrained: str | None = None,
    freeze="none",
    args: dict | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build model ``name`` for ``in_channels`` x ``image_size`` px images, ``num_classes`` outputs.

    ``source``: ``cnntrain`` (the registry), ``torchvision`` or ``timm`` (any model by name).
    ``stem``: ``small`` (3x3 stride-1 stem, for 28-64 px), ``imagenet`` (torchvision's original
    stem) or ``auto``. ``pretrained``: a torchvision weights name (``timm``: true) or a
    state_dict file; the head is then replaced for ``num_classes``. ``freeze``: see
    ``transfer.freeze``. ``kwargs`` (those not null, e.g. ``dropout``) and ``args`` go to the
    constructor.
    """
    from cnntrain.models import transfer

    kwargs = {**{k: v for k, v in kwargs.items() if v is not None}, **(args or {})}
    weights_file = pretrained if pretrained and transfer.is_file_spec(pretrained) else None
    weights_name = pretrained if pretrained and not weights_file else None
    try:
        model = _from_source(
            name, source, in_channels, num_classes, image_size, stem, weights_name, kwargs
        )
    except TypeError as e:
        # An option the architecture does not have (e.g. model.dropout on a ResNet), or a
        # model.args value of a type the constructor cannot use (text where it wants a class, as
        # a checkpoint's config may hold), is a config mistake, not a crash; other TypeErrors are
        # bugs and propagate.
        if "keyword argument" not in str(e) and not args:
            raise
        raise UserError(f"bad option for model {name!r}: {e}") from e
    if weights_file:
        transfer.load_matching(
            model, transfer.load_state_dict_file(weights_file), str(weights_file)
        )
    transfer.freeze(model, freeze)
    return model


def _from_source(
    name: str,
    source: str,
    in_channels: int,
    num_classes: int,
    image_size: int,
    stem: str,
    weights_name: str | None,
    kwargs: dict,
) -> nn.Module:
    """The model built by its source's factory, with named pretrained weights (not a file's,
    which create_model loads into any source's model)."""
    from cnntrain.models import hub

    if source == "torchvision":
        return hub.torchvision_model(
            name, in_channels=in_channels, num_classes=num_classes, weights=weights_name, **kwargs
        )
    if source == "timm":
        return hub.timm_model(
            name,
            in_channels=in_channels,
            num_classes=num_classes,
            pretrained=bool(weights_name),
            **kwargs,
        )
    if source == "cnntrain":
        return _create_registered(
            name, in_channels, num_classes, image_size, stem, weights_name, **kwargs
        )
    raise UserError(f"unknown model source {source!r} (cnntrain, torchvision or timm)")


def _create_registered(name, in_channels, num_classes, image_size, stem, weights_name, **kwargs):
    from cnntrain.models import transfer

    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"unknown model {name!r}{hint} (choose one of: {', '.join(list_models())})")
    small = resolve_stem(stem, image_size, weights_name) == "small"
    factory = _REGISTRY[name]
    if not weights_name:
        return factory(in_channels=in_channels, num_classes=num_classes, small=small, **kwargs)
    weights = transfer.torchvision_weights(transfer.TORCHVISION_NAMES.get(name, name), weights_name)
    model = factory(
        in_channels=3, num_classes=len(weights.meta["categories"]), small=small, **kwargs
    )
    transfer.load_matching(model, transfer.download_state_dict(weights), str(weights))
    transfer.replace_head(model, num_classes)
    transfer.adapt_first_conv(model, in_channels)
    return model


def build_model(
    model_cfg, in_channels: int, num_classes: int, image_size: int, device: torch.device
) -> tuple[nn.Module, dict]:
    """The model of a model config (a mapping: the config's `model` section) for this data, on
    `device`, and its summary; the summary's forward pass doubles as the check that the model
    can take this input, so that a mismatch fails here, in one line."""
    from omegaconf import DictConfig, OmegaConf

    from cnntrain.summary import summarize

    if isinstance(model_cfg, DictConfig):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    model = create_model(
        **model_cfg, in_channels=in_channels, num_classes=num_classes, image_size=image_size
    )
    try:
        info = summarize(model, (in_channels, image_size, image_size))
    except RuntimeError as e:
        raise UserError(
            f"model {model_cfg['name']} cannot take {in_channels}x{image_size}x{image_size} "
            f"input ({str(e).splitlines()[0]}); set data.image_size= or choose another model"
        ) from None
    return model.to(device), info


def _import_families() -> None:
    """Every module of this package, so that a new architecture is one file: its factories
    register themselves on import (`register_model`)."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_families()
