"""ResNet (He et al., 2015) on top of torchvision's ``resnet*`` builders.

Adapted: the first conv takes any number of input channels. For small inputs the 7x7/2 stem
and its max-pool would cut 32 px to 8 px before the first block, so the stem becomes a 3x3
stride-1 conv without max-pool (kuangliu/pytorch-cifar): 32 -> 32 -> 16 -> 8 -> 4 px.
"""

from __future__ import annotations

from functools import partial
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



# One registry entry per torchvision variant; each takes (in_channels=, num_classes=, small=, **kwargs).
for _name in ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152'):
    register_model(partial(_resnet, getattr(tvm, _name)), name=_name)
