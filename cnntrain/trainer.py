"""The training of one run, read top to bottom: `Trainer(...)` sets up the model, optimizer,
schedule, precision, weight average, trackers and checkpoint saver from the run plan;
`restore` continues a checkpoint, `init_from_data` starts a new run's data-dependent
initialization instead; `fit` runs the epochs (train, validate, log, checkpoint,
early stop, a signal's clean stop); `test` scores the best checkpoint on the test split."""

from __future__ import annotations

import itertools
import logging
import signal
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from cnntrain import calibration, distributed, resume
from cnntrain.checkpoint import CheckpointSaver, load_checkpoint, rng_state
from cnntrain.data import Data
from cnntrain.datainit import init_from_data
from cnntrain.ema import ModelEma
from cnntrain.engine import Placement, Update, evaluate_loader, train_one_epoch
from cnntrain.errors import Interrupted
from cnntrain.html_report import RunReport
from cnntrain.logs import shown
from cnntrain.models import build_model
from cnntrain.optim import create_optimizer, create_scheduler
from cnntrain.plan import RunPlan
from cnntrain.report import class_averages
from cnntrain.rundir import in_sweep
from cnntrain.runtime import StopSignals, amp_dtype, grad_scaler, input_layout
from cnntrain.tracking import RunTracker

log = logging.getLogger("cnntrain")


class Trainer:
    def __init__(self, cfg: DictConfig, plan: RunPlan, data: Data, run_dir: Path, device):
        self.cfg, self.plan, self.data, self.device = cfg, plan, data, device
        self.dtype = amp_dtype(cfg.amp, device, cfg.amp_dtype)
        self.model, self.summary = build_model(
            plan.model_cfg, plan.in_channels, plan.num_classes, plan.image_size, device
        )
        self.nhwc = input_layout(cfg, device)
        if self.nhwc:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = create_optimizer(cfg.optim, self.model)
        self.scheduler, self.interval = create_scheduler(
            cfg.sched, self.optimizer, epochs=cfg.epochs, steps_per_epoch=plan.steps_per_epoch
        )
        self.scaler = grad_scaler(self.dtype, device)
        self.ema = ModelEma(self.model, cfg.ema.decay) if cfg.ema.decay else None
        weight = plan.class_weights  # loss.class_weights; label smoothing applies under them
        self.criterion = nn.CrossEntropyLoss(
            weight=None if weight is None else torch.tensor(weight, device=device),
            label_smoothing=cfg.label_smoothing,
        )
        self.on = Placement(device, self.dtype, self.nhwc)
        self.max_eval_steps = cfg.max_eval_steps
        self.run_dir, self.main = run_dir, distributed.is_main()  # the one process writing files
        self.start, self.since_best, self.partial = 1, 0, None
        self.tracker = self.saver = None  # made by begin(), after a restore

    def restore(self, resumed: dict, changed: list[str]) -> None:
        """The model, optimizer, schedule, scaler, weight average and random streams of a
        checkpoint, and where its run stood."""
        resume.restore_ema(self.ema, resumed)  # first: the model below is the averaged one's base
        self.model.load_state_dict(resumed.get("train_model", resumed["model"]))
        resume.restore_optimizer(self.optimizer, resumed["optimizer"])
        self.scheduler = resume.restore_schedule(
            self.cfg,
            resumed,
            changed,
            self.optimizer,
            self.scheduler,
            self.plan.steps_per_epoch,
            self.interval,
        )
        if self.scaler is not None and resumed.get("scaler"):
            self.scaler.load_state_dict(resumed["scaler"])
        resume.restore_rng(resumed["rng"], self.device)
        self.start, self.partial = resumed["epoch"] + 1, resumed.get("partial")
        self.since_best = resumed.get("since_best", 0)

    def init_from_data(self) -> None:
        """A new run's data-dependent initialization (datainit.py: a model with an
        `init_from_data(images)` method gets training images), before the first step. Not on a
        resume: the checkpoint's weights are the run's."""
        init_from_data(self.model, self.data.loaders["train"], self.device)

    def begin(self, resumed: dict | None, title: str) -> None:
        """The step model (DDP, compile), the tracker and the checkpoint saver, continuing the
        history, best metric and top-k of `resumed` if given."""
        cfg = self.cfg
        self.step_model = ranked(self.model, cfg.sync_batchnorm, self.device)
        self.step_model = torch.compile(self.step_model) if cfg.compile else self.step_model
        # after a restore, which may replace the schedule
        per_step = self.scheduler if self.interval == "step" else None
        self.update = Update(self.optimizer, per_step, self.scaler, cfg.grad_clip, self.ema)
        # EMA weights, when kept, are the ones validated, tested and saved as a checkpoint's model.
        # Evaluation runs eager by design, never through the compiled (or DDP) step model: its
        # .eval() mode and the smaller last batch would each recompile it (2-3 compiles of tens
        # of seconds in epoch 1), for a pass that is a small part of an epoch.
        self.eval_model = self.ema.module if self.ema is not None else self.model
        report = None
        if self.main:  # report.html, written by the tracker of the one process writing files
            info = {"config": self.plan.config, "summary": self.summary, "epochs": cfg.epochs}
            report = RunReport(self.run_dir, title, **info)
        self.tracker = RunTracker(
            self.run_dir,
            cfg.epochs,
            resumed["history"] if resumed else [],
            write=self.main,
            title=title,
            num_classes=self.plan.num_classes,
            report=report,
        )
        self.saver = CheckpointSaver(
            self.run_dir / "checkpoints",
            resumed["best_metric"] if resumed else None,
            cfg.checkpoint.keep_top_k,
            resumed.get("top_k", []) if resumed else [],
            write=self.main,
        )
        if "val" not in self.data.loaders:
            log.info("no validation data (data.val_split=0): best.pt is chosen by train accuracy")

    def state(self, epoch: int, metrics: dict) -> tuple[dict, dict]:
        """A checkpoint's contents after `epoch`: (what best.pt keeps, what last.pt adds)."""
        core = {
            "model": (self.ema.module if self.ema is not None else self.model).state_dict(),
            "config": self.plan.config,
            "classes": self.plan.classes,
            "epoch": epoch,
            "metrics": metrics,
        }
        resume_state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": distributed.gathered(rng_state(self.device)),  # one per rank
            "history": self.tracker.history,
            "since_best": self.since_best,
        }
        if self.ema is not None:
            resume_state.update(
                train_model=self.model.state_dict(), ema_n_averaged=self.ema.n_averaged
            )
        return core, resume_state

    def fit(self) -> None:
        """The epochs from where the run stands to cfg.epochs, or to an early stop; a signal
        saves last.pt and raises Interrupted."""
        cfg = self.cfg
        with StopSignals() as signals:
            # the ranks must stop at the same batch: they compare notes every 8 batches
            stop = signals.requested if distributed.world_size() == 1 else _every_8th_batch(signals)
            for epoch in range(self.start, cfg.epochs + 1):
                row = self.epoch(epoch, signals, stop)
                metric = row["val_acc"] if row["val_acc"] is not None else row["train_acc"]
                self.since_best = 0 if self.saver.is_better(metric) else self.since_best + 1
                self.saver.save(*self.state(epoch, row), metric)
                distributed.barrier()  # best.pt is complete before any rank reads it
                patience = cfg.early_stop.patience
                if patience and self.since_best >= patience and epoch < cfg.epochs:
                    log.info(
                        "early stop after epoch %d: no better %s accuracy for %d epochs",
                        epoch,
                        "val" if "val" in self.data.loaders else "train",
                        patience,
                    )
                    return
                if distributed.any_rank(signals.requested()) and epoch < cfg.epochs:
                    raise _interrupted(
                        signals, self.saver.last, f"after epoch {epoch}/{cfg.epochs}"
                    )

    def epoch(self, epoch: int, signals: StopSignals, stop) -> dict:
        """One epoch of training and validation: its metrics.csv row."""
        cfg, t0, loader = self.cfg, time.perf_counter(), self.data.loaders["train"]
        # a resumed epoch keeps the lr it started with, for its metrics.csv row
        lr = self.partial["lr"] if self.partial else self.optimizer.param_groups[0]["lr"]
        loader.set_epoch(epoch)
        tr = train_one_epoch(
            self.step_model,
            loader,
            self.criterion,
            self.update,
            self.on,
            desc=f"epoch {epoch}/{cfg.epochs}",
            max_steps=cfg.max_steps_per_epoch,
            on_nan=cfg.on_nan,
            state=resume.epoch_state(self.partial),
            stop=stop,
            eta=(cfg.epochs - epoch, [r["time"] for r in self.tracker.history]),
        )
        self.partial = None
        if tr["state"].skipped:
            log.warning(
                "epoch %d: skipped %d batches with a non-finite loss (on_nan=skip_batch)",
                epoch,
                tr["state"].skipped,
            )
        if tr["state"].step < tr["total"]:  # stopped by a signal in the middle of the epoch
            self.stop_in_epoch(epoch, lr, tr, signals)
        if self.interval == "epoch":
            self.scheduler.step()
        va = self.validate()
        row = {
            "epoch": epoch,
            "train_loss": tr["loss"],
            "train_acc": tr["acc"],
            "val_loss": va["loss"],
            "val_acc": va["acc"],
            "lr": lr,
            "time": time.perf_counter() - t0,
            "img_per_s": tr["img_per_s"],
        }
        self.tracker.log_epoch(row)
        if "val" in self.data.loaders:
            self.tracker.log_predictions(self.data.loaders["val"], va, self.plan.classes, epoch)
        return row

    def validate(self) -> dict:
        val = self.data.loaders.get("val")
        if val is None:
            return {"loss": None, "acc": None}
        distributed.main_buffers(self.eval_model)
        return evaluate_loader(
            self.eval_model,
            val,
            self.on,
            num_classes=self.plan.num_classes,
            max_steps=self.max_eval_steps,
            keep_predictions=True,
            desc="val",
        )

    def stop_in_epoch(self, epoch: int, lr: float, tr: dict, signals: StopSignals):
        """last.pt with the running sums of the stopped epoch (each rank's own), then Interrupted."""
        done = distributed.gathered(tr["state"].state_dict())
        history = self.tracker.history
        core, resume_state = self.state(epoch - 1, history[-1] if history else {})
        partial = {"epoch": epoch, "lr": lr, "state": done}
        self.saver.save_last({**core, **resume_state, "partial": partial})
        distributed.barrier()
        where = f"in epoch {epoch}/{self.cfg.epochs} after step {tr['state'].step} of {tr['total']}"
        raise _interrupted(signals, self.saver.last, where)

    def test(self) -> tuple[dict, torch.Tensor | None]:
        """The test score of best.pt: (its part of results.json, the confusion matrix or None)."""
        best = load_checkpoint(self.saver.best)
        out = {
            "best_epoch": best["epoch"],
            "best_val_acc": best["metrics"]["val_acc"],
            "checkpoint": str(self.saver.best),
            "test_acc": None,
            "test_macro_f1": None,
            "test_balanced_acc": None,
            "test_top5": None,
            "test_loss": None,
            "test_ece": None,
        }
        loader = self.data.loaders.get("test")
        if loader is None:
            log.info("no test split; the final test score is skipped")
            return out, None
        self.model.load_state_dict(best["model"])
        te = evaluate_loader(
            self.model,
            loader,
            self.on,
            num_classes=self.plan.num_classes,
            max_steps=self.max_eval_steps,
            desc="test",
            keep_predictions=True,  # a few numbers an image: for the ECE
            tta=self.cfg.tta,
        )
        averages = class_averages(te["confusion"])
        out.update(
            test_tta=self.cfg.tta,
            test_acc=te["acc"],
            test_macro_f1=averages["macro_f1"],
            test_balanced_acc=averages["balanced_acc"],
            test_top5=te["top5"],
            test_loss=te["loss"],
            test_ece=calibration.metrics(calibration.terms_of(te))["ece"],
            test_images=te["num_samples"],
            test_capped=te["num_samples"] < loader.num_samples,
        )
        _log_test(
            best["epoch"],
            {**te, **averages},
            loader.num_samples,
            self.max_eval_steps,
            self.saver.best,
            self.cfg.tta,
        )
        return out, te["confusion"]


def _log_test(epoch: int, te: dict, images: int, max_steps, best: Path, tta) -> None:
    with_tta = f" with tta={tta}" if tta else ""
    if te["num_samples"] < images:  # max_eval_steps: a quick look, not the test score
        log.info(
            "test accuracy of best.pt (epoch %d)%s: %.4f (macro-F1 %.4f, balanced accuracy "
            "%.4f, loss %.4f) on only %d of the %d test images (max_eval_steps=%d); the full "
            "test: cnneval ckpt=%s",
            epoch,
            with_tta,
            te["acc"],
            te["macro_f1"],
            te["balanced_acc"],
            te["loss"],
            te["num_samples"],
            images,
            max_steps,
            shown(best),
        )
    else:
        log.info(
            "test accuracy of best.pt (epoch %d)%s: %.4f (macro-F1 %.4f, balanced accuracy "
            "%.4f, loss %.4f, %d images)",
            epoch,
            with_tta,
            te["acc"],
            te["macro_f1"],
            te["balanced_acc"],
            te["loss"],
            te["num_samples"],
        )


def ranked(model: nn.Module, sync_batchnorm: bool, device: torch.device) -> nn.Module:
    """The model as the ranks step it together: under torchrun wrapped in DDP (its BatchNorm
    layers synchronized if asked), else `model` itself."""
    if distributed.world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _every_8th_batch(signals: StopSignals):
    """A stop test for several ranks: every 8th call asks all ranks (a collective) whether any
    was asked to stop; the other calls answer no without communicating."""
    count = itertools.count(1)
    return lambda: next(count) % 8 == 0 and distributed.any_rank(signals.requested())


def _interrupted(signals: StopSignals, last: Path, where: str) -> Interrupted:
    # the signal that stops the run, on every rank: under torchrun perhaps one rank alone got it
    signum = int(distributed.largest(signals.signum or 0)) or signal.SIGTERM
    return Interrupted(
        f"stopped by {signal.Signals(signum).name} {where}; state saved to {last}. "
        f"{_resume_hint(last.parent.parent)}",
        signum,
    )


def _resume_hint(run_dir: Path) -> str:
    """A stopped sweep resumes as a whole: its finished jobs keep their results, the stopped
    ones continue, the others start."""
    from hydra.core.hydra_config import HydraConfig

    if in_sweep():
        return (
            f"Resume the sweep with the same arguments plus resume=auto "
            f"hydra.sweep.dir={HydraConfig.get().sweep.dir} (finished jobs keep their results)"
        )
    return f"Resume with the same arguments plus resume=auto hydra.run.dir={run_dir}"
