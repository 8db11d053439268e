"""`predict(cfg)`: the top-k classes of image files under a checkpoint, or under an ONNX file
written by cnnexport, run by onnxruntime alone (cnnpredict)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig

from cnntrain.checkpoint import load_checkpoint
from cnntrain.errors import UserError
from cnntrain.files import atomic_write
from cnntrain.inference import (
    Decode,
    Preprocess,
    find_images,
    model_from_checkpoint,
    trained_config,
)
from cnntrain.rundir import fresh_run, run_dir_from_hydra
from cnntrain.runtime import select_device
from cnntrain.schema import check
from cnntrain.text import markdown_table

log = logging.getLogger("cnntrain")


def predict(cfg: DictConfig, run_dir: str | Path | None = None) -> list[dict]:
    """One dict per image: {"file", "top": [(class, probability), ...]} (best first); printed
    as a table and written to predictions.csv (file, rank, class, probability)."""
    check(cfg)
    run_dir = Path(run_dir) if run_dir is not None else run_dir_from_hydra()
    if (cfg.ckpt is None) == (cfg.exported is None):
        raise UserError(
            f"give exactly one of ckpt= (a checkpoint written by cnntrain) and model= (an "
            f"ONNX file written by cnnexport); {'both were' if cfg.ckpt else 'neither was'} given"
        )
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
        chunk = files[start : start + batch_size]
        top = probabilities(pixels[start : start + batch_size]).topk(k, dim=1)
        for path, probs, indices in zip(chunk, top.values.tolist(), top.indices.tolist()):
            results.append(
                {"file": str(path), "top": [(classes[i], p) for i, p in zip(indices, probs)]}
            )
    write_predictions_csv(results, run_dir / "predictions.csv")
    print(format_predictions(results), flush=True)
    log.info("%d images, predictions written to %s", len(results), run_dir / "predictions.csv")
    return results


def _checkpoint(ckpt, device: torch.device) -> tuple[list[str], Decode, Callable]:
    """(classes, the decoder of new images, uint8 pixels -> probabilities) of a checkpoint; a
    calibrated copy's (cnneval calibrate=true) at its stored temperature."""
    from cnntrain.temperature import stored_temperature, tempered

    path = Path(str(ckpt)).expanduser()
    state = load_checkpoint(path)
    trained = trained_config(state, path)
    temperature = stored_temperature(state, path)  # checked before the model is built
    model = model_from_checkpoint(state, trained, path, device)
    model, _ = tempered(model, temperature, path)
    classes = list(state["classes"])
    prep = Preprocess(trained, device)

    def probabilities(pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(prep(pixels)).float().softmax(1).cpu()

    return classes, prep, probabilities


def _exported(file) -> tuple[list[str], Decode, Callable]:
    """The same for an ONNX file written by cnnexport, under onnxruntime: its metadata says the
    classes and what it takes (size, channels, layout, dtype), and its graph normalizes, so new
    images are only decoded to uint8 pixels, as Preprocess decodes them. The metadata is checked
    as data (export.checked_metadata) and the graph's outputs against its classes."""
    from cnntrain.export import checked_metadata, graph_input, load_onnx

    path = _onnx_file(Path(str(file)).expanduser())
    try:
        run, meta = load_onnx(path)
    except UserError:
        raise
    except Exception as e:
        raise UserError(
            f"{path} cannot be read by onnxruntime ({_reason(e)}); pass an .onnx file "
            "written by cnnexport"
        ) from None
    meta = checked_metadata(meta, path)
    classes, size = meta["classes"], meta["image_size"]
    decode = Decode(meta["channels"], size, meta.get("resize") or size)
    layout, dtype = meta["layout"], "uint8" if meta["input_dtype"] == "uint8" else "float"

    def probabilities(pixels: torch.Tensor) -> torch.Tensor:
        x = graph_input(pixels, layout, dtype)
        try:
            out = run(x).float()
        except Exception as e:  # a graph that does not take what its metadata describes
            raise UserError(
                f"{path}: onnxruntime cannot run it on {tuple(x.shape)} {meta['input_dtype']} "
                f"images, as its metadata describes ({_reason(e)}); export the checkpoint "
                "again with cnnexport"
            ) from None
        if out.dim() != 2 or out.shape[1] != len(classes):
            raise UserError(
                f"{path}: its graph gives outputs of shape {tuple(out.shape)} but its metadata "
                f"lists {len(classes)} classes; export the checkpoint again with cnnexport"
            )
        return out if meta["output"] == "probabilities" else out.softmax(1)

    return list(classes), decode, probabilities


def _onnx_file(path: Path) -> Path:
    """`path` if it can be an ONNX file; a checkpoint or another export format is named."""
    from cnntrain.filekind import EXPORTED, identify, require_regular

    require_regular(
        path,
        "exported model",
        "pass model= an .onnx file written by cnnexport, e.g. "
        "outputs/export/<date>/<time>_<run>/model.onnx",
    )
    kind, _ = identify(path)
    if kind in ("torchscript", "exported_program"):
        raise UserError(
            f"model={path} is {EXPORTED[kind]}: cnnpredict model= runs only ONNX files "
            "(cnnexport format=onnx); export one, or predict with ckpt= the checkpoint"
        )
    if kind in ("torch", "pickle"):
        raise UserError(
            f"model={path} is a PyTorch checkpoint, not an exported model; pass it as ckpt="
        )
    if kind != "onnx" and path.suffix.lower() != ".onnx":
        raise UserError(
            f"model={path}: cnnpredict runs ONNX files (.onnx) written by cnnexport; "
            "for a checkpoint use ckpt="
        )
    return path


def _reason(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)[
        :200
    ]


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
    return markdown_table(header, cells)
