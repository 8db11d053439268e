"""The CIFAR ResNets of He et al. (2015, Sec. 4.2): ResNet-20/32/44/56/110, written natively.

torchvision's ResNets are the ImageNet design (64-512 channels, 11 M+ parameters). The paper's
CIFAR networks are a 3x3 conv to 16 channels, then three groups of n basic blocks with 16 / 32 /
64 channels at strides 1 / 2 / 2 (depth 6n + 2), global average pooling and a linear layer:
0.27 M parameters for ResNet-20, 91.25 % on CIFAR-10 in the paper. Where a group halves the
size, the shortcut is the paper's option A: the identity, subsampled, with zero channels
appended, so it adds no parameters. The blocks are torchvision's BasicBlock.

Input: any size >= 4 px. Above 64 px (stem=imagenet) a ResNet 7x7/2 + max-pool stem
goes in front of the paper's 3x3 conv. Parameters at 10 classes: resnet20 0.27 M, resnet32
0.46 M, resnet44 0.66 M, resnet56 0.85 M, resnet110 1.73 M.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from ._utils import imagenet_stem, kaiming_fan_out_init
from .registry import register_model


class PadShortcut(nn.Module):
    """Option A: stride-2 subsampling, then zero channels to widen in_planes to planes."""

    def __init__(self, in_planes: int, planes: int) -> None:
        super().__init__()
        self.extra = planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        half = self.extra // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra - half))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10, small: bool = True):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        self.stem = (
            nn.Sequential(
                nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
                nn.BatchNorm2d(16),
                nn.ReLU(inplace=True),
            )
            if small
            else imagenet_stem(in_channels, 16)
        )
        blocks, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range((depth - 2) // 6):
                down = PadShortcut(in_planes, planes) if in_planes != planes else None
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, down))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                kaiming_fan_out_init(module)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


def _register(depth: int) -> None:
    def factory(*, in_channels: int, num_classes: int, small: bool) -> nn.Module:
        return CifarResNet(depth, in_channels, num_classes, small)

    register_model(factory, name=f"resnet{depth}")


for _depth in (20, 32, 44, 56, 110):
    _register(_depth)
