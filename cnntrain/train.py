"""`train(cfg)`: data -> model -> optimizer/schedule -> epochs of train + validate -> checkpoints
-> the test score of the best checkpoint."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import signal
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from cnntrain import distributed
from cnntrain.checkpoint import (
    CheckpointSaver,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cnntrain.data import Data, build_data, describe
from cnntrain.data.builtin import BUILTIN
from cnntrain.ema import ModelEma
from cnntrain.engine import EpochState, evaluate_loader, train_one_epoch
from cnntrain.errors import Interrupted, UserError
from cnntrain.files import write_text
from cnntrain.logs import log_outputs, shown
from cnntrain.models import build_model, resolve_stem
from cnntrain.optim import OPTIMIZERS, SCHEDULES, create_optimizer, create_scheduler, fast_forward
from cnntrain.resume import changed_keys, replans_schedule
from cnntrain.rundir import RunFolder, in_sweep, run_dir_from_hydra
from cnntrain.runtime import (
    StopSignals,
    amp_dtype,
    channels_last,
    grad_scaler,
    seed_everything,
    select_device,
)
from cnntrain.schema import check
from cnntrain.stored import refuse_code, validated
from cnntrain.summary import format_summary
from cnntrain.tracking import RunTracker

log = logging.getLogger("cnntrain")


def apply_pretrained_input(cfg: DictConfig) -> None:
    """Named pretrained weights expect the input size (unless data.image_size is set) and the
    normalization they were trained with; written into cfg so that checkpoints keep them."""
    from cnntrain.models.transfer import pretrained_input_spec

    spec = pretrained_input_spec(cfg.model)
    if spec is not None:
        if cfg.data.image_size is None:
            cfg.data.image_size = spec["image_size"]
        gray = cfg.data.get("mean") is not None and len(cfg.data.mean) == 1
        cfg.data.mean = [sum(spec["mean"]) / 3] if gray else spec["mean"]
        cfg.data.std = [sum(spec["std"]) / 3] if gray else spec["std"]
        log.info(
            "pretrained %s: input %s px, normalization mean %s std %s",
            cfg.model.pretrained,
            cfg.data.image_size,
            cfg.data.mean,
            cfg.data.std,
        )


def stored_config(cfg: DictConfig, data: Data) -> dict:
    """The resolved config as plain containers, with what the data decided filled in, so that a
    checkpoint alone rebuilds the same model and data."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config["data"]["root"] = str(Path(config["data"]["root"]).expanduser().resolve())
    config["data"].update(
        image_size=data.image_size, channels=data.in_channels, mean=data.mean, std=data.std
    )
    refuse_code(
        config, "this run"
    )  # what every tool will refuse to read (a literal '${' in a value)
    return config


def _resume_path(cfg: DictConfig, ckpt_dir: Path) -> Path | None:
    if cfg.resume == "auto":
        return ckpt_dir / "last.pt" if (ckpt_dir / "last.pt").exists() else None
    return Path(cfg.resume).expanduser() if cfg.resume else None


def _claim(cfg: DictConfig, folder: RunFolder, resume: Path | None) -> bool:
    """Claims the run folder (rank 0) and says whether this run continues the one in it; any
    other run's files there refuse the run, before anything is written."""
    folder.claim()
    if resume is not None and resume.resolve().parent.parent == folder.path.resolve():
        return True
    if cfg.resume == "auto":
        hint = "it has no checkpoints/last.pt to resume from; choose another hydra.run.dir="
    elif resume is not None:
        hint = (
            f"resume={resume} continues into a new folder: leave hydra.run.dir= out or name "
            "an empty folder"
        )
    elif (folder.path / "checkpoints" / "last.pt").exists():
        hint = "pass resume=auto to continue that run, or choose another hydra.run.dir="
    else:
        hint = ""
    folder.require_empty(hint)
    return False


def _load_resumed(resume: Path) -> dict:
    state = load_checkpoint(resume)
    validated(state["config"], resume)  # data, checked as the command line is, before any use
    if "optimizer" not in state:
        raise UserError(
            f"{resume} has no optimizer state (best.pt keeps weights only); resume from last.pt"
        )
    return state


def _carry_over(resume: Path, state: dict, ckpt_dir: Path) -> None:
    """A run continued in another folder takes along the files its last.pt refers to (best.pt,
    top-k), so that the final test still uses the best epoch of the whole run."""
    names = ["best.pt", *(f"epoch_{epoch:03d}.pt" for _, epoch in state.get("top_k", []))]
    for name in names:
        if (resume.parent / name).exists():
            save_checkpoint(load_checkpoint(resume.parent / name), ckpt_dir / name)


def _check_changes(cfg: DictConfig, config: dict, resumed: dict, resume: Path) -> list[str]:
    changed = changed_keys(
        resumed["config"],
        config,
        list(cfg.resume_allow_changes),
        resume,
        bool(resumed.get("partial")),
    )
    if cfg.epochs < resumed["epoch"]:
        raise UserError(
            f"cannot resume {resume} with epochs={cfg.epochs}: it has already trained "
            f"{resumed['epoch']} epochs"
        )
    if changed:
        log.info("resuming with changed %s (resume_allow_changes)", ", ".join(changed))
    return changed


def _restore_training(
    cfg, resumed: dict, changed: list[str], optimizer, scheduler, steps: int, interval: str
):
    """The optimizer's state (momentum buffers, Adam moments) from the checkpoint under the
    hyper-parameters of this config; the schedule where it stood, or, when a setting that
    shapes it changed (resume_allow_changes), a new plan for the new settings fast-forwarded
    to the step the run has reached. Returns the scheduler to use."""
    configured = [
        {k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")}
        for group in optimizer.param_groups
    ]
    try:
        optimizer.load_state_dict(resumed["optimizer"])
    except ValueError as e:
        raise UserError(
            f"cannot resume: the checkpoint's optimizer state does not fit this model "
            f"and optimizer ({e}); resume with the settings it was trained with"
        ) from None
    for group, settings in zip(optimizer.param_groups, configured):
        group.update(settings)  # e.g. a new weight decay or momentum, the configured fused flag
    if not replans_schedule(changed):
        scheduler.load_state_dict(resumed["scheduler"])
        return scheduler
    done = resumed["epoch"] * (steps if interval == "step" else 1)
    if resumed.get("partial") and interval == "step":
        done += _epoch_state(resumed["partial"]).step
    for group in optimizer.param_groups:
        group["lr"] = cfg.optim.lr
        group.pop("initial_lr", None)
    scheduler, _ = create_scheduler(cfg.sched, optimizer, epochs=cfg.epochs, steps_per_epoch=steps)
    fast_forward(scheduler, done)
    log.info(
        "schedule re-planned for epochs=%d: lr %.4g at step %d",
        cfg.epochs,
        optimizer.param_groups[0]["lr"],
        done,
    )
    return scheduler


def show_summary(cfg: DictConfig) -> dict:
    """`summary=true`: the model summary for this config, without loading any images."""
    from cnntrain.data import data_shape

    apply_pretrained_input(cfg)
    channels, size, classes = data_shape(cfg.data)
    _, info = build_model(cfg.model, channels, classes, size, torch.device("cpu"))
    print(
        format_summary(
            info,
            f"{cfg.model.name} on {cfg.data.name}: {classes} classes, "
            f"input {channels}x{size}x{size}",
        ),
        flush=True,
    )
    return info


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Trains the run `cfg` describes in its run folder (Hydra's, or `run_dir`), which it holds
    for its whole life; returns the results (results.json)."""
    check(cfg)
    if cfg.summary:
        return show_summary(cfg)
    run_dir = Path(run_dir) if run_dir is not None else run_dir_from_hydra()
    resume = _resume_path(cfg, run_dir / "checkpoints")
    folder, task_cfg = RunFolder(run_dir), copy.deepcopy(cfg)
    try:
        in_place = distributed.any_rank(
            bool(distributed.on_main(lambda: _claim(cfg, folder, resume)))
        )
        if distributed.is_main() and not in_place:
            folder.write_hydra_files(task_cfg)
        return _train(cfg, folder, resume, in_place, task_cfg)
    finally:
        folder.release()


def _train(
    cfg: DictConfig, folder: RunFolder, resume: Path | None, in_place: bool, task_cfg
) -> dict:
    run_dir, ckpt_dir = folder.path, folder.path / "checkpoints"
    resumed = _load_resumed(resume) if resume is not None else None
    device = select_device(cfg.device)
    # one seed per rank for dropout & co; the data order comes from cfg.seed alone, on every rank
    seed_everything(cfg.seed + distributed.rank(), cfg.deterministic)
    dtype = amp_dtype(cfg.amp, device, cfg.amp_dtype)

    apply_pretrained_input(cfg)
    data = build_data(cfg.data, cfg.aug, device=device, seed=cfg.seed)
    if "stem" in cfg.model:  # stored resolved: a checkpoint rebuilds the same network
        cfg.model.stem = resolve_stem(cfg.model.stem, data.image_size, cfg.model.pretrained)
    config = stored_config(cfg, data)
    train_loader, val_loader = data.loaders["train"], data.loaders.get("val")
    steps = min(len(train_loader), cfg.max_steps_per_epoch or len(train_loader))  # per epoch
    changed = []
    if resumed is not None:
        if resumed["classes"] != data.classes:
            raise UserError(
                f"cannot resume: the checkpoint's classes {resumed['classes']} differ "
                f"from the data's {data.classes}"
            )
        changed = _check_changes(cfg, config, resumed, resume)
        done = run_dir / "results.json"
        if in_place and not changed and done.is_file() and resumed["epoch"] >= cfg.epochs:
            log.info(
                "%s has finished already (resume=auto keeps its results): test_acc %s",
                run_dir,
                json.loads(done.read_text()).get("test_acc"),
            )
            return json.loads(done.read_text())
        if distributed.is_main():
            if in_place:
                folder.write_hydra_files(task_cfg)
            else:
                _carry_over(resume, resumed, ckpt_dir)
        distributed.barrier()  # rank 0 may have copied files into ckpt_dir
        log.info("resuming from %s: %s", resume, _resume_point(resumed, cfg.epochs, steps))
    model, summary = build_model(
        cfg.model, data.in_channels, len(data.classes), data.image_size, device
    )
    nhwc = channels_last(cfg.channels_last, device, dtype)
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(cfg.optim, model)
    scheduler, interval = create_scheduler(
        cfg.sched, optimizer, epochs=cfg.epochs, steps_per_epoch=steps
    )
    scaler = grad_scaler(dtype, device)
    start, history, best, partial, since_best = 1, [], None, None, 0
    ema = _ema(cfg.ema.decay, model, resumed)
    if resumed is not None:
        model.load_state_dict(resumed.get("train_model", resumed["model"]))
        scheduler = _restore_training(cfg, resumed, changed, optimizer, scheduler, steps, interval)
        if scaler is not None and resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        _restore_rng(resumed["rng"], device)
        start, history, best = resumed["epoch"] + 1, resumed["history"], resumed["best_metric"]
        partial, since_best = resumed.get("partial"), resumed.get("since_best", 0)

    log.info(
        "%s on %s: %s classes, input %dx%dx%d, %d train / %d val images, %s; device %s%s\n%s",
        cfg.model.name,
        cfg.data.name,
        len(data.classes),
        data.in_channels,
        data.image_size,
        data.image_size,
        train_loader.num_samples,
        val_loader.num_samples if val_loader else 0,
        describe(cfg.aug, cfg.data),
        device,
        f", amp {dtype}".replace("torch.", "") if dtype else "",
        format_summary(summary),
    )
    log.info("run dir: %s", run_dir)
    recipe = experiment_settings(cfg)
    if recipe:
        log.info("%s", recipe)

    step_model = model
    if distributed.world_size() > 1:
        from torch.nn.parallel import DistributedDataParallel

        if cfg.sync_batchnorm:
            step_model = nn.SyncBatchNorm.convert_sync_batchnorm(step_model)
        step_model = DistributedDataParallel(
            step_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    step_model = torch.compile(step_model) if cfg.compile else step_model
    # EMA weights, when kept, are the ones validated, tested and saved as the model of a checkpoint
    eval_model = ema.module if ema is not None else step_model
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    common = dict(device=device, amp_dtype=dtype, channels_last=nhwc, max_steps=cfg.max_eval_steps)
    main = distributed.is_main()  # the one process that writes files
    tracker = RunTracker(
        run_dir,
        cfg.epochs,
        history,
        write=main,
        title=f"{cfg.model.name} on {cfg.data.name}",
        num_classes=len(data.classes),
    )
    saver = CheckpointSaver(
        ckpt_dir,
        best,
        cfg.checkpoint.keep_top_k,
        resumed.get("top_k", []) if resumed else [],
        write=main,
    )
    if val_loader is None:
        log.info("no validation data (data.val_split=0): best.pt is chosen by train accuracy")

    def state(epoch: int, metrics: dict) -> tuple[dict, dict]:
        core = {
            "model": (ema.module if ema is not None else model).state_dict(),
            "config": config,
            "classes": data.classes,
            "epoch": epoch,
            "metrics": metrics,
        }
        resume_state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler else None,
            "rng": distributed.gathered(rng_state(device)),  # one per rank
            "history": tracker.history,
            "since_best": since_best,
        }
        if ema is not None:
            resume_state.update(train_model=model.state_dict(), ema_n_averaged=ema.n_averaged)
        return core, resume_state

    started = time.perf_counter()
    with StopSignals() as signals:
        # the ranks must stop at the same batch: they compare notes every 8 batches
        stop = (
            signals.requested
            if distributed.world_size() == 1
            else _every_8th_batch(signals.requested)
        )
        for epoch in range(start, cfg.epochs + 1):
            t0 = time.perf_counter()
            # a resumed epoch keeps the lr it started with, for its metrics.csv row
            lr = partial["lr"] if partial else optimizer.param_groups[0]["lr"]
            train_loader.set_epoch(epoch)
            tr = train_one_epoch(
                step_model,
                train_loader,
                criterion,
                optimizer,
                grad_clip=cfg.grad_clip,
                scheduler=scheduler if interval == "step" else None,
                scaler=scaler,
                desc=f"epoch {epoch}/{cfg.epochs}",
                device=device,
                amp_dtype=dtype,
                channels_last=nhwc,
                max_steps=cfg.max_steps_per_epoch,
                on_nan=cfg.on_nan,
                state=_epoch_state(partial),
                stop=stop,
                ema=ema,
                epochs_after=cfg.epochs - epoch,
                epoch_times=[r["time"] for r in tracker.history],
            )
            partial = None
            if tr["state"].skipped:
                log.warning(
                    "epoch %d: skipped %d batches with a non-finite loss (on_nan=skip_batch)",
                    epoch,
                    tr["state"].skipped,
                )
            if tr["state"].step < tr["total"]:  # stopped by a signal in the middle of the epoch
                done = distributed.gathered(tr["state"].state_dict())  # each rank's own sums
                core, resume_state = state(
                    epoch - 1, tracker.history[-1] if tracker.history else {}
                )
                saver.save_last(
                    {**core, **resume_state, "partial": {"epoch": epoch, "lr": lr, "state": done}}
                )
                distributed.barrier()
                raise _interrupted(
                    _signal(signals),
                    saver.last,
                    f"in epoch {epoch}/{cfg.epochs} after step {tr['state'].step} of {tr['total']}",
                )
            if interval == "epoch":
                scheduler.step()
            va = (
                evaluate_loader(
                    eval_model,
                    val_loader,
                    num_classes=len(data.classes),
                    keep_predictions=True,
                    desc="val",
                    **common,
                )
                if val_loader
                else {"loss": None, "acc": None}
            )
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
            tracker.log_epoch(row)
            if val_loader:
                tracker.log_predictions(val_loader, va, data.classes, epoch)
            metric = va["acc"] if va["acc"] is not None else tr["acc"]
            since_best = 0 if saver.is_better(metric) else since_best + 1
            saver.save(*state(epoch, row), metric)
            distributed.barrier()  # best.pt is complete before any rank reads it
            patience = cfg.early_stop.patience
            if patience and since_best >= patience and epoch < cfg.epochs:
                log.info(
                    "early stop after epoch %d: no better %s accuracy for %d epochs",
                    epoch,
                    "val" if val_loader else "train",
                    patience,
                )
                break
            if distributed.any_rank(signals.requested()) and epoch < cfg.epochs:
                raise _interrupted(
                    _signal(signals), saver.last, f"after epoch {epoch}/{cfg.epochs}"
                )
    results, confusion = _final_test(model, data, saver, common)
    results.update(
        model=cfg.model.name,
        dataset=cfg.data.name,
        epochs=cfg.epochs,
        epochs_run=tracker.history[-1]["epoch"] if tracker.history else 0,
        train_time_s=round(time.perf_counter() - started, 2),
        params=summary["params"],
        trainable_params=summary["trainable"],
        macs=summary["macs"],
        run_dir=str(run_dir),
        val_at_chance=tracker.at_chance(results["best_epoch"]),
    )
    if main:
        write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    tracker.log_final(hparams(cfg), results, confusion, data.classes)
    tracker.close()
    if main:
        log_outputs(
            run_dir,
            [
                f"cnneval ckpt={shown(saver.best)}",
                f"tensorboard --logdir {shown(run_dir)}",
                *_full_datasets(cfg.data),
            ],
        )
    return results


def _full_datasets(data: DictConfig) -> list[str]:
    """After a run on the bundled sample (the default, the first run of most users): the full
    datasets are one override away."""
    if not getattr(BUILTIN.get(data.name), "bundled", False):
        return []
    log.info(
        "this run trained on the small %s that ships with cnntrain; the full sets are one "
        "override away (downloaded into %s/, or data.root=):",
        BUILTIN[data.name].title,
        shown(data.root),
    )
    return [
        "cnntrain data=fashion_mnist   # all 60,000 Fashion-MNIST images",
        "cnntrain data=mnist           # handwritten digits",
    ]


def _ema(decay, model: nn.Module, resumed: dict | None) -> ModelEma | None:
    """The exponential moving average of the weights and BN buffers (None without ema.decay); a
    resumed run restores it from the checkpoint's model."""
    if not decay:
        return None
    ema = ModelEma(model, decay)
    if resumed is not None and "ema_n_averaged" in resumed:
        ema.module.load_state_dict(resumed["model"])
        ema.n_averaged = resumed["ema_n_averaged"]
    return ema


def _restore_rng(states, device: torch.device) -> None:
    """Each rank continues its own random streams (dropout & co.; each rank has its own seed).
    A run resumed by another number of processes cannot: the ranks without a saved state keep
    their fresh seeds, and the run is no longer exactly the uninterrupted one."""
    states = states if isinstance(states, list) else [states]  # older checkpoints: rank 0's only
    if len(states) != distributed.world_size():
        log.warning(
            "the checkpoint was written by %d process(es) and is resumed by %d: dropout "
            "and other random streams do not continue exactly",
            len(states),
            distributed.world_size(),
        )
    if distributed.rank() < len(states):
        set_rng_state(states[distributed.rank()], device)


def _epoch_state(partial: dict | None) -> EpochState | None:
    """Where a resumed epoch stopped. Each rank continues its own running sums, so the epoch's
    numbers are those of a run that never stopped, to the last bit. Resumed by another number
    of ranks (or from a checkpoint that kept only the totals), rank 0 carries the totals."""
    if partial is None:
        return None
    states = partial["state"] if isinstance(partial["state"], list) else [partial["state"]]
    if len(states) == distributed.world_size():
        return EpochState(**states[distributed.rank()])
    step = states[0]["step"]
    if not distributed.is_main():
        return EpochState(step=step)
    return EpochState(
        step=step,
        loss_sum=sum(float(s["loss_sum"]) for s in states),
        correct=sum(int(s["correct"]) for s in states),
        n=sum(s["n"] for s in states),
        skipped=states[0]["skipped"],
    )


def _resume_point(resumed: dict, epochs: int, steps: int) -> str:
    """Where the resumed run continues, in the words of the stop message."""
    partial = resumed.get("partial")
    if partial:
        return (
            f"epoch {partial['epoch']}/{epochs} continues after step "
            f"{_epoch_state(partial).step} of {steps}"
        )
    return f"epoch {resumed['epoch'] + 1}/{epochs} starts ({resumed['epoch']} done)"


def _every_8th_batch(requested):
    """A stop test for several ranks: every 8th call asks all ranks (a collective) whether any
    was asked to stop; the other calls answer no without communicating."""
    count = itertools.count(1)
    return lambda: next(count) % 8 == 0 and distributed.any_rank(requested())


def _signal(signals: StopSignals) -> int:
    """The signal that stops the run, on every rank: under torchrun perhaps one rank alone got it."""
    return int(distributed.largest(signals.signum or 0)) or signal.SIGTERM


def _interrupted(signum: int, last: Path, where: str) -> Interrupted:
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


def experiment_settings(cfg: DictConfig | None = None) -> str | None:
    """What `experiment=<name>` turns on, read from its file: the recipe is otherwise invisible
    in the run's header (overrides on the command line win over it). Its aug preset comes with
    the geometry it applies to the run's data (`cfg`), unless the command line chose another."""
    from hydra.core.hydra_config import HydraConfig

    name = (
        HydraConfig.get().runtime.choices.get("experiment") if HydraConfig.initialized() else None
    )
    if not name:
        return None
    import importlib.resources

    path = importlib.resources.files("cnntrain.configs") / "experiment" / f"{name}.yaml"
    if not path.is_file():  # an experiment from another config search path
        return f"experiment={name}"
    recipe = OmegaConf.to_container(OmegaConf.load(str(path)))
    settings = [
        f"{group.rpartition('/')[2]}={option}"
        for entry in recipe.pop("defaults", [])
        if isinstance(entry, dict)
        for group, option in entry.items()
    ]
    if cfg is not None and f"aug={cfg.aug.name}" in settings:
        settings[settings.index(f"aug={cfg.aug.name}")] = describe(cfg.aug, cfg.data)

    def flat(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}={json.dumps(v) if isinstance(v, (bool, list)) or v is None else v}"

    settings += flat(recipe)
    return f"experiment={name} sets {' '.join(settings)} (command-line overrides win)"


# TensorBoard HParams columns: name -> config key (class names for optim and sched)
HPARAMS = {
    "model": "model.name",
    "data": "data.name",
    "optim": "optim.name",
    "optim.lr": "optim.lr",
    "optim.weight_decay": "optim.weight_decay",
    "sched": "sched.name",
    "aug": "aug.name",
    "data.batch_size": "data.batch_size",
    "epochs": "epochs",
    "seed": "seed",
    "amp": "amp",
    "name": "name",
}
CLASSES = {"optim.name": OPTIMIZERS, "sched.name": SCHEDULES}  # columns that show the torch class
# overrides that say where things are, not what was trained: not columns
NOT_HPARAMS = (
    "data.root",
    "data.cache_dir",
    "data.download",
    "data.num_workers",
    "resume",
    "debug",
)


def _hparam_value(value):
    """A value as TensorBoard's hparams plugin takes it: bool, int, float or str (the rest as text)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return json.dumps(OmegaConf.to_container(value, resolve=True))
    if value is None:
        return "null"
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def _overridden_keys() -> dict:
    """The keys the command line set (a sweep's varied keys among them), with the group
    choices (model=resnet18, experiment=...) as the group's name: key -> the config key or None."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hydra = HydraConfig.get()
    keys = {}
    for override in hydra.overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra.") or key in NOT_HPARAMS:
            continue
        keys[key] = None if key in hydra.runtime.choices else key
    return keys


def hparams(cfg: DictConfig) -> dict:
    """The run's settings for TensorBoard's HParams tab, each with its own type: the model, data,
    optimizer and schedule (class names), lr, weight decay, augmentation, batch size, epochs,
    seed, amp, `name` when set, and every key set on the command line (what a sweep varies),
    with its resolved value."""
    from hydra.core.hydra_config import HydraConfig

    out = {}
    for column, key in HPARAMS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            out[column] = _hparam_value(CLASSES[key][value].__name__ if key in CLASSES else value)
    for key, config_key in _overridden_keys().items():
        if key in out or key in HPARAMS:
            continue
        if config_key is None:  # a group choice (model=, optim=: already columns; experiment=, ...)
            out[key] = _hparam_value(HydraConfig.get().runtime.choices.get(key))
        else:
            out[key] = _hparam_value(OmegaConf.select(cfg, key, default=None))
    return out


def _final_test(model, data: Data, saver: CheckpointSaver, common) -> dict:
    best = load_checkpoint(saver.best)
    out = {
        "best_epoch": best["epoch"],
        "best_val_acc": best["metrics"]["val_acc"],
        "checkpoint": str(saver.best),
        "test_acc": None,
        "test_top5": None,
        "test_loss": None,
    }
    test_loader = data.loaders.get("test")
    if test_loader is None:
        log.info("no test split; the final test score is skipped")
        return out, None
    model.load_state_dict(best["model"])
    te = evaluate_loader(model, test_loader, num_classes=len(data.classes), desc="test", **common)
    out.update(
        test_acc=te["acc"],
        test_top5=te["top5"],
        test_loss=te["loss"],
        test_images=te["num_samples"],
        test_capped=te["num_samples"] < test_loader.num_samples,
    )
    if out["test_capped"]:  # max_eval_steps: a quick look, not the test score
        log.info(
            "test accuracy of best.pt (epoch %d): %.4f (loss %.4f) on only %d of the %d test "
            "images (max_eval_steps=%d); the full test: cnneval ckpt=%s",
            best["epoch"],
            te["acc"],
            te["loss"],
            te["num_samples"],
            test_loader.num_samples,
            common["max_steps"],
            shown(saver.best),
        )
    else:
        log.info(
            "test accuracy of best.pt (epoch %d): %.4f (loss %.4f, %d images)",
            best["epoch"],
            te["acc"],
            te["loss"],
            te["num_samples"],
        )
    return out, te["confusion"]
