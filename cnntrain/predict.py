"""`predict(cfg)`: the top-k classes of image files under a checkpoint (cnnpredict)."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from cnntrain.files import atomic_write
from cnntrain.inference import Preprocess, find_images, load_trained_model
from cnntrain.runtime import select_device
from cnntrain.rundir import fresh_run
from cnntrain.schema import check
from cnntrain.train import run_dir_from_hydra

log = logging.getLogger("cnntrain")


def predict(cfg: DictConfig, run_dir: str | Path | None = None) -> list[dict]:
    """One dict per image: {"file", "top": [(class, probability), ...]} (best first); printed
    as a table and written to predictions.csv (file, rank, class, probability)."""
    check(cfg)
    run_dir = Path(run_dir) if run_dir is not None else run_dir_from_hydra()
    files = find_images(cfg.inputs)  # before anything is claimed or built: a typo fails at once
    with fresh_run(run_dir, cfg):
        return _predict(cfg, files, run_dir)


def _predict(cfg: DictConfig, files: list[Path], run_dir: Path) -> list[dict]:
    topk, batch_size = cfg.topk, cfg.batch_size
    device = select_device(cfg.device)
    model, trained, classes = load_trained_model(cfg.ckpt, device)
    prep = Preprocess(trained, device)
    k = min(topk, len(classes))
    results = []
    pixels = prep.decoded(files)
    with torch.inference_mode():
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            x = prep(pixels[start:start + batch_size])
            top = model(x).float().softmax(1).topk(k, dim=1)
            for path, probs, indices in zip(chunk, top.values.tolist(), top.indices.tolist()):
                results.append({"file": str(path), "top": [(classes[i], p) for i, p in zip(indices, probs)]})
    write_predictions_csv(results, run_dir / "predictions.csv")
    print(format_predictions(results), flush=True)
    log.info("%d images, predictions written to %s", len(results), run_dir / "predictions.csv")
    return results


def write_predictions_csv(results: list[dict], path: Path) -> None:
    with atomic_write(path, newline="") as f:
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
