"""Temperature scaling (Guo et al. 2017): the logits divided by one number T > 0 fit on the val
split by minimizing NLL. Dividing by a positive number keeps the order of the logits, so top-1
(and top-5) stay as they are; only the confidences change.

`cnneval calibrate=true` fits T and stores it in a calibrated copy of the checkpoint,
`<name>.calibrated.pt` beside it, rather than in a sidecar file: the copy carries its weights and
their temperature together, so retraining over best.pt cannot leave a stale T applied to new
weights, and the original file is never touched (`cnnpredict ckpt=best.pt` still gives the raw
probabilities). cnneval and cnnpredict read a copy's T back through `stored_temperature`, which
checks it as any other value read from a file (a finite number > 0)."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from cnntrain import distributed
from cnntrain.calibration import of_logits
from cnntrain.checkpoint import REQUIRED_KEYS, save_checkpoint
from cnntrain.errors import UserError
from cnntrain.schema import show

log = logging.getLogger("cnntrain")

# T is kept within [1/100, 100]: when the val split is all right and confident, its NLL keeps
# falling as T -> 0, and an unbounded fit would end at a meaningless 1e-20
LOG_BOUND = math.log(100.0)
SUFFIX = ".calibrated"


class Tempered(nn.Module):
    """`model` whose logits are divided by `temperature`."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model, self.temperature = model, float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature


def tempered(model: nn.Module, temperature: float | None, path: Path) -> tuple[nn.Module, float]:
    """(`model` under `temperature`, said in the log, or as it is when None; the T in use)."""
    if temperature is None:
        return model, 1.0
    log.info(
        "%s stores the temperature T = %.4g (fit by cnneval calibrate=true): the probabilities "
        "are softmax(logits / T)",
        path,
        temperature,
    )
    return Tempered(model, temperature), temperature


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, max_iter: int = 100) -> float:
    """The T minimizing the mean cross-entropy of softmax(logits / T), by LBFGS on log T (so T
    stays positive however the line search steps), within [1/100, 100]."""
    logits, target = logits.detach().float(), target.detach()
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.clamp(-LOG_BOUND, LOG_BOUND).exp(), target)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    t = log_t.detach().clamp(-LOG_BOUND, LOG_BOUND).exp().item()
    if not math.isfinite(t):  # non-finite logits (an fp16 overflow): nothing to fit
        raise UserError("temperature scaling failed: the val logits are not finite (try amp=false)")
    return t


def calibrated_path(path: Path) -> Path:
    """best.pt -> best.calibrated.pt (a calibrated copy names itself: it is recalibrated in place)."""
    stem = path.stem[: -len(SUFFIX)] if path.stem.endswith(SUFFIX) else path.stem
    return path.with_name(f"{stem}{SUFFIX}{path.suffix or '.pt'}")


def require_writable(path: Path) -> None:
    """Before anything is evaluated: the calibrated copy can be written beside `path`."""
    folder = calibrated_path(path).parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(
            f"calibrate=true writes {calibrated_path(path).name} beside the checkpoint, and "
            f"{folder} is not writable; copy the checkpoint into a writable folder and pass "
            "ckpt= that copy"
        )


def stored_temperature(ckpt: dict, path: Path) -> float | None:
    """The temperature a calibrated copy stores (None for a plain checkpoint), refused in one
    line unless it is a finite number > 0, as the command line would refuse it."""
    entry = ckpt.get("calibration")
    if entry is None:
        return None
    value = entry.get("temperature") if isinstance(entry, dict) else entry
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        shown = repr(value) if isinstance(value, str) else show(value)  # '1.5': a string
        raise UserError(
            f"{path}: its stored calibration.temperature={shown[:60]} is not a finite "
            "number > 0; the file was altered or damaged: run cnneval calibrate=true on the "
            "original checkpoint again, or use the original"
        )
    return float(value)


def fit_on_val(cfg: DictConfig, trained: DictConfig, classes, model: nn.Module, on) -> dict:
    """T fit on the val split's logits under `model` (raw logits): {"temperature",
    "fit_split", "fit_samples", "val_nll_before", "val_nll_after", "tta"}."""
    from cnntrain.engine import evaluate_loader
    from cnntrain.inference import checkpoint_split

    data, loader = checkpoint_split(
        trained,
        classes,
        cfg.data,
        "val",
        on.device,
        "calibrate=true fits the temperature on the val split: train with data.val_split>0, "
        "e.g. 0.1, or evaluate without calibrate=true",
    )
    if cfg.split == "val":
        log.warning(
            "calibrate=true with split=val: the temperature is fit and judged on the same "
            "images, so the 'after' numbers are optimistic; split=test judges it fairly"
        )
    val = evaluate_loader(
        model,
        loader,
        on,
        num_classes=len(data.classes),
        desc="val (calibrate)",
        tta=cfg.get("tta"),
        keep_logits=True,
        keep_predictions=True,
    )
    t = fit_temperature(val["logits"], val["target"])
    if abs(math.log(t)) >= LOG_BOUND - 1e-6:
        log.warning("the fitted temperature reached its bound (%.4g): the val split says little", t)
    return {
        "temperature": t,
        "fit_split": "val",
        "fit_samples": val["num_samples"],
        "val_nll_before": val["loss"],
        "val_nll_after": of_logits(val["logits"], val["target"], t)["nll"],
        "tta": cfg.get("tta"),
    }


def calibrated(fit: dict, result: dict, ckpt: dict, path: Path) -> dict:
    """The report's "calibrated" entry: the evaluated split's metrics at the fitted T (from
    result's logits), after rank 0 has written the calibrated copy of `ckpt`."""
    target = calibrated_path(path)
    entry = {**fit, "source": str(path.resolve())}
    state = {key: ckpt[key] for key in REQUIRED_KEYS}  # for inference: no optimizer state
    distributed.on_main(
        lambda: save_checkpoint(
            {**state, "calibration": entry},
            target,
            setting="folder for ckpt= (the calibrated copy goes beside it)",
        )
    )
    after = of_logits(result["logits"], result["target"], fit["temperature"])
    log.info(
        "temperature scaling: T = %.4g fit on %d val images (val NLL %.4f -> %.4f); "
        "calibrated copy written to %s",
        fit["temperature"],
        fit["fit_samples"],
        fit["val_nll_before"],
        fit["val_nll_after"],
        target,
    )
    return {**after, **fit, "checkpoint": str(target)}
