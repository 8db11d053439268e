"""ShuffleNet V2 1.0x (Ma et al., 2018) on top of torchvision's ``shufflenet_v2_x1_0``.

Adapted: the first conv takes any number of input channels. For small inputs the 3x3/2 conv
and 3x3/2 max-pool stem would leave 8 px of a 32 px image for the first stage and 1 px after
the last, so the conv becomes stride 1 and the max-pool goes (kuangliu/pytorch-cifar): the
three stages see 32 -> 16 -> 8 -> 4 px.

Input: any size >= 8 px with the small stem (32 px -> 4x4 final map), >= 32 px with
the ImageNet one (224 px -> 7x7, 2.28 M parameters).
"""

from __future__ import annotations

from torchvision import models as tvm

from ._utils import torchvision_factory
from .registry import register_model

# No init: torchvision's ShuffleNetV2 keeps PyTorch's default conv init, as a fresh conv has.
register_model(
    torchvision_factory(tvm.shufflenet_v2_x1_0, "conv1.0", pool="maxpool"), name="shufflenet_v2"
)
