"""`evaluate(cfg)`: the test-accuracy report of a checkpoint (cnneval)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from cnntrain import distributed
from cnntrain.calibration import metrics, terms_of, write_reliability
from cnntrain.checkpoint import load_checkpoint, require_file
from cnntrain.engine import Placement, evaluate_loader
from cnntrain.errors import UserError
from cnntrain.html_report import write_eval_report
from cnntrain.inference import checkpoint_split, model_from_checkpoint, trained_config
from cnntrain.logs import log_outputs
from cnntrain.report import (
    build_report,
    format_report,
    write_comparison,
    write_figures,
    write_predictions,
    write_report,
)
from cnntrain.rundir import fresh_run, run_dir_from_hydra
from cnntrain.runtime import amp_dtype, channels_last, select_device
from cnntrain.schema import check
from cnntrain.temperature import (
    calibrated,
    fit_on_val,
    require_writable,
    stored_temperature,
    tempered,
)

log = logging.getLogger("cnntrain")


def checkpoint_paths(ckpt) -> list[Path]:
    """`ckpt` is a checkpoint file, a run or multirun folder (every checkpoints/best.pt under
    it), or a list of those."""
    items = [ckpt] if isinstance(ckpt, (str, Path)) else list(ckpt)
    paths = []
    for item in items:
        path = Path(str(item)).expanduser()
        if path.is_dir():
            found = sorted(path.rglob("checkpoints/best.pt"))
            if not found:
                raise UserError(
                    f"no checkpoints/best.pt under {path}; pass ckpt= a .pt file or a run folder"
                )
            paths += found
        else:
            paths.append(require_file(path))  # before the run folder is claimed
    if not paths:
        raise UserError(
            "ckpt=[] names no checkpoint; give a .pt file, a run folder or a list of them"
        )
    return paths


def evaluate(cfg: DictConfig, run_dir: str | Path | None = None) -> dict | list[dict]:
    """One checkpoint: its report. Several: a report per checkpoint in numbered sub-folders, plus
    comparison.csv / comparison.md with one row each."""
    check(cfg)
    run_dir = Path(run_dir) if run_dir is not None else run_dir_from_hydra()
    paths = checkpoint_paths(cfg.ckpt)  # before the folder is claimed: a typo fails in a second
    if cfg.calibrate:
        for path in paths:
            require_writable(path)
    # under torchrun each rank evaluates a chunk of the split; rank 0 alone reports and writes
    with contextlib.ExitStack() as claimed:
        distributed.on_main(lambda: claimed.enter_context(fresh_run(run_dir, cfg)))
        return _evaluate(cfg, paths, run_dir)


def _evaluate(cfg: DictConfig, paths: list[Path], run_dir: Path) -> dict | list[dict]:
    if len(paths) == 1:
        return evaluate_checkpoint(cfg, paths[0], run_dir, verbose=True)
    reports = []
    runs = [path.parent.parent.name for path in paths]
    unique = len(set(runs)) == len(
        runs
    )  # a sweep's jobs (0_lenet5_mnist, ...) are already told apart
    for i, (path, run) in enumerate(zip(paths, runs)):
        folder = run_dir / (run if unique else f"{i}_{run}")
        reports.append(evaluate_checkpoint(cfg, path, folder, verbose=False))
    if distributed.is_main():
        print(write_comparison(reports, run_dir), flush=True)
        log_outputs(run_dir, [])
    return reports


def evaluate_checkpoint(cfg: DictConfig, path: Path, run_dir: Path, verbose: bool) -> dict:
    ckpt = load_checkpoint(path)
    trained = trained_config(ckpt, path)
    stored = stored_temperature(ckpt, path)
    device = select_device(cfg.device)
    # the data before the model: data whose classes differ is named as such, with both lists,
    # rather than as weights that do not fit a head of the data's size
    data, loader = checkpoint_split(
        trained,
        ckpt["classes"],
        cfg.data,
        cfg.split,
        device,
        f"try split={'val' if cfg.split == 'test' else 'test'}",
    )
    model, on = _model(cfg, ckpt, trained, path, device)
    # the val pass before the evaluation: a checkpoint without a val split fails before the long pass
    fit = fit_on_val(cfg, trained, ckpt["classes"], model, on) if cfg.calibrate else None
    # a calibrated copy is reported at its temperature; calibrate=true refits on raw logits
    model, temperature = tempered(model, None if fit else stored, path)
    result = evaluate_loader(
        model,
        loader,
        on,
        num_classes=len(data.classes),
        desc=cfg.split,
        keep_predictions=True,
        tta=cfg.get("tta"),
        keep_logits=fit is not None,
    )
    report = build_report(
        result,
        classes=data.classes,
        split=cfg.split,
        dataset=trained.data.name,
        model=trained.model.name,
        checkpoint=path.resolve(),
    )
    report["calibration"] = metrics(terms_of(result), temperature)
    if fit is not None:
        report["calibration"]["calibrated"] = calibrated(fit, result, ckpt, path)
    if not distributed.is_main():
        return report
    if verbose:
        print(format_report(report), flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_report(report, run_dir)
    write_figures(report, result, loader, run_dir)
    write_reliability(report, run_dir)
    if cfg.predictions:
        write_predictions(result, loader, data.classes, run_dir)
    write_eval_report(run_dir)  # last: it shows report.json and the figures written above
    if verbose:
        log_outputs(run_dir, [])
    return report


def _model(cfg: DictConfig, ckpt: dict, trained: DictConfig, path: Path, device):
    """(The checkpoint's model, the Placement it is evaluated under)."""
    model = model_from_checkpoint(ckpt, trained, path, device)
    dtype = amp_dtype(cfg.amp, device)
    # the layout training evaluated in, so that the same device gives the same numbers
    nhwc = channels_last(trained.get("channels_last", False), device, dtype)
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    return model, Placement(device, dtype, nhwc)
