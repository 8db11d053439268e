"""Wide ResNet (Zagoruyko & Komodakis, 2016), the CIFAR network WRN-28-10, written natively.

torchvision's ``wide_resnet50_2`` is a different network (an ImageNet bottleneck ResNet with
wider 3x3 convs). This is the paper's CIFAR design, following the authors' PyTorch code: a
3x3 conv to 16 channels, then 3 groups of (depth - 4) / 6 pre-activation basic blocks with
16k / 32k / 64k channels (k = width) at strides 1 / 2 / 2, then BN-ReLU, global average pool
and a linear classifier. WRN-28-10 has 36.5 M parameters at 10 classes.

5.2 G multiply-adds per 32 px image. Input: any size >= 4 px (32 px -> 8x8 final
map). Above 64 px (stem=imagenet) a ResNet-style 7x7/2 conv + 3x3/2 max-pool stem goes in
front, not in the paper, so that 224 px costs 16 G (3x CIFAR) instead of ~50x (>= 16 px;
224 px -> 14x14). Option: ``dropout`` between the convs of each block (0.0; the paper uses
0.3).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._utils import imagenet_stem, kaiming_fan_out_init
from .registry import register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-dropout-conv3x3, plus the shortcut (He et al., 2016b).

    Where the shape changes, the 1x1 projection shortcut reads the pre-activated input, as in
    the authors' code, so the identity path of the other blocks carries no BN or ReLU.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # Between the convs, where the paper found dropout to help (its Sec. 2.4).
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = torch.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + shortcut


class WideResNet(nn.Module):
    def __init__(
        self,
        depth: int = 28,
        width: int = 10,
        in_channels: int = 3,
        num_classes: int = 10,
        dropout: float = 0.0,
        small: bool = True,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"Wide ResNet depth must be 6n + 4, got {depth}")
        blocks_per_group = (depth - 4) // 6
        self.stem: nn.Module = (
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
            if small
            else imagenet_stem(in_channels, 16)
        )
        layers: list[nn.Module] = []
        in_planes = 16
        for planes, stride in ((16 * width, 1), (32 * width, 2), (64 * width, 2)):
            for i in range(blocks_per_group):
                layers.append(PreActBlock(in_planes, planes, stride if i == 0 else 1, dropout))
                in_planes = planes
        self.blocks = nn.Sequential(*layers)
        # Pre-activation blocks end on a conv, so the head normalises and activates first.
        self.head = nn.Sequential(
            nn.BatchNorm2d(in_planes),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(in_planes, num_classes),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                kaiming_fan_out_init(module)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


@register_model
def wrn28_10(*, in_channels: int, num_classes: int, small: bool, dropout: float = 0.0) -> nn.Module:
    return WideResNet(28, 10, in_channels, num_classes, dropout=dropout, small=small)
