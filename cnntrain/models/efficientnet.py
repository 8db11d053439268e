"""EfficientNet-B0 (Tan & Le, 2019) on top of torchvision's ``efficientnet_b0``.

Adapted: the first conv takes any number of input channels. For small inputs the overall
stride of 32 would leave 1 px of a 32 px image, so the 3x3/2 stem conv and the first block
that halves the resolution (the first 24-channel MBConv) become stride 1: stride 8, 32 -> 4 px.
Options such as ``dropout`` (0.2) and ``stochastic_depth_prob`` (0.2) go to torchvision.

Input: any size >= 8 px with the small stem (32 px -> 4x4 final map); the ImageNet
one keeps torchvision's strides (overall 32, >= 32 px; 224 px -> 7x7, 5.29 M parameters).
"""

from __future__ import annotations

from torchvision import models as tvm

from ._utils import kaiming_fan_out_init, torchvision_factory
from .registry import register_model

# torchvision's mode="fan_out" with the default leaky_relu(0) gain is the ReLU gain, so
# kaiming_fan_out_init is the family's own init.
register_model(
    torchvision_factory(
        tvm.efficientnet_b0, "features.0.0", init=kaiming_fan_out_init, unstride_next=True
    ),
    name="efficientnet_b0",
)
