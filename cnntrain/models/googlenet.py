"""GoogLeNet / Inception v1 (Szegedy et al., 2014) on top of ``torchvision.models.GoogLeNet``.

Adapted: the first conv takes any number of input channels, and the auxiliary classifiers are
off so training mode returns a plain logits tensor. For small inputs the 7x7/2 stem and the
first two max-pools are replaced by a single 3x3 stride-1 conv (as in kuangliu/pytorch-cifar),
so 32 px reaches the inception blocks at 32 -> 16 -> 8 px instead of 4 -> 2 -> 1.

Input: any size >= 8 px.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models import GoogLeNet

from ._utils import replace_conv
from .registry import register_model


def _googlenet_init(conv: nn.Conv2d) -> None:
    # Same as GoogLeNet(init_weights=True).
    torch.nn.init.trunc_normal_(conv.weight, mean=0.0, std=0.01, a=-2, b=2)


@register_model
def googlenet(*, in_channels: int, num_classes: int, small: bool, **kwargs: Any) -> nn.Module:
    model = GoogLeNet(
        num_classes=num_classes,
        aux_logits=False,
        transform_input=False,
        init_weights=True,
        **kwargs,
    )
    if small:
        # conv1 is a BasicConv2d (conv + BN + ReLU): swapping its conv keeps the BN and ReLU.
        model.conv1.conv = replace_conv(
            model.conv1.conv, in_channels, kernel_size=3, stride=1, padding=1, init=_googlenet_init
        )
        model.maxpool1 = nn.Identity()
        model.maxpool2 = nn.Identity()
    else:
        model.conv1.conv = replace_conv(model.conv1.conv, in_channels, init=_googlenet_init)
    return model
