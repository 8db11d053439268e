"""The promises of docs/training.md (a run folder belongs to one run, resuming, faults) under
attack, as a careless user or script would attack them: two runs into one folder at once, a
resume aimed at another run's folder, folders holding only some of a run's files, a full disk,
bad values of every kind. Every case: one `error:` line on stderr, a non-zero exit code, no
traceback, and every file of an earlier run byte for byte intact."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import refusal, run_cli

TRAIN = ("data.download=false", "device=cpu", "epochs=1", "data.batch_size=32")


def everything(folder: Path) -> dict:
    """Every file below `folder` (.hydra/ and logs included) with its bytes and mtime."""
    return {
        p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def assert_refused(proc, *needles):
    """One `error:` line on stderr naming what is wrong, exit code 1, no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert "error" not in proc.stdout.lower(), proc.stdout
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def finished_run(data_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_cli(
        "cnntrain",
        "data=mnist",
        f"data.root={data_root}",
        *TRAIN,
        f"hydra.run.dir={run_dir}",
        cwd=run_dir.parent,
    )
    return run_dir


def _popen(args, cwd, env=None):
    script = Path(sys.executable).parent / args[0]
    return subprocess.Popen(
        [str(script), *args[1:]],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
    )


def _wait(procs):
    return [(p.wait(timeout=600), *p.communicate()) for p in procs]


# ------------------------------------------------------------------------- data lost before
@pytest.mark.e2e
def test_two_runs_started_together_into_one_folder(data_root, tmp_path):
    run_dir = tmp_path / "shared"
    args = ["cnntrain", "data=mnist", f"data.root={data_root}", *TRAIN, f"hydra.run.dir={run_dir}"]
    results = _wait([_popen([*args, f"seed={seed}"], tmp_path) for seed in (1, 2)])
    assert sorted(code for code, _, _ in results) == [0, 1], results
    winner = 1 + [code for code, _, _ in results].index(0)
    loser = results[2 - winner][2]
    assert "error: " in loser and str(run_dir) in loser and "Traceback" not in loser
    assert ("in use by another run" in loser) or (
        "already holds files that are not this run's" in loser
    )
    # every file is the winner's
    assert (
        torch.load(run_dir / "checkpoints/last.pt", weights_only=True)["config"]["seed"] == winner
    )
    assert f"seed={winner}" in (run_dir / ".hydra/overrides.yaml").read_text()
    assert json.loads((run_dir / "results.json").read_text())["test_acc"] is not None
    log = (run_dir / "train.log").read_text()
    assert "error" not in log.lower(), log  # the loser wrote nothing there, not even its error


@pytest.mark.e2e
def test_two_plain_runs_in_the_same_second_get_two_folders(data_root, tmp_path):
    while time.time() % 1 > 0.2:  # start both early in one second: they compute the same name
        time.sleep(0.05)
    results = _wait(
        [
            _popen(
                ["cnntrain", "data=mnist", f"data.root={data_root}", *TRAIN, f"seed={s}"], tmp_path
            )
            for s in (1, 2)
        ]
    )
    assert [code for code, _, _ in results] == [0, 0], results
    runs = sorted(p.parent.parent for p in (tmp_path / "outputs").rglob("checkpoints/last.pt"))
    assert len(runs) == 2
    # outputs/<date>/<time>_<model>_<data>, the second one -2 when they started in one second
    assert all(re.fullmatch(r"\d\d-\d\d-\d\d_lenet5_mnist(-2)?", r.name) for r in runs), runs
    seeds = {
        torch.load(r / "checkpoints/last.pt", weights_only=True)["config"]["seed"] for r in runs
    }
    assert seeds == {1, 2}


@pytest.mark.e2e
def test_resume_into_another_runs_folder_is_refused(finished_run, data_root, tmp_path):
    other = tmp_path / "other"
    run_cli(
        "cnntrain",
        "data=mnist",
        f"data.root={data_root}",
        *TRAIN,
        f"hydra.run.dir={other}",
        cwd=tmp_path,
    )
    before = everything(other)
    proc = run_cli(
        "cnntrain",
        "data=mnist",
        f"data.root={data_root}",
        *TRAIN,
        f"resume={finished_run}/checkpoints/last.pt",
        f"hydra.run.dir={other}",
        cwd=tmp_path,
        check=False,
    )
    assert_refused(
        proc,
        str(other),
        "already holds files that are not this run's",
        "continues into a new folder",
    )
    assert everything(other) == before


@pytest.mark.parametrize(
    "leftover",
    [
        "checkpoints/best.pt",
        "checkpoints/epoch_003.pt",
        "results.json",
        "metrics.csv",
        "curves.png",
        "tb/events.out.tfevents.1",
        "notes.txt",
    ],
)
@pytest.mark.parametrize("resume", [None, "auto"])
def test_a_folder_with_any_result_but_no_last_pt_is_refused(data_root, tmp_path, leftover, resume):
    from hydra import compose, initialize_config_module

    from cnntrain.rundir import RunFolderRefused
    from cnntrain.train import train

    run_dir = tmp_path / "run"
    (run_dir / leftover).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / leftover).write_bytes(b"the only copy of something")
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra/config.yaml").write_text("seed: 7\n")
    before = everything(run_dir)
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "data=mnist",
                f"data.root={data_root}",
                *TRAIN,
                *([f"resume={resume}"] if resume else []),
            ],
        )
    with pytest.raises(RunFolderRefused, match=leftover.split("/")[0]) as refused:
        train(cfg, run_dir=run_dir)
    assert str(run_dir) in str(refused.value)
    assert everything(run_dir) == before


@pytest.mark.e2e
def test_the_cli_refuses_such_a_folder_too(data_root, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints/best.pt").write_bytes(b"the only copy of something")
    before = everything(run_dir)
    proc = run_cli(
        "cnntrain",
        "data=mnist",
        f"data.root={data_root}",
        *TRAIN,
        "resume=auto",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        check=False,
    )
    assert_refused(
        proc, str(run_dir), "checkpoints/best.pt", "no checkpoints/last.pt to resume from"
    )
    assert everything(run_dir) == before


@pytest.mark.e2e
def test_refused_reruns_leave_every_file_of_the_run_untouched(finished_run, data_root, tmp_path):
    """.hydra/*.yaml and train.log included: Hydra writes nothing before the folder is claimed."""
    before = everything(finished_run)
    attempts = [
        (
            "cnntrain",
            "data=mnist",
            f"data.root={data_root}",
            *TRAIN,
            f"hydra.run.dir={finished_run}",
            "seed=3",
        ),
        (
            "cnntrain",
            "data=mnist",
            f"data.root={data_root}",
            *TRAIN,
            f"hydra.run.dir={finished_run}",
            "resume=auto",
            "model=resnet20",
        ),
        (
            "cnntrain",
            "data=mnist",
            f"data.root={data_root}",
            *TRAIN,
            f"hydra.run.dir={finished_run}",
            "resume=auto",
            "epochs=3",
        ),
        ("cnneval", f"ckpt={finished_run}/checkpoints/best.pt", f"hydra.run.dir={finished_run}"),
        (
            "cnnpredict",
            f"ckpt={finished_run}/checkpoints/best.pt",
            f"inputs={finished_run}/curves.png",
            f"hydra.run.dir={finished_run}",
        ),
    ]
    log = Path("train.log")
    for args in attempts:
        log_before = (finished_run / log).read_bytes()
        proc = run_cli(*args, cwd=tmp_path, check=False)
        assert_refused(proc)
        after = everything(finished_run)
        log_after = after.pop(log)[0]
        assert after == {k: v for k, v in before.items() if k != log}, args
        # a refused resume of the run itself may add its error to the run's own log, nothing else
        assert (
            log_after == log_before or "resume=auto" in args and log_after.startswith(log_before)
        ), args


@pytest.mark.e2e
def test_resume_auto_of_a_finished_run_keeps_its_results(finished_run, data_root, tmp_path):
    before = everything(finished_run)
    proc = run_cli(
        "cnntrain",
        "data=mnist",
        f"data.root={data_root}",
        *TRAIN,
        f"hydra.run.dir={finished_run}",
        "resume=auto",
        cwd=tmp_path,
    )
    assert "has finished already" in proc.stdout
    after = everything(finished_run)
    assert {k: v for k, v in after.items() if k.name != "train.log"} == {
        k: v for k, v in before.items() if k.name != "train.log"
    }


def _mount_tmpfs(path: Path, size: str, *options) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
        capture_output=True,
    )
    return proc.returncode == 0


@pytest.fixture
def tiny_disk(tmp_path):
    """A real file system of 2 MB (tmpfs), where the test can fill the disk for real."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _fill(disk: Path) -> None:
    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


@pytest.mark.e2e  # mounts a tmpfs
def test_full_disk_while_curves_png_is_written(tiny_disk):
    from cnntrain.errors import UserError
    from cnntrain.tracking import RunTracker

    tracker = RunTracker(tiny_disk, epochs=3)
    tracker.log_epoch(
        {
            "epoch": 1,
            "train_loss": 1.0,
            "train_acc": 0.5,
            "val_loss": 1.0,
            "val_acc": 0.5,
            "lr": 0.1,
            "time": 1.0,
            "img_per_s": 1.0,
        }
    )
    old = (tiny_disk / "curves.png").read_bytes()
    _fill(tiny_disk)
    tracker.history.append(
        {
            "epoch": 2,
            "train_loss": 0.5,
            "train_acc": 0.7,
            "val_loss": 0.6,
            "val_acc": 0.6,
            "lr": 0.05,
            "time": 1.0,
            "img_per_s": 1.0,
        }
    )
    with pytest.raises(
        UserError, match=f"cannot write {tiny_disk / 'curves.png'}: disk full"
    ) as info:
        tracker._plot()
    assert "\n" not in str(info.value)
    assert (tiny_disk / "curves.png").read_bytes() == old
    assert not list(tiny_disk.glob(".*.tmp"))
    tracker.close()


@pytest.mark.e2e  # mounts a tmpfs
def test_full_disk_during_a_run_is_one_line(tiny_disk, data_root, tmp_path):
    _fill(tiny_disk)
    os.unlink(tiny_disk / "filler")  # free, then a run far larger than 2 MB (its checkpoints)
    proc = run_cli(
        "cnntrain",
        "data=mnist",
        f"data.root={data_root}",
        *TRAIN,
        "model=resnet20",
        "max_steps_per_epoch=1",
        "max_eval_steps=1",
        f"hydra.run.dir={tiny_disk / 'run'}",
        cwd=tmp_path,
        check=False,
    )
    assert_refused(proc, "disk full")
    assert not list(tiny_disk.rglob(".*.tmp"))


# ------------------------------------------------------------------------- bad values, one line
BAD_VALUES = [
    ("grad_clip=-1", "grad_clip=-1.0 is not allowed: it must be > 0"),
    ("sched.warmup_epochs=-1", "sched.warmup_epochs=-1.0 is not allowed"),
    ("amp=maybe", "amp=maybe is not allowed: it must be true or false"),
    ("amp=1", "amp=1 is not allowed: it must be true or false"),
    ("deterministic=perhaps", "deterministic=perhaps is not allowed: it must be true or false"),
    ("seed=-1", "seed=-1 is not allowed: it must be >= 0"),
    ("label_smoothing=2", "label_smoothing=2.0 is not allowed: it must be >= 0, < 1"),
    ("optim.momentum=-1", "optim.momentum=-1.0 is not allowed"),
    ("epochs=2.0", "epochs=2.0 is not allowed: it must be an integer"),
    # a list key: OmegaConf's message has no value, the override has it
    ("data.mean=3", "data.mean=3 is not allowed: it must be null or a list of numbers"),
    ("aug.order=3", "aug.order=3 is not allowed: it must be null or a list of strings"),
    ("data.batch_size=64.0", "data.batch_size=64.0 is not allowed: it must be an integer"),
    ("device=cuda:abc", "device=cuda:abc is not allowed"),
    ("optim.lr=${nope}", "optim.lr: Interpolation key 'nope' not found"),
    ("optim.lr=nan", "optim.lr=nan is not allowed: it must be a finite number"),
    ("optim.lr=inf", "optim.lr=inf is not allowed: it must be a finite number"),
    (
        "optim.learning_rate=0.1",
        "unknown key optim.learning_rate for optim=sgd; did you mean optim.lr?",
    ),
    (
        "+optim.learning_rate=0.1",
        "unknown key optim.learning_rate for optim=sgd; did you mean optim.lr?",
    ),
    ("optim=adam optim.momentum=0.9", "unknown key optim.momentum for optim=adam"),
    ("data.std=[0]", "data.std=[0.0] is not allowed: it must be > 0"),
    ("data.std=[0,0,0]", "data.std=[0.0, 0.0, 0.0] is not allowed: it must be > 0"),
    ("data.mean=[0.5,0.5]", "data.mean=[0.5, 0.5] is not allowed"),
    ("data.mean=[0.1,0.2,0.3]", "data.mean=[0.1, 0.2, 0.3] and data.std=[0.3538] must both be"),
    ("model=resnet81", "unknown model=resnet81; did you mean model=resnet18?"),
    ("optim.nesterov=true optim.momentum=0", "optim.nesterov=true needs optim.momentum > 0"),
    ("resume_allow_changes=[model.name]", "model.name can never change"),
    ("resume_allow_changes=[nonsense]", "nonsense is not a key of the config"),
    ("epochs=[", "cannot read the override 'epochs=['"),
    ("sched=onecycle sched.warmup_epochs=1 epochs=2", "sched=onecycle has its own warmup"),
    (
        "checkpoint.keep_top_k=two",
        "checkpoint.keep_top_k=two is not allowed: it must be an integer",
    ),
    (
        "model.pretrained=[a,b]",
        "model.pretrained=['a', 'b'] is not allowed: it must be null or a string",
    ),
    ("data.image_size=100000", "data.image_size=100000 is not allowed: it must be >= 1, <= 2048"),
]


@pytest.mark.parametrize("override, needle", BAD_VALUES)
def test_bad_values_are_one_line_naming_the_key(override, needle):
    assert needle in refusal(*override.split(" "))


@pytest.mark.parametrize(
    "override, needle",
    [
        case
        for case in BAD_VALUES
        if case[0]
        in (
            "amp=1",
            "epochs=2.0",
            "optim.lr=${nope}",
            "+optim.learning_rate=0.1",
            "model=resnet81",
            "epochs=[",
        )
    ],
)
@pytest.mark.e2e
def test_bad_values_through_the_cli_leave_nothing(data_root, tmp_path, override, needle):
    """Composition errors, schema errors and Hydra's own: one line on stderr, no folder."""
    proc = run_cli(
        "cnntrain",
        "data=mnist",
        f"data.root={data_root}",
        *TRAIN,
        override,
        cwd=tmp_path,
        check=False,
    )
    assert_refused(proc, needle)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, needle",
    [
        (("cnneval",), "ckpt is required"),
        (("cnnpredict", "ckpt=x.pt"), "inputs is required"),
        (("cnnviz", "ckpt=x.pt"), "inputs is required"),
        (
            ("cnneval", "ckpt=x.pt", "split=train"),
            "split=train is not allowed: it must be one of test, val",
        ),
        (("cnneval", "ckpt=x.pt", "tta=mirror"), "tta=mirror is not allowed"),
        (("cnnpredict", "ckpt=x.pt", "inputs=y.png", "topk=0"), "topk=0 is not allowed"),
        (("cnnviz", "ckpt=x.pt", "inputs=y.png", "max_images=-3"), "max_images=-3 is not allowed"),
    ],
)
@pytest.mark.e2e
def test_other_tools_bad_values(tmp_path, args, needle):
    proc = run_cli(*args, cwd=tmp_path, check=False)
    assert_refused(proc, needle)
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    "args",
    [
        (
            "cnntrain",
            "data=mnist",
            "data.root=/nonexistent",
            *TRAIN,
        ),  # fails after it claimed its folder
        ("cnntrain", "summary=true", "device=cpu"),
        ("cnntrain", "--cfg", "job"),
        ("cnntrain", "--help"),
        ("cnneval", "ckpt=missing.pt"),
        ("cnnpredict", "ckpt=missing.pt", "inputs=."),
        ("cnnviz", "ckpt=missing.pt", "inputs=."),
    ],
)
@pytest.mark.e2e
def test_starts_that_end_before_any_result_leave_no_folder(tmp_path, args):
    """A bad input found after the run claimed its default folder (a missing dataset or
    checkpoint) removes that folder again, with its .hydra/ and log: the error is on stderr."""
    proc = run_cli(*args, cwd=tmp_path, check=False)
    assert proc.returncode == (
        0 if "--help" in args or "--cfg" in args or "summary=true" in args else 1
    )
    assert list(tmp_path.iterdir()) == [], proc.stderr


def test_run_names():
    from omegaconf import OmegaConf

    from cnntrain.cli import run_name

    def name(**cfg):
        return run_name(OmegaConf.create(cfg))

    assert (
        name(model={"name": "resnet18"}, data={"name": "cifar10"}, name=None) == "resnet18_cifar10"
    )
    assert (
        name(model={"name": "resnet18"}, data={"name": "cifar10"}, name="my run/2 ") == "my-run-2"
    )
    assert (
        name(model={"name": "???"}, data={"name": "mnist"}) == "mnist"
    )  # model=timm without a name
    # cnneval, cnnpredict, cnnviz: the run of the checkpoint
    assert (
        name(ckpt="outputs/2026-11-22/10-00-00_lenet5_mnist-2/checkpoints/best.pt")
        == "lenet5_mnist-2"
    )
    assert (
        name(ckpt="multirun/2026-11-22/10-00-00/3_resnet20_cifar10/checkpoints/last.pt")
        == "resnet20_cifar10"
    )
    assert name(ckpt="multirun/2026-11-22/10-00-00") == "" and name(ckpt=["a.pt", "b.pt"]) == ""


@pytest.mark.e2e
def test_a_validation_split_that_leaves_no_training_image(data_root, tmp_path):
    proc = run_cli(
        "cnntrain",
        "data=mnist",
        f"data.root={data_root}",
        *TRAIN,
        "data.val_split=0.9999",
        cwd=tmp_path,
        check=False,
    )
    assert_refused(proc, "data.val_split=0.9999 holds out all")


@pytest.mark.e2e
def test_cnneval_batch_size_zero(finished_run, tmp_path):
    proc = run_cli(
        "cnneval",
        f"ckpt={finished_run}/checkpoints/best.pt",
        "data.batch_size=0",
        cwd=tmp_path,
        check=False,
    )
    assert_refused(proc, "data.batch_size=0 is not allowed: it must be >= 1")


@pytest.mark.e2e
def test_run_dir_that_is_a_file_or_read_only(data_root, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    proc = run_cli(
        "cnntrain",
        "data=mnist",
        f"data.root={data_root}",
        *TRAIN,
        f"hydra.run.dir={a_file}",
        cwd=tmp_path,
        check=False,
    )
    assert_refused(proc, str(a_file), "hydra.run.dir=")
    assert a_file.read_text() == "keep me"
    read_only = tmp_path / "ro"
    if not _mount_tmpfs(read_only, "1m", "ro"):
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        proc = run_cli(
            "cnntrain",
            "data=mnist",
            f"data.root={data_root}",
            *TRAIN,
            f"hydra.run.dir={read_only}/run",
            cwd=tmp_path,
            check=False,
        )
        assert_refused(proc, "Read-only file system", "hydra.run.dir=")
    finally:
        subprocess.run(["umount", "-l", str(read_only)], capture_output=True)


@pytest.mark.e2e
def test_ctrl_c_during_start_up(data_root, tmp_path):
    """A real SIGINT while the data is being loaded: exit 130, one line, no folder left."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import signal\n"
        "import cnntrain.data as data\n"
        "original = data.build_data\n"
        "def build_data(*args, **kwargs):\n"
        # to this thread, the main one, where a terminal's Ctrl-C lands: os.kill may hand it to
        # one of torch's threads, and Python raises it in the main thread only some bytecodes on
        "    signal.raise_signal(signal.SIGINT)\n"
        "    return original(*args, **kwargs)\n"
        "data.build_data = build_data\n"
        "import cnntrain.train\n"
        "cnntrain.train.build_data = build_data\n"
    )
    proc = _popen(
        ["cnntrain", "data=mnist", f"data.root={data_root}", *TRAIN],
        tmp_path,
        env={"PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
    )
    code, out, err = _wait([proc])[0]
    assert code == 130, (out, err)
    assert "Traceback" not in out + err and err.strip().startswith("error: interrupted"), err
    assert not list((tmp_path / "outputs").rglob("*.pt"))


# ------------------------------------------------------------------------- non-finite numbers
@pytest.fixture
def nan_checkpoint(finished_run, tmp_path):
    state = torch.load(finished_run / "checkpoints/last.pt", weights_only=True)
    name = next(iter(state["model"]))
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    return tmp_path / "nan.pt", name


@pytest.mark.e2e
def test_non_finite_weights_are_refused_by_every_tool(
    nan_checkpoint, finished_run, data_root, tmp_path
):
    path, name = nan_checkpoint
    for args in (
        ("cnneval", f"ckpt={path}"),
        ("cnnpredict", f"ckpt={path}", f"inputs={finished_run}/curves.png"),
        ("cnntrain", "data=mnist", f"data.root={data_root}", *TRAIN, "epochs=2", f"resume={path}"),
        ("cnntrain", "data=mnist", f"data.root={data_root}", *TRAIN, f"model.pretrained={path}"),
    ):
        proc = run_cli(*args, cwd=tmp_path, check=False)
        assert_refused(proc, "non-finite weights", name)


# ------------------------------------------------------------------------- sweeps
@pytest.mark.parametrize(
    "launcher",
    [[], ["launcher=joblib"], ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]],
)
@pytest.mark.e2e
def test_sweep_exit_code_counts_failed_jobs(data_root, tmp_path, launcher):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "cnntrain",
        "-m",
        "data=mnist",
        f"data.root={data_root}",
        *TRAIN,
        "max_steps_per_epoch=1",
        "max_eval_steps=1",
        "optim.lr=0.05,-1",
        *launcher,
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "1 job(s) failed" in proc.stderr and "optim.lr=-1 is not allowed" in proc.stderr
    summary = (sweep / "summary.md").read_text()
    assert "| ok |" in summary and "| failed |" in summary


@pytest.mark.e2e
def test_an_interrupted_sweep_resumes_as_a_whole(data_root, tmp_path):
    """The second job is stopped by a real SIGTERM; the hint names the sweep folder, and
    following it keeps the first job's results and continues the second."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, signal\n"
        "if os.environ.get('STOP_SEED'):\n"
        "    from cnntrain.data.loaders import BatchLoader\n"
        "    original = BatchLoader.iter_from\n"
        "    def iter_from(self, start):\n"
        "        for i, batch in enumerate(original(self, start)):\n"
        "            if self.shuffle and self.seed == int(os.environ['STOP_SEED']) and i == 2:\n"
        "                os.kill(os.getpid(), signal.SIGTERM)\n"
        "            yield batch\n"
        "    BatchLoader.iter_from = iter_from\n"
    )
    sweep = tmp_path / "sweep"
    args = [
        "cnntrain",
        "-m",
        "data=mnist",
        f"data.root={data_root}",
        *TRAIN,
        "epochs=2",
        "seed=1,2",
    ]
    env = {"PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "STOP_SEED": "2"}
    code, out, err = _wait([_popen([*args, f"hydra.sweep.dir={sweep}"], tmp_path, env)])[0]
    assert code == 143, err
    assert f"resume=auto hydra.sweep.dir={sweep}" in err, err
    first = everything(sweep / "0_lenet5_mnist")
    assert (sweep / "0_lenet5_mnist/results.json").is_file() and not (
        sweep / "1_lenet5_mnist/results.json"
    ).exists()
    code, out, err = _wait(
        [_popen([*args, f"hydra.sweep.dir={sweep}", "resume=auto"], tmp_path, {"STOP_SEED": ""})]
    )[0]
    assert code == 0, err
    assert {
        k: v for k, v in everything(sweep / "0_lenet5_mnist").items() if k.suffix != ".log"
    } == {k: v for k, v in first.items() if k.suffix != ".log"}
    assert "resuming from" in (sweep / "1_lenet5_mnist/train.log").read_text()
    assert (sweep / "1_lenet5_mnist/results.json").is_file()
    assert (sweep / "summary.md").read_text().count("| ok |") == 2
