"""Helpers shared by the model families to adapt torchvision's ImageNet architectures."""

from __future__ import annotations

from typing import Callable

from torch import nn


def replace_conv(
    conv: nn.Conv2d,
    in_channels: int,
    kernel_size: int | None = None,
    stride: int | None = None,
    padding: int | None = None,
    *,
    init: Callable[[nn.Conv2d], None] | None = None,
) -> nn.Conv2d:
    """Return a copy of ``conv`` with another input channel count and optionally another geometry.

    Output channels, bias, dilation and groups are kept. Returns ``conv`` itself when nothing
    changes, so the default configuration stays bit-identical to torchvision. ``init`` re-applies
    the family's initialisation: torchvision initialises in ``__init__``, before the swap, so a
    fresh conv would otherwise get PyTorch's default init instead.
    """
    kernel = conv.kernel_size if kernel_size is None else (kernel_size, kernel_size)
    stride_ = conv.stride if stride is None else (stride, stride)
    padding_ = conv.padding if padding is None else (padding, padding)
    old = (conv.in_channels, conv.kernel_size, conv.stride, conv.padding)
    if (in_channels, kernel, stride_, padding_) == old:
        return conv
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=kernel,
        stride=stride_,
        padding=padding_,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    if init is not None:
        init(new)
    return new


def kaiming_fan_out_init(conv: nn.Conv2d) -> None:
    """The conv init torchvision's VGG and ResNet use."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
