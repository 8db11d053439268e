"""`evaluate(cfg)`: the test-accuracy report of a checkpoint (cnneval)."""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from cnntrain.checkpoint import load_checkpoint
from cnntrain.config import validate_runtime
from cnntrain.data import build_data
from cnntrain.engine import evaluate_loader
from cnntrain.errors import UserError
from cnntrain.report import build_report, format_report, write_figures, write_predictions, write_report
from cnntrain.runtime import amp_dtype, select_device
from cnntrain.train import build_model, run_dir_from_hydra

log = logging.getLogger("cnntrain")


def evaluate(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    validate_runtime(cfg)
    if cfg.split not in ("test", "val"):
        raise UserError(f"split must be test or val, got {cfg.split!r}")
    run_dir = Path(run_dir) if run_dir is not None else run_dir_from_hydra()
    ckpt = load_checkpoint(cfg.ckpt)
    trained = OmegaConf.create(ckpt["config"])
    if "pretrained" in trained.model:
        trained.model.pretrained = None  # the weights come from the checkpoint
    for key, value in cfg.data.items():
        if value is not None:
            trained.data[key] = value
    device = select_device(cfg.device)
    data = build_data(trained.data, None, device=device, seed=trained.seed, splits=(cfg.split,))
    loader = data.loaders.get(cfg.split)
    if loader is None:
        raise UserError(f"{trained.data.name} at {trained.data.root} has no {cfg.split} split "
                        f"(try split={'val' if cfg.split == 'test' else 'test'})")
    if data.classes != ckpt["classes"]:
        raise UserError(f"the data's classes differ from the checkpoint's: checkpoint "
                        f"{ckpt['classes']} ({len(ckpt['classes'])}), data {data.classes} "
                        f"({len(data.classes)}); point data.root= at the dataset it was trained on")
    model, _ = build_model(trained.model, data.in_channels, len(data.classes), data.image_size, device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"{cfg.ckpt}: weights do not fit model {trained.model.name} "
                        f"({str(e).splitlines()[0]})") from None
    result = evaluate_loader(model, loader, nn.CrossEntropyLoss(), device=device,
                             num_classes=len(data.classes), desc=cfg.split,
                             amp_dtype=amp_dtype(cfg.amp, device), channels_last=False,
                             keep_predictions=True)
    report = build_report(result, classes=data.classes, split=cfg.split, dataset=trained.data.name,
                          model=trained.model.name, checkpoint=Path(cfg.ckpt).resolve())
    print(format_report(report), flush=True)
    write_report(report, run_dir)
    write_figures(report, result, loader, run_dir)
    if cfg.predictions:
        write_predictions(result, loader, data.classes, run_dir)
    log.info("report written to %s", run_dir / "report.json")
    return report
