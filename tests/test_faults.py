"""Faults injected for real: litter and broken files in image folders, malicious and broken
checkpoints, a writer killed mid-save, a full or read-only disk. Each ends in one UserError (the
CLI's one `error: ...` line, exit code 1) naming the file and the fix, and leaves earlier
checkpoints intact."""

import errno
import logging
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import refusal, run_cli
from fakedata import write_image_folder
from omegaconf import OmegaConf
from test_errors import assert_one_line_error

from cnntrain.checkpoint import load_checkpoint, save_checkpoint
from cnntrain.data import build_data, data_shape
from cnntrain.errors import UserError
from cnntrain.files import STALE_TEMP_S

CPU = torch.device("cpu")
CLASSES = ["cat", "dog", "fox"]


# ---------------------------------------------------------------- image folders


@pytest.fixture()
def images(tmp_path):
    """6 train and 3 test images per class, PNG and JPEG."""
    return write_image_folder(tmp_path / "imgs", CLASSES, {"train": 6, "test": 3}, size=32)


def folder_cfg(root, **kw):
    base = dict(
        name="imagefolder",
        root=str(root),
        download=False,
        batch_size=64,
        num_workers=0,
        val_split=0.0,
        image_size=32,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        skip_bad_images=False,
    )
    return OmegaConf.create({**base, **kw})


def truncated(folder, suffix):
    """The first half of a good image of that format from the same split."""
    data = sorted(folder.parent.glob(f"*/*{suffix}"))[0].read_bytes()
    return data[: len(data) // 2]


# Each a file a real folder can hold: a download cut short, a file that is no image, a file
# created but never written.
CORRUPT = {
    "truncated.jpg": lambda folder: truncated(folder, ".jpg"),
    "truncated.png": lambda folder: truncated(folder, ".png"),
    "random.jpg": lambda folder: random.Random(0).randbytes(3000),
    "empty.png": lambda folder: b"",
}


def corrupt(folder, name):
    path = folder / name
    path.write_bytes(CORRUPT[name](folder))
    return path


def count(loader):
    return sum(len(y) for _, y in loader)


def test_hidden_folders_and_files_are_not_classes_or_images(images):
    good = next(iter((images / "train" / "cat").glob("*.png")))
    for split in ("train", "test"):  # a notebook's autosave folder next to the class folders
        (images / split / ".ipynb_checkpoints").mkdir()
    shutil.copy(good, images / "train" / ".ipynb_checkpoints" / "x.png")
    cat = images / "train" / "cat"
    (cat / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (cat / "._0000.jpg").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS resource fork: no JPEG
    (cat / ".thumbs").mkdir()
    shutil.copy(good, cat / ".thumbs" / "small.png")

    data = build_data(folder_cfg(images), None, device=CPU, seed=0)
    assert data.classes == CLASSES and data_shape(folder_cfg(images))[2] == 3
    assert data.loaders["train"].num_samples == 18 and data.loaders["test"].num_samples == 9
    names = [data.loaders["train"].sample_name(i) for i in range(18)]
    assert not [n for n in names if "/." in n]
    assert count(data.loaders["train"]) == 18  # nothing hidden was read as an image


def test_empty_class_folders_are_named(images):
    (images / "train" / "wolf").mkdir()
    (images / "train" / "zebra").mkdir()
    (images / "train" / "zebra" / ".DS_Store").write_bytes(b"junk")  # hidden: still empty
    with pytest.raises(UserError) as info:
        build_data(folder_cfg(images), None, device=CPU, seed=0)
    msg = str(info.value)
    assert "\n" not in msg and "add images or remove the folder" in msg
    assert str(images / "train" / "wolf") in msg and str(images / "train" / "zebra") in msg


@pytest.mark.parametrize("name", CORRUPT)
@pytest.mark.parametrize("measured", [False, True], ids=["loading", "measuring-mean-std"])
def test_corrupt_image_stops_naming_the_file(images, name, measured):
    path = corrupt(images / "train" / "cat", name)
    cfg = folder_cfg(images, **({"mean": None, "std": None} if measured else {}))
    with pytest.raises(UserError) as info:
        count(build_data(cfg, None, device=CPU, seed=0).loaders["train"])
    msg = str(info.value)
    assert "\n" not in msg and f"image {path} cannot be read (" in msg
    assert "remove or replace it, or set data.skip_bad_images=true" in msg


def test_skip_bad_images_must_be_a_bool(images):
    assert refusal(
        "data=imagefolder", f"data.root={images}", "data.skip_bad_images=yes"
    ).startswith("data.skip_bad_images=yes is not allowed: it must be true or false")


def test_corrupt_image_in_a_decoding_process_is_still_one_line(images):
    path = corrupt(images / "test" / "dog", "truncated.jpg")
    with pytest.raises(UserError) as info:  # the cache build stops, before any training
        build_data(folder_cfg(images, num_workers=2), None, device=CPU, seed=0, splits=("test",))
    msg = str(info.value)
    assert (
        msg.startswith(f"image {path} cannot be read (image file is truncated") and "\n" not in msg
    )


def test_skip_bad_images_leaves_them_out_of_the_cache_and_says_so_every_run(images, caplog):
    from PIL import ImageFile

    bad = sorted(corrupt(images / "train" / "fox", name) for name in CORRUPT)
    bad_test = corrupt(images / "test" / "cat", "random.jpg")
    cfg = folder_cfg(images, num_workers=2, skip_bad_images=True, mean=None, std=None)
    caplog.set_level(logging.WARNING, logger="cnntrain")
    for _run in (1, 2):  # the build, then a run that reuses the cache
        caplog.clear()
        data = build_data(cfg, None, device=CPU, seed=0)
        warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
        assert len(warnings) == 2, warnings
        assert warnings[0].startswith("skipped 4 unreadable image(s) of 22")
        assert all(str(p) in warnings[0] for p in bad) and str(bad_test) in warnings[1]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # truncated files must fail, not half-decode
    train, test = data.loaders["train"], data.loaders["test"]
    for epoch in (1, 2):
        train.set_epoch(epoch)
        assert count(train) == 18  # what is left of the 22 files
    # an unshuffled pass: the i-th prediction still belongs to sample_name(i) and sample(i)
    assert count(test) == 9
    names = [test.sample_name(i) for i in range(9)]
    assert str(bad_test) not in names and len(set(names)) == 9
    assert test.sample(8).shape[-1] == 3
    # the same cache without the flag: the images are still bad, and still named
    with pytest.raises(UserError, match="cannot be read"):
        build_data(
            folder_cfg(images, skip_bad_images=False, mean=None, std=None), None, device=CPU, seed=0
        )


def test_skipped_images_leave_no_gap_in_the_batches(images):
    for name in ("empty.png", "random.jpg"):  # test/cat sorts these before its good images
        corrupt(images / "test" / "cat", name).rename(images / "test" / "cat" / f"-{name}")
    loader = build_data(
        folder_cfg(images, batch_size=2, skip_bad_images=True),
        None,
        device=CPU,
        seed=0,
        splits=("test",),
    ).loaders["test"]
    assert len(loader) == 5 and [len(y) for _, y in loader] == [2, 2, 2, 2, 1]


def write_bad_folder(root):
    """A folder with one corrupt training and one corrupt test image."""
    write_image_folder(root, CLASSES, {"train": 6, "test": 3}, size=32)
    return corrupt(root / "train" / "dog", "truncated.jpg"), corrupt(
        root / "test" / "fox", "random.jpg"
    )


def train_folder_args(root, run_dir, *extra):
    return [
        "cnntrain",
        "data=imagefolder",
        f"data.root={root}",
        "data.image_size=32",
        "data.batch_size=8",
        "data.num_workers=2",
        "epochs=1",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


@pytest.mark.e2e
def test_cli_corrupt_image_ends_in_one_line(tmp_path):
    bad_train, _ = write_bad_folder(tmp_path / "imgs")
    proc = run_cli(
        *train_folder_args(tmp_path / "imgs", tmp_path / "run"), cwd=tmp_path, check=False
    )
    assert_one_line_error(
        proc, f"error: image {bad_train} cannot be read", "data.skip_bad_images=true"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture(scope="module")
def skipping_run(tmp_path_factory):
    """An imagefolder run over corrupt images with data.skip_bad_images=true."""
    tmp = tmp_path_factory.mktemp("skipping")
    bad = write_bad_folder(tmp / "imgs")
    proc = run_cli(
        *train_folder_args(tmp / "imgs", tmp / "run", "data.skip_bad_images=true"), cwd=tmp
    )
    return tmp, proc, bad


@pytest.mark.e2e  # its fixture runs the console scripts
def test_cli_skip_bad_images_trains_and_logs_the_files(skipping_run):
    tmp, proc, (bad_train, bad_test) = skipping_run
    log = (tmp / "run" / "train.log").read_text()
    assert str(bad_test) in log and "skipped 1 unreadable image(s) of 10" in log
    assert "error" not in (proc.stdout + proc.stderr).lower()
    assert '"test_images": 9' in (tmp / "run" / "results.json").read_text()


@pytest.mark.e2e
def test_cnneval_imagefolder_with_other_class_folders_shows_both_lists(skipping_run):
    tmp, _, _ = skipping_run
    other = tmp / "other"
    shutil.copytree(tmp / "imgs" / "test", other / "test")
    (other / "test" / "fox").rename(other / "test" / "wolf")
    (other / "test" / ".ipynb_checkpoints").mkdir()  # not a class: not in the found list
    proc = run_cli(
        "cnneval",
        f"ckpt={tmp / 'run/checkpoints/best.pt'}",
        f"data.root={other}",
        f"hydra.run.dir={tmp / 'ev'}",
        cwd=tmp,
        check=False,
    )
    assert_one_line_error(
        proc, "classes differ", "['cat', 'dog', 'fox'] (3)", "['cat', 'dog', 'wolf'] (3)"
    )


@pytest.mark.e2e  # its fixture runs the console scripts
def test_cnneval_takes_the_class_order_from_the_checkpoint(skipping_run, tmp_path):
    """Folders are listed sorted; a checkpoint whose classes are in another order is refused,
    never relabelled by the folder order."""
    from hydra import compose, initialize_config_module

    from cnntrain.evaluate import evaluate

    tmp, _, _ = skipping_run
    ckpt = torch.load(tmp / "run/checkpoints/best.pt", weights_only=True)
    ckpt["classes"] = ["dog", "cat", "fox"]
    torch.save(ckpt, tmp_path / "reordered.pt")
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        cfg = compose(
            config_name="eval", overrides=[f"ckpt={tmp_path / 'reordered.pt'}", "device=cpu"]
        )
    with pytest.raises(
        UserError,
        match=re.escape("checkpoint ['dog', 'cat', 'fox'] (3), data ['cat', 'dog', 'fox']"),
    ):
        evaluate(cfg, run_dir=tmp_path / "ev")


# ---------------------------------------------------------------- checkpoints: loading


class TouchViaSystem:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # what unpickling would run
        return os.system, (f"touch {self.marker}",)


class TouchViaPath(TouchViaSystem):
    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def malicious(path, payload, marker, nested):
    """A checkpoint whose unpickling would create `marker`, bare or inside a cnntrain-like dict."""
    obj = payload(marker)
    torch.save(
        {"model": {}, "config": obj, "classes": [], "epoch": 1, "metrics": {}} if nested else obj,
        path,
    )
    return path


@pytest.mark.parametrize("nested", [False, True], ids=["bare", "in-a-checkpoint-dict"])
@pytest.mark.parametrize("payload", [TouchViaSystem, TouchViaPath])
def test_malicious_pickle_is_refused_without_running(tmp_path, payload, nested):
    proof = malicious(tmp_path / "proof.pt", payload, tmp_path / "proof", nested)
    torch.load(proof, weights_only=False)  # loaded unsafely, the payload does run
    assert (tmp_path / "proof").exists()
    from cnntrain.models.transfer import load_state_dict_file

    path = malicious(tmp_path / "evil.pt", payload, tmp_path / "marker", nested)
    with pytest.raises(
        UserError, match=f"checkpoint {re.escape(str(path))} holds Python objects .* refused"
    ):
        load_checkpoint(path)
    with pytest.raises(
        UserError, match="not a weights-only state_dict"
    ):  # model.pretrained=evil.pt
        load_state_dict_file(str(path))
    assert not (tmp_path / "marker").exists()


@pytest.mark.e2e
def test_cli_refuses_malicious_checkpoint(tmp_path):
    path = malicious(tmp_path / "evil.pt", TouchViaSystem, tmp_path / "marker", nested=False)
    proc = run_cli(
        "cnneval", f"ckpt={path}", f"hydra.run.dir={tmp_path / 'ev'}", cwd=tmp_path, check=False
    )
    assert_one_line_error(
        proc, f"error: checkpoint {path} holds Python objects (posix.system)", "refused"
    )
    assert proc.returncode == 1 and not (tmp_path / "marker").exists()


def test_whole_pickled_model_is_refused_naming_its_class(tmp_path):
    from cnntrain.models import create_model

    torch.save(
        create_model("lenet5", in_channels=1, num_classes=10, image_size=28), tmp_path / "model.pt"
    )
    with pytest.raises(
        UserError, match=r"model.pt holds Python objects \(cnntrain\.models\.lenet\.\w+\)"
    ):
        load_checkpoint(tmp_path / "model.pt")


def test_empty_checkpoint_file(tmp_path):
    (
        tmp_path / "empty.pt"
    ).touch()  # a save that died before writing a byte, outside our temp scheme
    with pytest.raises(UserError, match=r"empty.pt is empty \(0 bytes\); use another checkpoint"):
        load_checkpoint(tmp_path / "empty.pt")


def is_root():
    return hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.mark.skipif(is_root(), reason="root reads files whatever their permissions")
def test_unreadable_checkpoint_says_so(tmp_path):
    save_checkpoint(core(), tmp_path / "c.pt")
    (tmp_path / "c.pt").chmod(0)
    with pytest.raises(UserError, match="c.pt cannot be read: Permission denied"):
        load_checkpoint(tmp_path / "c.pt")


def test_unreadable_checkpoint_says_so_simulated(tmp_path, monkeypatch):
    """The same through a patched torch.load, so that it also runs as root."""
    save_checkpoint(core(), tmp_path / "c.pt")

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(UserError, match="c.pt cannot be read: Permission denied"):
        load_checkpoint(tmp_path / "c.pt")


# ---------------------------------------------------------------- checkpoints: saving


def core(epoch=0, size=3):
    return {
        "model": {"w": torch.full((size,), float(epoch))},
        "config": {},
        "classes": ["a", "b"],
        "epoch": epoch,
        "metrics": {},
    }


TEMP = re.compile(r"\.last\.pt\.[a-z0-9_]{8}\.tmp")

# Saves ever newer 32 MB checkpoints to argv[1] until killed; a save takes tens of milliseconds.
SAVER = textwrap.dedent("""
    import sys, torch
    from cnntrain.checkpoint import save_checkpoint
    epoch = int(sys.argv[2])
    while True:
        epoch += 1
        save_checkpoint({"model": {"w": torch.full((8_000_000,), float(epoch))}, "config": {},
                         "classes": ["a", "b"], "epoch": epoch, "metrics": {}}, sys.argv[1])
""")


def kill_mid_write(path, epoch, save, fraction, full_size, timeout=60):
    """Start SAVER and SIGKILL it once the temp file of its `save`-th save holds `fraction` of a
    checkpoint. Returns whether the kill landed mid-write."""
    before = set(os.listdir(path.parent))
    seen = []  # the saver's temp files, in order
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path), str(epoch)])
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            seen += sorted(
                n for n in set(os.listdir(path.parent)) - before - set(seen) if TEMP.fullmatch(n)
            )
            if len(seen) >= save:
                try:
                    if os.path.getsize(path.parent / seen[save - 1]) >= fraction * full_size:
                        proc.send_signal(signal.SIGKILL)
                        proc.wait()
                        return seen[save - 1] in os.listdir(path.parent)
                except FileNotFoundError:  # that save completed between two looks: try the next
                    save += 1
            time.sleep(0.002)
        pytest.fail("the saver never wrote a temp file")
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.e2e
def test_kill_9_during_save_keeps_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(core(0, 8_000_000), path)
    full_size = path.stat().st_size
    rng, epoch, mid_write = random.Random(0), 0, 0
    for _ in range(3):
        mid_write += kill_mid_write(
            path, epoch, rng.randint(1, 3), rng.uniform(0.05, 0.9), full_size
        )
        state = load_checkpoint(path)  # the last complete save, never a partial one
        w = state["model"]["w"]
        assert state["epoch"] >= epoch and w.numel() == 8_000_000
        assert w.min().item() == w.max().item() == state["epoch"]
        epoch = state["epoch"]
        assert all(name == "last.pt" or TEMP.fullmatch(name) for name in os.listdir(tmp_path))
    leftovers = [name for name in os.listdir(tmp_path) if TEMP.fullmatch(name)]
    assert mid_write >= 1 and 1 <= len(leftovers) <= mid_write  # killed writers leave their temps
    # the next save removes them once they are stale, and only them: not a temp as recent as a
    # live writer's, nor anything outside our own name pattern
    old = time.time() - STALE_TEMP_S - 10
    for name in leftovers:
        os.utime(tmp_path / name, (old, old))
    keep = [".last.pt.notours.tmp", ".best.pt.abcdefgh.tmp", "last.pt.abcdefgh.tmp", "notes.txt"]
    for name in keep:
        (tmp_path / name).touch()
        os.utime(tmp_path / name, (old, old))
    keep.append(".last.pt.recent_0.tmp")
    (tmp_path / keep[-1]).touch()
    save_checkpoint(core(epoch + 1), path)
    assert sorted(os.listdir(tmp_path)) == sorted(["last.pt", *keep])
    assert load_checkpoint(path)["epoch"] == epoch + 1


class NoSpaceOnFsync:
    """ENOSPC where network and quota-limited file systems report it: at fsync."""

    def __call__(self, monkeypatch):
        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", full)


class NoSpaceFromTheKernel:
    """A real ENOSPC: the temp file's bytes go to /dev/full."""

    def __call__(self, monkeypatch):
        if not os.path.exists("/dev/full"):
            pytest.skip("no /dev/full")
        real_fdopen = os.fdopen

        def to_dev_full(fd, *args, **kwargs):
            os.close(fd)
            return real_fdopen(os.open("/dev/full", os.O_WRONLY), *args, **kwargs)

        monkeypatch.setattr(os, "fdopen", to_dev_full)


@pytest.mark.parametrize(
    "disk_full", [NoSpaceOnFsync(), NoSpaceFromTheKernel()], ids=["fsync", "write"]
)
def test_disk_full_keeps_the_old_checkpoint_and_says_so(tmp_path, monkeypatch, disk_full):
    path = tmp_path / "ckpts" / "last.pt"
    save_checkpoint(core(1), path)
    disk_full(monkeypatch)
    with pytest.raises(UserError) as info:
        save_checkpoint(core(2, 100_000), path)
    assert str(info.value) == (
        f"cannot write checkpoint {path}: disk full; free space or choose another hydra.run.dir="
    )
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(path.parent) == ["last.pt"]


@pytest.mark.e2e
def test_disk_full_during_training_is_one_line(tmp_path, data_root, monkeypatch):
    """The CLI, its checkpoint fsync failing with ENOSPC (injected by a sitecustomize module)."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        textwrap.dedent("""
        import errno, os
        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync = fsync
    """)
    )
    monkeypatch.setenv("PYTHONPATH", str(inject))
    run = tmp_path / "run"
    proc = run_cli(
        "cnntrain",
        "data=mnist",
        f"data.root={data_root}",
        "data.download=false",
        "epochs=1",
        "max_steps_per_epoch=2",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        check=False,
    )
    # whichever file is written first (.hydra/config.yaml, since it is written atomically too)
    assert_one_line_error(
        proc,
        f"error: cannot write {run}{os.sep}",
        ": disk full; free space or choose another hydra.run.dir=",
    )
    assert proc.returncode == 1 and not list(run.rglob("*.pt")) and not list(run.rglob(".*.tmp"))


@pytest.mark.skipif(is_root(), reason="root writes into read-only folders")
def test_read_only_checkpoint_folder(tmp_path):
    save_checkpoint(core(1), tmp_path / "ckpts" / "last.pt")
    (tmp_path / "ckpts").chmod(0o500)
    try:
        with pytest.raises(
            UserError, match="last.pt: Permission denied; choose a writable hydra.run.dir="
        ):
            save_checkpoint(core(2), tmp_path / "ckpts" / "last.pt")
    finally:
        (tmp_path / "ckpts").chmod(0o700)
    assert load_checkpoint(tmp_path / "ckpts" / "last.pt")["epoch"] == 1


def test_read_only_checkpoint_folder_simulated(tmp_path, monkeypatch):
    """The same through a patched mkstemp, so that it also runs as root."""
    import tempfile

    save_checkpoint(core(1), tmp_path / "last.pt")

    def denied(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(UserError) as info:
        save_checkpoint(core(2), tmp_path / "last.pt")
    assert str(info.value) == (
        f"cannot write checkpoint {tmp_path / 'last.pt'}: Permission denied; "
        "choose a writable hydra.run.dir="
    )
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
