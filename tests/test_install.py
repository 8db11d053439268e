"""A non-editable install (the wheel) works from an unrelated directory: the Hydra configs ship
inside the package."""

import json
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
from conftest import run_cli

# console scripts in subprocesses: the end-to-end tier
pytestmark = pytest.mark.e2e


PROJECT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(PROJECT),
        ],
        check=True,
        capture_output=True,
    )
    return next(out.glob("cnntrain-*.whl"))


def test_wheel_contains_the_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for name in (
        "cnntrain/configs/train.yaml",
        "cnntrain/configs/eval.yaml",
        "cnntrain/configs/model/lenet5.yaml",
        "cnntrain/configs/data/imagefolder.yaml",
        "cnntrain/configs/hydra/default.yaml",
        "cnntrain/configs/sched/onecycle.yaml",
        "cnntrain/configs/data/fashion_mnist_mini.yaml",
        *(
            f"cnntrain/html/{f}"  # report.html's template and the vendored uPlot
            for f in (
                "page.html",
                "report.css",
                "report.js",
                "uPlot.iife.min.js",
                "uPlot.min.css",
                "uPlot.LICENSE",
            )
        ),
        *(
            f"cnntrain/data/fashion_mnist_mini/{f}"
            for f in (
                "train-images-idx3-ubyte.gz",
                "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz",
                "LICENSE",
            )
        ),
    ):
        assert name in names, name
    # and every other config: pyproject's package-data globs reach every folder of configs/
    shipped = {
        f"cnntrain/configs/{p.relative_to(PROJECT / 'configs')}"
        for p in (PROJECT / "configs").rglob("*.yaml")
    }
    assert shipped <= set(names), sorted(shipped - set(names))


def test_wheel_in_a_fresh_venv_runs_from_another_directory(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    site = Path(
        subprocess.check_output(
            [
                env_dir / "bin/python",
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            text=True,
        ).strip()
    )
    # torch & co. come from this environment (a fresh download of torch is gigabytes); cnntrain
    # itself only from the wheel: a plain path entry does not run this environment's .pth files,
    # so an editable install here stays invisible there
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [env_dir / "bin/python", "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
    )
    where = subprocess.check_output(
        [env_dir / "bin/python", "-c", "import cnntrain; print(cnntrain.__file__)"],
        text=True,
        cwd=tmp_path,
    )
    assert where.startswith(str(site))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_cli(str(env_dir / "bin/cnntrain"), "--help", cwd=elsewhere)
    assert (
        "model=lenet5: airbench94, alexnet," in proc.stdout and "model.name=lenet5" in proc.stdout
    )  # configs in the wheel
    # the default dataset is the sample inside the wheel: nothing to download, real images
    run_cli(str(env_dir / "bin/cnntrain"), "epochs=1", cwd=elsewhere)
    run_dir = next((elsewhere / "outputs").glob("*/*"))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["dataset"] == "fashion_mnist_mini" and results["test_images"] == 1000
    assert results["test_acc"] > 0.6  # one epoch of real clothing images (chance: 0.1)
    assert sorted(p.name for p in elsewhere.iterdir()) == [
        "outputs"
    ]  # no data/ folder: no download
    run_cli(str(env_dir / "bin/cnneval"), f"ckpt={run_dir}/checkpoints/best.pt", cwd=elsewhere)
    report = json.loads(next((elsewhere / "outputs" / "eval").glob("*/*/report.json")).read_text())
    assert report["top1"] == results["test_acc"]
