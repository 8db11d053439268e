"""AlexNet (Krizhevsky et al., 2012) on top of ``torchvision.models.AlexNet``.

Adapted: the first conv takes any number of input channels. For small inputs (28-64 px) the
11x11 stride-4 stem would shrink the image below the three 3x3/2 max-pools, so it becomes a
3x3 stride-1 conv and the classifier reads a 2x2 instead of a 6x6 feature map.

Input: >= 15 px with the small stem, >= 63 px with the ImageNet 11x11/4 one (224 px:
61.1 M parameters).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.models import AlexNet

from ._utils import replace_conv
from .registry import register_model


@register_model
def alexnet(*, in_channels: int, num_classes: int, small: bool, **kwargs: Any) -> nn.Module:
    model = AlexNet(num_classes=num_classes, **kwargs)
    if small:
        model.features[0] = replace_conv(
            model.features[0], in_channels, kernel_size=3, stride=1, padding=1
        )
        model.avgpool = nn.AdaptiveAvgPool2d(2)
        fc = model.classifier[1]
        model.classifier[1] = nn.Linear(256 * 2 * 2, fc.out_features)
    else:
        model.features[0] = replace_conv(model.features[0], in_channels)
    return model
