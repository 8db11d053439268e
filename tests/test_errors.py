"""Every bad input: one clear line naming the thing and the fix, a non-zero exit code, no
traceback, and nothing of an earlier run overwritten."""

import shutil

import pytest
import torch
from conftest import run_cli


@pytest.fixture(scope="module")
def existing_run(data_root, tmp_path_factory):
    """A finished run whose files must survive every bad command aimed at its folder."""
    run_dir = tmp_path_factory.mktemp("existing")
    run_cli(
        "cnntrain",
        "data=mnist",
        f"data.root={data_root}",
        "data.download=false",
        "epochs=1",
        f"hydra.run.dir={run_dir}",
        cwd=run_dir,
    )
    return run_dir


def snapshot(run_dir):
    return {
        p.relative_to(run_dir): p.read_bytes()
        for p in run_dir.rglob("*")
        if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"
    }


def assert_one_line_error(proc, *needles):
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if "error" in line.lower()]
    assert lines, out
    for needle in needles:
        assert any(needle in line for line in lines), (needle, out)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("epochs=0", "epochs=0 is not allowed: it must be >= 1 (default 10"),
        ("epochs=-2", "epochs=-2 is not allowed: it must be >= 1"),
        ("data.batch_size=0", "data.batch_size=0 is not allowed: it must be >= 1"),
        ("optim.lr=-0.1", "optim.lr=-0.1 is not allowed: it must be > 0"),
        ("optim.lr=0", "optim.lr=0 is not allowed: it must be > 0"),
        ("data.val_split=1.0", "data.val_split=1.0 is not allowed: it must be >= 0, < 1"),
        ("device=cuda", "no CUDA GPU"),
        (
            "channels_last=maybe",
            "channels_last=maybe is not allowed: it must be one of auto, true, false",
        ),
        ("on_nan=ignore", "on_nan=ignore is not allowed: it must be one of stop, skip_batch"),
        ("checkpoint.keep_top_k=-1", "checkpoint.keep_top_k=-1 is not allowed: it must be >= 0"),
        ("resume_allow_changes=[model.name]", "model.name can never change when resuming"),
        ("ema.decay=1.5", "ema.decay=1.5 is not allowed: it must be > 0, < 1"),
        ("early_stop.patience=0", "early_stop.patience=0 is not allowed: it must be >= 1"),
        ("aug.mixup_alpha=-1", "aug.mixup_alpha=-1.0 is not allowed: it must be >= 0"),
    ],
)
@pytest.mark.e2e
def test_bad_values(existing_run, data_root, override, needle):
    before = snapshot(existing_run)
    proc = run_cli(
        "cnntrain",
        "data=mnist",
        f"data.root={data_root}",
        "data.download=false",
        override,
        f"hydra.run.dir={existing_run}",
        "resume=auto",
        cwd=existing_run,
        check=False,
    )
    assert_one_line_error(proc, needle)
    assert snapshot(existing_run) == before


@pytest.mark.e2e
def test_unknown_group_option_lists_the_options(tmp_path):
    proc = run_cli("cnntrain", "model=resnet81", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert (
        "error: unknown model=resnet81; did you mean model=resnet18? (options: airbench94, alexnet,"
        in proc.stderr
    )
    assert "Traceback" not in proc.stderr


@pytest.mark.e2e
def test_missing_dataset_files(tmp_path):
    proc = run_cli(
        "cnntrain",
        "data=cifar10",
        f"data.root={tmp_path}",
        "data.download=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        check=False,
    )
    assert_one_line_error(proc, "CIFAR-10 not found", str(tmp_path / "cifar-10-batches-py"))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.e2e
def test_imagefolder_without_class_folders(tmp_path):
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    proc = run_cli(
        "cnntrain",
        "data=imagefolder",
        f"data.root={tmp_path / 'imgs'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        check=False,
    )
    assert_one_line_error(proc, "class")


@pytest.mark.e2e
def test_imagefolder_without_root(tmp_path):
    proc = run_cli(
        "cnntrain",
        "data=imagefolder",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        check=False,
    )
    assert_one_line_error(proc, "data.root=")


@pytest.fixture()
def bad_checkpoints(existing_run, tmp_path):
    good = (existing_run / "checkpoints" / "best.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint\n" * 10)
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "foreign.pt")
    torch.save(
        {"model": {}, "config": {}, "classes": [], "epoch": 1, "metrics": torch.nn.Linear(1, 1)},
        tmp_path / "unsafe.pt",
    )
    return tmp_path


@pytest.mark.parametrize(
    "name,needle",
    [
        ("missing.pt", "not found"),
        ("truncated.pt", "truncated or not a PyTorch file"),
        ("garbage.pt", "not a PyTorch file"),
        ("foreign.pt", "not a cnntrain checkpoint"),
        ("unsafe.pt", "unsafe loading and was refused"),
    ],
)
@pytest.mark.e2e
def test_bad_checkpoint_for_cnneval(bad_checkpoints, name, needle):
    path = bad_checkpoints / name
    proc = run_cli(
        "cnneval",
        f"ckpt={path}",
        f"hydra.run.dir={bad_checkpoints / 'ev'}",
        cwd=bad_checkpoints,
        check=False,
    )
    assert_one_line_error(proc, needle, str(path))
    assert not (bad_checkpoints / "ev" / "report.json").exists()


@pytest.mark.e2e
def test_bad_checkpoint_for_resume(bad_checkpoints, data_root):
    proc = run_cli(
        "cnntrain",
        "data=mnist",
        f"data.root={data_root}",
        "data.download=false",
        f"resume={bad_checkpoints / 'truncated.pt'}",
        f"hydra.run.dir={bad_checkpoints / 'r'}",
        cwd=bad_checkpoints,
        check=False,
    )
    assert_one_line_error(proc, "truncated")


@pytest.mark.e2e
def test_resume_with_another_model_is_refused(existing_run, data_root, tmp_path):
    proc = run_cli(
        "cnntrain",
        "data=mnist",
        f"data.root={data_root}",
        "data.download=false",
        "model=resnet18",
        f"resume={existing_run}/checkpoints/last.pt",
        f"hydra.run.dir={tmp_path / 'r'}",
        cwd=tmp_path,
        check=False,
    )
    assert_one_line_error(proc, "model.name=lenet5")


@pytest.mark.e2e
def test_cnneval_with_other_classes_shows_both_lists(existing_run, data_root, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(data_root / "MNIST", other / "MNIST")
    # a checkpoint trained on MNIST evaluated against CIFAR-10's classes is refused
    ckpt = torch.load(existing_run / "checkpoints/best.pt", weights_only=True)
    ckpt["classes"] = [f"c{i}" for i in range(7)]
    torch.save(ckpt, tmp_path / "seven.pt")
    proc = run_cli(
        "cnneval",
        f"ckpt={tmp_path / 'seven.pt'}",
        f"data.root={other}",
        f"hydra.run.dir={tmp_path / 'ev'}",
        cwd=tmp_path,
        check=False,
    )
    assert_one_line_error(proc, "classes differ", "'c6'", "'9 - nine'")
