"""MnasNet-A1 1.0 (Tan et al., 2018) on top of torchvision's ``mnasnet1_0``.

Adapted: the first conv takes any number of input channels. For small inputs the overall
stride of 32 would leave 1 px of a 32 px image, so the 3x3/2 stem conv and the first block
that halves the resolution (the first 24-channel block) become stride 1: stride 8, 32 -> 4 px.
BatchNorm momentum 0.1 (PyTorch's default) in place of torchvision's 1 - 0.9997, from scratch
and with pretrained weights alike: see ``_utils.BN_MOMENTUM``.

Input: any size >= 8 px with the small stem (32 px -> 4x4 final map); the ImageNet
one keeps torchvision's strides (overall 32, >= 32 px; 224 px -> 7x7, 4.38 M parameters).
Option: ``dropout`` (0.2).
"""

from __future__ import annotations

from torchvision import models as tvm

from ._utils import BN_MOMENTUM, kaiming_fan_out_init, torchvision_factory
from .registry import register_model

# kaiming_fan_out_init is torchvision's MNASNet init.
register_model(
    torchvision_factory(
        tvm.mnasnet1_0,
        "layers.0",
        init=kaiming_fan_out_init,
        unstride_next=True,
        bn_momentum=BN_MOMENTUM,
    ),
    name="mnasnet",
)
