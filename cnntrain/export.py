"""`export(cfg)`: a checkpoint as a file to deploy (cnnexport), verified before it is kept.

The exported model is `Deployable`: the trained model (eval mode, the checkpoint's weights) behind
the preprocessing evaluation does, so a deployment feeds it what an image decoder gives: uint8
pixels (or float 0..1) at the training size, NCHW or NHWC, any batch size. It converts to float,
normalizes with the training mean/std and returns logits (or probabilities).

Each format (ONNX with torch's dynamo exporter, TorchScript by tracing, torch.export's
ExportedProgram) is written to a temp name in the run folder, loaded back from that file with
its own runtime (onnxruntime, torch.jit.load, torch.export.load) and run on real images, whose
outputs are compared with cnntrain's eager predictions on the same pixels. Only when every
requested format agrees within `atol` (and on the top-1 class of every image) are the files
renamed into place, each with a JSON sidecar of its metadata; otherwise nothing is kept."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import math
import os
import re
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cnntrain.errors import UserError
from cnntrain.files import atomic_write, os_error, write_error
from cnntrain.logs import log_outputs, shown
from cnntrain.schema import EXPORT_FORMATS, check
from cnntrain.text import markdown_table

log = logging.getLogger("cnntrain")

FILES = {
    "onnx": "model.onnx",
    "torchscript": "model.torchscript.pt",
    "exported_program": "model.pt2",
}
RUNTIMES = {
    "onnx": "onnxruntime",
    "torchscript": "torch.jit.load",
    "exported_program": "torch.export.load",
}
METADATA_ENTRY = "cnntrain.json"  # the metadata's name inside TorchScript and .pt2 archives
INPUT_NAME = "images"
EXTRA = ("onnx", "onnxscript", "onnxruntime")  # what torch's ONNX exporter and its check need
CHUNK = 64  # images per call when verifying


# --------------------------------------------------------------------------- the exported model
class Deployable(nn.Module):
    """uint8 images (B, C, S, S), or (B, S, S, C) with layout="nhwc"; float 0..1 with
    input="float") -> the model's logits (probabilities with softmax=True). The normalization
    is cnntrain's (data.augment.Normalize): x * 1 / (255 std) - mean / std, in float32."""

    def __init__(
        self,
        model: nn.Module,
        mean,
        std,
        *,
        layout: str = "nchw",
        input: str = "uint8",
        softmax: bool = False,
    ):
        super().__init__()
        self.model = model.eval()
        self.nhwc, self.softmax = layout == "nhwc", bool(softmax)
        std = torch.tensor([float(s) for s in std]).view(1, -1, 1, 1)
        mean = torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / ((255.0 if input == "uint8" else 1.0) * std))
        self.register_buffer("shift", mean / std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2) if self.nhwc else images
        out = self.model(x.float() * self.scale - self.shift)
        return out.softmax(1) if self.softmax else out


def graph_input(pixels: torch.Tensor, layout: str, input: str) -> torch.Tensor:
    """uint8 (B, C, S, S) pixels -> what the exported model takes: in `layout`, uint8 or float 0..1."""
    x = pixels.permute(0, 2, 3, 1) if layout == "nhwc" else pixels
    x = x.contiguous()
    return x if input == "uint8" else x.float() / 255.0


def _dynamic_batch() -> dict:
    return {INPUT_NAME: {0: torch.export.Dim("batch", min=1)}}


# --------------------------------------------------------------------------- metadata
def config_sha256(config) -> str:
    """sha256 of a checkpoint's stored config as canonical JSON (sorted keys, no spaces)."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config)
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def checkpoint_results(path: Path) -> dict:
    """{"test_acc", "test_images"} of the checkpoint from its run's results.json (which scores
    best.pt): None each when there is none or it scores another file."""
    results = path.parent.parent / "results.json" if path.parent.name == "checkpoints" else None
    try:
        found = json.loads(results.read_text()) if results is not None else {}
    except (OSError, ValueError):
        found = {}
    if not isinstance(found, dict) or Path(str(found.get("checkpoint", ""))).name != path.name:
        found = {}
    acc, images = found.get("test_acc"), found.get("test_images")
    return {
        "test_acc": float(acc) if isinstance(acc, (int, float)) else None,
        "test_images": int(images) if isinstance(images, int) else None,
    }


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cnntrain")
    except PackageNotFoundError:
        return None


def metadata(
    ckpt: dict, trained: DictConfig, path: Path, *, layout: str, input: str, softmax: bool
) -> dict:
    """What a deployment needs to feed the exported model and read its output, and where it
    comes from; plain JSON types only."""
    from cnntrain.data import storage_size

    data = trained.data
    size, channels = int(data.image_size), len(data.mean)
    return {
        "model": str(trained.model.name),
        "dataset": str(data.name),
        "classes": [str(c) for c in ckpt["classes"]],
        "num_classes": len(ckpt["classes"]),
        "image_size": size,
        "channels": channels,
        "layout": layout,
        "input_name": INPUT_NAME,
        "input_shape": ["batch", channels, size, size]
        if layout == "nchw"
        else ["batch", size, size, channels],
        "input_dtype": "uint8" if input == "uint8" else "float32",
        "input_range": [0, 255] if input == "uint8" else [0, 1],
        # new images: shorter side resized to this, then the central image_size square (cnnpredict)
        "resize": int(storage_size(data, size, trained.get("aug"))),
        "mean": [float(m) for m in data.mean],
        "std": [float(s) for s in data.std],
        "output": "probabilities" if softmax else "logits",
        "output_name": "probabilities" if softmax else "logits",
        **checkpoint_results(path),
        "config_sha256": config_sha256(ckpt["config"]),
        "checkpoint": str(path.resolve()),
        "epoch": int(ckpt["epoch"]) if isinstance(ckpt.get("epoch"), int) else None,
        "cnntrain_version": _version(),
        "torch_version": torch.__version__,
    }


# --------------------------------------------------------------------------- one function per format
def require_extra(what: str = "format=onnx", modules=EXTRA) -> None:
    """The ONNX packages, or one line saying how to install them."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(
            f'{what} needs {", ".join(missing)}, not installed here: pip install "cnntrain[export]"'
        )


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    """torch's dynamo-based ONNX exporter (torch.export, then onnxscript's translation and
    optimizer); metadata as ONNX metadata_props, each value JSON-encoded."""
    with _quiet("onnxscript", "onnx_ir"):  # the optimizer's progress lines
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            verbose=False,
            input_names=[INPUT_NAME],
            output_names=[meta["output_name"]],
            dynamic_shapes=_dynamic_batch(),
        )
    program.model.metadata_props.update({k: json.dumps(v) for k, v in meta.items()})
    program.save(str(path), external_data=False)


def export_torchscript(module: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    """torch.jit.trace (any batch size: shapes are traced as operations); metadata as the
    archive's extra file cnntrain.json."""
    traced = torch.jit.trace(module, example, check_trace=False)  # the verification checks it
    torch.jit.save(traced, str(path), _extra_files={METADATA_ENTRY: json.dumps(meta)})


def export_exported_program(
    module: nn.Module, example: torch.Tensor, path: Path, meta: dict
) -> None:
    """torch.export.export with a dynamic batch, saved with torch.export.save; metadata as its
    extra file cnntrain.json."""
    program = torch.export.export(module, (example,), dynamic_shapes=_dynamic_batch())
    torch.export.save(program, str(path), extra_files={METADATA_ENTRY: json.dumps(meta)})


@contextlib.contextmanager
def _quiet(*loggers: str):
    """Those loggers' INFO lines kept off the console (the root logger shows INFO) for the block."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


EXPORTERS: dict[str, Callable] = {
    "onnx": export_onnx,
    "torchscript": export_torchscript,
    "exported_program": export_exported_program,
}


def _json_values(items) -> dict:
    out = {}
    for k, v in items:
        try:
            out[k] = json.loads(v)
        except (TypeError, ValueError):
            out[k] = v
    return out


def load_onnx(path: Path, *, threads: int | None = None, spinning: bool = True):
    """(run, metadata) of an ONNX file under onnxruntime on the CPU: run(tensor) -> tensor.
    `threads`: its intra-op threads (None: onnxruntime's default, one per core); `spinning`:
    whether they busy-wait for work after a run (onnxruntime's default; lower latency, but
    they hold the cores a moment longer)."""
    require_extra("an ONNX file", ("onnxruntime",))
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads is not None:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    return run, _json_values(session.get_modelmeta().custom_metadata_map.items())


def load_torchscript(path: Path):
    extra = {METADATA_ENTRY: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.14 marks torch.jit deprecated
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return _no_grad(module), json.loads(extra[METADATA_ENTRY])


def load_exported_program(path: Path):
    extra = {METADATA_ENTRY: ""}
    module = torch.export.load(str(path), extra_files=extra).module()
    return _no_grad(module), json.loads(extra[METADATA_ENTRY])


def _no_grad(module) -> Callable:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return run


LOADERS: dict[str, Callable] = {
    "onnx": load_onnx,
    "torchscript": load_torchscript,
    "exported_program": load_exported_program,
}


# what an exported file's metadata may say: anything else is a crafted or damaged file
LAYOUTS, INPUT_DTYPES, OUTPUTS = ("nchw", "nhwc"), ("uint8", "float32"), ("logits", "probabilities")
MAX_IMAGE_SIZE = 4096  # pixels a side; beyond it decoding a batch would exhaust memory


def checked_metadata(
    meta: dict,
    path: Path,
    required=("classes", "image_size", "channels", "layout", "input_dtype", "output"),
) -> dict:
    """An exported file's metadata, each key cnnpredict reads checked as the data it is (a file
    can be crafted to hold anything): the `required` keys there, classes a list of distinct
    names, sizes whole numbers in range, channels 1 or 3, mean/std finite with std > 0, layout,
    dtype and output from the known sets. A bad key is one UserError naming the file and key."""
    fix = "export the checkpoint again with cnnexport, or predict with ckpt="
    missing = [key for key in required if key not in meta]
    if missing:
        raise UserError(f"{path} lacks cnnexport's metadata ({', '.join(missing)}); {fix}")
    # in this order: each check relies on the keys the ones before it passed
    for problem in (_classes_problem, _sizes_problem, _normalization_problem, _names_problem):
        found = problem(meta)
        if found is not None:
            key, want = found
            value = repr(meta.get(key))
            raise UserError(
                f"{path}: its metadata {key}={value[:80]}{'...' if len(value) > 80 else ''} is "
                f"not {want}; {fix}"
            )
    return meta


# each -> (key, what it should be) of the first bad key it checks, or None
def _classes_problem(meta: dict) -> tuple[str, str] | None:
    classes = meta["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        return "classes", "a non-empty list of class names (strings)"
    if len(set(classes)) < len(classes):
        repeated = next(c for c in classes if classes.count(c) > 1)
        return "classes", f"a list of distinct names ({repeated!r} repeats)"
    return None


def _sizes_problem(meta: dict) -> tuple[str, str] | None:
    for key in ("image_size", "resize"):  # resize: the shorter side before the central crop
        low = 1 if key == "image_size" else meta["image_size"]
        value = meta.get(key)
        value = low if value is None and key == "resize" else value
        if not _whole(value) or not low <= value <= MAX_IMAGE_SIZE:
            return key, f"a whole number from {low} to {MAX_IMAGE_SIZE}"
    if meta["channels"] not in (1, 3) or not _whole(meta["channels"]):
        return "channels", "1 or 3"
    return None


def _normalization_problem(meta: dict) -> tuple[str, str] | None:
    for key in ("mean", "std"):
        value = meta.get(key, [1.0] * meta["channels"])
        if (
            not isinstance(value, list)
            or len(value) != meta["channels"]
            or not all(_finite(v) for v in value)
            or key == "std"
            and not all(v > 0 for v in value)
        ):
            return (
                key,
                f"a list of {meta['channels']} finite number(s){' > 0' if key == 'std' else ''}",
            )
    return None


def _names_problem(meta: dict) -> tuple[str, str] | None:
    for key, known in (("layout", LAYOUTS), ("input_dtype", INPUT_DTYPES), ("output", OUTPUTS)):
        if meta[key] not in known or not isinstance(meta[key], str):
            return key, f"one of {', '.join(known)}"
    return None


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata embedded in an exported file (by its name: .onnx, .pt2, else TorchScript)."""
    path = Path(path)
    fmt = {".onnx": "onnx", ".pt2": "exported_program"}.get(path.suffix, "torchscript")
    return LOADERS[fmt](path)[1]


def export_reason(e: BaseException) -> str:
    """Why an exporter failed, in a few words: the innermost error's first line, with an
    operator named plainly (`No ONNX function found for <OpOverload(op='x.y', ...)>`)."""
    inner = e
    while inner.__cause__ is not None:
        inner = inner.__cause__
    text = " ".join(str(inner).split())
    op = re.search(r"OpOverload\(op='([^']+)'", text)
    if op:
        text = re.sub(r"<OpOverload\(op='[^']+'[^>]*>", f"operator {op[1]}", text)
    first = next(
        (line.strip() for line in str(inner).splitlines() if line.strip()), type(inner).__name__
    )
    text = text if op else first
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return f"{type(inner).__name__}: {text[:300]}"


# --------------------------------------------------------------------------- verification
def compare(expected: torch.Tensor, got: torch.Tensor, atol: float) -> dict:
    """The exported outputs against cnntrain's: max abs difference and top-1 agreement. An
    image whose exported top-1 class differs is a failure unless cnntrain's own output for that
    class is within `atol` of its best (a tie at the tolerance)."""
    expected, got = expected.float(), got.float()
    if got.shape != expected.shape:
        return {
            "images": len(expected),
            "max_abs_diff": None,
            "top1_agree": 0,
            "top1_agreement": 0.0,
            "ties": 0,
            "passed": False,
            "problem": f"output shape {tuple(got.shape)}, expected {tuple(expected.shape)}",
        }
    diff = (got - expected).abs()
    finite = bool(torch.isfinite(got).all())
    max_diff = float(diff.max()) if diff.numel() and finite else (0.0 if finite else None)
    top_e, top_g = expected.argmax(1), got.argmax(1)
    agree = top_e == top_g
    tie = expected.gather(1, top_g[:, None])[:, 0] >= expected.max(1).values - atol
    ties = int((~agree & tie).sum())
    passed = finite and max_diff <= atol and ties == int((~agree).sum())
    out = {
        "images": len(expected),
        "max_abs_diff": max_diff,
        "top1_agree": int(agree.sum()),
        "top1_agreement": float(agree.float().mean()) if len(agree) else 1.0,
        "ties": ties,
        "passed": passed,
    }
    if not finite:
        out["problem"] = "non-finite outputs"
    return out


def run_batched(run: Callable, pixels: torch.Tensor, layout: str, input: str) -> torch.Tensor:
    """`run` (an exported model) on uint8 (N, C, S, S) pixels, CHUNK at a time."""
    return torch.cat(
        [
            run(graph_input(pixels[i : i + CHUNK], layout, input)).float()
            for i in range(0, len(pixels), CHUNK)
        ]
    )


def eager_outputs(model: nn.Module, mean, std, pixels: torch.Tensor, softmax: bool) -> torch.Tensor:
    """cnntrain's own predictions: its Normalize, then the model, as cnneval and cnnpredict run it."""
    from cnntrain.data.augment import Normalize

    normalize = Normalize(list(mean), list(std), "cpu")
    with torch.inference_mode():
        out = torch.cat(
            [model(normalize(pixels[i : i + CHUNK])).float() for i in range(0, len(pixels), CHUNK)]
        )
    return out.softmax(1) if softmax else out


def _median_s(fn: Callable, x, *, min_runs: int, min_s: float, max_runs: int = 1000) -> float:
    times, start = [], time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < min_s):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def benchmark(
    runners: dict[str, Callable],
    pixels: torch.Tensor,
    layout: str,
    input: str,
    *,
    batch: int = 64,
    rounds: int = 5,
    round_s: float = 0.2,
) -> dict:
    """Per runner: median latency of one image (ms) and throughput at batch `batch` (img/s), on
    these pixels (repeated to fill the batch). The runners take turns, `rounds` rounds of at
    least `round_s` s each per batch size, and each result is the median of its rounds: a burst
    of other work on a shared machine then weighs on all of them alike."""
    many = pixels[torch.arange(batch) % len(pixels)]
    one, many = graph_input(pixels[:1], layout, input), graph_input(many, layout, input)
    for run in runners.values():  # warm-up: allocations, kernel choices
        run(one), run(many)
    latency = {name: [] for name in runners}
    per_batch = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            latency[name].append(_median_s(run, one, min_runs=3, min_s=round_s))
            per_batch[name].append(_median_s(run, many, min_runs=1, min_s=round_s))
    return {
        name: {
            "latency_ms_b1": statistics.median(latency[name]) * 1000,
            f"throughput_b{batch}": batch / statistics.median(per_batch[name]),
        }
        for name in runners
    }


def eager_runner(module: nn.Module) -> Callable:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x)

    return run


# --------------------------------------------------------------------------- the tool
def formats_of(value) -> list[str]:
    """format= as a list without repeats (the schema checked each name)."""
    items = [value] if isinstance(value, str) else list(value)
    if not items:
        raise UserError(
            f"format=[] names no format; give one or more of {', '.join(EXPORT_FORMATS)}"
        )
    return list(dict.fromkeys(str(f) for f in items))


def export(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Every requested format of `cfg.ckpt`, verified; returns the report (export.json)."""
    from cnntrain.checkpoint import require_file
    from cnntrain.inference import find_images
    from cnntrain.rundir import fresh_run, run_dir_from_hydra

    check(cfg)
    run_dir = Path(run_dir) if run_dir is not None else run_dir_from_hydra()
    formats = formats_of(cfg.format)
    if "onnx" in formats:
        require_extra()
    path = require_file(Path(str(cfg.ckpt)).expanduser())  # before the folder is claimed
    files = find_images(cfg.inputs) if cfg.inputs is not None else None
    with fresh_run(run_dir, cfg):
        return _export(cfg, path, formats, files, run_dir)


def verification_pixels(cfg: DictConfig, trained: DictConfig, classes: list[str], files) -> dict:
    """The uint8 (N, C, S, S) pixels the exported files are checked on: `files` (inputs=)
    decoded as cnnpredict decodes them, or verify_images test images evenly spaced over the
    split, through cnntrain's data path as cnneval reads them (before normalization)."""
    from cnntrain.data import storage_size
    from cnntrain.inference import Decode, checkpoint_split

    data = trained.data
    size = int(data.image_size)
    if files is not None:
        decode = Decode(len(data.mean), size, storage_size(data, size, trained.get("aug")))
        return {
            "pixels": decode.decoded(files).clone(),
            "labels": None,
            "names": [str(f) for f in files],
            "source": f"{len(files)} image file(s) of inputs=",
        }
    fix = "or check the export on image files: inputs=..."
    try:
        _, loader = checkpoint_split(trained, classes, cfg.data, "test", torch.device("cpu"), fix)
    except UserError as e:
        raise UserError(str(e) if fix in str(e) else f"{e} ({fix})") from None
    n = loader.num_samples
    k = min(int(cfg.verify_images), n)
    picks = torch.arange(k) * n // k  # evenly spaced: a class-sorted split gives every class
    return {
        "pixels": loader.pixels(picks),
        "labels": loader.labels[picks].cpu(),
        "names": [loader.sample_name(int(i)) for i in picks],
        "source": f"{k} of the {n} test images of {data.name}"
        + (" (evenly spaced)" if k < n else ""),
    }


@dataclass
class _Job:
    """What every format is exported from and verified against: the same for each, so it
    travels as one value from _export to _export_one."""

    module: nn.Module  # the Deployable
    example: torch.Tensor  # the exporters' example input
    meta: dict
    pixels: torch.Tensor  # uint8 (N, C, S, S): the verification images
    expected: torch.Tensor  # cnntrain's eager outputs on them
    atol: float
    layout: str
    input: str


def _export(cfg: DictConfig, path: Path, formats: list[str], files, run_dir: Path) -> dict:
    """export() in the claimed run folder: the checkpoint loaded, every format written and
    verified, then the report (export.json, the table) of what was kept."""
    ckpt, trained, model, meta = _load(cfg, path, formats)
    sample = verification_pixels(cfg, trained, list(ckpt["classes"]), files)
    job = _prepared_job(cfg, model, meta, sample)
    results, bench = _write_verified(cfg, formats, job, run_dir)
    report = {
        "checkpoint": str(path.resolve()),
        "model": meta["model"],
        "dataset": meta["dataset"],
        "metadata": meta,
        "atol": float(cfg.atol),
        "verified_on": sample["source"],
        "samples": sample["names"],
        "formats": results,
        "benchmark": bench,
    }
    with atomic_write(run_dir / "export.json") as f:
        json.dump(report, f, indent=2)
    print(format_table(results, bench), flush=True)
    if bench:
        _log_benchmark_machine(bench)
    commands = []
    if "onnx" in formats:
        commands.append(f"cnnpredict model={shown(run_dir / FILES['onnx'])} inputs=<your images>")
    log_outputs(run_dir, commands)
    return report


def _load(
    cfg: DictConfig, path: Path, formats: list[str]
) -> tuple[dict, DictConfig, nn.Module, dict]:
    """The checkpoint, its training config, its model (CPU) and the exported files' metadata,
    announced in one line before the slow part starts."""
    from cnntrain.checkpoint import load_checkpoint
    from cnntrain.inference import model_from_checkpoint, trained_config

    ckpt = load_checkpoint(path)
    trained = trained_config(ckpt, path)
    model = model_from_checkpoint(ckpt, trained, path, torch.device("cpu"))
    meta = metadata(ckpt, trained, path, softmax=cfg.softmax, layout=cfg.layout, input=cfg.input)
    log.info(
        "exporting %s (%s on %s, epoch %s) as %s: %s %s %s -> %s of %d classes",
        shown(path),
        meta["model"],
        meta["dataset"],
        meta["epoch"],
        ", ".join(formats),
        meta["input_dtype"],
        cfg.layout.upper(),
        "x".join(map(str, meta["input_shape"])),
        meta["output"],
        len(ckpt["classes"]),
    )
    return ckpt, trained, model, meta


def _prepared_job(cfg: DictConfig, model: nn.Module, meta: dict, sample: dict) -> _Job:
    """cnntrain's eager outputs on the sample (what every format must reproduce) and the
    Deployable the formats are exported from."""
    pixels = sample["pixels"]
    expected = eager_outputs(model, meta["mean"], meta["std"], pixels, cfg.softmax)
    line = f"checking on {sample['source']}"
    if sample["labels"] is not None:
        line += f"; cnntrain's top-1 accuracy on them: {float((expected.argmax(1) == sample['labels']).float().mean()):.4f}"
    log.info("%s", line)
    options = dict(layout=cfg.layout, input=cfg.input)
    module = Deployable(model, meta["mean"], meta["std"], softmax=cfg.softmax, **options)
    module.requires_grad_(False)
    # batch 2: the batch stays dynamic
    example = graph_input(pixels[torch.arange(2) % len(pixels)], **options)
    return _Job(module, example, meta, pixels, expected, cfg.atol, **options)


def _write_verified(
    cfg: DictConfig, formats: list[str], job: _Job, run_dir: Path
) -> tuple[dict[str, dict], dict | None]:
    """Every format exported to a temp file and verified (then benchmarked, with benchmark=);
    only when all passed are they renamed into place with their sidecars. An export is all or
    nothing: whatever fails, no temp file is left. -> (results per format, benchmark or None)."""
    temps: dict[str, Path] = {}
    results: dict[str, dict] = {}
    runners: dict[str, Callable] = {}
    try:
        for fmt in formats:
            temps[fmt] = _temp_path(run_dir / FILES[fmt])
            results[fmt], runners[fmt] = _export_one(fmt, job, temps[fmt])
        bench = _benchmark_formats(formats, job, runners, temps) if cfg.benchmark else None
        for fmt in formats:  # every format passed: now they are kept
            _commit(temps.pop(fmt), run_dir / FILES[fmt])
            with atomic_write(run_dir / f"{FILES[fmt]}.json") as f:
                json.dump({"format": fmt, **job.meta}, f, indent=2)
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
    return results, bench


def _benchmark_formats(
    formats: list[str], job: _Job, runners: dict[str, Callable], temps: dict[str, Path]
) -> dict:
    """benchmark() of eager PyTorch and each verified runtime, with the machine's load beside
    it (what makes the timings comparable, or not)."""
    log.info("benchmark: eager PyTorch and %s, taking turns", ", ".join(formats))
    # onnxruntime's idle threads must not spin on the cores the next runtime times
    if "onnx" in runners:
        runners["onnx"] = load_onnx(temps["onnx"], spinning=False)[0]
    bench = benchmark(
        {"eager": eager_runner(job.module), **runners},
        job.pixels,
        layout=job.layout,
        input=job.input,
    )
    bench.update(
        torch_threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        load_average=[round(x, 2) for x in os.getloadavg()],
    )
    return bench


def _log_benchmark_machine(bench: dict) -> None:
    """The cores and load the benchmark ran with: timings on a busy machine are noise."""
    busy = bench["load_average"][0] > bench["cpu_count"] + 0.5
    log.info(
        "benchmark on %d CPU core(s), %d torch thread(s), onnxruntime one per core; load "
        "average %.1f%s",
        bench["cpu_count"],
        bench["torch_threads"],
        bench["load_average"][0],
        ": other processes shared the CPU, the timings are noisy" if busy else "",
    )


def _export_one(fmt: str, job: _Job, temp: Path) -> tuple[dict, Callable]:
    """One format: exported to `temp`, loaded back from it by its runtime and compared with
    cnntrain's outputs `job.expected` on `job.pixels`. A failure is one UserError."""
    others = " or ".join(f"format={f}" for f in EXPORT_FORMATS if f != fmt)
    seconds = _write_format(fmt, job, temp, others)
    run, stored, got = _run_back(fmt, job, temp, others)
    result = {
        "file": FILES[fmt],
        "bytes": temp.stat().st_size,
        "export_s": round(seconds, 3),
        "runtime": RUNTIMES[fmt],
        **compare(job.expected, got, job.atol),
    }
    written = {"format": fmt, **job.meta}
    if {key: stored.get(key) for key in written} != written:
        result.update(passed=False, problem="its embedded metadata does not read back")
    _log_verified(fmt, result, seconds, job)
    if not result["passed"]:
        raise _mismatch(fmt, result, job, others)
    return result, run


def _write_format(fmt: str, job: _Job, temp: Path, others: str) -> float:
    """`fmt`'s exporter writing `temp`; -> the seconds it took. A failure is one UserError: a
    write error names the final file, any other the exporter's reason and the other formats."""
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # torch's exporters warn about their own internals (deprecations, traced shapes):
            # what counts is the verification below
            warnings.simplefilter("ignore")
            EXPORTERS[fmt](job.module, job.example, temp, {"format": fmt, **job.meta})
    except Exception as e:
        error = os_error(e)
        if error is not None:
            raise write_error(temp.parent / FILES[fmt], error) from None
        raise UserError(
            f"model {job.meta['model']} cannot be exported to {fmt} ({export_reason(e)}); try {others}"
        ) from None
    return time.perf_counter() - start


def _run_back(fmt: str, job: _Job, temp: Path, others: str) -> tuple[Callable, dict, torch.Tensor]:
    """`temp` loaded by its own runtime, as a deployment loads it, and run on the verification
    pixels; -> (run, its stored metadata, its outputs). One that does not load or run is one
    UserError."""
    try:
        run, stored = LOADERS[fmt](temp)
        got = run_batched(run, job.pixels, job.layout, job.input)
    except UserError:
        raise
    except Exception as e:
        raise UserError(
            f"the {fmt} export of {job.meta['model']} does not run under {RUNTIMES[fmt]} "
            f"({export_reason(e)}); try {others}"
        ) from None
    return run, stored, got


def _diff_text(result: dict) -> str:
    return "n/a" if result["max_abs_diff"] is None else f"{result['max_abs_diff']:.3g}"


def _log_verified(fmt: str, result: dict, seconds: float, job: _Job) -> None:
    log.info(
        "%s: %s exported in %.1f s (%.1f MB); %s on %d images vs cnntrain: max abs %s "
        "difference %s (atol %g), top-1 agrees on %d/%d%s",
        fmt,
        FILES[fmt],
        seconds,
        result["bytes"] / 1e6,
        RUNTIMES[fmt],
        result["images"],
        "logit" if job.meta["output"] == "logits" else "probability",
        _diff_text(result),
        job.atol,
        result["top1_agree"],
        result["images"],
        f" ({result['ties']} tie(s) within atol)" if result["ties"] else "",
    )


def _mismatch(fmt: str, result: dict, job: _Job, others: str) -> UserError:
    """The one-line error of a format whose outputs (or metadata) do not match cnntrain's."""
    atol = job.atol
    why = result.get("problem") or (
        f"max abs difference {_diff_text(result)} > atol={atol:g}"
        if result["max_abs_diff"] > atol
        else f"top-1 differs on {result['images'] - result['top1_agree'] - result['ties']} of "
        f"{result['images']} images"
    )
    return UserError(
        f"the {fmt} export of {job.meta['model']} does not match cnntrain's predictions "
        f"on {result['images']} images ({why}); nothing was kept. Try {others}, or "
        "atol= if the difference is acceptable"
    )


def _temp_path(final: Path) -> Path:
    """A fresh hidden temp name beside `final`, with its extension (torch.export.save wants
    .pt2), which the exporter writes to."""
    try:
        fd, name = tempfile.mkstemp(
            dir=final.parent, prefix=f".{final.name}.", suffix=f".tmp{final.suffix}"
        )
    except OSError as e:
        raise write_error(final, e) from None
    os.close(fd)
    return Path(name)


def _commit(temp: Path, final: Path) -> None:
    """`temp` becomes `final`: flushed to disk first, then renamed over it."""
    try:
        os.chmod(temp, 0o644)
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, final)
    except OSError as e:
        raise write_error(final, e) from None


def format_table(results: dict, bench: dict | None) -> str:
    """Per format: file, size, max abs difference, top-1 agreement; with a benchmark, latency and
    throughput beside eager PyTorch's (and the speed-up)."""
    header = ["format", "file", "MB", "max abs diff", "top-1 agreement"]
    rows = []
    if bench:
        header += ["latency b1 (ms)", "throughput b64 (img/s)", "vs eager"]
        eager = bench["eager"]
        rows.append(
            [
                "eager PyTorch",
                "-",
                "-",
                "-",
                "-",
                f"{eager['latency_ms_b1']:.2f}",
                f"{eager['throughput_b64']:.0f}",
                "1.00x",
            ]
        )
    for fmt, r in results.items():
        row = [
            fmt,
            r["file"],
            f"{r['bytes'] / 1e6:.1f}",
            "n/a" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2e}",
            f"{r['top1_agree']}/{r['images']} ({100 * r['top1_agreement']:.1f} %)",
        ]
        if bench:
            b = bench[fmt]
            row += [
                f"{b['latency_ms_b1']:.2f}",
                f"{b['throughput_b64']:.0f}",
                f"{b['throughput_b64'] / bench['eager']['throughput_b64']:.2f}x",
            ]
        rows.append(row)
    return markdown_table(header, rows)
