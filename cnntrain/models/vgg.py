"""VGG (Simonyan & Zisserman, 2014) on top of torchvision's ``vgg*`` builders.

Adapted: the first conv takes any number of input channels. For small inputs the five 2x2
max-pools would reach 0 px from 28 px, so they round up (28 -> 14 -> 7 -> 4 -> 2 -> 1), and the
7x7x512 -> 4096 -> 4096 head (~120 M parameters, pointless on a 1x1 map) is replaced by the
dropout + linear head of kuangliu/pytorch-cifar.

Input: any size with the small stem, >= 32 px with the ImageNet one (the torchvision
model as it is).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from torch import nn
from torchvision import models as tvm

from ._utils import kaiming_fan_out_init, replace_conv
from .registry import register_model


def _vgg(
    builder: Callable[..., tvm.VGG],
    in_channels: int,
    num_classes: int,
    small: bool,
    **kwargs: Any,
) -> nn.Module:
    if not small:
        model = builder(weights=None, num_classes=num_classes, **kwargs)
        model.features[0] = replace_conv(model.features[0], in_channels, init=kaiming_fan_out_init)
        return model
    # torchvision always allocates and initialises the 7x7x512 -> 4096 -> 4096 head that we
    # throw away (~120 M parameters: ~1 s and ~0.5 GB per model), so build on the meta device
    # and materialise only the conv layers we keep, re-applying VGG's init to them.
    with torch.device("meta"):
        model = builder(weights=None, num_classes=num_classes, **kwargs)
    model.features[0] = replace_conv(model.features[0], in_channels)
    model.features.to_empty(device="cpu")
    for module in model.features:
        if isinstance(module, nn.Conv2d):
            kaiming_fan_out_init(module)
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()
        elif isinstance(module, nn.MaxPool2d):
            module.ceil_mode = True
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(
        nn.Dropout(kwargs.get("dropout", 0.5)), nn.Linear(512, num_classes)
    )
    return model


# One registry entry per torchvision variant; each takes (in_channels=, num_classes=, small=, **kwargs).
for _name in ("vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"):
    register_model(partial(_vgg, getattr(tvm, _name)), name=_name)
