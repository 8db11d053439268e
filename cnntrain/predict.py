"""`predict(cfg)`: the top-k classes of image files under a checkpoint, or under an ONNX file
written by cnnexport, run by onnxruntime alone (cnnpredict)."""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig

from cnntrain.errors import UserError
from cnntrain.files import atomic_write
from cnntrain.inference import Decode, Preprocess, find_images, load_trained_model
from cnntrain.runtime import select_device
from cnntrain.rundir import fresh_run
from cnntrain.schema import check
from cnntrain.train import run_dir_from_hydra

log = logging.getLogger("cnntrain")

# what cnnpredict reads from an exported file's metadata
EXPORTED_KEYS = ("classes", "image_size", "channels", "layout", "input_dtype", "output")


def predict(cfg: DictConfig, run_dir: str | Path | None = None) -> list[dict]:
    """One dict per image: {"file", "top": [(class, probability), ...]} (best first); printed
    as a table and written to predictions.csv (file, rank, class, probability)."""
    check(cfg)
    run_dir = Path(run_dir) if run_dir is not None else run_dir_from_hydra()
    if (cfg.ckpt is None) == (cfg.exported is None):
        raise UserError(f"give exactly one of ckpt= (a checkpoint written by cnntrain) and model= (an "
                        f"ONNX file written by cnnexport); {'both were' if cfg.ckpt else 'neither was'} given")
    if cfg.exported is not None:
        from cnntrain.export import require_extra

        require_extra("model=FILE.onnx", ("onnxruntime",))
    files = find_images(cfg.inputs)  # before anything is claimed or built: a typo fails at once
    with fresh_run(run_dir, cfg):
        return _predict(cfg, files, run_dir)


def _predict(cfg: DictConfig, files: list[Path], run_dir: Path) -> list[dict]:
    topk, batch_size = cfg.topk, cfg.batch_size
    if cfg.ckpt is not None:
        classes, decode, probabilities = _checkpoint(cfg.ckpt, select_device(cfg.device))
    else:
        classes, decode, probabilities = _exported(cfg.exported)
    k = min(topk, len(classes))
    results = []
    pixels = decode.decoded(files)
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        top = probabilities(pixels[start:start + batch_size]).topk(k, dim=1)
        for path, probs, indices in zip(chunk, top.values.tolist(), top.indices.tolist()):
            results.append({"file": str(path), "top": [(classes[i], p) for i, p in zip(indices, probs)]})
    write_predictions_csv(results, run_dir / "predictions.csv")
    print(format_predictions(results), flush=True)
    log.info("%d images, predictions written to %s", len(results), run_dir / "predictions.csv")
    return results


def _checkpoint(ckpt, device: torch.device) -> tuple[list[str], Decode, Callable]:
    """(classes, the decoder of new images, uint8 pixels -> probabilities) of a checkpoint."""
    model, trained, classes = load_trained_model(ckpt, device)
    prep = Preprocess(trained, device)

    def probabilities(pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(prep(pixels)).float().softmax(1).cpu()
    return classes, prep, probabilities


def _exported(file) -> tuple[list[str], Decode, Callable]:
    """The same for an ONNX file written by cnnexport, under onnxruntime: its metadata says the
    classes and what it takes (size, channels, layout, dtype), and its graph normalizes, so new
    images are only decoded to uint8 pixels, as Preprocess decodes them."""
    from cnntrain.export import graph_input, load_onnx

    path = Path(str(file)).expanduser()
    if not path.is_file():
        raise UserError(f"exported model {path} not found (pass model= an .onnx file written by "
                        "cnnexport, e.g. outputs/export/<date>/<time>_<run>/model.onnx)")
    if path.suffix.lower() != ".onnx":
        raise UserError(f"model={path}: cnnpredict runs ONNX files (.onnx) written by cnnexport; "
                        "for a checkpoint use ckpt=")
    try:
        run, meta = load_onnx(path)
    except UserError:
        raise
    except Exception as e:
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UserError(f"{path} cannot be read by onnxruntime ({reason[:200]}); pass an .onnx file "
                        "written by cnnexport") from None
    missing = [key for key in EXPORTED_KEYS if key not in meta]
    if missing:
        raise UserError(f"{path} lacks cnnexport's metadata ({', '.join(missing)}); export the "
                        "checkpoint with cnnexport ckpt=... or predict with ckpt=")
    size = int(meta["image_size"])
    decode = Decode(int(meta["channels"]), size, int(meta.get("resize") or size))
    layout, dtype = meta["layout"], "uint8" if meta["input_dtype"] == "uint8" else "float"

    def probabilities(pixels: torch.Tensor) -> torch.Tensor:
        out = run(graph_input(pixels, layout, dtype)).float()
        return out if meta["output"] == "probabilities" else out.softmax(1)
    return list(meta["classes"]), decode, probabilities


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
