"""LeNet-5 (LeCun et al., 1998), written natively: torchvision has no LeNet.

Modern variant: ReLU and max-pooling instead of tanh and subsampling, and the first conv padded
so 28 px MNIST gives the paper's 32 px geometry. An adaptive pool in front of the classifier
lets other input sizes reach the 16x5x5 = 400 features the fully connected layers expect.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from . import register_model


class PoolTo(nn.AdaptiveAvgPool2d):
    """Adaptive average pooling to `output_size`, skipped when the map already has that size
    (28/32 px inputs): the identity pooling would still cost ~5 % of a LeNet-5 training step."""

    def forward(self, x: Tensor) -> Tensor:
        size = self.output_size
        return x if x.shape[-2:] == (size, size) else super().forward(x)


class LeNet5(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            PoolTo(5),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@register_model
def lenet5(*, in_channels: int, num_classes: int, small: bool, **kwargs: Any) -> nn.Module:
    # One architecture for every input size, so `small` is ignored; there are no options.
    if kwargs:
        raise TypeError(f"lenet5() got an unexpected keyword argument {next(iter(kwargs))!r}")
    return LeNet5(in_channels, num_classes)
