"""train(cfg) in-process: the GPU-era options that also run on the CPU (bf16 autocast,
channels_last, torch.compile) and the optimizer/schedule factories."""

import json

import pytest
import torch
from conftest import refusal
from hydra import compose, initialize_config_module

from cnntrain import distributed
from cnntrain.errors import UserError
from cnntrain.models import create_model
from cnntrain.optim import create_optimizer, create_scheduler
from cnntrain.runtime import amp_dtype
from cnntrain.train import train


def make_cfg(*overrides):
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def run(data_root, tmp_path, *overrides):
    cfg = make_cfg(
        "data=mnist",
        f"data.root={data_root}",
        "data.download=false",
        "epochs=1",
        "device=cpu",
        *overrides,
    )
    return train(cfg, run_dir=tmp_path)


def test_bf16_autocast_and_channels_last_on_cpu(data_root, tmp_path):
    assert amp_dtype(True, torch.device("cpu")) == torch.bfloat16
    results = run(
        data_root, tmp_path, "amp=true", "channels_last=true", "data=cifar10", "model=resnet18"
    )
    assert 0 <= results["test_acc"] <= 1
    assert json.loads((tmp_path / "results.json").read_text())["model"] == "resnet18"


def test_channels_last_auto_is_on_for_the_cpu_and_for_cuda_with_amp(data_root, tmp_path):
    from cnntrain.runtime import channels_last

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert channels_last("auto", cpu, None) and channels_last("auto", cuda, torch.bfloat16)
    assert not channels_last("auto", cuda, None) and not channels_last(False, cpu, None)
    run(data_root, tmp_path, "model=resnet20", "data=cifar10")
    weight = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)["model"][
        "stem.0.weight"
    ]
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def test_amp_dtype_choices():
    assert amp_dtype(False, torch.device("cuda")) is None
    assert amp_dtype(True, torch.device("cuda"), "fp16") == torch.float16
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        amp_dtype(True, torch.device("cpu"), "fp16")


@pytest.mark.e2e
def test_torch_compile_on_cpu(data_root, tmp_path):
    pytest.importorskip("torch._dynamo")
    results = run(data_root, tmp_path, "compile=true", "data.val_split=0")
    assert 0 <= results["test_acc"] <= 1
    state = torch.load(tmp_path / "checkpoints/best.pt", weights_only=True)["model"]
    assert not any(k.startswith("_orig_mod") for k in state)  # plain keys, loadable without compile


def test_validation_runs_eager_beside_a_compiled_training_model(data_root, tmp_path, monkeypatch):
    """Evaluation through the compiled model recompiles it for .eval() and for the smaller last
    batch (2-3 compiles of tens of seconds on a GPU): validation uses the eager module instead,
    the same weights. torch.compile is stood in for by a wrapper that records its calls."""
    calls = []

    class Compiled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self._orig_mod = model

        def forward(self, x):
            calls.append((self.training, len(x)))
            return self._orig_mod(x)

    synced = []
    monkeypatch.setattr(torch, "compile", Compiled)
    monkeypatch.setattr(distributed, "main_buffers", synced.append)
    results = run(data_root, tmp_path, "compile=true", "data.batch_size=32")
    assert results["best_val_acc"] is not None
    # under torchrun the ranks validate with rank 0's BatchNorm statistics (DDP's forward, which
    # broadcast them before, is not on this path)
    assert synced and not any(isinstance(m, Compiled) for m in synced)
    assert calls and all(training for training, _ in calls)  # only training steps compiled
    assert {n for _, n in calls} == {32}  # one static shape: the last partial batch is dropped


def test_training_learns_the_toy_data(data_root, tmp_path):
    results = run(data_root, tmp_path, "epochs=4", "optim=adam", "aug=none")
    assert results["test_acc"] > 0.5  # 10 classes: chance is 0.1


def test_optimizer_leaves_biases_and_norms_without_weight_decay():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    opt = create_optimizer(make_cfg("optim=sgd").optim, model)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert [p.ndim for p in decay["params"]] == [4] and len(no_decay["params"]) == 3
    assert opt.defaults["nesterov"] is True


def lrs(sched_overrides, epochs=4, steps=10):
    model = torch.nn.Linear(2, 2)
    cfg = make_cfg("optim=sgd", "optim.lr=1.0", "optim.weight_decay=0", *sched_overrides)
    opt = create_optimizer(cfg.optim, model)
    sched, interval = create_scheduler(cfg.sched, opt, epochs=epochs, steps_per_epoch=steps)
    out = []
    for _ in range(epochs * (steps if interval == "step" else 1)):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out, interval


def test_step_and_multistep_schedules():
    values, interval = lrs(["sched=step", "sched.step_size=2"])
    assert interval == "epoch" and values == pytest.approx([1, 1, 0.1, 0.1])
    values, _ = lrs(["sched=multistep"], epochs=8)  # milestones 0.5, 0.75 of 8 epochs
    assert values == pytest.approx([1] * 4 + [0.1] * 2 + [0.01] * 2)


def test_cosine_with_warmup_and_onecycle():
    values, interval = lrs(["sched=cosine", "sched.warmup_epochs=1"])
    assert interval == "step" and len(values) == 40
    assert values[0] == pytest.approx(0.01) and values[10] == pytest.approx(1.0)
    assert values[:10] == sorted(values[:10]) and values[10:] == sorted(values[10:], reverse=True)
    values, _ = lrs(["sched=onecycle"])
    assert max(values) == pytest.approx(1.0, rel=1e-3) and values[0] < 0.1 and values[-1] < 1e-3
    assert "sched=onecycle has its own warmup" in refusal("sched=onecycle", "sched.warmup_epochs=1")
    values, _ = lrs(["sched=none", "sched.warmup_epochs=2"])
    assert values[0] == pytest.approx(0.01) and values[2:] == [1.0, 1.0]


def test_onecycle_as_airbench_triangle_with_constant_momentum():
    """airbench94's schedule: linear 0.2 -> 1 (at 23 %) -> 0.07 of the peak, momentum fixed."""
    cfg = make_cfg(
        "optim=sgd",
        "optim.lr=1.0",
        "optim.momentum=0.85",
        "sched=onecycle",
        "sched.pct_start=0.23",
        "sched.anneal_strategy=linear",
        "sched.div_factor=5",
        "sched.final_div_factor=2.857142857",
        "sched.cycle_momentum=false",
    )
    opt = create_optimizer(cfg.optim, torch.nn.Linear(2, 2))
    sched, _ = create_scheduler(cfg.sched, opt, epochs=10, steps_per_epoch=10)
    values, momenta = [], []
    for _ in range(100):
        values.append(opt.param_groups[0]["lr"])
        momenta.append(opt.param_groups[0]["momentum"])
        opt.step()
        sched.step()
    assert values[0] == pytest.approx(0.2) and max(values) == pytest.approx(1.0)
    assert values.index(max(values)) == 22 and values[-1] == pytest.approx(0.07)
    assert values[:23] == sorted(values[:23]) and values[22:] == sorted(values[22:], reverse=True)
    assert set(momenta) == {0.85}
    assert "sched.div_factor=0.0 is not allowed: it must be > 0" in refusal(
        "sched=onecycle", "sched.div_factor=0"
    )


def test_norm_lr_scale_multiplies_the_lr_of_normalization_layers_only():
    from cnntrain.resume import restore_schedule

    model = create_model("resnet20", in_channels=3, num_classes=10, image_size=32)
    norm = {
        id(p)
        for m in model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
        for p in m.parameters()
    }
    cfg = make_cfg("optim=sgd", "optim.lr=0.1", "optim.norm_lr_scale=64", "sched=onecycle")
    opt = create_optimizer(cfg.optim, model)
    decay, no_decay, scaled = opt.param_groups
    assert {id(p) for p in scaled["params"]} == norm and scaled["lr"] == pytest.approx(6.4)
    assert scaled["weight_decay"] == 0 and decay["lr"] == no_decay["lr"] == 0.1
    assert [p.ndim for p in no_decay["params"]] == [1]  # the head's bias
    # schedules scale every group's lr: the factor holds at the peak of one cycle (sched.max_lr
    # given or not) and in a schedule re-planned on resume
    for peak in (None, 0.5):
        cfg = make_cfg(
            "optim=sgd",
            "optim.lr=0.1",
            "optim.norm_lr_scale=64",
            "sched=onecycle",
            f"sched.max_lr={'null' if peak is None else peak}",
        )
        opt = create_optimizer(cfg.optim, model)
        sched, _ = create_scheduler(cfg.sched, opt, epochs=2, steps_per_epoch=8)
        for _ in range(3):  # the peak: step pct_start x 16 - 1
            opt.step()
            sched.step()
        assert opt.param_groups[2]["lr"] == pytest.approx(64 * opt.param_groups[0]["lr"])
        assert opt.param_groups[0]["lr"] == pytest.approx(peak or 0.1)
    resumed = {"epoch": 1, "scheduler": sched.state_dict()}
    sched = restore_schedule(cfg, resumed, ["epochs"], opt, sched, 8, "step")
    assert opt.param_groups[2]["lr"] == pytest.approx(64 * opt.param_groups[0]["lr"])
    # the default: the groups as before (no third group, no lr_scale)
    plain = create_optimizer(make_cfg("optim=sgd").optim, model)
    assert len(plain.param_groups) == 2 and "lr_scale" not in plain.param_groups[1]
    assert "optim.norm_lr_scale=0.0 is not allowed: it must be > 0" in refusal(
        "optim.norm_lr_scale=0"
    )


def test_step_caps_limit_training_and_evaluation(data_root, tmp_path):
    results = run(
        data_root, tmp_path, "max_steps_per_epoch=2", "max_eval_steps=1", "data.batch_size=16"
    )
    assert results["test_images"] == 16
    import csv

    row = next(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert float(row["img_per_s"]) > 0


def test_fused_optimizer_by_default_with_the_same_update():
    torch.manual_seed(0)
    models = [
        create_model("lenet5", in_channels=1, num_classes=10, image_size=28) for _ in range(2)
    ]
    models[1].load_state_dict(models[0].state_dict())
    fused = create_optimizer(make_cfg("optim=sgd").optim, models[0])
    plain = create_optimizer(make_cfg("optim=sgd", "optim.fused=false").optim, models[1])
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for model, opt in zip(models, (fused, plain)):
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b)


def test_evaluate_loader_matches_the_textbook_metrics():
    from cnntrain.data.augment import BatchTransform
    from cnntrain.data.loaders import BatchLoader
    from cnntrain.engine import evaluate_loader

    torch.manual_seed(0)
    images, labels = (
        torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8),
        torch.randint(0, 7, (50,)),
    )
    cpu = torch.device("cpu")
    loader = BatchLoader(
        images, labels, 16, BatchTransform([0.5], [0.25], cpu, size=28), device=cpu
    )
    model = create_model("lenet5", in_channels=1, num_classes=7, image_size=28).eval()
    r = evaluate_loader(model, loader, num_classes=7, keep_predictions=True)
    with torch.no_grad():
        out = model((images.float() / 255 - 0.5) / 0.25)
    assert r["loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(out, labels).item(), rel=1e-5
    )
    assert r["acc"] == (out.argmax(1) == labels).sum().item() / 50
    assert r["top5"] == (out.topk(5, 1).indices == labels[:, None]).any(1).sum().item() / 50
    torch.testing.assert_close(r["confidence"], out.softmax(1).max(1).values)
    assert torch.equal(r["predicted"], out.argmax(1)) and r["confusion"].sum() == 50
    assert r["confusion"][labels[0], out[0].argmax()] >= 1


def test_progress_lines_off_a_terminal(data_root, tmp_path, monkeypatch, caplog):
    """pytest's stderr is no terminal: no tqdm bar, but progress lines, on a clock that runs 10 s
    a read (so a 20-step epoch "takes" 200 s: a line every max(30 s, 200 s / 4) = 50 s, none at
    its last step)."""
    import logging
    import re
    import time
    from types import SimpleNamespace

    from cnntrain import engine

    clock = iter(range(0, 10**6, 10))
    monkeypatch.setattr(
        engine,
        "time",
        SimpleNamespace(monotonic=lambda: next(clock), perf_counter=time.perf_counter),
    )
    caplog.set_level(logging.INFO, logger="cnntrain")
    run(
        data_root,
        tmp_path,
        "epochs=2",
        "data.batch_size=8",
        "max_steps_per_epoch=20",
        "max_eval_steps=1",
    )
    pattern = (
        r"epoch (\d)/2 step (\d+)/20 loss \d\.\d{4} acc \d\.\d{4} \d+ img/s, "
        r"epoch ETA (\d+):(\d\d), run ETA (\d+):(\d\d)$"
    )
    lines = [m for m in (re.match(pattern, r.getMessage()) for r in caplog.records) if m]
    for epoch in ("1", "2"):
        steps = [int(m[2]) for m in lines if m[1] == epoch]
        assert (
            2 <= len(steps) <= engine.PROGRESS_LINES and steps == sorted(steps) and steps[-1] < 20
        )
    first = lines[0]
    epoch_left, run_left = int(first[3]) * 60 + int(first[4]), int(first[5]) * 60 + int(first[6])
    # epoch 1 knows no epoch time yet: the run's ETA counts epoch 2 as long as epoch 1
    assert epoch_left > 0 and run_left == pytest.approx(epoch_left + 200, abs=3)
    assert lines[-1].groups()[2:4] == lines[-1].groups()[4:]  # the last epoch: the run ends with it


def test_progress_lines_need_a_few_seconds(data_root, tmp_path, caplog):
    """Real time: these short epochs log no progress line, only epoch lines."""
    import logging

    caplog.set_level(logging.INFO, logger="cnntrain")
    run(data_root, tmp_path, "max_steps_per_epoch=3", "max_eval_steps=1")
    assert not [r for r in caplog.records if "img/s, epoch ETA" in r.getMessage()]
    assert [r for r in caplog.records if r.getMessage().startswith("epoch 1/1 train_loss")]


def test_val_accuracy_at_chance_is_flagged(data_root, tmp_path, monkeypatch, caplog):
    """Val accuracy at chance while train accuracy rises: one warning in the epoch lines,
    val_at_chance in results.json, status `chance` (not failed) in the sweep summary."""
    import logging

    from omegaconf import OmegaConf

    from cnntrain import callbacks
    from cnntrain import trainer as train_module
    from cnntrain.tracking import at_chance

    assert (
        at_chance(0.117, 0.65, 10) and not at_chance(0.2, 0.65, 10) and not at_chance(0.1, 0.2, 10)
    )
    assert not at_chance(0.5, 0.99, 2) and not at_chance(None, 0.9, 10)
    real_train, real_eval = train_module.train_one_epoch, train_module.evaluate_loader

    def trained(*args, **kwargs):
        return {**real_train(*args, **kwargs), "acc": 0.65}

    def evaluated(*args, **kwargs):
        result = real_eval(*args, **kwargs)
        return {**result, "acc": 0.117} if kwargs.get("desc") == "val" else result

    monkeypatch.setattr(train_module, "train_one_epoch", trained)
    monkeypatch.setattr(train_module, "evaluate_loader", evaluated)
    caplog.set_level(logging.INFO, logger="cnntrain")
    job = tmp_path / "sweep" / "0"
    results = run(data_root, job, "epochs=2", "max_steps_per_epoch=2", "max_eval_steps=1")
    assert results["val_at_chance"] is True
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "val accuracy 0.117 is at chance (1/10) while train accuracy is 0.650: BatchNorm "
        "running statistics may not have settled (few steps) or the val data differ from train"
    ]
    (job / ".hydra").mkdir(exist_ok=True)  # Hydra writes it in a real sweep
    OmegaConf.save(OmegaConf.create(["model=lenet5"]), job / ".hydra" / "overrides.yaml")
    ok = tmp_path / "sweep" / "1"
    (ok / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(["model=resnet18"]), ok / ".hydra" / "overrides.yaml")
    (ok / "results.json").write_text(json.dumps({"test_acc": 0.01, "val_at_chance": False}))
    rows = callbacks.summarize_sweep(tmp_path / "sweep")
    assert [(r["job"], r["status"]) for r in rows] == [("1", "ok"), ("0", "chance")]
    assert "at chance" in rows[1]["note"] and "| chance |" in callbacks.format_table(rows)
