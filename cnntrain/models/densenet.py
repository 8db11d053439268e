"""DenseNet-121 (Huang et al., 2016) on top of torchvision's ``densenet121``.

Adapted: the first conv takes any number of input channels. For small inputs the 7x7/2 conv
and 3x3/2 max-pool stem would leave 8 px of a 32 px image for the first dense block and 1 px
for the last, so it becomes a 3x3 stride-1 conv without max-pool, as the paper's own CIFAR
DenseNets do: the blocks see 32 -> 16 -> 8 -> 4 px (the transitions' 2x2 average pools).

Input: >= 8 px with the small stem (32 px -> 4x4 final map), >= 32 px with the ImageNet
one (224 px -> 7x7, 7.98 M parameters). Memory-hungry in training:
``+model.args.memory_efficient=true`` trades compute for memory.
"""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from ._utils import torchvision_factory
from .registry import register_model


def _densenet_init(conv: nn.Conv2d) -> None:
    # Same as torchvision's DenseNet: fan-in Kaiming normal, and its convs have no bias.
    nn.init.kaiming_normal_(conv.weight)


register_model(
    torchvision_factory(
        tvm.densenet121, "features.conv0", init=_densenet_init, pool="features.pool0"
    ),
    name="densenet121",
)
