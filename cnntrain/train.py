"""`train(cfg)`: claim the run folder -> plan the run from the config and the data (the LR
finder's lr with optim.lr=find; lr_find=true stops after the finder) -> restore a checkpoint if
resuming -> fit (trainer.py) -> the test score of the best checkpoint -> results.json."""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from cnntrain import distributed, lr_find, resume
from cnntrain.data import build_data, data_shape
from cnntrain.files import write_text
from cnntrain.logs import log_outputs
from cnntrain.models import build_model
from cnntrain.plan import input_config, make_plan
from cnntrain.rundir import RunFolder, run_dir_from_hydra
from cnntrain.runinfo import hparams, log_header, next_steps
from cnntrain.runtime import input_layout, seed_everything, select_device
from cnntrain.schema import check
from cnntrain.summary import format_summary
from cnntrain.trainer import Trainer

log = logging.getLogger("cnntrain")


def train(cfg: DictConfig, run_dir: str | Path | None = None, *, checked: bool = False) -> dict:
    """Trains the run `cfg` describes in its run folder (Hydra's, or `run_dir`), which it holds
    for its whole life; returns the results (results.json). `checked`: the caller (the console
    script, before importing torch) has run the schema check already."""
    if not checked:
        check(cfg)
    cfg = copy.deepcopy(cfg)  # a read-only copy: what the run decides lives in its plan
    OmegaConf.set_readonly(cfg, True)
    if cfg.summary:
        return show_summary(cfg)
    run_dir = Path(run_dir) if run_dir is not None else run_dir_from_hydra()
    path = resume.resume_path(cfg, run_dir / "checkpoints")
    folder = RunFolder(run_dir)
    try:
        in_place = distributed.any_rank(
            bool(distributed.on_main(lambda: _claim(cfg, folder, path)))
        )
        if distributed.is_main() and not in_place:
            folder.write_hydra_files(cfg)
        return _run(cfg, folder, path, in_place)
    finally:
        folder.release()


def _run(cfg: DictConfig, folder: RunFolder, path: Path | None, in_place: bool) -> dict:
    resumed = resume.load_resumed(path) if path is not None else None
    device = select_device(cfg.device)
    # one seed per rank for dropout & co; the data order comes from cfg.seed alone, on every rank
    seed_everything(cfg.seed + distributed.rank(), cfg.deterministic)
    data_cfg = input_config(cfg)
    nhwc = input_layout(cfg, device)
    data = build_data(data_cfg, cfg.aug, device=device, seed=cfg.seed, channels_last=nhwc)
    plan = make_plan(cfg, data_cfg, data)
    if cfg.lr_find:
        return lr_find.report(cfg, plan, data, device, folder.path)  # trains nothing
    if cfg.optim.lr == "find":  # before anything compares, stores or uses the lr
        cfg, plan = lr_find.settle(cfg, plan, data, device, resumed, folder.path)
        if distributed.is_main() and not in_place:
            folder.write_hydra_files(cfg)
    changed = []
    if resumed is not None:
        changed = resume.check_resumable(cfg, plan, resumed, path)
        done = folder.path / "results.json"
        if in_place and not changed and done.is_file() and resumed["epoch"] >= cfg.epochs:
            results = json.loads(done.read_text())
            log.info(
                "%s has finished already (resume=auto keeps its results): test_acc %s",
                folder.path,
                results.get("test_acc"),
            )
            return results
        if distributed.is_main():
            if in_place:
                folder.write_hydra_files(cfg)
            else:
                resume.carry_over(path, resumed, folder.path / "checkpoints")
        distributed.barrier()  # rank 0 may have copied files into the checkpoints folder
        where = resume.resume_point(resumed, cfg.epochs, plan.steps_per_epoch)
        log.info("resuming from %s: %s", path, where)
    trainer = Trainer(cfg, plan, data, folder.path, device)
    if resumed is not None:
        trainer.restore(resumed, changed)
    else:
        trainer.init_from_data()
    log_header(cfg, plan, data, trainer)
    trainer.begin(resumed, title=f"{cfg.model.name} on {cfg.data.name}")
    started = time.perf_counter()
    try:
        trainer.fit()
        results, confusion = trainer.test()
    except BaseException as e:  # a signal's Interrupted, a NaN loss, a full disk, Ctrl-C
        trainer.tracker.stopped(e)
        raise
    history = trainer.tracker.history
    results.update(
        model=cfg.model.name,
        dataset=cfg.data.name,
        epochs=cfg.epochs,
        epochs_run=history[-1]["epoch"] if history else 0,
        train_time_s=round(time.perf_counter() - started, 2),
        params=trainer.summary["params"],
        trainable_params=trainer.summary["trainable"],
        macs=trainer.summary["macs"],
        run_dir=str(folder.path),
        val_at_chance=trainer.tracker.at_chance(results["best_epoch"]),
    )
    _finish(cfg, folder.path, trainer, results, confusion)
    return results


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


def _finish(cfg: DictConfig, run_dir: Path, trainer: Trainer, results: dict, confusion) -> None:
    """results.json, TensorBoard's HParams and final figures, and what to run next."""
    main = distributed.is_main()
    if main:
        write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    trainer.tracker.log_final(hparams(cfg), results, confusion, trainer.plan.classes)
    trainer.tracker.close()
    if main:
        log_outputs(run_dir, next_steps(cfg.data, run_dir, trainer.saver.best))


def show_summary(cfg: DictConfig) -> dict:
    """`summary=true`: the model summary for this config, without loading any images."""
    channels, size, classes = data_shape(input_config(cfg))
    _, info = build_model(cfg.model, channels, classes, size, torch.device("cpu"))
    title = (
        f"{cfg.model.name} on {cfg.data.name}: {classes} classes, input {channels}x{size}x{size}"
    )
    print(format_summary(info, title), flush=True)
    return info
