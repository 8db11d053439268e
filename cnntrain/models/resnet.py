"""ResNet (He et al., 2015) and ResNeXt (Xie et al., 2016) on top of torchvision's builders.

Adapted: the first conv takes any number of input channels. For small inputs the 7x7/2 stem
and its max-pool would cut 32 px to 8 px before the first block, so the stem becomes a 3x3
stride-1 conv without max-pool (kuangliu/pytorch-cifar): 32 -> 32 -> 16 -> 8 -> 4 px.

Input: any size >= 8 px; ResNeXt-50 needs >= 32 px with the ImageNet stem (224 px ->
7x7, 25.03 M parameters).
"""

from __future__ import annotations

from torchvision import models as tvm

from ._utils import kaiming_fan_out_init, torchvision_factory
from .registry import register_model

# Registry name -> torchvision builder. ResNeXt-50 is only published as 32x4d (32 groups of
# width 4), so the short name means that one.
_BUILDERS = {
    "resnet18": tvm.resnet18,
    "resnet34": tvm.resnet34,
    "resnet50": tvm.resnet50,
    "resnet101": tvm.resnet101,
    "resnet152": tvm.resnet152,
    "resnext50": tvm.resnext50_32x4d,
}

# One registry entry per variant; each takes (in_channels=, num_classes=, small=, **kwargs).
for _name, _builder in _BUILDERS.items():
    _factory = torchvision_factory(_builder, "conv1", init=kaiming_fan_out_init, pool="maxpool")
    register_model(_factory, name=_name)
