"""Helpers shared by the model families to adapt torchvision's ImageNet architectures."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn


def replace_conv(
    conv: nn.Conv2d,
    in_channels: int,
    kernel_size: int | None = None,
    stride: int | None = None,
    padding: int | None = None,
    *,
    init: Callable[[nn.Conv2d], None] | None = None,
) -> nn.Conv2d:
    """Return a copy of ``conv`` with another input channel count and optionally another geometry.

    Output channels, bias, dilation and groups are kept. Returns ``conv`` itself when nothing
    changes, so the default configuration stays bit-identical to torchvision. ``init`` re-applies
    the family's initialisation: torchvision initialises in ``__init__``, before the swap, so a
    fresh conv would otherwise get PyTorch's default init instead.
    """
    kernel = conv.kernel_size if kernel_size is None else (kernel_size, kernel_size)
    stride_ = conv.stride if stride is None else (stride, stride)
    padding_ = conv.padding if padding is None else (padding, padding)
    old = (conv.in_channels, conv.kernel_size, conv.stride, conv.padding)
    if (in_channels, kernel, stride_, padding_) == old:
        return conv
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=kernel,
        stride=stride_,
        padding=padding_,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    if init is not None:
        init(new)
    return new


def imagenet_stem(in_channels: int, out_channels: int) -> nn.Sequential:
    """ResNet's ImageNet stem (7x7/2 conv, BN-ReLU, 3x3/2 max-pool: 224 px -> 56 px), put in
    front of the CIFAR networks above 64 px. Not in their papers, which only train on 32 px;
    without it their first group would run at full resolution, ~50x the cost of CIFAR."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    )


def kaiming_fan_out_init(conv: nn.Conv2d) -> None:
    """The conv init of torchvision's VGG, ResNet, MobileNet, EfficientNet and MnasNet."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def adapt_stem(
    model: nn.Module,
    conv: str,
    in_channels: int,
    small: bool,
    *,
    init: Callable[[nn.Conv2d], None] | None = None,
    pool: str | None = None,
    unstride_next: bool = False,
) -> nn.Module:
    """Fit the first conv of ``model`` (dotted path ``conv``) to ``in_channels`` and, if ``small``,
    to 28-64 px inputs; returns ``model``.

    The small stem is one 3x3 stride-1 conv with padding 1 (kuangliu/pytorch-cifar) in place of
    whatever downsampling stem the ImageNet model has, and the max-pool at ``pool`` goes: at
    32 px, ImageNet stems leave 8 px or less before the first stage and 1 px for the last one.
    Networks whose stem is a lone strided conv (the mobile families) get ``unstride_next``:
    their first downsampling block also becomes stride 1, for the same overall stride of 8
    (32 -> 4 px at the end) as the CIFAR ResNets.
    """
    first = model.get_submodule(conv)
    if not small:
        model.set_submodule(conv, replace_conv(first, in_channels, init=init))
        return model
    stem = replace_conv(first, in_channels, kernel_size=3, stride=1, padding=1, init=init)
    model.set_submodule(conv, stem)
    if pool is not None:
        model.set_submodule(pool, nn.Identity())
    if unstride_next:
        # torchvision registers these networks' layers in execution order, so with the stem at
        # stride 1 the first strided conv left is the depthwise conv of the first block that
        # halves the resolution. Its padding is k // 2, so at stride 1 it keeps the size.
        convs = (m for m in model.modules() if isinstance(m, nn.Conv2d))
        next(c for c in convs if c.stride != (1, 1)).stride = (1, 1)
    return model


def set_bn_momentum(model: nn.Module, momentum: float) -> nn.Module:
    """Set the running-statistics momentum of every BatchNorm layer of ``model`` (eps and weights
    stay); returns ``model``."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum
    return model


def torchvision_factory(
    builder: Callable[..., nn.Module],
    conv: str,
    *,
    init: Callable[[nn.Conv2d], None] | None = None,
    pool: str | None = None,
    unstride_next: bool = False,
    bn_momentum: float | None = None,
) -> Callable[..., nn.Module]:
    """A registry factory for torchvision's ``builder``: untrained, ``num_classes`` outputs,
    options passed on, and the stem adapted by ``adapt_stem`` (see there for the arguments).
    ``bn_momentum``: the BatchNorm momentum in place of torchvision's (see ``set_bn_momentum``)."""

    def factory(*, in_channels: int, num_classes: int, small: bool, **kwargs: Any) -> nn.Module:
        model = builder(weights=None, num_classes=num_classes, **kwargs)
        if bn_momentum is not None:
            set_bn_momentum(model, bn_momentum)
        return adapt_stem(
            model, conv, in_channels, small, init=init, pool=pool, unstride_next=unstride_next
        )

    return factory


# PyTorch's default BatchNorm momentum. MobileNetV3 (0.01) and MnasNet (0.0003) come from
# TensorFlow's ImageNet recipes of hundreds of thousands of steps; with them the running
# statistics take hundreds to thousands of steps to settle, so eval-mode (validation) accuracy
# stays at chance through short runs while training accuracy rises. The momentum is no weight:
# pretrained weights load the same, and fine-tuning re-estimates the statistics as fast.
BN_MOMENTUM = 0.1
