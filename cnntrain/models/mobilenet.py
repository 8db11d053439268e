"""MobileNetV2 (Sandler et al., 2018) and MobileNetV3 (Howard et al., 2019) on top of
torchvision's ``mobilenet_v2`` / ``mobilenet_v3_small`` / ``mobilenet_v3_large``.

Adapted: the first conv takes any number of input channels. For small inputs the overall
stride of 32 would leave 1 px of a 32 px image, so the 3x3/2 stem conv and the first block
that halves the resolution (the first 24-channel block in V2 and V3-large, the first block in
V3-small) become stride 1, as in kuangliu/pytorch-cifar's MobileNetV2: stride 8, 32 -> 4 px.
Option: ``dropout`` (0.2).
BatchNorm momentum 0.1 (PyTorch's default) in place of MobileNetV3's 0.01, from scratch and
with pretrained weights alike: see ``_utils.BN_MOMENTUM`` (MobileNetV2 has 0.1 already).

Input: any size >= 8 px with the small stem (32 px -> 4x4 final map); the ImageNet
one keeps torchvision's strides (overall 32, >= 32 px; 224 px -> 7x7). Parameters at 224 px:
mobilenet_v2 3.50 M, mobilenet_v3_small 2.54 M, mobilenet_v3_large 5.48 M.
"""

from __future__ import annotations

from torchvision import models as tvm

from ._utils import BN_MOMENTUM, kaiming_fan_out_init, torchvision_factory
from .registry import register_model

# One registry entry per variant; each takes (in_channels=, num_classes=, small=, **kwargs).
for _name in ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large"):
    # torchvision's mode="fan_out" with the default leaky_relu(0) gain is the ReLU gain, so
    # kaiming_fan_out_init is the family's own init.
    _factory = torchvision_factory(
        getattr(tvm, _name),
        "features.0.0",
        init=kaiming_fan_out_init,
        unstride_next=True,
        bn_momentum=BN_MOMENTUM,
    )
    register_model(_factory, name=_name)
