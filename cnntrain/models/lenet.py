"""LeNet-5 (LeCun et al., 1998), written natively: torchvision has no LeNet.

Modern variant: ReLU and max-pooling instead of tanh and subsampling, and the first conv padded
so 28 px MNIST gives the paper's 32 px geometry. An adaptive pool in front of the classifier
lets other input sizes reach the 16x5x5 = 400 features the fully connected layers expect.
`lenet5_bn` adds batch normalization (Ioffe & Szegedy, 2015) after every convolution and hidden
fully connected layer, as d2l.ai's "LeNet with batch normalization": the same 62 k weights, but
it tolerates learning rates several times larger and converges in fewer epochs.

Input: any size >= 12 px; designed for 28/32 px. ``stem`` is ignored: one architecture
for every size.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .registry import register_model


class PoolTo(nn.AdaptiveAvgPool2d):
    """Adaptive average pooling to `output_size`, skipped when the map already has that size
    (28/32 px inputs): the identity pooling would still cost ~5 % of a LeNet-5 training step."""

    def forward(self, x: Tensor) -> Tensor:
        size = self.output_size
        return x if x.shape[-2:] == (size, size) else super().forward(x)


class LeNet5(nn.Module):
    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, batch_norm: bool = False
    ) -> None:
        super().__init__()

        def block(layer: nn.Module, width: int, norm: type[nn.Module]) -> list[nn.Module]:
            # a layer followed by BN carries no bias: BN's shift replaces it
            if batch_norm:
                layer.bias = None
            return [layer, *([norm(width)] if batch_norm else []), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(nn.Conv2d(in_channels, 6, kernel_size=5, padding=2), 6, nn.BatchNorm2d),
            nn.MaxPool2d(2),
            *block(nn.Conv2d(6, 16, kernel_size=5), 16, nn.BatchNorm2d),
            nn.MaxPool2d(2),
            PoolTo(5),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            *block(nn.Linear(16 * 5 * 5, 120), 120, nn.BatchNorm1d),
            *block(nn.Linear(120, 84), 84, nn.BatchNorm1d),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def _no_options(name: str, kwargs: dict) -> None:
    # One architecture for every input size, so `small` is ignored; there are no options.
    if kwargs:
        raise TypeError(f"{name}() got an unexpected keyword argument {next(iter(kwargs))!r}")


@register_model
def lenet5(*, in_channels: int, num_classes: int, small: bool, **kwargs: Any) -> nn.Module:
    _no_options("lenet5", kwargs)
    return LeNet5(in_channels, num_classes)


@register_model
def lenet5_bn(*, in_channels: int, num_classes: int, small: bool, **kwargs: Any) -> nn.Module:
    _no_options("lenet5_bn", kwargs)
    return LeNet5(in_channels, num_classes, batch_norm=True)
