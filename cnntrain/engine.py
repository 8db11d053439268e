"""The training step loop and the evaluation loop, shared by training, validation and cnneval.

Metrics are summed on the device and read once per epoch: a `.item()` per batch would make
the host wait for the GPU at every step."""
from __future__ import annotations

import itertools
import time
from contextlib import nullcontext

import torch
from torch import nn
from tqdm import tqdm


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


class _Progress:
    """The batches of `loader` (in channels_last layout if asked) under a tqdm bar whose
    postfix (which needs a device sync) refreshes at most once a second."""

    def __init__(self, loader, desc: str, enabled: bool, channels_last: bool, max_steps=None):
        total = min(len(loader), max_steps or len(loader))
        # disable=None: no bar when stderr is not a terminal (CI logs, pipes)
        self.bar = tqdm(itertools.islice(loader, total), total=total, desc=desc, leave=False,
                        disable=None if enabled else True, dynamic_ncols=True)
        self.channels_last = channels_last
        self.last = time.monotonic()

    def __iter__(self):
        for x, y in self.bar:
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def update(self, loss_sum, correct, n):
        if self.bar.disable or time.monotonic() - self.last < 1.0:
            return
        self.last = time.monotonic()
        self.bar.set_postfix(loss=f"{loss_sum.item() / n:.4f}", acc=f"{correct.item() / n:.4f}")

    def close(self):
        self.bar.close()


def train_one_epoch(model: nn.Module, loader, criterion, optimizer, *, device: torch.device,
                    scheduler=None, scaler=None, amp_dtype=None, channels_last: bool = False,
                    grad_clip: float | None = None, max_steps: int | None = None, desc: str = "train",
                    progress: bool = True) -> dict:
    """One pass over `loader` (or its first `max_steps` batches); `scheduler`, if given, is
    stepped after every batch.
    Returns {"loss", "acc"} averaged over the samples seen and the training throughput "img_per_s"."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    start = time.perf_counter()
    bar = _Progress(loader, desc, progress, channels_last, max_steps)
    for x, y in bar:
        with autocast(device, amp_dtype):
            out = model(x)
            loss = criterion(out, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:  # fp16: scale the loss so small gradients do not underflow
            scaler.scale(loss).backward()
            if grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach() * len(y)
        correct += (out.argmax(1) == y).sum()
        n += len(y)
        bar.update(loss_sum, correct, n)
    bar.close()
    loss, acc = loss_sum.item() / max(n, 1), correct.item() / max(n, 1)  # waits for the device
    return {"loss": loss, "acc": acc, "img_per_s": n / (time.perf_counter() - start)}


@torch.no_grad()
def evaluate_loader(model: nn.Module, loader, criterion, *, device: torch.device, num_classes: int,
                    amp_dtype=None, channels_last: bool = False, max_steps: int | None = None,
                    keep_predictions: bool = False, desc: str = "eval", progress: bool = True) -> dict:
    """Loss, top-1, top-5 (None under 5 classes) and the confusion matrix
    (rows = true class, columns = predicted) over `loader` (or its first `max_steps` batches);
    with keep_predictions also each sample's "predicted" class, its "confidence" and "target"."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    top5 = torch.zeros((), device=device, dtype=torch.long)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.long)
    n = 0
    kept = []
    bar = _Progress(loader, desc, progress, channels_last, max_steps)
    for x, y in bar:
        with autocast(device, amp_dtype):
            out = model(x)
        loss_sum += criterion(out.float(), y) * len(y)
        if keep_predictions:
            confidence, predicted = out.float().softmax(1).max(1)
            kept.append((confidence, predicted, y))
        confusion += torch.bincount(y * num_classes + out.argmax(1), minlength=num_classes**2)
        if num_classes >= 5:
            top5 += (out.topk(5, 1).indices == y[:, None]).any(1).sum()
        n += len(y)
    bar.close()
    confusion = confusion.view(num_classes, num_classes).cpu()
    n = max(n, 1)
    result = {"loss": loss_sum.item() / n, "acc": confusion.diag().sum().item() / n,
              "top5": top5.item() / n if num_classes >= 5 else None, "confusion": confusion,
              "num_samples": int(confusion.sum())}
    if keep_predictions:
        for i, key in enumerate(("confidence", "predicted", "target")):
            result[key] = torch.cat([k[i] for k in kept]).cpu()
    return result
