"""The GPU path end to end: fp16 + GradScaler and bf16 training, compile, channels_last, an
exact resume, a GPU checkpoint on a CPU-only machine, the tools on the GPU, and training steps
that never wait for the device. Marked `cuda`: skipped where no GPU is visible (conftest.py)."""

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from hydra import compose, initialize_config_module
from test_resume import rows

from cnntrain.checkpoint import load_checkpoint
from cnntrain.errors import Interrupted
from cnntrain.train import train

pytestmark = pytest.mark.cuda


def make_cfg(data_root, *overrides):
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[
                f"data.root={data_root}",
                "data.download=false",
                "data=cifar10",
                "device=cuda",
                *overrides,
            ],
        )


def tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_mixed_precision_training(data_root, tmp_path, dtype):
    if dtype == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bf16")
    results = train(
        make_cfg(data_root, "model=resnet20", "epochs=2", "amp=true", f"amp_dtype={dtype}"),
        run_dir=tmp_path,
    )
    last = load_checkpoint(tmp_path / "checkpoints/last.pt")
    assert (last["scaler"] is not None) == (dtype == "fp16")
    assert results["test_acc"] is not None and all(
        torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point()
    )


def test_compile_and_channels_last(data_root, tmp_path):
    results = train(
        make_cfg(
            data_root,
            "model=resnet20",
            "epochs=1",
            "amp=true",
            "compile=true",
            "channels_last=true",
        ),
        run_dir=tmp_path,
    )
    assert results["test_acc"] is not None


def test_a_stopped_fp16_run_resumes_exactly(data_root, tmp_path, signal_at_batch):
    # LeNet-5: no kernel without a deterministic CUDA version (adaptive pooling's backward has none)
    overrides = (
        "model=lenet5",
        "epochs=3",
        "deterministic=true",
        "amp=true",
        "amp_dtype=fp16",
        "aug.mixup_alpha=0.2",
        "data.batch_size=100",
    )
    full, part = tmp_path / "full", tmp_path / "part"
    train(make_cfg(data_root, *overrides), run_dir=full)
    signal_at_batch(7)
    with pytest.raises(Interrupted):
        train(make_cfg(data_root, *overrides), run_dir=part)
    import signal

    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    train(make_cfg(data_root, *overrides, "resume=auto"), run_dir=part)
    a, b = (load_checkpoint(d / "checkpoints/last.pt") for d in (full, part))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert rows(full) == rows(part)


def test_an_unfused_adamw_run_continues_under_fp16(data_root, tmp_path):
    """amp is free on resume: an fp32 run's unfused AdamW counts its steps on the host; under
    fp16 the same state steps with the count on the GPU (capturable: amp_step.prepare)."""
    base = ("model=lenet5", "optim=adamw", "optim.fused=false", "sched=none")
    train(make_cfg(data_root, *base, "epochs=1", "amp=false"), run_dir=tmp_path)
    more = (
        "epochs=2",
        "amp=true",
        "amp_dtype=fp16",
        "resume=auto",
        "resume_allow_changes=[epochs]",
    )
    train(make_cfg(data_root, *base, *more), run_dir=tmp_path)
    last = load_checkpoint(tmp_path / "checkpoints/last.pt")
    assert last["epoch"] == 2 and last["scaler"] is not None
    assert all(g["capturable"] and not g["fused"] for g in last["optimizer"]["param_groups"])
    steps = {float(s["step"]) for s in last["optimizer"]["state"].values()}
    assert len(steps) == 1 and steps.pop() > 1


@pytest.mark.e2e
def test_a_gpu_checkpoint_loads_and_evaluates_without_a_gpu(data_root, tmp_path):
    train(
        make_cfg(data_root, "model=lenet5", "epochs=1", "ema.decay=0.9", "amp=true"),
        run_dir=tmp_path / "run",
    )
    # the one-liner of docs/training.md (Outputs)
    last = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert {t.device.type for t in tensors(last)} == {"cpu"}
    env_before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the subprocess sees no GPU
    try:
        run_cli(
            "cnneval",
            f"ckpt={tmp_path / 'run/checkpoints/best.pt'}",
            "device=cpu",
            f"hydra.run.dir={tmp_path / 'ev'}",
            cwd=tmp_path,
        )
    finally:
        if env_before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = env_before
    assert json.loads((tmp_path / "ev/report.json").read_text())["num_samples"] == 200


@pytest.mark.e2e
def test_the_tools_on_the_gpu(data_root, folder_root, tmp_path):
    train(make_cfg(data_root, "model=resnet20", "epochs=1", "amp=true"), run_dir=tmp_path / "run")
    best = tmp_path / "run/checkpoints/best.pt"
    run_cli(
        "cnneval",
        f"ckpt={best}",
        "device=cuda",
        "amp=true",
        f"hydra.run.dir={tmp_path / 'ev'}",
        cwd=tmp_path,
    )
    run_cli(
        "cnnpredict",
        f"ckpt={best}",
        f"inputs={folder_root / 'test'}",
        "device=cuda",
        f"hydra.run.dir={tmp_path / 'pr'}",
        cwd=tmp_path,
    )
    image = sorted((folder_root / "test").rglob("*.png"))[0]
    run_cli(
        "cnnviz",
        f"ckpt={best}",
        f"inputs={image}",
        "device=cuda",
        f"hydra.run.dir={tmp_path / 'vz'}",
        cwd=tmp_path,
    )
    assert (tmp_path / "ev/report.json").is_file() and (tmp_path / "vz/filters.png").is_file()
    assert (tmp_path / "pr/predictions.csv").is_file()


AUG_PRESETS = sorted(p.stem for p in (Path(__file__).parents[1] / "configs/aug").glob("*.yaml"))


@pytest.mark.parametrize("aug", AUG_PRESETS)
@pytest.mark.parametrize("fused", ["auto", "false"])  # auto: fused kernels; false: amp_step.py
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_training_steps_never_wait_for_the_gpu(data_root, monkeypatch, optim, fused, aug):
    """20 steps of fp16 + GradScaler (each optimizer fused and unfused), EMA, MixUp, CutMix,
    every aug preset, channels_last: no host-device sync. The progress check's once-a-second
    read of the running sums and the epoch's final read of them are the waits the loop has on
    purpose; they are switched off here. So is the step that creates an unfused optimizer's
    state (it reads found_inf: amp_step.py), in the warm-up."""
    from cnntrain import engine
    from cnntrain.data import build_data
    from cnntrain.ema import ModelEma
    from cnntrain.models import build_model
    from cnntrain.optim import create_optimizer, create_scheduler
    from cnntrain.runtime import grad_scaler

    cfg = make_cfg(
        data_root,
        "model=resnet20",
        f"aug={aug}",
        "aug.mixup_alpha=0.2",
        "aug.cutmix_alpha=1.0",
        "data.batch_size=16",
        f"optim={optim}",
        f"optim.fused={fused}",
        "sched=onecycle",
        "grad_clip=1.0",
    )
    device = torch.device("cuda", torch.cuda.current_device())
    data = build_data(cfg.data, cfg.aug, device=device, seed=0, splits=("train",))
    model, _ = build_model(cfg.model, 3, 10, 32, device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(cfg.optim, model)
    assert all(bool(g["fused"]) == (fused == "auto") for g in optimizer.param_groups)
    scheduler, _ = create_scheduler(cfg.sched, optimizer, epochs=1, steps_per_epoch=44)
    update = engine.Update(
        optimizer, scheduler, grad_scaler(torch.float16, device), 1.0, ModelEma(model, 0.99)
    )
    args = (update, engine.Placement(device, torch.float16, channels_last=True))
    loader = data.loaders["train"]
    for _ in range(8):  # warm-up, until a step was applied (fp16 starts with inf steps)
        engine.train_one_epoch(
            model, loader, torch.nn.CrossEntropyLoss(), *args, max_steps=2, progress=False
        )
        if optimizer.state:
            break
    assert optimizer.state
    torch.cuda.synchronize(device)
    monkeypatch.setattr(engine._Progress, "check", lambda *args, **kw: None)
    monkeypatch.setattr(engine.distributed, "summed", lambda *values: [0.0] * len(values))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loader.set_epoch(2)
            engine.train_one_epoch(
                model, loader, torch.nn.CrossEntropyLoss(), *args, max_steps=20, progress=False
            )
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert syncs == [], syncs[:3]
