"""Faults during training, injected for real: signals mid-epoch and between epochs, a NaN loss
at a chosen step, top-k checkpoint rotation, and resuming with changed settings."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hydra import compose, initialize_config_module

from cnntrain.checkpoint import load_checkpoint
from cnntrain.errors import Interrupted, UserError
from cnntrain.train import train

# fake MNIST: 360 train images -> 5 batches of 64 per epoch (the remainder is dropped)
STEPS_PER_EPOCH = 5


def make_cfg(data_root, *overrides):
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[
                "data=mnist",
                f"data.root={data_root}",
                "data.download=false",
                "device=cpu",
                "deterministic=true",
                "epochs=3",
                *overrides,
            ],
        )


def rows(run_dir):
    return [
        {k: v for k, v in r.items() if k not in ("time", "img_per_s")}
        for r in csv.DictReader(open(run_dir / "metrics.csv"))
    ]


@pytest.mark.parametrize("stop_batch", [7, STEPS_PER_EPOCH * 2], ids=["mid-epoch", "epoch-end"])
def test_signal_then_resume_equals_an_uninterrupted_run(
    data_root, tmp_path, signal_at_batch, stop_batch, caplog
):
    full, part = tmp_path / "full", tmp_path / "part"
    train(make_cfg(data_root), run_dir=full)
    signal_at_batch(stop_batch)
    with pytest.raises(Interrupted, match=f"resume=auto hydra.run.dir={part}") as stopped:
        train(make_cfg(data_root), run_dir=part)
    assert stopped.value.exit_code == 128 + signal.SIGUSR1
    saved = load_checkpoint(part / "checkpoints/last.pt")
    if stop_batch == 7:  # epoch 2 stopped after its 2nd batch
        assert saved["epoch"] == 1 and saved["partial"]["epoch"] == 2
        assert saved["partial"]["state"][0]["step"] == 2
        stop, resume = "in epoch 2/3 after step 2 of 5", "epoch 2/3 continues after step 2 of 5"
    else:  # the signal came with the last batch of epoch 2: the epoch is finished and saved
        assert saved["epoch"] == 2 and "partial" not in saved
        stop, resume = "after epoch 2/3", "epoch 3/3 starts (2 done)"
    assert f"stopped by SIGUSR1 {stop}; state saved to" in str(stopped.value)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # the handler is gone after train() returns
    caplog.set_level("INFO", logger="cnntrain")
    train(make_cfg(data_root, "resume=auto"), run_dir=part)
    assert (
        f"resuming from {part}/checkpoints/last.pt: {resume}" in caplog.text
    )  # the stop's own terms

    a, b = (load_checkpoint(d / "checkpoints/last.pt") for d in (full, part))
    assert b["epoch"] == 3 and "partial" not in b
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert rows(full) == rows(part)


def test_mid_epoch_resume_on_an_augmented_image_folder_is_exact(
    folder_root, tmp_path, signal_at_batch
):
    """90 training images decoded once, batches of 16 (5 per epoch), every augmentation on:
    stopped in the middle of epoch 2 and resumed (streaming from the cache this time, as a
    folder larger than the memory budget is), the run ends as one that never stopped."""

    def cfg(*extra):
        with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
            return compose(
                config_name="train",
                overrides=[
                    "data=imagefolder",
                    f"data.root={folder_root}",
                    "data.image_size=16",
                    "data.batch_size=16",
                    "device=cpu",
                    "deterministic=true",
                    "epochs=3",
                    "model=lenet5",
                    "aug=strong",
                    "aug.color_jitter=0.3",
                    "aug.mixup_alpha=0.2",
                    "aug.cutmix_alpha=1.0",
                    *extra,
                ],
            )

    full, part = tmp_path / "full", tmp_path / "part"
    train(cfg(), run_dir=full)
    signal_at_batch(8)
    with pytest.raises(Interrupted):
        train(cfg(), run_dir=part)
    assert load_checkpoint(part / "checkpoints/last.pt")["partial"]["state"][0]["step"] == 3
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    train(cfg("resume=auto", "data.memory_budget_gb=0"), run_dir=part)  # resumed streaming
    a, b = (load_checkpoint(d / "checkpoints/last.pt") for d in (full, part))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert rows(full) == rows(part)


@pytest.mark.e2e
def test_sigterm_from_outside_saves_and_resume_auto_continues(data_root, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        str(os.path.join(os.path.dirname(sys.executable), "cnntrain")),
        "data=mnist",
        f"data.root={data_root}",
        "data.download=false",
        "device=cpu",
        "model=resnet20",
        "epochs=50",
        "sched=step",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.Popen(
        args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.csv").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "stopped by SIGTERM" in out and f"resume=auto hydra.run.dir={run_dir}" in out
    stopped_at = load_checkpoint(run_dir / "checkpoints/last.pt")["epoch"]
    assert stopped_at >= 1
    epochs = stopped_at + 2
    done = subprocess.run(
        [
            *args[:-3],
            f"epochs={epochs}",
            "sched=step",
            "resume=auto",
            "resume_allow_changes=[epochs]",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert [int(r["epoch"]) for r in rows(run_dir)] == list(range(1, epochs + 1))


def test_nan_loss_stops_at_its_step_and_leaves_checkpoints_alone(data_root, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    train(make_cfg(data_root, "epochs=1"), run_dir=run_dir)
    before = {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()}
    original, calls = torch.nn.CrossEntropyLoss.forward, [0]

    def poisoned(self, out, target):
        loss = original(self, out, target)
        if self.training:
            calls[0] += 1
            if calls[0] == 3:  # the 3rd batch of epoch 2
                return loss * float("nan")
        return loss

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", poisoned)
    with pytest.raises(
        UserError,
        match=r"loss became nan at epoch 2/3, step 3 \(lr .*\): the "
        "training diverged; stopped",
    ):
        train(make_cfg(data_root, "resume=auto", "resume_allow_changes=[epochs]"), run_dir=run_dir)
    assert {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()} == before


def test_skip_batch_skips_only_the_bad_update(data_root, tmp_path, monkeypatch, caplog):
    original, calls = torch.nn.CrossEntropyLoss.forward, [0]

    def poisoned(self, out, target):
        loss = original(self, out, target)
        if self.training:
            calls[0] += 1
            if calls[0] == 2:
                return loss * float("inf")
        return loss

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", poisoned)
    results = train(make_cfg(data_root, "epochs=1", "on_nan=skip_batch"), run_dir=tmp_path)
    assert "skipped 1 batches with a non-finite loss" in caplog.text
    weights = load_checkpoint(tmp_path / "checkpoints/last.pt")["model"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    assert float(rows(tmp_path)[0]["train_loss"]) < float("inf") and results["test_acc"] is not None


def test_keep_top_k_keeps_exactly_the_k_best_epochs(data_root, tmp_path):
    train(
        make_cfg(data_root, "epochs=5", "checkpoint.keep_top_k=2", "optim.lr=0.02"),
        run_dir=tmp_path,
    )
    accs = [(float(r["val_acc"]), int(r["epoch"])) for r in rows(tmp_path)]
    top = sorted(accs, key=lambda a: (-a[0], a[1]))[:2]
    expected = {"last.pt", "best.pt", *(f"epoch_{e:03d}.pt" for _, e in top)}
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} == expected
    for _, epoch in top:
        assert load_checkpoint(tmp_path / f"checkpoints/epoch_{epoch:03d}.pt")["epoch"] == epoch
    assert load_checkpoint(tmp_path / "checkpoints/best.pt")["epoch"] == top[0][1]


@pytest.fixture(scope="module")
def one_epoch(data_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one")
    train(make_cfg(data_root, "epochs=1", "sched=step"), run_dir=run_dir)
    return run_dir


@pytest.mark.parametrize(
    "override, key, fixed",
    [
        ("data.batch_size=32", "data.batch_size", False),
        ("optim.lr=0.1", "optim.lr", False),
        ("epochs=4", "epochs", False),
        ("sched=cosine", "sched.name", False),
        ("optim.weight_decay=0.01", "optim.weight_decay", False),
        ("aug=none", "aug.digits.degrees", False),
        ("data.kind=natural", "data.kind", False),
        ("optim=adam", "optim.name", True),
        ("model=resnet20", "model.name", True),
        ("data.image_size=32", "data.image_size", True),
        ("ema.decay=0.9", "ema.decay", True),
        ("data.val_split=0.2", "data.val_split", True),
    ],
)
def test_resume_with_a_changed_setting_is_refused_naming_it(
    data_root, one_epoch, tmp_path, override, key, fixed
):
    with pytest.raises(UserError, match=rf"trained with {key}=.*, not ") as refused:
        train(
            make_cfg(
                data_root,
                "epochs=1",
                "sched=step",
                override,
                f"resume={one_epoch}/checkpoints/last.pt",
            ),
            run_dir=tmp_path,
        )
    assert ("resume_allow_changes" in str(refused.value)) == (not fixed)
    assert not (tmp_path / "checkpoints").exists()


@pytest.fixture(scope="module")
def old_run(one_epoch, tmp_path_factory):
    """one_epoch's checkpoints as a run from before data.kind stored them: aug.gray (what the
    1-channel data trained with, then without zoom) and aug.rgb, no data.kind."""
    run_dir = tmp_path_factory.mktemp("old")
    (run_dir / "checkpoints").mkdir()
    for name in ("best.pt", "last.pt"):
        state = torch.load(one_epoch / "checkpoints" / name, weights_only=True)
        config = state["config"]
        del config["data"]["kind"]
        aug = config["aug"]
        aug["gray"] = {k: v for k, v in aug.pop("digits").items() if k != "scale"}
        aug["rgb"] = {k: v for k, v in aug.pop("natural").items() if k != "scale"}
        del aug["clothing"]
        torch.save(state, run_dir / "checkpoints" / name)
    return run_dir


def test_an_old_checkpoint_evaluates_predicts_and_resumes_under_the_new_keys(
    data_root, old_run, tmp_path
):
    from cnntrain.evaluate import evaluate
    from cnntrain.inference import Preprocess, trained_config

    best = old_run / "checkpoints/best.pt"
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[f"ckpt={best}", "device=cpu"])
    assert evaluate(cfg, run_dir=tmp_path / "ev")["num_samples"] == 200
    trained = trained_config(load_checkpoint(best), best)
    assert Preprocess(trained, torch.device("cpu")).stored == 28 and trained.data.kind == "digits"
    last = f"resume={old_run}/checkpoints/last.pt"
    # today's aug=basic zooms digits, which that run did not: a change like any other
    with pytest.raises(
        UserError,
        match=r"trained with aug.digits.scale=None, not \[0.9, 1.1\]; to change it "
        r"on purpose add resume_allow_changes=\[aug.digits.scale\]",
    ):
        train(make_cfg(data_root, "epochs=2", "sched=step", last), run_dir=tmp_path / "refused")
    results = train(
        make_cfg(
            data_root,
            "epochs=2",
            "sched=step",
            "aug.digits.scale=null",
            last,
            "resume_allow_changes=[epochs]",
        ),
        run_dir=tmp_path / "resumed",
    )
    assert results["epochs_run"] == 2


def test_resume_allow_changes_scales_the_schedule_to_the_new_lr(data_root, one_epoch, tmp_path):
    before = load_checkpoint(one_epoch / "checkpoints/last.pt")
    lr_then = before["optimizer"]["param_groups"][0]["lr"]
    train(
        make_cfg(
            data_root,
            "epochs=2",
            "optim.lr=0.1",
            "data.batch_size=32",
            "sched=step",
            "resume_allow_changes=[epochs,optim.lr,data.batch_size]",
            f"resume={one_epoch}/checkpoints/last.pt",
        ),
        run_dir=tmp_path,
    )
    # the epoch-2 row logs the lr that epoch started with: the old one, doubled (0.05 -> 0.1)
    assert float(rows(tmp_path)[1]["lr"]) == pytest.approx(lr_then * 2)
    with pytest.raises(UserError, match="model.name can never change"):
        train(
            make_cfg(data_root, "epochs=2", "resume_allow_changes=[model.name]", "resume=auto"),
            run_dir=one_epoch,
        )


def test_more_epochs_re_plan_the_cosine_schedule_to_the_new_end(data_root, tmp_path):
    """Resumed with more epochs, cosine continues from where it stands down to the new end,
    instead of climbing again past its old horizon."""
    cosine = ("sched=cosine", "sched.interval=epoch")
    train(make_cfg(data_root, "epochs=3", *cosine), run_dir=tmp_path)
    train(
        make_cfg(data_root, "epochs=6", *cosine, "resume=auto", "resume_allow_changes=[epochs]"),
        run_dir=tmp_path,
    )
    lrs = [float(r["lr"]) for r in rows(tmp_path)]
    assert len(lrs) == 6 and lrs[:3] == pytest.approx([0.05, 0.0375, 0.0125])
    # the plan of a 6-epoch run from epoch 4 on: 0.05 * (1 + cos(pi * k / 6)) / 2
    import math

    assert lrs[3:] == pytest.approx([0.05 * (1 + math.cos(math.pi * k / 6)) / 2 for k in (3, 4, 5)])
    assert all(b <= a for a, b in zip(lrs[3:], lrs[4:]))
    with pytest.raises(UserError, match="resume_allow_changes=\\[epochs\\]"):
        train(make_cfg(data_root, "epochs=8", *cosine, "resume=auto"), run_dir=tmp_path)


def test_a_handler_installed_before_is_called_after_the_save(data_root, tmp_path, signal_at_batch):
    # submitit installs its requeue handler for SIGUSR2 before the job runs
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        signal_at_batch(3, signal.SIGUSR2)
        with pytest.raises(Interrupted):
            train(make_cfg(data_root, "epochs=2"), run_dir=tmp_path)
        assert (
            calls == [signal.SIGUSR2]
            and load_checkpoint(tmp_path / "checkpoints/last.pt")["partial"]
        )
    finally:
        signal.signal(signal.SIGUSR2, previous)
