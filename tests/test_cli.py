"""The console scripts end to end, as a user runs them: files written, cnneval agreeing with
training, resume, sweeps and every bad input."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from cnntrain.data.builtin import BUILTIN
from cnntrain.options import config_options

PNG = b"\x89PNG\r\n\x1a\n"
# every data= option read from data.root (the bundled one has none: tests/test_learning.py)
DATASETS = [d for d in config_options("data") if not getattr(BUILTIN.get(d), "bundled", False)]


def train_args(dataset, data_root, folder_root, run_dir, *extra):
    root = folder_root if dataset == "imagefolder" else data_root
    args = [
        "cnntrain",
        f"data={dataset}",
        f"data.root={root}",
        "data.download=false",
        "epochs=2",
        f"hydra.run.dir={run_dir}",
        "optim.lr=0.02",
        "data.batch_size=32",
    ]
    if dataset == "imagefolder":
        args += ["data.image_size=32", "data.num_workers=0"]
    return [*args, *extra]


@pytest.fixture(scope="module", params=DATASETS)
def trained(request, data_root, folder_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp(f"run_{request.param}")
    proc = run_cli(*train_args(request.param, data_root, folder_root, run_dir), cwd=run_dir.parent)
    return request.param, run_dir, proc


@pytest.mark.e2e  # its fixture runs the console scripts
def test_run_writes_every_file(trained):
    dataset, run_dir, proc = trained
    for name in (
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "train.log",
        "metrics.csv",
        "curves.png",
        "report.html",
        "results.json",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    ):
        assert (run_dir / name).is_file(), name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = events.Tags()
    assert {"loss/train", "acc/val", "lr", "hparam/test_acc"} <= set(tags["scalars"])
    assert {"val/predictions", "test/confusion_matrix"} <= set(tags["images"])
    assert len(events.Scalars("loss/train")) == 2
    assert (run_dir / "curves.png").read_bytes()[:8] == PNG
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0]) == [
        "epoch",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "lr",
        "time",
        "img_per_s",
    ]
    assert all(0 <= float(r["val_acc"]) <= 1 and float(r["train_loss"]) > 0 for r in rows)
    log = (run_dir / "train.log").read_text()
    assert "epoch 2/2 train_loss" in log and "val_acc" in log and "lr" in log
    assert "epoch 1/2 train_loss" in proc.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert 0 <= results["test_acc"] <= 1 and results["dataset"] == dataset
    assert (
        f"test accuracy of best.pt (epoch {results['best_epoch']}): {results['test_acc']:.4f}"
        in proc.stdout
    )
    assert results["test_capped"] is False
    # the end says where everything is and what to run next, in paths relative to where it ran
    end, shown = proc.stdout.strip().splitlines()[-3:], run_dir.name
    assert (
        f"results saved to {shown}: checkpoints/best.pt, checkpoints/last.pt, curves.png" in end[0]
    )
    assert "results.json" in end[0] and "train.log" in end[0]
    assert end[1].endswith(f"next: cnneval ckpt={shown}/checkpoints/best.pt")
    assert end[2].endswith(f"next: tensorboard --logdir {shown}")


@pytest.mark.e2e  # its fixture runs the console scripts
def test_checkpoints_are_plain_weights_only_dicts(trained):
    dataset, run_dir, _ = trained
    last = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    best = torch.load(run_dir / "checkpoints/best.pt", weights_only=True)
    for key in ("model", "config", "classes", "epoch", "metrics"):
        assert key in last and key in best
    for key in ("optimizer", "scheduler", "scaler", "rng"):
        assert key in last and key not in best
    assert last["epoch"] == 2 and isinstance(last["config"], dict)
    assert (
        last["config"]["data"]["name"] == dataset
        and Path(last["config"]["data"]["root"]).is_absolute()
    )
    assert len(last["classes"]) == (
        100 if dataset == "cifar100" else 3 if dataset == "imagefolder" else 10
    )
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


@pytest.mark.e2e
def test_cnneval_reports_what_training_printed(trained, tmp_path):
    dataset, run_dir, _ = trained
    results = json.loads((run_dir / "results.json").read_text())
    proc = run_cli(
        "cnneval", f"ckpt={run_dir}/checkpoints/best.pt", f"hydra.run.dir={tmp_path}", cwd=tmp_path
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["top1"] == pytest.approx(results["test_acc"], abs=1e-12)
    assert (
        report["split"] == "test" and report["dataset"] == dataset and report["model"] == "lenet5"
    )
    k = len(report["classes"])
    assert len(report["per_class"]) == k and len(report["confusion_matrix"]) == k
    assert sum(map(sum, report["confusion_matrix"])) == report["num_samples"]
    assert sum(c["support"] for c in report["per_class"]) == report["num_samples"]
    assert set(report["per_class"][0]) == {
        "name",
        "support",
        "accuracy",
        "precision",
        "recall",
        "f1",
    }
    assert (report["top5"] is None) == (k < 5)
    assert (tmp_path / "report.md").read_text().startswith("# Evaluation")
    assert f"top1 {report['top1']:.4f}" in proc.stdout and "precision" in proc.stdout
    for name in ("confusion_matrix.png", "per_class.png", "misclassified.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG, name
    assert f"{report['top1']:.4f}" in (tmp_path / "report.html").read_text()
    predictions = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert len(predictions) == report["num_samples"]
    correct = sum(p["true"] == p["predicted"] for p in predictions)
    assert correct / len(predictions) == pytest.approx(report["top1"])
    assert all(0 < float(p["confidence"]) <= 1 for p in predictions)
    if dataset == "imagefolder":
        assert Path(predictions[0]["sample"]).is_file()
    else:
        assert [p["sample"] for p in predictions[:3]] == ["0", "1", "2"]


@pytest.mark.e2e
def test_cnneval_val_split_and_overrides(data_root, tmp_path):
    run_dir = tmp_path / "run"
    run_cli(*train_args("mnist", data_root, None, run_dir, "epochs=1"), cwd=tmp_path)
    copy = tmp_path / "moved"
    shutil.copytree(data_root / "MNIST", copy / "MNIST")
    run_cli(
        "cnneval",
        f"ckpt={run_dir}/checkpoints/best.pt",
        "split=val",
        f"data.root={copy}",
        "data.batch_size=7",
        "device=cpu",
        f"hydra.run.dir={tmp_path / 'ev'}",
        cwd=tmp_path,
    )
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["split"] == "val" and report["num_samples"] == 40
    best = torch.load(run_dir / "checkpoints/best.pt", weights_only=True)
    assert report["top1"] == pytest.approx(best["metrics"]["val_acc"], abs=1e-12)


@pytest.mark.e2e
def test_resume_continues_to_the_same_result(data_root, tmp_path):
    # sched=step does not depend on `epochs`, so a 1-epoch run resumed to 3 epochs (its schedule
    # re-planned) must match an uninterrupted 3-epoch run bit for bit on the CPU
    common = ["model=lenet5", "deterministic=true", "device=cpu", "sched=step", "sched.step_size=2"]
    full, part, resumed = tmp_path / "full", tmp_path / "part", tmp_path / "resumed"
    run_cli(*train_args("mnist", data_root, None, full, "epochs=3", *common), cwd=tmp_path)
    run_cli(*train_args("mnist", data_root, None, part, "epochs=1", *common), cwd=tmp_path)
    proc = run_cli(
        *train_args(
            "mnist",
            data_root,
            None,
            resumed,
            "epochs=3",
            *common,
            "resume_allow_changes=[epochs]",
            f"resume={part}/checkpoints/last.pt",
        ),
        cwd=tmp_path,
    )
    assert f"resuming from {part}/checkpoints/last.pt: epoch 2/3 starts (1 done)" in proc.stdout
    assert "epoch 1/3" not in proc.stdout
    a = torch.load(full / "checkpoints/last.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints/last.pt", weights_only=True)
    assert b["epoch"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key

    def strip(path):
        with open(path) as f:
            return [
                {k: v for k, v in r.items() if k not in ("time", "img_per_s")}
                for r in csv.DictReader(f)
            ]

    assert strip(full / "metrics.csv") == strip(resumed / "metrics.csv")
    assert (resumed / "checkpoints/best.pt").is_file()


@pytest.mark.e2e
def test_rerun_into_a_run_dir_with_checkpoints_is_refused(data_root, tmp_path):
    run_dir = tmp_path / "run"
    run_cli(*train_args("mnist", data_root, None, run_dir, "epochs=1"), cwd=tmp_path)
    before = (run_dir / "checkpoints/last.pt").read_bytes()
    proc = run_cli(
        *train_args("mnist", data_root, None, run_dir, "epochs=1"), cwd=tmp_path, check=False
    )
    assert proc.returncode != 0 and "resume=" in proc.stderr
    assert (run_dir / "checkpoints/last.pt").read_bytes() == before


@pytest.mark.e2e
def test_multirun_two_jobs(data_root, tmp_path):
    proc = run_cli(
        "cnntrain",
        "-m",
        "model=lenet5,resnet18",
        "data=mnist",
        f"data.root={data_root}",
        "data.download=false",
        "epochs=1",
        "label_smoothing=0.05",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    for job, model in (("0_lenet5_mnist", "lenet5"), ("1_resnet18_mnist", "resnet18")):
        results = json.loads((tmp_path / "sweep" / job / "results.json").read_text())
        assert (
            results["model"] == model
            and (tmp_path / "sweep" / job / "checkpoints/best.pt").is_file()
        )
    assert "#1 : model=resnet18" in proc.stdout + proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "summary.csv")))
    assert sorted(r["job"] for r in rows) == ["0_lenet5_mnist", "1_resnet18_mnist"] and all(
        r["status"] == "ok" for r in rows
    )
    accs = [float(r["test_acc"]) for r in rows]
    assert accs == sorted(accs, reverse=True)
    assert "| model=lenet5 | ok |" in proc.stdout and (tmp_path / "sweep" / "summary.md").is_file()
    sweep_page = (tmp_path / "sweep" / "report.html").read_text()
    assert all(f'href="{r["job"]}/report.html"' in sweep_page for r in rows)
    # TensorBoard HParams: each setting with its own type, and what the command line set
    hparams, kinds, scalars = _hparams(tmp_path / "sweep" / "1_resnet18_mnist" / "tb")
    assert hparams == {
        "model": "resnet18",
        "data": "mnist",
        "optim": "SGD",
        "optim.lr": 0.05,
        "optim.weight_decay": 0.0005,
        "sched": "CosineAnnealingLR",
        "aug": "basic",
        "data.batch_size": 64,
        "epochs": 1,
        "seed": 42,
        "amp": False,
        "label_smoothing": 0.05,
    }
    assert (
        kinds["amp"] == "bool_value"
        and kinds["model"] == "string_value"
        and kinds["epochs"] == "number_value"
    )
    assert {"hparam/test_acc", "hparam/best_val_acc"} <= set(scalars)
    # cnneval on the sweep folder compares every job's best.pt in one table
    run_cli(
        "cnneval", f"ckpt={tmp_path / 'sweep'}", f"hydra.run.dir={tmp_path / 'cmp'}", cwd=tmp_path
    )
    compared = list(csv.DictReader(open(tmp_path / "cmp" / "comparison.csv")))
    assert sorted(p.name for p in (tmp_path / "cmp").glob("[!.]*/")) == [
        "0_lenet5_mnist",
        "1_resnet18_mnist",
    ]
    assert sorted(r["model"] for r in compared) == ["lenet5", "resnet18"]
    for r in compared:
        job = Path(r["checkpoint"]).parents[1]
        assert float(r["top1"]) == pytest.approx(
            json.loads((job / "results.json").read_text())["test_acc"]
        )


@pytest.mark.e2e
def test_multirun_failed_job_is_reported_and_others_run(data_root, tmp_path):
    proc = run_cli(
        "cnntrain",
        "-m",
        "optim.lr=-1,0.05",
        "data=mnist",
        f"data.root={data_root}",
        "data.download=false",
        "epochs=1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert "1 job(s) failed" in proc.stderr and "optim.lr=-1 is not allowed" in proc.stderr
    assert not (tmp_path / "sweep" / "0_lenet5_mnist" / "results.json").exists()
    assert (
        json.loads((tmp_path / "sweep" / "1_lenet5_mnist" / "results.json").read_text())["test_acc"]
        is not None
    )
    assert "Traceback" not in proc.stdout + proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "summary.csv")))
    assert [(r["job"], r["status"]) for r in rows] == [
        ("1_lenet5_mnist", "ok"),
        ("0_lenet5_mnist", "failed"),
    ]
    assert rows[1]["error"].startswith("optim.lr=-1 is not allowed")


@pytest.mark.e2e
def test_a_capped_test_says_it_is_capped_and_how_to_get_the_full_one(data_root, tmp_path):
    proc = run_cli(
        *train_args("mnist", data_root, None, tmp_path / "run", "epochs=1", "max_eval_steps=1"),
        cwd=tmp_path,
    )
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert results["test_capped"] is True and results["test_images"] == 32
    assert (
        "on only 32 of the 200 test images (max_eval_steps=1); the full test: cnneval "
        "ckpt=run/checkpoints/best.pt"
    ) in proc.stdout


@pytest.mark.e2e
def test_an_experiment_run_says_what_the_recipe_turned_on(data_root, tmp_path):
    proc = run_cli(
        "cnntrain",
        "experiment=mnist_lenet5",
        "data=mnist",
        f"data.root={data_root}",
        "data.download=false",
        "epochs=1",
        "max_steps_per_epoch=2",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    line = next(line for line in proc.stdout.splitlines() if "experiment=mnist_lenet5 sets" in line)
    assert (
        "model=lenet5" in line and "data=mnist" in line and "(command-line overrides win)" in line
    )
    assert (
        " aug=basic (digits: shift 2, rotate 10, scale 0.9-1.1) " in line
    )  # the section its data uses


@pytest.mark.e2e
def test_help_lists_groups_and_every_key_with_its_meaning(tmp_path):
    out = run_cli("cnntrain", "optim=adam", "--help", cwd=tmp_path).stdout
    assert "optim=adam: adam, adamw, sgd" in out and "schema/" not in out
    assert "optim.betas=[0.9, 0.999]" in out and "optim.momentum" not in out
    lr = next(line for line in out.splitlines() if line.strip().startswith("optim.lr="))
    assert "learning rate, or find: " in lr and lr.endswith("[a number > 0, or find]")
    assert "$CNNTRAIN_CACHE" in out  # a meaning with a $ survives Hydra's string.Template
    assert not list(tmp_path.iterdir())  # --help leaves no folder
    out = run_cli("cnneval", "--help", cwd=tmp_path).stdout
    assert "ckpt=???" in out and "a checkpoint, a run or multirun folder" in out


@pytest.mark.e2e
def test_sweep_lines_share_one_time_format(data_root, tmp_path):
    import re

    proc = run_cli(
        "cnntrain",
        "-m",
        "model=lenet5",
        "data=mnist",
        f"data.root={data_root}",
        "data.download=false",
        "epochs=1",
        "max_steps_per_epoch=1",
        cwd=tmp_path,
    )
    stamped = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert any("Launching 1 jobs locally" in line for line in stamped)
    assert all(re.match(r"\[\d\d:\d\d:\d\d\] ", line) for line in stamped), stamped


def _hparams(tb_dir: Path):
    """A run's HParams record read back from its event file: values, their kinds, scalar tags."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    # no per-run experiment record: TensorBoard then derives the columns from all runs and
    # ticks the ones that differ (see tracking.hparams_summaries)
    assert metadata.EXPERIMENT_TAG not in content and metadata.SESSION_END_INFO_TAG in content
    info = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    values = {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}
    return (
        values,
        {k: v.WhichOneof("kind") for k, v in info.hparams.items()},
        events.Tags()["scalars"],
    )
