"""Real Fashion-MNIST (from ../shared/data/fashion_mnist.sh DEST, then CNNTRAIN_FASHION_MNIST=DEST).
Skipped when it is not there."""

import json
import os
from pathlib import Path

import pytest
from conftest import run_cli

ROOT = os.environ.get("CNNTRAIN_FASHION_MNIST", "")
pytestmark = [
    pytest.mark.skipif(
        not (Path(ROOT) / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file(),
        reason="real Fashion-MNIST not available (set CNNTRAIN_FASHION_MNIST to a fashion_mnist.sh DEST)",
    ),
    pytest.mark.e2e,  # the console scripts in subprocesses: the end-to-end tier
]


def train_fashion_mnist(tmp_path, epochs):
    run_cli(
        "cnntrain",
        "data=fashion_mnist",
        f"data.root={ROOT}",
        "data.download=false",
        f"epochs={epochs}",
        "device=cpu",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
        timeout=1800,
    )
    return json.loads((tmp_path / "results.json").read_text())


def test_one_epoch_learns_real_fashion_mnist(tmp_path):
    results = train_fashion_mnist(tmp_path, 1)
    assert results["test_acc"] > 0.80


@pytest.mark.slow
def test_acceptance_lenet5_ten_epochs_reaches_90_percent(tmp_path):
    results = train_fashion_mnist(tmp_path, 10)
    print(json.dumps(results, indent=2))
    assert results["test_acc"] >= 0.90
