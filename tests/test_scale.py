"""Beyond one process, with the real engines: torchrun/DDP (2 gloo processes on the CPU), the
joblib and submitit launchers, the Optuna sweeper, and sweep folders that never collide."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli

BIN = Path(sys.executable).parent


def rows(run_dir):
    return list(csv.DictReader(open(run_dir / "metrics.csv")))


@pytest.mark.e2e
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(data_root, tmp_path):
    # LeNet-5 has no BatchNorm, and each rank trains on its half of exactly the global batch
    # one process draws (augmented with the same random numbers), so DDP's averaged gradient
    # is the one-process gradient up to float32 rounding of sums taken in another order
    # (~1e-7 relative per step): after 10 steps the weights agree to 1e-5.
    common = [
        "data=mnist",
        f"data.root={data_root}",
        "data.download=false",
        "device=cpu",
        "epochs=2",
        "model=lenet5",
        "deterministic=true",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("cnntrain", *common, "data.batch_size=64", f"hydra.run.dir={one}", cwd=tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "cnntrain",
            *common,
            "data.batch_size=32",
            f"hydra.run.dir={two}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a = torch.load(one / "checkpoints/last.pt", weights_only=True)
    b = torch.load(two / "checkpoints/last.pt", weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=1e-5, rtol=1e-4)
    for r1, r2 in zip(rows(one), rows(two)):
        assert float(r1["train_loss"]) == pytest.approx(float(r2["train_loss"]), rel=1e-4)
        assert r1["val_acc"] == r2["val_acc"]  # the 40 val images, split over the ranks, once each
    results = json.loads((two / "results.json").read_text())
    assert (
        results["test_images"] == 200
        and results["test_acc"] == json.loads((one / "results.json").read_text())["test_acc"]
    )
    # one run folder, written by rank 0 alone: no second .hydra, no rank log without errors
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert proc.stdout.count("test accuracy of best.pt") == 1


def test_run_folders_of_ranks_and_sweeps(tmp_path, monkeypatch):
    from cnntrain import cli, rundir

    base = str(tmp_path / "multirun/2026-11-22/10-00-00")
    monkeypatch.delenv("CNNTRAIN_RUN_TIME", raising=False)

    # two sweeps started in the same second: mkdir lets only one of them have the folder
    def new_process():  # each run is a process of its own, which asks once
        rundir._made.clear()
        return rundir.unique_dir(base)

    assert [new_process() for _ in range(3)] == [base, f"{base}-2", f"{base}-3"]
    assert rundir.unique_dir(base) == f"{base}-3"  # Hydra composes twice: one answer per process
    monkeypatch.setenv("CNNTRAIN_RUN_TIME", "1795000000.0")  # under torchrun: rank 0's clock
    assert rundir.unique_dir(base) == base and cli._run_time() == 1795000000.0


@pytest.mark.e2e
def test_two_sweeps_started_together_get_two_folders(data_root, tmp_path):
    args = [
        str(BIN / "cnntrain"),
        "-m",
        "model=lenet5",
        "data=mnist",
        f"data.root={data_root}",
        "data.download=false",
        "device=cpu",
        "epochs=1",
        "max_steps_per_epoch=1",
    ]
    procs = [
        subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stdout.read()
    sweeps = sorted(tmp_path.glob("multirun/*/*"))
    assert len(sweeps) == 2 and all(
        (s / "0_lenet5_mnist" / "results.json").is_file() for s in sweeps
    )


@pytest.mark.e2e
def test_joblib_launcher_runs_jobs_in_parallel_processes(data_root, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    run_cli(
        "cnntrain",
        "-m",
        "launcher=joblib",
        "model=lenet5,resnet20",
        "data=mnist",
        f"data.root={data_root}",
        "data.download=false",
        "device=cpu",
        "epochs=1",
        "max_steps_per_epoch=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    models = {
        json.loads((tmp_path / "sweep" / j / "results.json").read_text())["model"]
        for j in ("0_lenet5_mnist", "1_resnet20_mnist")
    }
    assert models == {"lenet5", "resnet20"}
    assert "summary.csv" in {p.name for p in (tmp_path / "sweep").iterdir()}


@pytest.mark.e2e
def test_optuna_sweep_maximizes_the_validation_accuracy(data_root, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    run_cli(
        "cnntrain",
        "-m",
        "hparams_search=fashion_mnist_optuna",
        "data=fashion_mnist",
        f"data.root={data_root}",
        "data.download=false",
        "device=cpu",
        "epochs=1",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.n_startup_trials=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    trials = [
        json.loads(
            next((tmp_path / "sweep").glob(f"{j}_*_fashion_mnist/results.json")).read_text()
        )["best_val_acc"]
        for j in range(3)
    ]
    assert best["best_value"] == max(trials)
    assert set(best["best_params"]) == {"optim.lr", "optim.weight_decay", "data.batch_size"}


@pytest.mark.e2e
def test_submitit_slurm_preset_composes_and_its_jobs_run_with_the_local_executor(
    data_root, tmp_path
):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = run_cli(
        "cnntrain", "launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra", cwd=tmp_path
    )
    launcher = yaml.safe_load(proc.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["partition"] == "gpu"
    assert launcher["max_num_timeout"] == 3 and launcher["signal_delay_s"] == 120
    # the same job through submitit's local executor: a pickled job, a submission script, logs
    run_cli(
        "cnntrain",
        "-m",
        "hydra/launcher=submitit_local",
        "model=lenet5",
        "data=mnist",
        f"data.root={data_root}",
        "data.download=false",
        "device=cpu",
        "epochs=1",
        "max_steps_per_epoch=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "hydra.launcher.timeout_min=10",
        cwd=tmp_path,
    )
    assert (tmp_path / "sweep" / "0_lenet5_mnist" / "results.json").is_file()
    assert list((tmp_path / "sweep" / ".submitit").rglob("*_submitted.pkl"))
