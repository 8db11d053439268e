"""The training step loop and the evaluation loop, shared by training, validation and cnneval.

Metrics are summed on the device and read once per epoch: a `.item()` per batch would make
the host wait for the GPU at every step."""

from __future__ import annotations

import itertools
import logging
import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from cnntrain import amp_step, distributed
from cnntrain.calibration import brier_terms
from cnntrain.errors import UserError
from cnntrain.tta import tta_logits

log = logging.getLogger("cnntrain")
CPU = torch.device("cpu")

# Off a terminal (a log file, a pipe, SLURM, CI) there is no bar: a progress line is logged
# instead, every PROGRESS_EVERY_S seconds, and further apart in long epochs, so that an epoch
# gets at most PROGRESS_LINES of them: one every 30 s says the run is alive, while more than a
# few lines per epoch would bury the epoch lines.
PROGRESS_EVERY_S = 30.0
PROGRESS_LINES = 4


def duration(seconds: float) -> str:
    """`m:ss`, or `h:mm:ss` from an hour on."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


@dataclass(frozen=True)
class Placement:
    """Where a loop runs and in what precision: the device, the autocast dtype (None: fp32)
    and whether the images go in channels_last layout."""

    device: torch.device = CPU
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False


@dataclass
class EpochState:
    """The running sums of a training epoch (on the device) and how far it got. A mid-epoch
    checkpoint stores it, so that a resumed epoch continues from the next batch and ends with
    the numbers an uninterrupted one would have."""

    step: int = 0  # batches done
    loss_sum: torch.Tensor | float = 0.0
    correct: torch.Tensor | int = 0
    n: int = 0
    skipped: int = 0  # batches with a non-finite loss, skipped (on_nan=skip_batch)

    def to(self, device: torch.device) -> EpochState:
        """The running sums as tensors on `device`, where the steps add to them."""
        self.loss_sum = torch.as_tensor(self.loss_sum, dtype=torch.float32, device=device)
        self.correct = torch.as_tensor(self.correct, dtype=torch.long, device=device)
        return self

    def state_dict(self) -> dict:
        return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in vars(self).items()}


class _Progress:
    """The batches of `loader` from batch `start` on (in channels_last layout if asked) under a
    tqdm bar. Reading the device's sums waits for it, so on a GPU the postfix and the
    non-finite-loss check happen at most once a second; on the CPU the check is free, every step.
    Under torchrun the check is an all-reduce that every rank makes at the same steps (each
    CHECK_EVERY-th on a GPU), so that all stop together.
    Where the bar is not shown (stderr is not a terminal), rank 0 logs a progress line at one of
    those once-a-second reads, every PROGRESS_EVERY_S seconds (see there): step, running loss and
    accuracy (its own batches), img/s (all ranks), and the ETA of the epoch and of the run. The
    run's ETA assumes that each of the epochs after this one (`eta`: their number, and the
    seconds of the epochs done, validation included) takes the median of those seconds, or as
    long as this epoch's training before any is done."""

    CHECK_EVERY = 32

    def __init__(
        self,
        loader,
        desc: str,
        enabled: bool,
        on: Placement,
        max_steps=None,
        start: int = 0,
        first_n: int = 0,
        eta: tuple[int | None, list] = (None, []),
    ):
        total = min(len(loader), max_steps or len(loader))
        # disable=None: no bar when stderr is not a terminal (CI logs, pipes)
        self.bar = tqdm(
            itertools.islice(loader.iter_from(start), total - start),
            total=total,
            initial=start,
            desc=desc,
            leave=False,
            disable=None if enabled else True,
            dynamic_ncols=True,
        )
        self.total, self.desc, self.channels_last = total, desc, on.channels_last
        self.every_step = on.device.type == "cpu"
        self.ranks = distributed.world_size() > 1
        self.last = self.t0 = self.last_line = time.monotonic()
        self.start, self.first_n, self.lines = start, first_n, 0
        self.log_lines = enabled and self.bar.disable and distributed.is_main()
        self.epochs_after, epoch_times = eta
        self.epoch_s = statistics.median(epoch_times) if epoch_times else None

    def __iter__(self):
        for x, y in self.bar:
            if self.channels_last:  # a no-op for batches already NHWC (build_data's layout)
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def check(self, state: EpochState, on_nan: str, final: bool = False, lr: float = 0.0) -> None:
        now = time.monotonic()
        due = now - self.last >= 1.0
        if self.ranks:  # a clock would have the ranks check at different steps
            checked = final or self.every_step or state.step % self.CHECK_EVERY == 0
        else:
            checked = final or due or self.every_step
        if not (checked or due):
            return
        loss = float(state.loss_sum)
        if checked and on_nan == "stop":
            # a non-finite sum on any rank makes the sum over the ranks non-finite
            total = distributed.summed(loss)[0] if self.ranks else loss
            if not math.isfinite(total):
                where = "step" if self.every_step else "by step"
                raise UserError(
                    f"training loss became {total} at {self.desc}, {where} {state.step} "
                    f"(lr {lr:.4g}): the training diverged; stopped, the checkpoints "
                    "of the last complete epoch are untouched (lower optim.lr, set "
                    "grad_clip=, or on_nan=skip_batch)"
                )
        if due:  # the device was read just now: the bar's numbers or a progress line are free
            self.last = now
            n = max(state.n, 1)
            if not self.bar.disable:
                postfix = {"loss": f"{loss / n:.4f}", "acc": f"{int(state.correct) / n:.4f}"}
                etas = self._etas(now, state)
                if etas and etas[2] is not None:  # tqdm shows the epoch's own ETA
                    postfix["run ETA"] = duration(etas[2])
                self.bar.set_postfix(postfix)
            elif self.log_lines and not final and state.n and state.step < self.total:
                self._log_line(now, state, loss / n, int(state.correct) / n)

    def _etas(self, now: float, state: EpochState):
        """(this epoch's estimated length, seconds left in it, seconds left in the run or None)."""
        done = state.step - self.start
        if done <= 0:
            return None
        step_s = (now - self.t0) / done
        epoch_left = step_s * (self.total - state.step)
        run_left = None
        if self.epochs_after is not None:
            run_left = epoch_left + self.epochs_after * (self.epoch_s or step_s * self.total)
        return step_s * self.total, epoch_left, run_left

    def _log_line(self, now: float, state: EpochState, loss: float, acc: float) -> None:
        etas = self._etas(now, state)
        if etas is None or self.lines >= PROGRESS_LINES:
            return
        epoch_s, epoch_left, run_left = etas
        # every PROGRESS_EVERY_S, or a quarter of the epoch when that is longer: at most a few
        # lines an epoch (and none in an epoch shorter than PROGRESS_EVERY_S)
        if now - self.last_line < max(PROGRESS_EVERY_S, epoch_s / PROGRESS_LINES):
            return
        self.last_line, self.lines = now, self.lines + 1
        img_s = (state.n - self.first_n) * distributed.world_size() / max(now - self.t0, 1e-9)
        run = f", run ETA {duration(run_left)}" if run_left is not None else ""
        log.info(
            "%s step %d/%d loss %.4f acc %.4f %.0f img/s, epoch ETA %s%s",
            self.desc,
            state.step,
            self.total,
            loss,
            acc,
            img_s,
            duration(epoch_left),
            run,
        )

    def close(self):
        self.bar.close()


@dataclass
class Update:
    """What a batch's loss does to the weights: backward (scaled under fp16 by `scaler`, a
    GradScaler), gradient-norm clipping, the optimizer step and the weight average (`ema`, a
    ModelEma); `scheduler`, if given, steps after every batch, skipped ones included, so that the
    schedule follows the steps. Under a scaler the step never waits for the device, fused
    optimizer or not (amp_step.py)."""

    optimizer: torch.optim.Optimizer
    scheduler: object = None
    scaler: object = None
    grad_clip: float | None = None
    ema: object = None

    def __post_init__(self) -> None:
        self.scaled_step = (
            None if self.scaler is None else amp_step.ScaledStep(self.scaler, self.optimizer)
        )

    def __call__(self, model: nn.Module, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:  # fp16: scale the loss so small gradients do not underflow
            self.scaler.scale(loss).backward()
            if self.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
            self.scaled_step()
            self.scaler.update()
        else:
            loss.backward()
            if self.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(model)

    def step_schedule(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def train_one_epoch(
    model: nn.Module,
    loader,
    criterion,
    update: Update,
    on: Placement = Placement(),
    *,
    max_steps: int | None = None,
    desc: str = "train",
    progress: bool = True,
    on_nan: str = "stop",
    state: EpochState | None = None,
    stop=None,
    eta: tuple[int | None, list] = (None, []),
) -> dict:
    """One pass over `loader` (or its first `max_steps` batches), continuing `state` (a resumed
    epoch) if given. `stop()` is asked after every batch whether to end the epoch early (a
    signal). A non-finite loss stops training (UserError) or, with on_nan="skip_batch", skips
    that batch's update. `eta` (the epochs left after this one, the seconds of the epochs
    done) gives the run's ETA to the progress bar or line (_Progress).
    Returns {"loss", "acc"} averaged over the samples seen, the throughput "img_per_s", and
    "state" (its step < "total" if stopped early)."""
    model.train()
    state = (state or EpochState()).to(on.device)
    first, start = state.n, time.perf_counter()
    bar = _Progress(loader, desc, progress, on, max_steps, state.step, first, eta)
    for x, target in bar:
        y = target if target.ndim == 1 else target.argmax(1)  # MixUp/CutMix: the larger share
        with autocast(on.device, on.amp_dtype):
            out = model(x)
            loss = criterion(out, target)
        # skip_batch reads the loss every step (a device sync on a GPU): only when asked for.
        # The ranks decide together, at the same step: one rank skipping (or stopping) alone
        # would pair its next gradient all-reduce with another's current one.
        if on_nan == "skip_batch" and distributed.any_rank(not torch.isfinite(loss)):
            state.skipped += 1
        else:
            update(model, loss)
            state.loss_sum += loss.detach() * len(y)
            state.correct += (out.argmax(1) == y).sum()
            state.n += len(y)
        update.step_schedule()
        state.step += 1
        bar.check(state, on_nan, lr=update.lr)
        if stop is not None and stop():
            break
    bar.close()
    bar.check(state, on_nan, final=True, lr=update.lr)  # waits for the device
    loss_sum, correct, n, new = distributed.summed(
        state.loss_sum, state.correct, state.n, state.n - first
    )
    return {
        "loss": loss_sum / max(n, 1),
        "acc": correct / max(n, 1),
        "state": state,
        "loss_sum": loss_sum,
        "correct": int(correct),
        "n": int(n),  # over all ranks
        "total": bar.total,
        "img_per_s": new / (time.perf_counter() - start),
    }


@torch.no_grad()
def evaluate_loader(
    model: nn.Module,
    loader,
    on: Placement = Placement(),
    *,
    num_classes: int,
    max_steps: int | None = None,
    keep_predictions: bool = False,
    desc: str = "eval",
    progress: bool = True,
    tta: str | None = None,
    keep_logits: bool = False,
) -> dict:
    """Cross-entropy loss, top-1, top-5 (None under 5 classes) and the confusion matrix
    (rows = true class, columns = predicted) over `loader` (or its first `max_steps` batches);
    with keep_predictions also each sample's "predicted" class, its "confidence", "target",
    "nll" (its cross-entropy) and "brier" (its Brier term, calibration.brier_terms); with
    keep_logits also the (N, K) "logits" (temperature scaling refits on them).
    Per batch only the top-k classes, the log-sum-exp of the logits and the Brier term are kept
    (everything above follows from them); the rest is computed once at the end, in a few large
    ops. tta: test-time augmentation, the logits averaged over views of each image (tta.py: flip,
    flip_shift)."""
    model.eval()
    k = min(5, num_classes)
    kept = []
    bar = _Progress(loader, desc, progress, on, max_steps)
    for x, y in bar:
        with autocast(on.device, on.amp_dtype):
            out = tta_logits(model, x, tta)
        out = out.float()
        top, lse = out.topk(k, 1), out.logsumexp(1)
        nll = lse - out.gather(1, y[:, None])[:, 0]
        batch = [top.indices, top.values[:, 0] - lse, nll, y, brier_terms(out, y)]
        kept.append(batch + [out] if keep_logits else batch)
    bar.close()
    # a rank's chunk may be empty
    empty = [
        torch.empty(0, k, dtype=torch.long),
        torch.empty(0),
        torch.empty(0),
        torch.empty(0).long(),
        torch.empty(0),
    ] + ([torch.empty(0, num_classes)] if keep_logits else [])
    parts = [torch.cat(p) for p in zip(*kept)] if kept else [e.to(on.device) for e in empty]
    top, log_confidence, loss, target, brier, *logits = distributed.gather_cat(parts)
    if not len(target):
        raise UserError(f"{desc}: no images to evaluate")
    predicted = top[:, 0]
    confusion = torch.bincount(target * num_classes + predicted, minlength=num_classes**2)
    confusion = confusion.view(num_classes, num_classes).cpu()
    n = len(target)
    result = {
        "loss": loss.sum().item() / n,
        "acc": confusion.diag().sum().item() / n,
        "top5": (top == target[:, None]).any(1).sum().item() / n if num_classes >= 5 else None,
        "confusion": confusion,
        "num_samples": n,
    }
    if keep_predictions:
        result.update(
            confidence=log_confidence.exp().cpu(),
            predicted=predicted.cpu(),
            target=target.cpu(),
            nll=loss.cpu(),
            brier=brier.cpu(),
        )
    if keep_logits:
        result["logits"] = logits[0].cpu()
    return result
