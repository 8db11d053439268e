"""The LR finder (cnntrain/lr_find.py), in-process on the bundled Fashion-MNIST sample:
`lr_find=true` writes lr_find.png and lr_find.json and nothing else of a run, whatever the
schedule; `optim.lr=find` trains exactly as the run with the suggested number would, stores the
number, and is not run again on resume; bad settings and a loss that diverges at once are one
line. On the real Fashion-MNIST (CNNTRAIN_FASHION_MNIST) the suggestions for SGD and AdamW are
in a sane range and a run with them learns."""

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import refusal
from hydra import compose, initialize_config_module

from cnntrain import lr_find
from cnntrain.errors import UserError
from cnntrain.train import train

QUICK = ("device=cpu", "lr_finder.num_it=30", "max_eval_steps=2")


def make_cfg(*overrides):
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        return compose(config_name="train", overrides=[*QUICK, *overrides])


def _found(run_dir: Path) -> dict:
    return json.loads((run_dir / "lr_find.json").read_text())


@pytest.mark.parametrize(
    "sched,rule",
    [(("sched=onecycle",), "steep"), (("sched=cosine", "sched.warmup_epochs=1"), "valley")],
)
def test_lr_find_writes_its_files_trains_nothing_and_ignores_the_schedule(tmp_path, sched, rule):
    cfg = make_cfg("lr_find=true", "epochs=3", *sched, f"lr_finder.rule={rule}")
    results = train(cfg, run_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name[0] != ".") == [
        "lr_find.json",
        "lr_find.png",
    ]  # no checkpoint, metrics, results or TensorBoard events
    found = _found(tmp_path)
    s = found["settings"]
    assert (s["start_lr"], s["end_lr"], s["num_it"]) == (1e-7, 10.0, 30)
    # the test's own exponential lr, step by step, whatever sched= says
    n = len(found["lrs"])
    expected = [1e-7 * (10 / 1e-7) ** (i / 29) for i in range(n)]
    np.testing.assert_allclose(found["lrs"], expected, rtol=1e-9)
    assert len(found["losses"]) == len(found["raw_losses"]) == n > 10
    valley, steep = found["suggestion"]["valley"], found["suggestion"]["steep"]
    for lr in (valley, steep):
        assert math.isfinite(lr) and 1e-7 <= lr <= 10
    assert (
        results["lr_find"] == found["suggestion"] and found["optim.lr"] == found["suggestion"][rule]
    )
    assert (tmp_path / "lr_find.png").read_bytes()[:4] == b"\x89PNG"


def _metrics(run_dir: Path) -> list[dict]:
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return [{k: v for k, v in row.items() if k not in ("time", "img_per_s")} for row in rows]


def test_optim_lr_find_trains_as_the_number_it_found_would(tmp_path, monkeypatch):
    """The finder touches neither the run's model nor its random streams: the run equals one
    given the suggestion directly, weight for weight; the checkpoint stores the number, and a
    resumed run takes it from there without running the finder again."""
    run = ("epochs=1", "max_steps_per_epoch=5", "deterministic=true", "sched=onecycle")
    found_dir, given_dir = tmp_path / "found", tmp_path / "given"
    train(make_cfg("optim.lr=find", *run), run_dir=found_dir)
    lr = _found(found_dir)["optim.lr"]
    stored = torch.load(found_dir / "checkpoints/last.pt", weights_only=True)
    assert stored["config"]["optim"]["lr"] == lr and isinstance(lr, float)
    train(make_cfg(f"optim.lr={lr}", *run), run_dir=given_dir)
    assert _metrics(found_dir) == _metrics(given_dir)
    given = torch.load(given_dir / "checkpoints/last.pt", weights_only=True)
    for name, tensor in stored["model"].items():
        assert torch.equal(tensor, given["model"][name]), name

    def no_finder(*args, **kwargs):
        raise AssertionError("the LR finder ran again on resume")

    monkeypatch.setattr(lr_find, "range_test", no_finder)
    resumed = make_cfg(
        "optim.lr=find", *run, "epochs=2", "resume=auto", "resume_allow_changes=[epochs]"
    )
    train(resumed, run_dir=found_dir)
    last = torch.load(found_dir / "checkpoints/last.pt", weights_only=True)
    assert last["epoch"] == 2 and last["config"]["optim"]["lr"] == lr


def test_a_loss_that_diverges_at_once_is_one_clear_line(tmp_path):
    cfg = make_cfg("lr_find=true", "lr_finder.start_lr=100", "lr_finder.end_lr=10000")
    with pytest.raises(UserError, match="diverged at once.*lower lr_finder.start_lr") as e:
        train(cfg, run_dir=tmp_path)
    assert "\n" not in str(e.value)
    found = _found(tmp_path)  # what it saw stays, for a look at lr_find.png
    assert found["suggestion"] == {"valley": None, "steep": None} and found["problem"]
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["optim.lr=fast"], "optim.lr=fast is not allowed: it must be a number > 0, or find"),
        (["optim.lr=Find"], "optim.lr=Find is not allowed: it must be a number > 0, or find"),
        (["optim.lr=true"], "optim.lr=true is not allowed: it must be a number > 0, or find"),
        (["optim.lr=-1"], "optim.lr=-1 is not allowed: it must be > 0"),
        (["lr_find=1"], "lr_find=1 is not allowed: it must be true or false"),
        (
            ["lr_finder.start_lr=1", "lr_finder.end_lr=0.1"],
            "lr_finder.start_lr=1.0 must be below lr_finder.end_lr=0.1",
        ),
        (["lr_finder.num_it=5"], "lr_finder.num_it=5 is not allowed: it must be >= 10"),
        (["lr_finder.stop_factor=0.5"], "lr_finder.stop_factor=0.5 is not allowed"),
        (["lr_finder.smoothing=1"], "lr_finder.smoothing=1.0 is not allowed"),
        (
            ["lr_finder.rule=min"],
            "lr_finder.rule=min is not allowed: it must be one of valley, steep",
        ),
        (
            ["lr_finder.num_iter=50"],
            "unknown key lr_finder.num_iter; did you mean lr_finder.num_it?",
        ),
        (["lr_find=true", "resume=auto"], "lr_find=true trains nothing, so it continues no run"),
        (
            ["lr_find=true", "optimized_metric=test_acc"],
            "lr_find=true trains nothing, so it has no optimized_metric=test_acc",
        ),
    ],
)
def test_bad_lr_finder_settings_are_one_line(overrides, needle):
    assert needle in refusal(*overrides)


def _finding(lrs, losses, num_it=None) -> lr_find.Finding:
    finding = lr_find.Finding(settings={"num_it": num_it or len(lrs)})
    finding.lrs, finding.losses, finding.stopped = list(lrs), list(losses), "test"
    lr_find.suggest(finding)
    return finding


def test_the_suggestion_rules_on_curves_of_known_shape():
    lrs = np.logspace(-7, 1, 100)
    # flat, then a fall between 1e-4 and 1e-1 (steepest at 1e-2), then a climb
    x = np.log10(lrs)
    losses = 2.3 - 1.5 / (1 + np.exp(-(x + 2) * 3)) + np.where(x > -1, (x + 1) ** 2 * 3, 0)
    finding = _finding(lrs, losses)
    assert 1e-4 < finding.valley < 1e-1 and finding.problem == ""
    assert 3e-3 < finding.steep < 3e-2
    rising = _finding(lrs, np.linspace(2.3, 9, 100))
    assert rising.valley is None and "did not fall" in rising.problem


def _rank_finds(data_root, run_dir, poison_at):
    """One gloo rank's `optim.lr=find` run (tests/ranks.py); `poison_at`: rank 1's n-th
    training loss is inf. Returns the lr this rank trained with, or the error it ended with."""
    from cnntrain import distributed

    settle, trained = lr_find.settle, {}

    def noted(*args, **kwargs):
        cfg, plan = settle(*args, **kwargs)
        trained.update(lr=cfg.optim.lr, stored=plan.config["optim"]["lr"])
        return cfg, plan

    lr_find.settle = noted

    if poison_at and distributed.rank() == 1:
        forward, calls = torch.nn.CrossEntropyLoss.forward, [0]

        def poisoned(self, out, target):
            calls[0] += 1
            loss = forward(self, out, target)
            return loss * float("inf") if calls[0] == poison_at else loss

        torch.nn.CrossEntropyLoss.forward = poisoned
    overrides = ["data=mnist", f"data.root={data_root}", "data.download=false", "epochs=1"]
    cfg = make_cfg(*overrides, "optim.lr=find", "max_steps_per_epoch=2", "data.batch_size=32")
    try:
        train(cfg, run_dir=run_dir)
    except UserError as e:
        return ("error", str(e))
    return trained


@pytest.mark.e2e  # gloo ranks, each a process
def test_under_torchrun_the_ranks_find_one_lr_together(data_root, tmp_path):
    """The ranks step the test together (DDP) and decide on their mean loss: one lr for all,
    and a loss that is inf on one rank alone stops every rank at the same step (no hang)."""
    import ranks

    first, second = ranks.run(_rank_finds, data_root, str(tmp_path / "ok"), None)
    assert first == second == {"lr": _found(tmp_path / "ok")["optim.lr"], "stored": first["lr"]}
    stopped = ranks.run(_rank_finds, data_root, str(tmp_path / "inf"), 2)
    assert stopped[0] == stopped[1] and "diverged at once" in stopped[0][1]
    assert "the loss became inf" in stopped[0][1]


ROOT = os.environ.get("CNNTRAIN_FASHION_MNIST", "")


@pytest.mark.skipif(
    not (Path(ROOT) / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file(),
    reason="real Fashion-MNIST not available (set CNNTRAIN_FASHION_MNIST)",
)
@pytest.mark.parametrize("optim,low,high", [("sgd", 1e-3, 1.0), ("adamw", 1e-5, 3e-2)])
def test_on_real_fashion_mnist_the_suggestion_is_sane_and_learns(tmp_path, optim, low, high):
    cfg = make_cfg(
        "data=fashion_mnist",
        f"data.root={ROOT}",
        "data.download=false",
        f"optim={optim}",
        "optim.lr=find",
        "lr_finder.num_it=200",
        "epochs=1",
        "max_steps_per_epoch=300",
        "max_eval_steps=null",
    )
    results = train(cfg, run_dir=tmp_path)
    found = _found(tmp_path)
    print(optim, found["suggestion"], results["test_acc"])
    assert low <= found["optim.lr"] <= high
    # 300 steps (a third of an epoch) at lrs that LeNet-5 learns slowly with: 70-75 % there;
    # chance is 10 %
    assert results["test_acc"] > 0.6
