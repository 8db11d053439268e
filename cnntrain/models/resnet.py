"""ResNet (He et al., 2015) on top of torchvision's ``resnet*`` builders.

Adapted: the first conv takes any number of input channels. For small inputs the 7x7/2 stem
and its max-pool would cut 32 px to 8 px before the first block, so the stem becomes a 3x3
stride-1 conv without max-pool (kuangliu/pytorch-cifar): 32 -> 32 -> 16 -> 8 -> 4 px.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn
from torchvision import models as tvm

from . import register_model
from ._utils import kaiming_fan_out_init, replace_conv


def _resnet(
    builder: Callable[..., tvm.ResNet],
    in_channels: int,
    num_classes: int,
    small: bool,
    **kwargs: Any,
) -> nn.Module:
    model = builder(weights=None, num_classes=num_classes, **kwargs)
    if small:
        model.conv1 = replace_conv(
            model.conv1, in_channels, kernel_size=3, stride=1, padding=1, init=kaiming_fan_out_init
        )
        model.maxpool = nn.Identity()
    else:
        model.conv1 = replace_conv(model.conv1, in_channels, init=kaiming_fan_out_init)
    return model


@register_model
def resnet18(*, in_channels: int, num_classes: int, small: bool, **kwargs: Any) -> nn.Module:
    return _resnet(tvm.resnet18, in_channels, num_classes, small, **kwargs)


@register_model
def resnet34(*, in_channels: int, num_classes: int, small: bool, **kwargs: Any) -> nn.Module:
    return _resnet(tvm.resnet34, in_channels, num_classes, small, **kwargs)


@register_model
def resnet50(*, in_channels: int, num_classes: int, small: bool, **kwargs: Any) -> nn.Module:
    return _resnet(tvm.resnet50, in_channels, num_classes, small, **kwargs)


@register_model
def resnet101(*, in_channels: int, num_classes: int, small: bool, **kwargs: Any) -> nn.Module:
    return _resnet(tvm.resnet101, in_channels, num_classes, small, **kwargs)


@register_model
def resnet152(*, in_channels: int, num_classes: int, small: bool, **kwargs: Any) -> nn.Module:
    return _resnet(tvm.resnet152, in_channels, num_classes, small, **kwargs)
