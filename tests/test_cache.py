"""The decoded image cache (cnntrain/data/cache.py): image folder splits decoded once into a
uint8 array on disk and memory-mapped afterwards; rebuilt when the files change, never trusted
half-built, shared by processes that build it at once, and with the pixels of the eval preset."""

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from fakedata import export_folder, make_images, write_image_folder
from PIL import Image

from cnntrain.data import cache
from cnntrain.data.cache import folder_facts, load_split, measure_mean_std, scan_split
from cnntrain.data.folder import to_mode
from cnntrain.errors import UserError

CLASSES = ["cat", "dog", "fox"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def folder(tmp_path):
    """12 train images per class, PNG and JPEG, gray and colour, two sizes."""
    return write_image_folder(tmp_path / "imgs", CLASSES, {"train": 12}, size=20)


def load(root, cache_dir, split="train", **kw):
    kw = {"size": 16, "channels": 3, "workers": 0, **kw}
    return load_split(scan_split(str(root), split), cache_dir=str(cache_dir), **kw)


def entries(cache_dir):
    """The cache entry folders (and anything else that is not a lock or facts file)."""
    return sorted(
        p.name
        for p in Path(cache_dir).iterdir()
        if not p.name.endswith(".lock") and not p.name.startswith("facts-")
    )


def count_decodes(monkeypatch) -> list:
    calls = []
    real = cache.decode

    def counting(path, mode, size):
        calls.append(path)
        return real(path, mode, size)

    monkeypatch.setattr(cache, "decode", counting)
    return calls


def expected(path, size, mode="RGB") -> np.ndarray:
    """What torchvision's usual evaluation preset (ToImage, Resize, CenterCrop) makes of a file."""
    from torchvision.transforms import v2

    with Image.open(path) as img:
        return v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])(
            to_mode(img, mode)
        ).numpy()


# ---------------------------------------------------------------- reuse and rebuild


def test_second_load_reuses_the_entry_without_decoding(folder, tmp_path, monkeypatch, caplog):
    first = load(folder, tmp_path / "c")
    assert first.images.shape == (36, 3, 16, 16) and first.images.dtype == np.uint8
    assert isinstance(first.images, np.memmap)
    assert first.labels.tolist() == scan_split(str(folder), "train").labels
    monkeypatch.setattr(cache, "decode", lambda *a: pytest.fail("decoded again"))
    with caplog.at_level(logging.INFO, logger="cnntrain"):
        again = load(folder, tmp_path / "c")
    assert any(m.startswith("reusing decoded cache") and "36 images" in m for m in caplog.messages)
    assert again.path == first.path and again.files == first.files and again.classes == CLASSES
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.labels, first.labels)


def test_another_size_or_channel_count_is_another_entry(folder, tmp_path):
    a, b, c = (
        load(folder, tmp_path / "c", size=s, channels=ch) for s, ch in ((16, 3), (12, 3), (16, 1))
    )
    assert len({a.path, b.path, c.path}) == 3 and len(entries(tmp_path / "c")) == 3
    assert b.images.shape[1:] == (3, 12, 12) and c.images.shape[1:] == (1, 16, 16)


def _change(file: Path):
    Image.new("RGB", (20, 20), (250, 10, 10)).save(file)  # other content, other size and mtime


def _add(file: Path):
    Image.new("RGB", (20, 20), (10, 250, 10)).save(file.with_name("new.png"))


def _remove(file: Path):
    file.unlink()


@pytest.mark.parametrize("edit", [_change, _add, _remove])
def test_changed_added_or_removed_file_rebuilds(folder, tmp_path, monkeypatch, edit):
    before = load(folder, tmp_path / "c")
    file = sorted((folder / "train" / "dog").glob("*.png"))[0]
    edit(file)
    os.utime(file.parent)  # whatever the edit, the folder's own mtime does not matter
    calls = count_decodes(monkeypatch)
    after = load(folder, tmp_path / "c")
    split = scan_split(str(folder), "train")
    assert len(calls) == len(split.files) and after.path != before.path
    assert after.files == split.files
    for i in (0, len(split.files) - 1, *(i for i, f in enumerate(split.files) if "dog" in f)):
        np.testing.assert_array_equal(after.images[i], expected(split.files[i], 16))
    assert entries(tmp_path / "c") == [os.path.basename(after.path)]  # the stale entry pruned


def test_an_untrusted_entry_is_rebuilt(folder, tmp_path, monkeypatch):
    first = load(folder, tmp_path / "c")
    good = np.array(first.images)
    os.remove(os.path.join(first.path, "meta.json"))
    calls = count_decodes(monkeypatch)
    np.testing.assert_array_equal(load(folder, tmp_path / "c").images, good)
    assert len(calls) == 36
    with open(os.path.join(first.path, "images.npy"), "r+b") as f:  # arrays shorter than meta says
        f.truncate(os.path.getsize(f.name) // 2)
    np.testing.assert_array_equal(load(folder, tmp_path / "c").images, good)
    assert len(calls) == 72


# ---------------------------------------------------------------- killed and concurrent builds

SLOW_BUILD = """
    import logging, sys, time, hashlib
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    from cnntrain.data import cache
    real = cache.decode
    def slow(*args):  # a build long enough to be caught half-way
        time.sleep(float(sys.argv[3]))
        return real(*args)
    cache.decode = slow
    out = cache.load_split(cache.scan_split(sys.argv[1], "train"), size=16, channels=3,
                           cache_dir=sys.argv[2], workers=0)
    print("digest", hashlib.sha256(out.images.tobytes() + out.labels.tobytes()).hexdigest())
"""


def start_build(root, cache_dir, delay):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    args = [
        sys.executable,
        "-c",
        textwrap.dedent(SLOW_BUILD),
        str(root),
        str(cache_dir),
        str(delay),
    ]
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for(condition, timeout=60):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


@pytest.mark.e2e
def test_a_killed_build_leaves_nothing_trusted(folder, tmp_path, monkeypatch):
    cache_dir = tmp_path / "c"
    proc = start_build(folder, cache_dir, 0.05)  # 36 images: ~2 s of decoding
    try:
        wait_for(lambda: cache_dir.is_dir() and any(cache_dir.glob("tmp-*/images.npy")))
        time.sleep(0.3)  # some rows written
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert list(cache_dir.glob("tmp-*")) and not [
        e for e in entries(cache_dir) if not e.startswith("tmp-")
    ]
    calls = count_decodes(monkeypatch)
    rebuilt = load(folder, cache_dir)
    assert len(calls) == 36
    np.testing.assert_array_equal(rebuilt.images, load(folder, tmp_path / "fresh").images)
    assert entries(cache_dir) == [os.path.basename(rebuilt.path)]  # the dead build's folder removed


@pytest.mark.e2e
def test_two_processes_building_at_once_share_one_entry(folder, tmp_path):
    cache_dir = tmp_path / "c"
    procs = [start_build(folder, cache_dir, 0.02) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("decoded 36 images" in out for out in outs) == 1, outs
    assert sum("reusing decoded cache" in out for out in outs) == 1, outs
    digests = {line for out in outs for line in out.splitlines() if line.startswith("digest")}
    assert len(digests) == 1 and len(entries(cache_dir)) == 1
    mine = load(folder, cache_dir)
    import hashlib

    assert digests == {
        "digest " + hashlib.sha256(mine.images.tobytes() + mine.labels.tobytes()).hexdigest()
    }


# ---------------------------------------------------------------- pixels


def _rgb(path):
    Image.fromarray(make_images(1, 1, 37, 3, 0)[0][0]).resize((37, 23)).save(path)


def _gray(path):
    Image.fromarray(make_images(1, 1, 30, 1, 1)[0][0, :, :, 0]).resize((19, 30)).save(path)


def _sixteen_bit(path):
    ramp = (np.arange(25 * 31).reshape(25, 31) * 80).astype(np.uint16)
    Image.fromarray(ramp).save(path)  # I;16: PIL's own convert would clip it to white


def _transparent(path):
    rgba = np.concatenate([make_images(1, 1, 27, 3, 2)[0][0], np.full((27, 27, 1), 0, np.uint8)], 2)
    rgba[::2, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(path)  # half its rows see-through: shown on white


@pytest.mark.parametrize("write", [_rgb, _gray, _sixteen_bit, _transparent])
@pytest.mark.parametrize("channels", [3, 1])
def test_pixels_are_the_eval_presets(tmp_path, write, channels):
    for c in CLASSES[:2]:
        (tmp_path / "d" / "train" / c).mkdir(parents=True)
        write(tmp_path / "d" / "train" / c / "x.png")
    out = load(tmp_path / "d", tmp_path / "c", size=14, channels=channels)
    assert out.images.shape == (2, channels, 14, 14)
    for image, file in zip(out.images, out.files):
        np.testing.assert_array_equal(image, expected(file, 14, "L" if channels == 1 else "RGB"))


def test_two_workers_and_none_give_the_same_arrays(tmp_path):
    images, labels = make_images(300, 3, 24, 3, seed=5)
    export_folder(images, labels, CLASSES, tmp_path / "d", "train", fmt="jpg", size=30)
    a = load(tmp_path / "d", tmp_path / "c0", workers=0)
    b = load(tmp_path / "d", tmp_path / "c2", workers=2)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.files == b.files


# ---------------------------------------------------------------- unreadable images


def _break(folder):
    bad = sorted((folder / "train" / "dog").glob("*.png"))[1]
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    (folder / "train" / "fox" / "empty.jpg").write_bytes(b"")
    return [str(bad), str(folder / "train" / "fox" / "empty.jpg")]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_image_is_named_and_leaves_no_entry(folder, tmp_path, workers):
    bad = _break(folder)
    with pytest.raises(UserError) as e:
        load(folder, tmp_path / "c", workers=workers)
    message = str(e.value)
    assert "\n" not in message and "data.skip_bad_images=true" in message
    assert bad[0] in message and "cannot be read" in message
    assert entries(tmp_path / "c") == []  # neither an entry nor a temporary folder


def test_skipped_bad_images_are_recorded_and_reported_on_every_load(folder, tmp_path, caplog):
    bad = _break(folder)
    with caplog.at_level(logging.WARNING, logger="cnntrain"):
        first = load(folder, tmp_path / "c", skip_bad=True)
        again = load(folder, tmp_path / "c", skip_bad=True)
    warnings = [
        m
        for m in caplog.messages
        if m.startswith("skipped 2 unreadable image(s) of 37 (data.skip_bad_images=true)")
    ]
    assert len(warnings) == 2 and all(b in warnings[0] for b in bad)
    for out in (first, again):
        assert out.skipped == bad and len(out.files) == 35 and out.images.shape[0] == 35
        assert not set(bad) & set(out.files)
        assert len(out.labels) == 35
    keep = [i for i, f in enumerate(scan_split(str(folder), "train").files) if f not in bad]
    assert again.labels.tolist() == [scan_split(str(folder), "train").labels[i] for i in keep]
    np.testing.assert_array_equal(again.images[-1], expected(again.files[-1], 16))
    with pytest.raises(UserError, match="empty file|cannot be read") as e:  # still bad
        load(folder, tmp_path / "c")
    assert bad[0] in str(e.value)


# ---------------------------------------------------------------- folder rules


def test_hidden_files_and_folders_are_ignored(folder, tmp_path):
    train = folder / "train"
    (train / "cat" / ".DS_Store").write_bytes(b"junk")
    (train / "cat" / "._0000.jpg").write_bytes(b"junk")
    (train / ".ipynb_checkpoints").mkdir()
    (train / "dog" / ".thumbs").mkdir()
    Image.new("RGB", (8, 8)).save(train / "dog" / ".thumbs" / "x.png")
    out = load(folder, tmp_path / "c")
    assert out.classes == CLASSES and len(out.files) == 36 and not out.skipped


def test_an_empty_class_folder_is_named(folder):
    (folder / "train" / "emu").mkdir()
    with pytest.raises(UserError, match=r"class folder .*emu has no images"):
        scan_split(str(folder), "train")


def test_missing_split(folder):
    assert scan_split(str(folder), "val") is None
    with pytest.raises(UserError, match="val/<class>/<image>"):
        scan_split(str(folder), "val", required=True)
    (folder / "test").mkdir()
    with pytest.raises(UserError, match="no class folders"):
        scan_split(str(folder), "test")


def test_an_unwritable_cache_dir_is_one_line_naming_the_setting(folder, tmp_path):
    (tmp_path / "file").write_text("")  # a folder below a file cannot be made, even by root
    for call in (
        lambda d: load(folder, d),
        lambda d: folder_facts(scan_split(str(folder), "train"), d),
    ):
        with pytest.raises(UserError, match="data.cache_dir=") as e:
            call(str(tmp_path / "file" / "cache"))
        assert "\n" not in str(e.value)


@pytest.mark.e2e
def test_stale_temporary_folders_are_removed(folder, tmp_path):
    cache_dir = tmp_path / "c"
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    import socket

    host = socket.gethostname()
    mine = cache_dir / f"tmp-{os.getpid()}@{host}-abc"  # a live process's build: kept
    for name in (f"tmp-{dead.pid}@{host}-abc", "tmp-1@elsewhere-old", mine.name):
        (cache_dir / name).mkdir(parents=True)
    old = time.time() - 2 * cache.STALE_S
    os.utime(cache_dir / "tmp-1@elsewhere-old", (old, old))
    load(folder, cache_dir)
    assert [p.name for p in cache_dir.glob("tmp-*")] == [mine.name]


# ---------------------------------------------------------------- header facts


def test_facts_of_a_gray_folder(tmp_path, monkeypatch):
    images, labels = make_images(12, 3, 10, 1, seed=0)
    export_folder(images[..., 0], labels, CLASSES, tmp_path / "d", "train")
    gray_palette = Image.fromarray(images[0, ..., 0]).convert("P")  # P with a gray palette
    gray_palette.putpalette([v for i in range(256) for v in (i, i, i)])
    gray_palette.save(tmp_path / "d" / "train" / "cat" / "palette.png")
    wide = Image.fromarray(images[1, ..., 0].astype(np.uint16) * 257)  # 16-bit gray
    wide.save(tmp_path / "d" / "train" / "dog" / "wide.png")
    split = scan_split(str(tmp_path / "d"), "train")
    facts = folder_facts(split, str(tmp_path / "c"))
    assert facts.gray and facts.native_size() == 10
    assert facts.modes == {"L": 12, "P": 1, "I;16": 1} or facts.modes == {"L": 12, "P": 1, "I": 1}
    assert facts.sizes == {(10, 10): 14}
    # a second run opens no image: the facts come from the cache folder
    monkeypatch.setattr(cache, "_read_header", lambda path: pytest.fail("header read again"))
    assert folder_facts(split, str(tmp_path / "c")) == facts
    monkeypatch.undo()
    colour = Image.fromarray(make_images(1, 1, 10, 3, 0)[0][0]).convert("P")  # a colour palette
    colour.save(tmp_path / "d" / "train" / "fox" / "colour.png")
    assert not folder_facts(scan_split(str(tmp_path / "d"), "train"), str(tmp_path / "c")).gray


def test_facts_of_a_mixed_folder_and_its_mode_warning(folder, tmp_path, caplog):
    facts = folder_facts(scan_split(str(folder), "train"), str(tmp_path / "c"))
    assert not facts.gray and facts.modes == {"RGB": 24, "L": 12}
    with caplog.at_level(logging.WARNING, logger="cnntrain"):
        facts.warn_mixed_modes()
    assert len(caplog.messages) == 1
    assert caplog.messages[0].startswith("train/ mixes image modes: RGB 24, L 12 (e.g. train/cat/")


@pytest.mark.parametrize(
    "sizes,native",
    [
        ({(40, 30): 5}, 30),  # one size: its short side
        ({(600, 500): 3}, 500),  # one size is kept, however large
        ({(40, 30): 3, (50, 64): 2}, 30),  # the median short side
        ({(40, 30): 2, (50, 64): 2}, 40),  # between two: their mean
        ({(300, 400): 3, (500, 900): 4}, 224),  # a median above 224 is capped
    ],
)
def test_native_size(sizes, native):
    assert cache.Facts(gray=False, sizes=sizes, modes={}).native_size() == native


# ---------------------------------------------------------------- mean/std


def test_mean_std_of_the_cached_array(folder, tmp_path):
    images = load(folder, tmp_path / "c").images
    x = np.asarray(images, dtype=np.float64) / 255
    mean, std = measure_mean_std(images)
    assert mean == [round(v, 4) for v in x.mean((0, 2, 3))]
    assert std == pytest.approx(x.std((0, 2, 3)), abs=1e-4)
    sub_mean, _ = measure_mean_std(images, max_images=10)  # every 3rd image
    assert sub_mean == [round(v, 4) for v in x[::3].mean((0, 2, 3))]
    with pytest.raises(UserError, match="data.mean"):
        measure_mean_std(images[:0])


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CNNTRAIN_CACHE", str(tmp_path / "mine"))
    assert cache.default_cache_dir() == str(tmp_path / "mine")
    monkeypatch.delenv("CNNTRAIN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.default_cache_dir() == str(tmp_path / "xdg" / "cnntrain")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache.default_cache_dir() == os.path.expanduser("~/.cache/cnntrain")


def test_a_failed_facts_write_names_the_cache_setting(folder, tmp_path, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache.json, "dump", full)
    with pytest.raises(
        UserError, match=r"disk full; free space or choose another data.cache_dir="
    ) as e:
        folder_facts(scan_split(str(folder), "train"), str(tmp_path / "c"))
    assert "\n" not in str(e.value) and not [
        p for p in (tmp_path / "c").iterdir() if p.suffix == ".tmp"
    ]
