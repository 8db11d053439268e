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


def create_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    stem: str = "auto",
    **kwargs: Any,
) -> nn.Module:
    """Build model ``name`` for ``in_channels`` x ``image_size`` px images, ``num_classes`` outputs.

    ``stem``: ``small`` (3x3 stride-1 stem, for 28-64 px), ``imagenet`` (torchvision's original
    stem) or ``auto`` (``small`` up to 64 px). ``kwargs`` go to the torchvision constructor
    (e.g. ``dropout``).
    """
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"unknown model {name!r}{hint} (choose one of: {', '.join(list_models())})")
    if stem not in STEMS:
        raise UserError(f"unknown model stem {stem!r} (choose one of: {', '.join(STEMS)})")
    sizes = {"in_channels": in_channels, "num_classes": num_classes, "image_size": image_size}
    for what, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"model {what} must be a positive integer, got {value!r}")
    small = image_size <= SMALL_STEM_MAX_SIZE if stem == "auto" else stem == "small"
    try:
        factory = _REGISTRY[name]
        return factory(in_channels=in_channels, num_classes=num_classes, small=small, **kwargs)
    except TypeError as e:
        # An option the architecture does not have (e.g. model.dropout on a ResNet) is a
        # config mistake, not a crash; other TypeErrors are bugs and propagate.
        if "keyword argument" not in str(e):
            raise
        raise UserError(f"bad option for model {name!r}: {e}") from e


# Imported last: the family modules use register_model from this module.
from . import alexnet, googlenet, lenet, resnet, vgg  # noqa: E402,F401
