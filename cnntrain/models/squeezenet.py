"""SqueezeNet 1.1 (Iandola et al., 2016) on top of torchvision's ``squeezenet1_1``.

Adapted: the first conv takes any number of input channels. For small inputs its 3x3/2
unpadded conv becomes 3x3/1 with padding 1; the three 3x3/2 max-pools (ceil mode) stay, so the
fire modules see 32 -> 16 -> 8 -> 4 px.

There is no linear layer: the classifier is dropout, a 1x1 conv to ``num_classes`` maps, a
ReLU and a global average pool. The logits are therefore never negative, and the final conv
starts at N(0, 0.01) so they start near 0. Options: ``dropout`` (0.5).

Input: >= 8 px with the small stem (32 px -> 4x4 final map), >= 17 px with the
ImageNet one (224 px -> 13x13, 1.24 M parameters).
"""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from ._utils import torchvision_factory
from .registry import register_model


def _squeezenet_init(conv: nn.Conv2d) -> None:
    # Same as torchvision's SqueezeNet for every conv but the classifier's.
    nn.init.kaiming_uniform_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


register_model(
    torchvision_factory(tvm.squeezenet1_1, "features.0", init=_squeezenet_init),
    name="squeezenet",
)
