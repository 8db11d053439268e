"""cnnexport end to end on models trained here on the bundled real Fashion-MNIST sample: every
format run by its own runtime agrees with cnntrain's predictions, the graph takes uint8 images in
both layouts, the metadata reads back, cnnpredict runs the ONNX file alone, and bad inputs are one
line with no file left. A slow sweep exports every registered model to ONNX."""

import csv
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import refusal, run_cli
from PIL import Image

FORMATS = ("onnx", "torchscript", "exported_program")
FILES = {
    "onnx": "model.onnx",
    "torchscript": "model.torchscript.pt",
    "exported_program": "model.pt2",
}
ALL = "format=[onnx,torchscript,exported_program]"


def train(name, tmp_path_factory, *extra) -> Path:
    run_dir = tmp_path_factory.mktemp(f"ex_{name}")
    run_cli(
        "cnntrain",
        f"model={name}",
        "epochs=1",
        "device=cpu",
        *extra,
        f"hydra.run.dir={run_dir}",
        cwd=run_dir.parent,
    )
    return run_dir / "checkpoints/best.pt"


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    return train("lenet5", tmp_path_factory)


@pytest.fixture(scope="module")
def resnet20(tmp_path_factory):  # weights need not be good for parity
    return train("resnet20", tmp_path_factory, "max_steps_per_epoch=5", "max_eval_steps=2")


@pytest.fixture(scope="module")
def mobilenet_v2(tmp_path_factory):
    return train("mobilenet_v2", tmp_path_factory, "max_steps_per_epoch=5", "max_eval_steps=2")


def export(ckpt, out, *extra, check=True, env=None):
    return run_cli(
        "cnnexport",
        f"ckpt={ckpt}",
        f"hydra.run.dir={out}",
        *extra,
        cwd=out.parent,
        check=check,
        env=env,
    )


@pytest.fixture(scope="module")
def lenet_export(lenet, tmp_path_factory):
    out = tmp_path_factory.mktemp("lenet_export") / "out"
    proc = export(lenet, out, ALL)
    return out, proc


def bundled_test_images():
    from cnntrain.data.builtin import load_builtin

    images, labels, classes = load_builtin("fashion_mnist_mini", "", train=False, download=False)
    return images, labels, classes


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error:" in line]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp") or ".tmp." in p.name]


def check_parity(out: Path, proc):
    report = json.loads((out / "export.json").read_text())
    assert report["verified_on"].startswith("64 of the 1000 test images of fashion_mnist_mini")
    for fmt in FORMATS:
        result = report["formats"][fmt]
        assert result["passed"] and result["images"] == 64, result
        assert result["max_abs_diff"] < 1e-3 and result["top1_agreement"] == 1.0, result
        assert (out / FILES[fmt]).is_file() and (out / f"{FILES[fmt]}.json").is_file()
        assert f"{fmt}: {FILES[fmt]} exported" in proc.stdout
    saved = next(line for line in proc.stdout.splitlines() if "results saved to" in line)
    assert all(
        name in saved
        for name in ("export.json", *FILES.values(), *(f"{f}.json" for f in FILES.values()))
    )
    assert no_temp_files(out)
    return report


@pytest.mark.e2e  # its fixture runs the console scripts
def test_lenet_every_format_matches_cnntrain(lenet_export):
    check_parity(*lenet_export)


# MobileNetV2 (torchvision's blocks): 75 s on 2 cores, most of it training and exporting
@pytest.mark.parametrize(
    "model", ["resnet20", pytest.param("mobilenet_v2", marks=pytest.mark.slow)]
)
@pytest.mark.e2e
def test_resnet20_and_mobilenet_v2_every_format_match_cnntrain(model, request, tmp_path):
    ckpt = request.getfixturevalue(model)
    proc = export(ckpt, tmp_path / "out", ALL)
    assert check_parity(tmp_path / "out", proc)["metadata"]["model"] == model


def onnx_predictions(path: Path, images: np.ndarray, layout: str, dtype: str):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images.transpose(0, 2, 3, 1) if layout == "nhwc" else images
    x = np.ascontiguousarray(x)
    x = x if dtype == "uint8" else (x.astype(np.float32) / 255)
    return np.concatenate(
        [session.run(None, {"images": x[i : i + 200]})[0] for i in range(0, len(x), 200)]
    )


@pytest.mark.e2e
def test_uint8_in_both_layouts_gives_cnneval_top1(lenet, tmp_path):
    """The 1,000 bundled test images as uint8 arrays straight from the dataset file (NCHW, and
    NHWC as a decoder gives them; float 0..1 with softmax too): the exported graph's top-1 is the
    class cnneval's predictions.csv gives, image by image."""
    run_cli(
        "cnneval", f"ckpt={lenet}", "device=cpu", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path
    )
    rows = list(csv.DictReader(open(tmp_path / "eval/predictions.csv")))
    images, labels, classes = bundled_test_images()
    images = images.numpy()
    assert len(rows) == len(images) == 1000
    expected = [r["predicted"] for r in sorted(rows, key=lambda r: int(r["sample"]))]
    for name, extra in (
        ("nchw", ()),
        ("nhwc", ("layout=nhwc",)),
        ("float", ("layout=nhwc", "input=float", "softmax=true")),
    ):
        export(lenet, tmp_path / name, *extra)
        meta = json.loads((tmp_path / name / "model.onnx.json").read_text())
        layout, dtype = meta["layout"], "uint8" if meta["input_dtype"] == "uint8" else "float"
        assert (layout, dtype) == {
            "nchw": ("nchw", "uint8"),
            "nhwc": ("nhwc", "uint8"),
            "float": ("nhwc", "float"),
        }[name]
        out = onnx_predictions(tmp_path / name / "model.onnx", images, layout, dtype)
        assert out.shape == (1000, 10)
        if name == "float":
            assert meta["output"] == "probabilities" and np.allclose(out.sum(1), 1, atol=1e-5)
        assert [classes[i] for i in out.argmax(1)] == expected, name


@pytest.mark.e2e  # its fixture runs the console scripts
def test_metadata_reads_back_from_every_format_and_the_sidecar(lenet, lenet_export):
    import onnx

    from cnntrain.export import read_metadata

    out, _ = lenet_export
    ckpt = torch.load(lenet, weights_only=True)
    results = json.loads((lenet.parent.parent / "results.json").read_text())
    digest = hashlib.sha256(
        json.dumps(ckpt["config"], sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    for fmt in FORMATS:
        sidecar = json.loads((out / f"{FILES[fmt]}.json").read_text())
        assert read_metadata(out / FILES[fmt]) == sidecar
        assert sidecar["format"] == fmt
        assert sidecar["classes"] == ckpt["classes"] and sidecar["num_classes"] == 10
        assert (sidecar["image_size"], sidecar["channels"], sidecar["layout"]) == (28, 1, "nchw")
        assert sidecar["input_dtype"] == "uint8" and sidecar["input_shape"] == ["batch", 1, 28, 28]
        assert (
            sidecar["mean"] == ckpt["config"]["data"]["mean"]
            and sidecar["std"] == ckpt["config"]["data"]["std"]
        )
        assert sidecar["model"] == "lenet5" and sidecar["output"] == "logits"
        assert sidecar["test_acc"] == results["test_acc"] and sidecar["config_sha256"] == digest
        assert json.loads(json.dumps(sidecar)) == sidecar  # plain JSON types
    # ONNX's own reader sees it too: one metadata_props entry per key, JSON-encoded
    props = {p.key: json.loads(p.value) for p in onnx.load(out / "model.onnx").metadata_props}
    assert props == json.loads((out / "model.onnx.json").read_text())
    report = json.loads((out / "export.json").read_text())
    assert report["metadata"]["config_sha256"] == digest and len(report["samples"]) == 64


@pytest.mark.e2e
def test_cnnpredict_runs_the_onnx_file_as_the_checkpoint(lenet, lenet_export, tmp_path):
    """The same PNG files (RGB, 40x40: converted and resized as for the checkpoint) through
    cnnpredict ckpt= and cnnpredict model=FILE.onnx: the same classes in the same order, the same
    probabilities to 1e-5, the same console table."""
    images, _, _ = bundled_test_images()
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i in range(0, 1000, 50):
        Image.fromarray(images[i, 0].numpy()).convert("RGB").resize((40, 40)).save(
            pngs / f"img_{i:03d}.png"
        )
    by_ckpt = run_cli(
        "cnnpredict",
        f"ckpt={lenet}",
        f"inputs={pngs}",
        "topk=3",
        "device=cpu",
        f"hydra.run.dir={tmp_path / 'a'}",
        cwd=tmp_path,
    )
    by_onnx = run_cli(
        "cnnpredict",
        f"model={lenet_export[0] / 'model.onnx'}",
        f"inputs={pngs}",
        "topk=3",
        f"hydra.run.dir={tmp_path / 'b'}",
        cwd=tmp_path,
    )
    a = list(csv.DictReader(open(tmp_path / "a/predictions.csv")))
    b = list(csv.DictReader(open(tmp_path / "b/predictions.csv")))
    assert len(a) == len(b) == 60
    for x, y in zip(a, b):
        assert (x["file"], x["rank"], x["class"]) == (y["file"], y["rank"], y["class"])
        assert float(x["probability"]) == pytest.approx(float(y["probability"]), abs=1e-5)
    table = [line for line in by_ckpt.stdout.splitlines() if line.startswith("|")]
    assert table == [line for line in by_onnx.stdout.splitlines() if line.startswith("|")]


@pytest.mark.e2e
def test_an_image_folder_model_stored_for_crops_exports_and_predicts_alike(folder_root, tmp_path):
    """RGB folder images stored at 1.14 x the model's size (random-resized-crop training): the
    check reads the test split's central crop, the metadata says to resize to 36 px before the
    32 px crop, and cnnpredict model= (NHWC) gives the predictions of ckpt=."""
    run_cli(
        "cnntrain",
        "model=lenet5",
        "data=imagefolder",
        f"data.root={folder_root}",
        "data.image_size=32",
        "aug.natural.crop_scale=[0.5,1]",
        "aug.natural.shift=0",
        "data.num_workers=0",
        "epochs=1",
        "device=cpu",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    ckpt = tmp_path / "run/checkpoints/best.pt"
    proc = export(ckpt, tmp_path / "x", "layout=nhwc")
    meta = json.loads((tmp_path / "x/model.onnx.json").read_text())
    assert (meta["image_size"], meta["resize"], meta["channels"], meta["input_shape"]) == (
        32,
        36,
        3,
        ["batch", 32, 32, 3],
    )
    assert "on 30 images vs cnntrain" in proc.stdout  # the whole (small) test split
    for name, source in (("a", f"ckpt={ckpt}"), ("b", f"model={tmp_path / 'x/model.onnx'}")):
        run_cli(
            "cnnpredict",
            source,
            f"inputs={folder_root / 'val'}",
            "topk=2",
            "device=cpu",
            f"hydra.run.dir={tmp_path / name}",
            cwd=tmp_path,
        )
    a = list(csv.DictReader(open(tmp_path / "a/predictions.csv")))
    b = list(csv.DictReader(open(tmp_path / "b/predictions.csv")))
    assert len(a) == len(b) > 0 and [(x["file"], x["class"]) for x in a] == [
        (y["file"], y["class"]) for y in b
    ]
    assert max(abs(float(x["probability"]) - float(y["probability"])) for x, y in zip(a, b)) < 1e-5


def test_cnnpredict_default_folder_is_named_after_the_export():
    from omegaconf import OmegaConf

    from cnntrain.cli import run_name

    assert (
        run_name(
            OmegaConf.create(
                {"exported": "outputs/export/2026-11-22/10-00-00_lenet5_x/model.onnx", "ckpt": None}
            )
        )
        == "lenet5_x"
    )
    assert (
        run_name(OmegaConf.create({"exported": "deploy/clothes.onnx", "ckpt": None})) == "clothes"
    )


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "override, needle",
    [
        (
            "format=tflite",
            "format=tflite is not allowed: it must be one of onnx, torchscript, exported_program",
        ),
        (
            "format=[onnx,tflite]",
            "format=['onnx', 'tflite'] is not allowed: it must be one of onnx",
        ),
        ("layout=hwc", "layout=hwc is not allowed: it must be one of nchw, nhwc"),
        ("input=float16", "input=float16 is not allowed: it must be one of uint8, float"),
        ("atol=0", "atol=0.0 is not allowed: it must be > 0"),
        ("verify_images=0", "verify_images=0 is not allowed: it must be >= 1"),
        ("device=cuda", "device=cuda is not allowed: it must be one of cpu"),
        ("softmax=1", "softmax=1 is not allowed: it must be true or false"),
    ],
)
def test_bad_values_are_refused_by_the_schema(override, needle):
    assert needle in refusal("ckpt=x.pt", override, config="export")


@pytest.mark.e2e
def test_bad_inputs_are_one_line_and_leave_nothing(lenet, tmp_path):
    cases = [
        ((f"ckpt={tmp_path}/missing.pt",), ("missing.pt", "not found")),
        (("ckpt=x.pt", "format=tflite"), ("format=tflite is not allowed",)),
        (("ckpt=x.pt", "layout=hwc"), ("layout=hwc is not allowed",)),
        ((f"ckpt={lenet}", "format=[]"), ("format=[] names no format",)),
        (("ckpt=notes.txt",), ("notes.txt", "not a PyTorch file")),
        ((), ("ckpt is required",)),
    ]
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for args, needles in cases:
        proc = run_cli("cnnexport", *args, cwd=tmp_path, check=False)
        assert_one_line_error(proc, *needles)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"], args  # no outputs/


@pytest.mark.e2e
def test_cnnpredict_wants_exactly_one_of_ckpt_and_model(lenet, lenet_export, tmp_path):
    onnx_file = lenet_export[0] / "model.onnx"
    image = tmp_path / "x.png"
    Image.new("L", (28, 28)).save(image)
    for args, needle in (
        (("inputs=x.png",), "neither was given"),
        ((f"ckpt={lenet}", f"model={onnx_file}", "inputs=x.png"), "both were given"),
    ):
        proc = run_cli("cnnpredict", *args, cwd=tmp_path, check=False)
        assert_one_line_error(proc, "give exactly one of ckpt=", "model=", needle)
    proc = run_cli(
        "cnnpredict", f"model={tmp_path}/none.onnx", "inputs=x.png", cwd=tmp_path, check=False
    )
    assert_one_line_error(proc, "none.onnx not found")
    proc = run_cli("cnnpredict", f"model={image}", "inputs=x.png", cwd=tmp_path, check=False)
    assert_one_line_error(proc, "runs ONNX files (.onnx)")
    (tmp_path / "bad.onnx").write_bytes(b"\x00not onnx" * 10)
    proc = run_cli("cnnpredict", "model=bad.onnx", "inputs=x.png", cwd=tmp_path, check=False)
    assert_one_line_error(proc, "bad.onnx cannot be read by onnxruntime")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "x.png"]


def without(module: str, tmp_path: Path) -> dict:
    """Environment variables under which `import <module>` fails, as without the package: a
    sitecustomize.py marks it missing in sys.modules."""
    site = tmp_path / f"no_{module}"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


@pytest.mark.e2e
def test_without_the_export_extra_one_line_says_how_to_install(lenet, lenet_export, tmp_path):
    env = without("onnxruntime", tmp_path)
    proc = export(lenet, tmp_path / "out", env=env, check=False)
    assert_one_line_error(proc, "format=onnx needs onnxruntime", 'pip install "cnntrain[export]"')
    assert not (tmp_path / "out").exists()
    proc = run_cli(
        "cnnpredict",
        f"model={lenet_export[0] / 'model.onnx'}",
        f"inputs={tmp_path}",
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert_one_line_error(proc, "needs onnxruntime", 'pip install "cnntrain[export]"')
    # TorchScript and ExportedProgram need only torch
    export(
        lenet, tmp_path / "ts", "format=[torchscript,exported_program]", "verify_images=8", env=env
    )
    assert (tmp_path / "ts/model.torchscript.pt").is_file() and (
        tmp_path / "ts/model.pt2"
    ).is_file()


# In-process: a model the ONNX exporter cannot translate (an operator without an ONNX function)
# and an exported file whose outputs drift. Either ends in one UserError and leaves no file.
@torch.library.custom_op("cnntest::odd", mutates_args=())
def _odd(x: torch.Tensor) -> torch.Tensor:
    return x * 1.0


@_odd.register_fake
def _(x):
    return torch.empty_like(x)


class WithOddOp(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(_odd(x))


def export_in_process(ckpt, run_dir, *overrides):
    from hydra import compose, initialize_config_module

    from cnntrain.export import export as run_export

    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        cfg = compose(config_name="export", overrides=[f"ckpt={ckpt}", *overrides])
    return run_export(cfg, run_dir)


@pytest.mark.e2e  # its fixture runs the console scripts
def test_a_failing_exporter_names_the_operator_and_leaves_no_file(lenet, tmp_path, monkeypatch):
    import cnntrain.inference
    from cnntrain.errors import UserError

    real = cnntrain.inference.model_from_checkpoint
    monkeypatch.setattr(
        cnntrain.inference, "model_from_checkpoint", lambda *args: WithOddOp(real(*args)).eval()
    )
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        export_in_process(lenet, out, "format=[torchscript,onnx]", "verify_images=8")
    message = str(e.value)
    assert "\n" not in message and "model lenet5 cannot be exported to onnx" in message, message
    assert (
        "operator cnntest.odd" in message
        and "try format=torchscript or format=exported_program" in message
    )
    # the torchscript file had passed, but an export is all or nothing
    assert sorted(p.name for p in out.iterdir()) == [".cnntrain.lock"]


@pytest.mark.e2e  # its fixture runs the console scripts
def test_a_mismatch_beyond_atol_keeps_nothing(lenet, tmp_path, monkeypatch):
    import cnntrain.export
    from cnntrain.errors import UserError

    real = cnntrain.export.LOADERS["exported_program"]

    def drifting(path):
        run, meta = real(path)
        return (lambda x: run(x) + 0.01), meta

    monkeypatch.setitem(cnntrain.export.LOADERS, "exported_program", drifting)
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        export_in_process(lenet, out, "format=exported_program", "verify_images=8")
    assert (
        "does not match cnntrain's predictions on 8 images (max abs difference 0.01 > atol=0.001)"
        in str(e.value)
    )
    assert sorted(p.name for p in out.iterdir()) == [".cnntrain.lock"]
    # within a looser tolerance the same file passes and is kept, with its sidecar
    report = export_in_process(
        lenet, tmp_path / "loose", "format=exported_program", "verify_images=8", "atol=0.02"
    )
    assert report["formats"]["exported_program"]["max_abs_diff"] == pytest.approx(0.01, abs=1e-4)
    assert sorted(p.name for p in (tmp_path / "loose").iterdir()) == [
        ".cnntrain.lock",
        "export.json",
        "model.pt2",
        "model.pt2.json",
    ]


def test_compare_counts_ties_at_the_tolerance():
    from cnntrain.export import compare

    expected = torch.tensor([[1.0, 0.9995, 0.0], [2.0, 0.0, 0.0]])
    got = torch.tensor([[0.9999, 0.9996, 0.0], [0.0, 2.0, 0.0]])
    result = compare(expected, got, 1e-3)
    assert (result["top1_agree"], result["ties"], result["passed"]) == (1, 0, False)
    result = compare(expected[:1], torch.tensor([[0.9994, 0.9996, 0.0]]), 1e-3)
    assert (result["top1_agree"], result["ties"], result["passed"]) == (0, 1, True)


@pytest.mark.e2e
def test_benchmark_reports_every_runtime(lenet, tmp_path):
    proc = export(
        lenet, tmp_path / "out", "format=[onnx,torchscript]", "benchmark=true", "verify_images=8"
    )
    bench = json.loads((tmp_path / "out/export.json").read_text())["benchmark"]
    for name in ("eager", "onnx", "torchscript"):
        assert bench[name]["latency_ms_b1"] > 0 and bench[name]["throughput_b64"] > 0
    assert bench["cpu_count"] == os.cpu_count() and len(bench["load_average"]) == 3
    assert "| eager PyTorch" in proc.stdout and "latency b1 (ms)" in proc.stdout


# --------------------------------------------------------------------------- every model, ONNX
SWEEP_SHAPES = ((1, 28), (3, 32))  # gray 28 px as Fashion-MNIST, RGB 32 px as CIFAR


def sweep_models() -> list[str]:
    from importlib.resources import files

    names = sorted(
        p.name[:-5]
        for p in (files("cnntrain.configs") / "model").iterdir()
        if p.name.endswith(".yaml")
    )
    return [n for n in names if n not in ("tv", "timm")]  # those two need model.name


def sweep_images(channels: int, size: int, n: int = 64) -> torch.Tensor:
    """Real images: the bundled test images (evenly spaced), gray 28 px or as RGB 32 px."""
    from torchvision.transforms.v2 import functional as TF

    images, _, _ = bundled_test_images()
    x = images[torch.arange(n) * len(images) // n]
    if channels == 3:
        x = TF.resize(x.expand(-1, 3, -1, -1), [size, size], antialias=True)
    return x.contiguous()


def calibrate_batchnorm(model: torch.nn.Module, x: torch.Tensor) -> None:
    """BatchNorm running statistics of an untrained model measured on `x` (as training would
    have them), so that its activations neither vanish nor explode with depth (GoogLeNet's
    small initial weights would otherwise give every image the same logits: its bias)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


BENCH_MAX_S = (
    8.0  # a model whose 64 images take longer in eager PyTorch is exported and checked, not timed
)


def sweep_one(name: str, channels: int, size: int, folder: Path, threads: int, timed: bool) -> dict:
    from cnntrain.data.augment import Normalize
    from cnntrain.export import (
        Deployable,
        benchmark,
        compare,
        eager_outputs,
        eager_runner,
        export_onnx,
        export_reason,
        load_onnx,
        run_batched,
    )
    from cnntrain.models import create_model

    torch.manual_seed(0)
    row = {"model": name, "input": f"{channels}x{size}x{size}"}
    model = create_model(name, in_channels=channels, num_classes=10, image_size=size).eval()
    mean, std = [0.5] * channels, [0.25] * channels
    pixels = sweep_images(channels, size)
    calibrate_batchnorm(model, Normalize(mean, std, "cpu")(pixels))
    module = Deployable(model, mean, std).requires_grad_(False)
    path = folder / f"{name}_{channels}x{size}.onnx"
    start = time.perf_counter()
    try:
        export_onnx(module, pixels[:2], path, {"model": name, "output_name": "logits"})
    except Exception as e:
        return {**row, "exported": False, "reason": export_reason(e)}
    row["export_s"] = time.perf_counter() - start
    start = time.perf_counter()
    expected = eager_outputs(model, mean, std, pixels, softmax=False)
    eager_s = time.perf_counter() - start
    run = load_onnx(path, threads=threads, spinning=False)[0]
    result = compare(expected, run_batched(run, pixels, "nchw", "uint8"), 1e-3)
    row.update(
        exported=True,
        max_abs_diff=result["max_abs_diff"],
        top1=result["top1_agreement"],
        ties=result["ties"],
        passed=result["passed"],
        max_abs_logit=float(expected.abs().max()),
        classes_predicted=len(set(expected.argmax(1).tolist())),
        eager_s_b64=eager_s,
    )
    if timed and eager_s < BENCH_MAX_S:
        bench = benchmark(
            {"eager": eager_runner(module), "onnx": run},
            pixels,
            "nchw",
            "uint8",
            rounds=3 if eager_s < 1 else 1,
            round_s=0.1,
        )
        row.update(eager=bench["eager"], ort=bench["onnx"])
    path.unlink()
    return row


def sweep_table(rows: list[dict]) -> str:
    from cnntrain.export import markdown_table

    header = [
        "model",
        "input",
        "exported",
        "max abs diff",
        "max abs logit",
        "top-1 agreement",
        "eager b1 (ms)",
        "onnxruntime b1 (ms)",
        "eager b64 (img/s)",
        "onnxruntime b64 (img/s)",
        "b64 speed-up",
    ]
    cells = []
    for r in rows:
        if not r["exported"]:
            cells.append([r["model"], r["input"], "no: " + r["reason"][:80], *[""] * 8])
            continue
        ties = f" ({r['ties']} tie)" if r["ties"] else ""
        cells.append(
            [
                r["model"],
                r["input"],
                "yes",
                f"{r['max_abs_diff']:.1e}",
                f"{r['max_abs_logit']:.2g}",
                f"{100 * r['top1']:.1f} %{ties}",
            ]
        )
        if "eager" in r:
            cells[-1] += [
                f"{r['eager']['latency_ms_b1']:.2f}",
                f"{r['ort']['latency_ms_b1']:.2f}",
                f"{r['eager']['throughput_b64']:.0f}",
                f"{r['ort']['throughput_b64']:.0f}",
                f"{r['ort']['throughput_b64'] / r['eager']['throughput_b64']:.2f}x",
            ]
        else:
            timed = r["eager_s_b64"] < BENCH_MAX_S
            cells[-1] += [
                "see the other input"
                if timed
                else f"not timed (64 images: {r['eager_s_b64']:.0f} s eager)",
                *[""] * 4,
            ]
    return markdown_table(header, cells)


@pytest.mark.slow
def test_every_model_exports_to_onnx(tmp_path, capsys):
    """Every model= option, untrained (BatchNorm statistics measured on the images), at 28 px
    gray and 32 px RGB: exported to ONNX through the wrapper and checked on 64 real images
    against eager PyTorch; timed at 32 px RGB (both runtimes on CNNTRAIN_SWEEP_THREADS threads,
    default 1: steadier figures on a shared machine; one round instead of three for models
    whose 64 images take over 1 s, none over BENCH_MAX_S). Prints the table; CNNTRAIN_SWEEP_MODELS=a,b
    limits the models, CNNTRAIN_SWEEP_OUT=FILE also writes it with the raw rows."""
    threads = int(os.environ.get("CNNTRAIN_SWEEP_THREADS", "1"))
    torch.set_num_threads(threads)
    wanted = os.environ.get("CNNTRAIN_SWEEP_MODELS")
    names = wanted.split(",") if wanted else sweep_models()
    rows = []
    for name in names:
        for channels, size in SWEEP_SHAPES:
            rows.append(sweep_one(name, channels, size, tmp_path, threads, timed=channels == 3))
            with capsys.disabled():
                print(
                    f"{name} {channels}x{size}: {rows[-1].get('max_abs_diff', rows[-1].get('reason'))}",
                    file=sys.stderr,
                    flush=True,
                )
    table = sweep_table(rows)
    with capsys.disabled():
        print("\n" + table)
    if os.environ.get("CNNTRAIN_SWEEP_OUT"):
        Path(os.environ["CNNTRAIN_SWEEP_OUT"]).write_text(table + "\n" + json.dumps(rows, indent=1))
    failed = [f"{r['model']} {r['input']}" for r in rows if not r["exported"] or not r["passed"]]
    assert not failed, f"not exported or not matching: {failed}\n{table}"
