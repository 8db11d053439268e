"""`predict(cfg)`: the top-k classes of image files under a checkpoint (cnnpredict)."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from cnntrain.config import validate_runtime
from cnntrain.errors import UserError
from cnntrain.inference import Preprocess, find_images, load_trained_model
from cnntrain.runtime import select_device
from cnntrain.train import run_dir_from_hydra

log = logging.getLogger("cnntrain")


def _positive_int(cfg: DictConfig, key: str) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{key} must be a positive integer, got {value!r}")
    return value


def predict(cfg: DictConfig, run_dir: str | Path | None = None) -> list[dict]:
    """One dict per image: {"file", "top": [(class, probability), ...]} (best first); printed
    as a table and written to predictions.csv (file, rank, class, probability)."""
    validate_runtime(cfg)
    topk, batch_size = _positive_int(cfg, "topk"), _positive_int(cfg, "batch_size")
    run_dir = Path(run_dir) if run_dir is not None else run_dir_from_hydra()
    files = find_images(cfg.inputs)  # before the model is built: a typo fails in a second
    device = select_device(cfg.device)
    model, trained, classes = load_trained_model(cfg.ckpt, device)
    prep = Preprocess(trained.data, device)
    k = min(topk, len(classes))
    results = []
    with torch.inference_mode():
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            x = prep(torch.stack([prep.pixels(path) for path in chunk]))
            top = model(x).float().softmax(1).topk(k, dim=1)
            for path, probs, indices in zip(chunk, top.values.tolist(), top.indices.tolist()):
                results.append({"file": str(path), "top": [(classes[i], p) for i, p in zip(indices, probs)]})
    write_predictions_csv(results, run_dir / "predictions.csv")
    print(format_predictions(results), flush=True)
    log.info("%d images, predictions written to %s", len(results), run_dir / "predictions.csv")
    return results


def write_predictions_csv(results: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "rank", "class", "probability"])
        for r in results:
            for rank, (name, prob) in enumerate(r["top"], 1):
                writer.writerow([r["file"], rank, name, repr(prob)])


def format_predictions(results: list[dict]) -> str:
    k = len(results[0]["top"])
    cells = [[r["file"], *(f"{name} {prob:.4f}" for name, prob in r["top"])] for r in results]
    header = ["file", *(f"top{i}" for i in range(1, k + 1))]
    widths = [max(len(row[c]) for row in (header, *cells)) for c in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)
