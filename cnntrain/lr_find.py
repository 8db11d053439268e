"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural
Networks"; fastai's `lr_find`): train a copy of the run's model for a few hundred steps while the
lr grows exponentially from lr_finder.start_lr to end_lr, smooth the loss, stop once it diverges,
and suggest the lr in the middle of the longest fall of the loss (fastai's "valley" rule), with
the lr of the steepest fall as a second opinion (`lr_finder.rule=steep` makes it the one used).

`lr_find=true` runs the test alone (`report`: lr_find.png, lr_find.json and the suggestion, no
training, no checkpoint); `optim.lr=find` runs it and trains with the suggestion (`settle`).
The test steps with the run's own pieces: its Trainer's model, criterion, precision and
placement, the training loader, and engine.train_one_epoch with an Update of its optimizer,
grad clipping and scaler. The schedule is the test's own (sched= is ignored). The model is
built and stepped inside a saved-and-restored RNG state, so the run trains, afterwards, from the
same initial weights and with the same random streams as with the number given directly."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from cnntrain import distributed
from cnntrain.checkpoint import rng_state, set_rng_state
from cnntrain.engine import Update, train_one_epoch
from cnntrain.errors import UserError
from cnntrain.files import save_figure, write_text
from cnntrain.logs import log_outputs, shown
from cnntrain.optim import create_optimizer
from cnntrain.plan import RunPlan
from cnntrain.schema import container
from cnntrain.trainer import Trainer, ranked

log = logging.getLogger("cnntrain")

# As fastai: the suggestion rules skip the first tenth of the steps (the loss average is still
# settling there) and the last few (where it shoots up).
SKIP_END = 5


@dataclass
class Finding:
    """What the test saw: the lr of each step, its loss, the bias-corrected moving average, why
    it ended, and the suggestions (None when the loss gave none; `problem` says why)."""

    settings: dict
    lrs: list[float] = field(default_factory=list)
    raw_losses: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # smoothed
    stopped: str = ""
    valley: float | None = None
    steep: float | None = None
    problem: str = ""

    @property
    def suggestion(self) -> float | None:
        """The lr of lr_finder.rule: the one printed as optim.lr= and trained with."""
        return self.steep if self.settings.get("rule") == "steep" else self.valley

    def says(self) -> str:
        """The suggestion in words, the other rule's lr beside it."""
        if self.settings.get("rule") == "steep":
            return f"optim.lr={self.steep:g} (the steepest fall; the valley rule gives {self.valley:g})"
        return f"optim.lr={self.valley:g} (valley; the steepest fall is at {self.steep:g})"


class _ExpSchedule:
    """The lr of step i: start * (end / start) ** (i / (n - 1)), set before that step (it
    stands in for a scheduler in Update, which steps it after every batch)."""

    def __init__(self, optimizer, start: float, end: float, n: int):
        self.optimizer, self.step_no = optimizer, 0
        low, high = math.log(start), math.log(end)  # in logs: no overflow of end / start
        self.lrs = [math.exp(low + (high - low) * i / (n - 1)) for i in range(n)]
        self._set()

    def _set(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lrs[min(self.step_no, len(self.lrs) - 1)]

    def step(self) -> None:
        self.step_no += 1
        self._set()


class _Recorder:
    """The run's criterion, keeping each batch's loss; `stop()`, asked after every batch,
    records (lr, loss, smoothed loss) and says whether the test is over."""

    def __init__(self, criterion, schedule: _ExpSchedule, finding: Finding):
        self.criterion, self.schedule, self.finding = criterion, schedule, finding
        s = finding.settings
        self.beta, self.factor, self.num_it = s["smoothing"], s["stop_factor"], s["num_it"]
        self.avg, self.best, self.last = 0.0, math.inf, None

    def __call__(self, out, target):
        loss = self.criterion(out, target)
        self.last = loss.detach()
        return loss

    @property
    def done(self) -> bool:
        return bool(self.finding.stopped)

    def stop(self) -> bool:
        f, step = self.finding, len(self.finding.lrs)
        lr = self.schedule.lrs[self.schedule.step_no - 1]  # Update has stepped it already
        loss = float(self.last)
        if distributed.world_size() > 1:  # the ranks' mean: every rank stops at the same step
            loss = distributed.summed(loss)[0] / distributed.world_size()
        where = f"stopped at step {step + 1} of {self.num_it}, lr {lr:.3g}"
        if not math.isfinite(loss):
            f.stopped = f"{where}: the loss became {loss}"
            return True
        self.avg = self.beta * self.avg + (1 - self.beta) * loss
        smooth = self.avg / (1 - self.beta ** (step + 1))
        f.lrs.append(lr)
        f.raw_losses.append(loss)
        f.losses.append(smooth)
        self.best = min(self.best, smooth)
        if self.factor and smooth > self.factor * self.best:
            f.stopped = (
                f"{where}: the smoothed loss {smooth:.4g} passed {self.factor:g}x its "
                f"minimum {self.best:.4g}"
            )
        elif step + 1 >= self.num_it:
            f.stopped = f"all {self.num_it} steps done"
        return self.done


def settings(cfg: DictConfig) -> dict:
    return container(cfg.lr_finder)


def with_lr(cfg: DictConfig, lr: float) -> DictConfig:
    """A read-only copy of `cfg` with optim.lr=lr."""
    cfg = copy.deepcopy(cfg)
    OmegaConf.set_readonly(cfg, False)
    cfg.optim.lr = lr
    OmegaConf.set_readonly(cfg, True)
    return cfg


def range_test(cfg: DictConfig, plan: RunPlan, data, device, run_dir: Path) -> Finding:
    """Runs the test on a model built as the run's Trainer builds its own (inside a restored
    RNG state: the run's own model starts from the same weights) and returns what it saw, the
    suggestions included."""
    s = settings(cfg)
    finding = Finding(settings=s)
    saved = rng_state(device)
    try:
        start = with_lr(cfg, s["start_lr"])
        probe = Trainer(start, plan, data, run_dir, device)
        # a fresh optimizer: the Trainer's schedule has already changed its lr (and momentum)
        optimizer = create_optimizer(start.optim, probe.model)
        schedule = _ExpSchedule(optimizer, s["start_lr"], s["end_lr"], s["num_it"])
        recorder = _Recorder(probe.criterion, schedule, finding)
        update = Update(optimizer, schedule, probe.scaler, cfg.grad_clip)
        model, loader = ranked(probe.model, cfg.sync_batchnorm, device), data.loaders["train"]
        epoch = 1
        while not recorder.done:
            loader.set_epoch(epoch)  # more steps than an epoch: the next epoch's batches
            train_one_epoch(
                model,
                loader,
                recorder,
                update,
                probe.on,
                max_steps=s["num_it"] - len(finding.lrs),
                desc=f"lr_find (lr {s['start_lr']:.0e} to {s['end_lr']:.0e})",
                on_nan="skip_batch",  # a non-finite loss ends the test (the recorder), not the run
                stop=recorder.stop,
            )
            epoch += 1
            if not finding.lrs:  # an epoch without a batch (nothing to learn from): no more
                finding.stopped = finding.stopped or "no training batches"
    finally:
        set_rng_state(saved, device)
    suggest(finding)
    return finding


def suggest(finding: Finding) -> None:
    """fastai's rules on the smoothed losses, between the first tenth of the steps and the last
    SKIP_END: "valley", the middle of the longest run of falling losses (the longest decreasing
    subsequence), and "steep", where the loss falls fastest per decade of lr. Where the loss
    gave no such stretch, `problem` says why and the suggestions stay None."""
    n_it = finding.settings["num_it"]
    first, last = n_it // 10, len(finding.losses) - SKIP_END
    lrs, losses = np.array(finding.lrs[first:last]), np.array(finding.losses[first:last])
    if len(losses) < 3:
        finding.problem = (
            f"the loss diverged at once, too early for a suggestion ({finding.stopped}); "
            "lower lr_finder.start_lr (or, if it is low already, look at the model and data)"
        )
        return
    # longest[i]: the longest strictly falling sequence of losses that ends at step i
    longest = np.ones(len(losses), dtype=int)
    for i in range(1, len(losses)):
        higher = losses[:i] > losses[i]
        if higher.any():
            longest[i] = longest[:i][higher].max() + 1
    end = int(longest.argmax())
    if longest[end] < 3:
        finding.problem = (
            f"the loss did not fall between lr {lrs[0]:.3g} and {lrs[-1]:.3g} "
            f"({finding.stopped}); raise lr_finder.end_lr or lr_finder.num_it, or look at "
            "the model and data"
        )
        return
    start = max(0, end - int(longest[end]))
    third = (end - start) / 3
    finding.valley = _rounded(lrs[start + int(third) + int(third / 2)])
    slopes = np.diff(losses) / np.diff(np.log(lrs))
    finding.steep = _rounded(lrs[int(slopes.argmin())])


def _rounded(lr) -> float:
    """3 significant digits: the lr printed is the lr trained with."""
    return float(f"{float(lr):.3g}")


# --------------------------------------------------------------------------- files
def write(finding: Finding, run_dir: Path, title: str) -> None:
    """lr_find.json (every step's lr and loss, the suggestions, the settings) and lr_find.png."""
    if not distributed.is_main():
        return
    record = {
        "suggestion": {"valley": finding.valley, "steep": finding.steep},
        "optim.lr": finding.suggestion,
        "stopped": finding.stopped,
        "problem": finding.problem or None,
        "settings": finding.settings,
        "lrs": finding.lrs,
        "losses": finding.losses,
        "raw_losses": finding.raw_losses,
    }
    write_text(run_dir / "lr_find.json", json.dumps(record, indent=2) + "\n")
    _plot(finding, run_dir / "lr_find.png", title)


def _plot(finding: Finding, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(finding.lrs, finding.raw_losses, color="0.8", lw=0.8, label="loss per step")
    ax.plot(finding.lrs, finding.losses, color="C0", lw=1.8, label="smoothed loss")
    for lr, name, color in ((finding.valley, "valley", "C3"), (finding.steep, "steepest", "C1")):
        if lr is not None:
            i = int(np.argmin(np.abs(np.log(finding.lrs) - math.log(lr))))
            ax.axvline(lr, color=color, ls="--", lw=1)
            label = f"{name}: {lr:.3g}" + (" (optim.lr)" if lr == finding.suggestion else "")
            ax.plot(lr, finding.losses[i], "o", color=color, label=label)
    s = finding.settings
    ax.set_xlim(s["start_lr"], s["end_lr"])
    if finding.losses:  # from the lowest loss to a little above the start: the climb at the
        # end would squash the rest of the curve
        low = min(min(finding.losses), min(finding.raw_losses))
        high = max(finding.losses[: max(1, len(finding.losses) // 10)])
        ax.set_ylim(low - 0.05 * (high - low + 1e-3), high + 0.15 * (high - low + 1e-3))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR range test: {title}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)  # below the flat start, left of the fall
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- the two uses
def _title(cfg: DictConfig) -> str:
    return f"{cfg.model.name} on {cfg.data.name}, {cfg.optim.name}, batch {cfg.data.batch_size}"


def _found(cfg: DictConfig, plan: RunPlan, data, device, run_dir: Path) -> Finding:
    s = settings(cfg)
    log.info(
        "lr_find: %d steps of %s with the lr from %.3g to %.3g (sched=%s is not used)",
        s["num_it"],
        _title(cfg),
        s["start_lr"],
        s["end_lr"],
        cfg.sched.name,
    )
    finding = range_test(cfg, plan, data, device, run_dir)
    write(finding, run_dir, _title(cfg))
    if finding.suggestion is None:
        raise UserError(f"lr_find: {finding.problem} (see {shown(run_dir / 'lr_find.png')})")
    log.info(
        "lr_find: %s; suggested %s; %s",
        finding.stopped,
        finding.says(),
        shown(run_dir / "lr_find.png"),
    )
    return finding


def report(cfg: DictConfig, plan: RunPlan, data, device, run_dir: Path) -> dict:
    """`lr_find=true`: the test alone; prints the suggestion and what to run with it."""
    finding = _found(cfg, plan, data, device, run_dir)
    if distributed.is_main():
        log_outputs(run_dir, [_next_command(finding.suggestion)])
    return {
        "lr_find": {"valley": finding.valley, "steep": finding.steep},
        "run_dir": str(run_dir),
    }


def _next_command(lr) -> str:
    """This command line with optim.lr=<lr> instead of lr_find=true."""
    from hydra.core.hydra_config import HydraConfig

    args = []
    if HydraConfig.initialized():
        args = [
            a
            for a in HydraConfig.get().overrides.task
            if not a.lstrip("+~").startswith(("lr_find=", "lr_finder.", "optim.lr=", "hydra."))
        ]
    return " ".join(["cnntrain", *args, f"optim.lr={lr:g}"])


def settle(
    cfg: DictConfig, plan: RunPlan, data, device, resumed: dict | None, run_dir: Path
) -> tuple[DictConfig, RunPlan]:
    """`optim.lr=find`: the config and plan with the lr found (under torchrun the ranks step
    together and see the same mean losses: one suggestion), or, resuming, with the lr the run
    was started with (the test does not run again)."""
    if resumed is not None:
        lr = resumed["config"]["optim"]["lr"]  # a number: stored.validated refuses `find`
        log.info(
            "optim.lr=find: a resumed run keeps the lr it was started with, %g (the LR finder "
            "does not run again)",
            lr,
        )
    else:
        lr = _found(cfg, plan, data, device, run_dir).suggestion
        log.info("optim.lr=find: training with the LR finder's suggestion, optim.lr=%g", lr)
    config = {**plan.config, "optim": {**plan.config["optim"], "lr": lr}}
    return with_lr(cfg, lr), dataclasses.replace(plan, config=config)
