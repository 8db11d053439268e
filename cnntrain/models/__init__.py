"""Model registry and factory.

Each family module registers factories ``fn(*, in_channels, num_classes, small, **kwargs)``;
``create_model`` picks the stem from the image size and turns bad names into a ``UserError``.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

from torch import nn

from cnntrain.errors import UserError

ModelFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFactory] = {}

STEMS = ("auto", "small", "imagenet")
# Largest image size that still gets the small (CIFAR-style) stem with stem=auto.
SMALL_STEM_MAX_SIZE = 64


def register_model(fn: ModelFactory, name: str | None = None) -> ModelFactory:
    """Register ``fn`` under ``name`` (default: its ``__name__``); usable as a decorator."""
    name = name or fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


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
    from cnntrain.models import hub, transfer

    kwargs = {**{k: v for k, v in kwargs.items() if v is not None}, **(args or {})}
    weights_file = pretrained if pretrained and transfer.is_file_spec(pretrained) else None
    weights_name = pretrained if pretrained and not weights_file else None
    try:
        if source == "torchvision":
            model = hub.torchvision_model(
                name,
                in_channels=in_channels,
                num_classes=num_classes,
                weights=weights_name,
                **kwargs,
            )
        elif source == "timm":
            model = hub.timm_model(
                name,
                in_channels=in_channels,
                num_classes=num_classes,
                pretrained=bool(weights_name),
                **kwargs,
            )
        elif source == "cnntrain":
            model = _create_registered(
                name, in_channels, num_classes, image_size, stem, weights_name, **kwargs
            )
        else:
            raise UserError(f"unknown model source {source!r} (cnntrain, torchvision or timm)")
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


# Imported last: the family modules use register_model from this module.
from . import (  # noqa: E402,F401
    alexnet,
    cifar_resnet,
    convnext,
    densenet,
    efficientnet,
    googlenet,
    lenet,
    mnasnet,
    mobilenet,
    resnet,
    senet,
    shufflenet,
    squeezenet,
    vgg,
    wide_resnet,
)
