"""scripts/bench.py keeps working: a --quick run (a few steps per case, synthetic data) writes
every case, ratio and the start-up time. The speed itself is measured by running the script,
never asserted here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

# console scripts in subprocesses: the end-to-end tier
pytestmark = pytest.mark.e2e


SCRIPT = Path(__file__).parents[1] / "scripts" / "bench.py"


def test_bench_quick_run_writes_every_case_and_ratio(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--profile",
            "--root",
            str(tmp_path / "none"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["fashion_mnist"].startswith("synthetic")
    assert set(result["cases"]) == {
        "lenet5_fmnist_b64",
        "lenet5_fmnist_b256",
        "resnet20_synthetic32_b64",
        "eval_lenet5_fmnist_b64",
        "eval_resnet20_synthetic32_b64",
        "folder_png28_b64",
        "lenet5_jpg96_b64",
        "resnet20_jpg96_b64",
    }
    assert (
        set(result["cache"]) == {"png28", "jpg96"}
        and result["cache"]["png28"]["decode_img_per_s"] > 0
    )
    assert len(result["accuracy_same_images"]["png28"]) == 1
    rows = result["cases"]["lenet5_fmnist_b64"]["rows"]
    assert {"(1) cnntrain", "(2) bare", "(3) classic"} <= set(rows)
    assert all(r["img_per_s"] > 0 for r in rows.values())
    assert set(result["ratios"]) >= {
        "train_vs_bare_b64",
        "train_vs_bare_b256",
        "train_vs_classic_b64",
        "eval_vs_bare",
        "folder_vs_builtin_png28",
        "folder_vs_bare_jpg96_lenet5",
        "folder_vs_bare_jpg96_resnet20",
        "streamed_vs_memory",
    }
    assert result["help_seconds"] > 0 and result["profile_ms_per_step"]["bare_ms"] > 0
    assert "train_vs_bare_b64" in proc.stdout and Path(out.with_suffix(".profile.txt")).is_file()
