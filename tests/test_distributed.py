"""The torchrun path, proved on the CPU with gloo ranks (tests/ranks.py): each rank's random
streams survive a resume, the ranks agree on a non-finite loss, one process per machine
downloads, and the device-selection and RNG rules that only matter on a GPU, with torch.cuda
stood in for."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ranks
import torch

from cnntrain.checkpoint import load_checkpoint

# gloo ranks and torchrun, each a process: the end-to-end tier
pytestmark = pytest.mark.e2e


BIN = Path(sys.executable).parent
# fake MNIST: 360 training images, 40 held out; 2 ranks x 32 = 64 a step: 5 steps an epoch.
# SqueezeNet has dropout (0.5): each rank's dropout stream is part of the result.
COMMON = [
    "data.download=false",
    "device=cpu",
    "deterministic=true",
    "epochs=3",
    "model=squeezenet",
    "data.batch_size=32",
    "aug.mixup_alpha=0.4",
]


def _train(data_root, run_dir, overrides, signal_at=None, poison=None):
    """One rank's cnntrain run. `signal_at`: rank 0 gets SIGUSR1 while its training batch number
    `signal_at` (counted across epochs) is prepared. `poison` (rank, n): that rank's n-th training
    loss is inf. Returns the run's warnings and results."""
    from hydra import compose, initialize_config_module

    from cnntrain import distributed
    from cnntrain.data.loaders import BatchLoader
    from cnntrain.train import train

    if signal_at and distributed.rank() == 0:
        original, seen = BatchLoader.iter_from, [0]

        def iter_from(self, start):
            for batch in original(self, start):
                if self.shuffle:
                    seen[0] += 1
                    if seen[0] == signal_at:
                        signal.raise_signal(signal.SIGUSR1)
                yield batch

        BatchLoader.iter_from = iter_from
    if poison and distributed.rank() == poison[0]:
        forward, calls = torch.nn.CrossEntropyLoss.forward, [0]

        def poisoned(self, out, target):
            loss = forward(self, out, target)
            if self.training:
                calls[0] += 1
                if calls[0] == poison[1]:
                    return loss * float("inf")
            return loss

        torch.nn.CrossEntropyLoss.forward = poisoned
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("cnntrain").addHandler(handler)
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["data=mnist", f"data.root={data_root}", *COMMON, *overrides],
        )
    results = train(cfg, run_dir=run_dir)
    return {"warnings": warnings, "test_acc": results["test_acc"]}


def test_each_rank_resumes_its_own_random_streams_exactly(data_root, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    ranks.run(_train, data_root, full, [])
    # the ranks compare notes every 8 steps: the signal at step 6 stops both after step 8
    stopped = ranks.run(_train, data_root, part, [], 6)
    assert all(
        r[0] == "raised" and "stopped by SIGUSR1 in epoch 2/3 after step 3 of 5" in r[1]
        for r in stopped
    ), stopped
    saved = load_checkpoint(part / "checkpoints/last.pt")
    assert len(saved["rng"]) == 2 and not torch.equal(
        saved["rng"][0]["torch"], saved["rng"][1]["torch"]
    )
    resumed = ranks.run(_train, data_root, part, ["resume=auto"])
    assert resumed[0]["warnings"] == []
    a, b = (load_checkpoint(d / "checkpoints/last.pt") for d in (full, part))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert (full / "metrics.csv").read_text().count("\n") == 4
    drop = ("time", "img_per_s")
    rows = [
        [
            {
                k: v
                for k, v in zip(f.read_text().splitlines()[0].split(","), line.split(","))
                if k not in drop
            }
            for line in f.read_text().splitlines()[1:]
        ]
        for f in (full / "metrics.csv", part / "metrics.csv")
    ]
    assert rows[0] == rows[1]


def test_a_resume_by_another_number_of_ranks_says_it_is_not_exact(data_root, tmp_path, caplog):
    ranks.run(_train, data_root, tmp_path, ["epochs=1"])
    from hydra import compose, initialize_config_module

    from cnntrain.train import train

    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "data=mnist",
                f"data.root={data_root}",
                *COMMON,
                "epochs=2",
                "resume=auto",
                "resume_allow_changes=[epochs]",
            ],
        )
    train(cfg, run_dir=tmp_path)  # one process: it continues rank 0's streams
    assert "the checkpoint was written by 2 process(es) and is resumed by 1: dropout" in caplog.text


@pytest.mark.parametrize("on_nan", ["stop", "skip_batch"])
def test_an_inf_loss_on_one_rank_is_decided_by_all_at_the_same_step(data_root, tmp_path, on_nan):
    out = ranks.run(
        _train, data_root, tmp_path, ["epochs=1", f"on_nan={on_nan}"], None, (1, 3), timeout=120
    )
    if on_nan == "stop":
        # every rank stops at that step, with the same line (the sum over the ranks is inf)
        assert out[0] == out[1] and out[0][0] == "raised", out
        assert "UserError: training loss became inf at epoch 1/1, step 3" in out[0][1]
    else:
        # every rank skips the update of that step and trains on
        for r in out:
            assert r["warnings"] == [
                "epoch 1: skipped 1 batches with a non-finite loss (on_nan=skip_batch)"
            ], out
            assert r["test_acc"] is not None
        weights = load_checkpoint(tmp_path / "checkpoints/last.pt")["model"]
        assert all(torch.isfinite(w).all() for w in weights.values())


def _download(root, log):
    """One rank loading MNIST that is not there yet, with the download replaced by writing the
    fake files (slowly): records who downloaded, when."""
    from fakedata import write_mnist

    from cnntrain import distributed
    from cnntrain.data import builtin

    def fake_download(spec, root_, train, fix):
        with open(log, "a") as f:
            f.write(f"start {distributed.rank()} {time.time()}\n")
        time.sleep(1.0)
        write_mnist(Path(root_), "MNIST")
        with open(log, "a") as f:
            f.write(f"end {distributed.rank()} {time.time()}\n")
        return spec.cls(root_, train=train)

    builtin._download = fake_download
    images, labels, classes = builtin.load_builtin("mnist", str(root), train=True, download=True)
    return len(labels)


def test_one_rank_per_machine_downloads_and_the_others_read_its_files(tmp_path):
    log = tmp_path / "downloads.log"
    assert ranks.run(_download, tmp_path / "data", log) == [400, 400]
    assert [line.split()[:2] for line in log.read_text().splitlines()] == [
        ["start", "0"],
        ["end", "0"],
    ]


def _fail_on_local_rank0():
    from cnntrain import distributed
    from cnntrain.errors import UserError

    def load():
        if distributed.local_rank() == 0:
            raise UserError("could not download MNIST (no route)")
        return "read"

    return distributed.local_first(load)


def test_a_failed_download_ends_every_rank():
    out = ranks.run(_fail_on_local_rank0)
    assert out[0] == ("raised", "UserError: could not download MNIST (no route)")
    assert out[1][0] == "raised" and "another rank failed" in out[1][1]


def test_cnneval_under_torchrun_reports_once_from_rank_0(data_root, tmp_path):
    from conftest import run_cli

    run_cli(
        "cnntrain",
        "data=mnist",
        f"data.root={data_root}",
        "data.download=false",
        "device=cpu",
        "epochs=1",
        "model=lenet5",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc_per_node=2",
            str(BIN / "cnneval"),
            f"ckpt={tmp_path / 'run/checkpoints/best.pt'}",
            "device=cpu",
            f"hydra.run.dir={tmp_path / 'ev'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("lenet5 on mnist (test) from") == 1, proc.stdout
    report = json.loads((tmp_path / "ev/report.json").read_text())
    assert report["num_samples"] == 200  # the ranks' halves, gathered: every image once


def _buffers_after_sync(_):
    from cnntrain import distributed

    net = torch.nn.BatchNorm2d(3)
    net.running_mean.fill_(distributed.rank() + 1.0)
    net.num_batches_tracked.fill_(10 * distributed.rank())
    distributed.main_buffers(net)
    return [net.running_mean.tolist(), int(net.num_batches_tracked)]


def test_the_ranks_validate_with_rank_0s_batchnorm_statistics():
    assert ranks.run(_buffers_after_sync, None) == [[[1.0, 1.0, 1.0], 0]] * 2
