"""Data-dependent initialization: a model with an `init_from_data(images)` method (airbench94's
whitening layer) gets it called once, before the first step of a new run, with training images
as the model takes them (normalized, unaugmented). A resumed run restores the weights it stored
instead: the trainer calls this only when it does not restore a checkpoint, and cnneval,
cnnpredict and cnnexport load the stored weights."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

log = logging.getLogger("cnntrain")

# airbench initializes its whitening layer from 5,000 training images; larger images give as
# many patches from fewer (at most 5,000 images of 32 x 32 px worth of pixels)
INIT_IMAGES = 5000
INIT_PIXELS = INIT_IMAGES * 32 * 32


def init_images(loader, device: torch.device) -> torch.Tensor:
    """Up to INIT_IMAGES training images, evenly spaced over the split (an image folder is in
    class order), as normalized floats on `device`."""
    n = loader.num_samples
    size = loader.transform.size
    wanted = max(1, min(n, INIT_IMAGES, INIT_PIXELS // (size * size)))
    rows = torch.linspace(0, n - 1, wanted).round().long().unique()
    return loader.transform.normalize(loader.pixels(rows).to(device))


def init_from_data(model: nn.Module, loader, device: torch.device) -> bool:
    """Runs `model.init_from_data` on images of `loader` (the training split) if the model has
    one; returns whether it did."""
    init = getattr(model, "init_from_data", None)
    if not callable(init):
        return False
    t0 = time.perf_counter()
    images = init_images(loader, device)
    init(images)
    log.info(
        "%s initialized from %d training images (%.2f s)",
        type(model).__name__,
        len(images),
        time.perf_counter() - t0,
    )
    return True
