"""ConvNeXt-T (Liu et al., 2022) on top of torchvision's ``convnext_tiny``.

Adapted: the first conv takes any number of input channels. The ImageNet stem is a 4x4/4
"patchify" conv, and the three 2x2/2 downsampling layers bring 224 px to 7 px; at 32 px it
would give 8 px to the first stage and 1 px to the last. For small inputs it becomes a 3x3/1
conv with padding 1, so the stages see 32 -> 16 -> 8 -> 4 px like the CIFAR ResNets. 3x3
rather than 2x2/1: an unpadded 2x2 gives odd sizes (31 px) that the 2x2/2 downsamplers floor
(15, 7, 3), and a 1-pixel "patch" stem cannot mix neighbouring pixels before the first
LayerNorm. Options such as ``stochastic_depth_prob`` (0.1) go to torchvision.

Input: >= 8 px with the small stem (32 px -> 4x4 final map), >= 32 px with the ImageNet
one (224 px -> 7x7, 28.59 M parameters). Trained with AdamW in the paper, not SGD.
"""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from ._utils import torchvision_factory
from .registry import register_model


def _convnext_init(conv: nn.Conv2d) -> None:
    # Same as torchvision's ConvNeXt.
    nn.init.trunc_normal_(conv.weight, std=0.02)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


register_model(
    torchvision_factory(tvm.convnext_tiny, "features.0.0", init=_convnext_init),
    name="convnext_tiny",
)
