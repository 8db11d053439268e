"""The registry of cnntrain's own architectures: name -> factory. Its own module, below the
family modules that fill it and the factory that reads it, so that no module imports another
that imports it back."""

from __future__ import annotations

from typing import Callable

from torch import nn

ModelFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(fn: ModelFactory, name: str | None = None) -> ModelFactory:
    """Register ``fn`` under ``name`` (default: its ``__name__``); usable as a decorator."""
    name = name or fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)
