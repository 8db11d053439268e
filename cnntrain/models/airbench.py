"""airbench94 (Keller Jordan, 2024: "94% on CIFAR-10 in 3.29 seconds on a single GPU",
github.com/KellerJordan/cifar10-airbench, airbench94.py): a small VGG-like network built for
fast CIFAR-10 training, written natively.

A 2x2 conv without padding whitens the input: its weights are the eigenvectors of the 2x2
patch second-moment matrix of training images, each scaled by 1 / sqrt(eigenvalue + 5e-4),
once as they are and once negated (2 * C * 4 channels: 24 for RGB), so that the GELU after it
keeps both signs of every component. They are frozen; its bias trains. `init_from_data(images)`
computes them; the trainer calls it once before the first step of a new run (a resumed run,
cnneval and cnnexport load the stored weights instead). Then three groups of conv3x3 ->
max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU, 64 / 256 / 256 channels, a global max-pool
and a linear layer without bias whose logits are scaled by 1/9. The convs start as an identity
on their first input channels (dirac) plus PyTorch's default init; BatchNorm has eps 1e-12,
momentum 0.4 (airbench's 0.6 in the other convention: the running statistics follow the last
few batches) and no trained scale (its weight is frozen at 1, its bias trains).

Input: any size >= 9 px, any channel count (32 px: 31 -> 15 -> 7 -> 3 px, then airbench's 3x3
max-pool, here a global one, the same at 32 px). model.stem does not apply: the whitening layer
is the stem. 1.97 M parameters at 3 channels and 10 classes (1,440 of them frozen: the
whitening weights and the BN scales), 0.12 GMACs per 32 px image (ResNet-18's CIFAR form: 0.56).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import register_model

# airbench94's hyper-parameters of the network (hyp['net'])
WHITEN_KERNEL = 2
WHITEN_EPS = 5e-4
WIDTHS = (64, 256, 256)
BN_MOMENTUM = 0.4  # PyTorch's convention: the weight of the new batch (airbench's 1 - 0.6)
LOGIT_SCALE = 1 / 9
# patches per matrix product when measuring the whitening statistics (about 64 MiB of floats)
PATCH_CHUNK = 2**24


class _Conv(nn.Conv2d):
    """3x3, 'same' padding, no bias; an identity on the first in_channels outputs (dirac) on
    top of the default init: an implicit residual path at the start."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1, bias=False)
        with torch.no_grad():
            nn.init.dirac_(self.weight[: min(in_channels, out_channels)])


def _norm(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=1e-12, momentum=BN_MOMENTUM)
    bn.weight.requires_grad_(False)  # no trained scale: the next conv scales
    return bn


class ConvGroup(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            _Conv(in_channels, out_channels),
            nn.MaxPool2d(2),
            _norm(out_channels),
            nn.GELU(),
            _Conv(out_channels, out_channels),
            _norm(out_channels),
            nn.GELU(),
        )


class Airbench94(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        k = WHITEN_KERNEL
        width = 2 * in_channels * k * k
        self.whiten = nn.Conv2d(in_channels, width, k, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from the data (init_from_data), frozen
        nn.init.zeros_(self.whiten.bias)
        self.act = nn.GELU()
        widths = (width, *WIDTHS)
        self.blocks = nn.Sequential(*(ConvGroup(a, b) for a, b in zip(widths, widths[1:])))
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(WIDTHS[-1], num_classes, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.blocks(self.act(self.whiten(x))))
        return self.head(x) * LOGIT_SCALE

    @torch.no_grad()
    def init_from_data(self, images: Tensor) -> None:
        """The whitening weights from normalized training images (N, C, H, W), the model's
        input: the eigenvectors of the patches' second-moment matrix, scaled to unit variance,
        and their negatives."""
        eigenvalues, eigenvectors = patch_eigens(images.float(), WHITEN_KERNEL)
        scaled = eigenvectors / torch.sqrt(eigenvalues + WHITEN_EPS).view(-1, 1)
        weight = torch.cat([scaled, -scaled]).view_as(self.whiten.weight)
        self.whiten.weight.copy_(weight)


def patch_eigens(images: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(eigenvalues, eigenvectors as rows), largest first, of the uncentered second-moment
    matrix of every k x k patch of `images`, flattened in the order of a conv weight's (C, k, k).
    The sum is taken in chunks on the images' device; the small eigenproblem in float64 on the
    host (MPS has no float64)."""
    n, c, h, w = images.shape
    dim = c * k * k
    per_image = (h - k + 1) * (w - k + 1)
    step = max(1, PATCH_CHUNK // (per_image * dim))
    moment = torch.zeros(dim, dim, dtype=torch.float64)
    for i in range(0, n, step):
        # (b, C, H', W', k, k) -> one row per patch, (C, k, k) order
        patches = images[i : i + step].unfold(2, k, 1).unfold(3, k, 1)
        rows = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, dim)
        moment += (rows.T @ rows).double().cpu()
    eigenvalues, eigenvectors = torch.linalg.eigh(moment / (n * per_image))
    eigenvalues, eigenvectors = eigenvalues.flip(0).clamp(min=0), eigenvectors.T.flip(0)
    return eigenvalues.float().to(images.device), eigenvectors.float().to(images.device)


@register_model
def airbench94(*, in_channels: int, num_classes: int, small: bool) -> nn.Module:
    return Airbench94(in_channels, num_classes)
