"""SE-ResNet (Hu et al., 2017): ResNet with a squeeze-and-excitation module in every block.

torchvision has no SENet, so the SE module is written here and added to torchvision's
``BasicBlock`` / ``Bottleneck`` by subclassing; the network itself is torchvision's ``ResNet``
with these blocks, and gets the same stem adaptation as resnet.py (3x3 stride-1 stem without
max-pool for small inputs).

The SE module rescales the residual branch before the addition, so the identity path stays
untouched (the paper's "SE-ResNet module", its Fig. 3).

The SE modules' reduction is 16. Input: any size >= 8 px with the small stem (32 px ->
4x4 final map), >= 32 px with the ImageNet one; parameters at 224 px: se_resnet18 11.78 M,
se_resnet50 28.09 M.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ._utils import adapt_stem, kaiming_fan_out_init
from .registry import register_model


class SqueezeExcitation(nn.Module):
    """Squeeze: global average pool to one number per channel. Excitation: a bottleneck MLP
    (``channels // reduction`` hidden units) and a sigmoid give a gate in (0, 1) per channel.
    The input is multiplied by its gates, so channels are re-weighted by global context."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)

    def forward(self, x: Tensor) -> Tensor:
        squeezed = x.mean(dim=(2, 3))
        gates = torch.sigmoid(self.fc2(torch.relu(self.fc1(squeezed))))
        return x * gates[:, :, None, None]


class _SEBlock:
    """Mixin for torchvision's residual blocks: SE on the residual branch, then the addition.

    torchvision's ``forward`` adds the shortcut right after the last BN, with no hook in between,
    so the blocks say what their residual branch is and this ``forward`` replaces theirs.
    """

    def __init__(self, inplanes: int, planes: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(inplanes, planes, *args, **kwargs)  # type: ignore[call-arg]
        self.se = SqueezeExcitation(planes * self.expansion)  # type: ignore[attr-defined]

    def forward(self, x: Tensor) -> Tensor:
        downsample = self.downsample  # type: ignore[attr-defined]
        identity = x if downsample is None else downsample(x)
        return self.relu(self.se(self.residual(x)) + identity)  # type: ignore[attr-defined]


class SEBasicBlock(_SEBlock, BasicBlock):
    def residual(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class SEBottleneck(_SEBlock, Bottleneck):
    def residual(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


def _se_resnet(
    block: type[BasicBlock | Bottleneck],
    layers: list[int],
    in_channels: int,
    num_classes: int,
    small: bool,
    **kwargs: Any,
) -> nn.Module:
    # ResNet's own init covers the convs and BNs; the SE layers keep nn.Linear's default init.
    model = ResNet(block, layers, num_classes=num_classes, **kwargs)
    return adapt_stem(model, "conv1", in_channels, small, init=kaiming_fan_out_init, pool="maxpool")


# Same depths as torchvision's resnet18 / resnet50.
register_model(partial(_se_resnet, SEBasicBlock, [2, 2, 2, 2]), name="se_resnet18")
register_model(partial(_se_resnet, SEBottleneck, [3, 4, 6, 3]), name="se_resnet50")
