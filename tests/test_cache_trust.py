"""The decoded image cache trusts an entry only for what it can prove: a key a user cannot set
back (ctime, inode), a digest of each array checked on open, labels and files checked against
the scan. Whatever fails is decoded again with one warning naming the entry, never reused."""

import json
import logging
import os

import numpy as np
import pytest
from fakedata import write_image_folder
from PIL import Image
from test_cache import CLASSES, count_decodes, entries, expected, load

from cnntrain.data import cache
from cnntrain.data.cache import scan_split


@pytest.fixture()
def folder(tmp_path):
    """4 train images per class, PNG and JPEG, gray and colour, two sizes."""
    return write_image_folder(tmp_path / "imgs", CLASSES, {"train": 4}, size=20)


def untrusted(caplog, entry) -> list[str]:
    return [m for m in caplog.messages if m.startswith(f"decoded cache {entry} is not trusted")]


def rebuilt_once(folder, cache_dir, entry, monkeypatch, caplog, why: str, **kw):
    """Load again: every file decoded anew, one warning naming the entry and `why`."""
    calls = count_decodes(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="cnntrain"):
        out = load(folder, cache_dir, **kw)
    split = scan_split(str(folder), "train")
    [warning] = untrusted(caplog, entry)
    assert why in warning and warning.endswith("; decoding it again") and "\n" not in warning
    assert len(calls) == len(split.files) and out.path == entry
    assert out.labels.tolist() == [split.labels[split.files.index(f)] for f in out.files]
    for i, f in enumerate(out.files):
        np.testing.assert_array_equal(out.images[i], expected(f, 16))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cnntrain"):
        load(folder, cache_dir, **kw)  # the rebuilt entry is trusted again
    assert not untrusted(caplog, entry) and len(calls) == len(split.files)
    return out


def rewrite_meta(entry, edit) -> None:
    path = os.path.join(entry, "meta.json")
    with open(path) as f:
        meta = json.load(f)
    edit(meta)
    with open(path, "w") as f:
        json.dump(meta, f)


def redigest(entry) -> None:
    """Make meta.json's digests match the arrays again: a tampering the digest alone misses."""

    def edit(meta):
        for name in ("images.npy", "labels.npy"):
            meta["digests"][name] = cache.file_digest(os.path.join(entry, name))

    rewrite_meta(entry, edit)


# ---------------------------------------------------------------- the key


def test_an_image_rewritten_with_its_old_size_and_mtime_is_decoded_again(tmp_path, monkeypatch):
    folder = tmp_path / "d"
    for c in CLASSES[:2]:
        (folder / "train" / c).mkdir(parents=True)
        Image.new("RGB", (20, 20), (10, 20, 30)).save(
            folder / "train" / c / "x.png", compress_level=0
        )
    first = load(folder, tmp_path / "c")
    file = folder / "train" / "dog" / "x.png"
    st = os.stat(file)
    Image.new("RGB", (20, 20), (200, 0, 0)).save(file, compress_level=0)  # other pixels, same size
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))  # touch -r: the old mtime
    assert os.stat(file).st_size == st.st_size and os.stat(file).st_mtime_ns == st.st_mtime_ns
    calls = count_decodes(monkeypatch)
    again = load(folder, tmp_path / "c")
    assert again.path != first.path and len(calls) == 2
    np.testing.assert_array_equal(again.images[1], expected(file, 16))
    assert entries(tmp_path / "c") == [os.path.basename(again.path)]  # the stale one pruned


# ---------------------------------------------------------------- what an entry holds


@pytest.mark.parametrize(
    "label,keep_digest,why",
    [
        (7, False, "labels.npy does not match its digest"),
        (7, True, "label 7 is not one of the 3 classes"),
        (2, False, "labels.npy does not match its digest"),
        (2, True, "its labels differ from the folder's"),
    ],
)
def test_altered_labels_are_never_reused(
    folder, tmp_path, monkeypatch, caplog, label, keep_digest, why
):
    first = load(folder, tmp_path / "c")
    path = os.path.join(first.path, "labels.npy")
    labels = np.load(path)
    labels[labels == 0] = label  # in range: every cat now a fox
    np.save(path, labels)
    if keep_digest:
        redigest(first.path)
    rebuilt_once(folder, tmp_path / "c", first.path, monkeypatch, caplog, why)


def test_altered_image_bytes_are_never_reused(folder, tmp_path, monkeypatch, caplog):
    first = load(folder, tmp_path / "c")
    path = os.path.join(first.path, "images.npy")
    with open(path, "r+b") as f:
        f.seek(-100, os.SEEK_END)
        f.write(bytes(100))
    rebuilt_once(
        folder,
        tmp_path / "c",
        first.path,
        monkeypatch,
        caplog,
        "images.npy does not match its digest",
    )


def _swap(meta):
    meta["files"][0], meta["files"][1] = meta["files"][1], meta["files"][0]


def _drop(meta):
    meta["files"].pop()


def _skip(meta):  # a readable file claimed unreadable, the rest left as they were
    meta["skipped"].append([meta["files"][-1], "broken"])


def _not_a_list(meta):
    meta["files"] = "cat/0000.jpg"


@pytest.mark.parametrize(
    "edit,why",
    [
        (_swap, "its file list differs from the folder's"),
        (_drop, "its file list differs from the folder's"),
        (_skip, "its file list differs from the folder's"),
        (_not_a_list, "meta.json is not valid"),
    ],
)
def test_a_meta_file_list_unlike_the_scan_is_never_reused(
    folder, tmp_path, monkeypatch, caplog, edit, why
):
    first = load(folder, tmp_path / "c")
    rewrite_meta(first.path, edit)
    rebuilt_once(folder, tmp_path / "c", first.path, monkeypatch, caplog, why)


def test_a_file_recorded_unreadable_that_now_reads_is_decoded_again(
    folder, tmp_path, monkeypatch, caplog
):
    """A consistent tampering (files, skipped, arrays and digests agree) still has to prove its
    skipped files: they are decoded again on open, and one that reads breaks the entry."""
    first = load(folder, tmp_path / "c")
    rewrite_meta(
        first.path,
        lambda meta: (meta["skipped"].append([meta["files"][-1], "broken"]), meta["files"].pop()),
    )
    for name in ("images.npy", "labels.npy"):
        path = os.path.join(first.path, name)
        np.save(path, np.load(path)[:-1])
    redigest(first.path)
    rebuilt_once(
        folder,
        tmp_path / "c",
        first.path,
        monkeypatch,
        caplog,
        "recorded as unreadable, now reads",
        skip_bad=True,
    )


def test_a_tampered_entry_file_is_never_reused_nor_waited_on(folder, tmp_path, monkeypatch, caplog):
    first = load(folder, tmp_path / "c")
    images = os.path.join(first.path, "images.npy")
    os.remove(images)
    os.mkfifo(images)  # reading it would wait for a writer forever
    with unblocked(images):
        rebuilt_once(
            folder,
            tmp_path / "c",
            first.path,
            monkeypatch,
            caplog,
            "images.npy cannot be read: not a regular file but a FIFO",
        )
    with open(os.path.join(first.path, "meta.json"), "w") as f:
        f.write("[" * 100_000)  # deeper than json's recursion limit
    rebuilt_once(
        folder,
        tmp_path / "c",
        first.path,
        monkeypatch,
        caplog,
        "meta.json cannot be read: nested too deeply",
    )


# ---------------------------------------------------------------- attacks on the build


class unblocked:
    """Opens the FIFO `path` for writing after a few seconds, so that code which (wrongly) waits
    on it fails its test instead of hanging it."""

    def __init__(self, path):
        import threading

        self.path, self.done = path, threading.Event()
        self.thread = threading.Thread(target=self.release, daemon=True)

    def release(self):
        while not self.done.wait(3):
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader waiting (ENXIO), or gone
                pass

    def __enter__(self):
        self.thread.start()

    def __exit__(self, *exc):
        self.done.set()


@pytest.mark.parametrize("kind", ["FIFO", "character device"])
def test_a_special_file_among_the_images_is_a_bad_image(folder, tmp_path, kind):
    special = folder / "train" / "cat" / "special.png"
    if kind == "FIFO":
        os.mkfifo(special)
    else:
        os.symlink("/dev/zero", special)  # links are followed: a device node reached by one
    with unblocked(special):
        facts = cache.folder_facts(scan_split(str(folder), "train"), str(tmp_path / "c"))
        assert sum(facts.sizes.values()) == 12  # its header is not read, nor waited on
        with pytest.raises(cache.UserError) as e:
            load(folder, tmp_path / "c")
        out = load(folder, tmp_path / "c", skip_bad=True)
    assert str(e.value) == (
        f"image {special} cannot be read (not a regular file but a {kind}); remove "
        "or replace it, or set data.skip_bad_images=true"
    )
    assert out.skipped == [str(special)] and len(out.files) == 12


def _png_header(width, height) -> bytes:
    """A PNG whose header claims width x height 8-bit gray pixels, with no pixel data behind it."""
    import struct
    import zlib

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def test_an_image_over_the_pixel_limit_is_a_bad_image(folder, tmp_path, monkeypatch):
    """PIL refuses an image over twice Image.MAX_IMAGE_PIXELS and decodes (with a warning) one
    under it: a few hundred KB of PNG can take a GB. Both are bad images, with one line."""
    cat = folder / "train" / "cat"
    (cat / "huge.png").write_bytes(_png_header(20000, 20000))  # 400 MP: over twice the limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1100)  # 40x40 is then as 100 MP is really
    Image.new("L", (40, 40), 7).save(cat / "large.png")
    out = load(folder, tmp_path / "c", skip_bad=True)
    assert out.skipped == [str(cat / "huge.png"), str(cat / "large.png")]
    assert out.reasons[str(cat / "large.png")] == (
        "40x40: 1600 pixels exceed PIL's decompression bomb limit of 1100 (Image.MAX_IMAGE_PIXELS)"
    )
    assert "decompression bomb" in out.reasons[str(cat / "huge.png")]


def test_a_full_cache_disk_is_one_line_and_leaves_nothing(folder, tmp_path, monkeypatch):
    """On a full tmpfs a sparse memory-mapped file died of SIGBUS (workers=0) or hung the pool
    (workers=2); its blocks are allocated first now (tried on a real 1 MB tmpfs)."""
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(cache.UserError) as e:
        load(folder, tmp_path / "c")
    assert str(e.value) == (
        f"data.cache_dir={tmp_path / 'c'} is full (No space left on device); free "
        "space or set data.cache_dir= (or $CNNTRAIN_CACHE) to a folder with room"
    )
    assert entries(tmp_path / "c") == []


def test_a_file_changed_while_decoded_is_not_stored(folder, tmp_path, monkeypatch, caplog):
    """Another builder, or a user, rewrites a file while this build decodes: what the entry holds
    of it is unknown, so the entry is used by this run but not stored under the old stats."""
    split = scan_split(str(folder), "train")
    victim = split.files[-1]
    real = cache.decode

    def decode(path, mode, size):
        if path == split.files[0]:
            Image.new("RGB", (30, 30), (255, 255, 0)).save(
                victim, format="PNG" if victim.endswith("png") else "JPEG"
            )
        return real(path, mode, size)

    monkeypatch.setattr(cache, "decode", decode)
    with caplog.at_level(logging.WARNING, logger="cnntrain"):
        out = load(folder, tmp_path / "c")
    assert out.images.shape[0] == 12 and entries(tmp_path / "c") == []
    rel = os.path.relpath(victim, split.root)
    assert [
        m
        for m in caplog.messages
        if m.endswith(
            f"not stored: {rel} changed while being decoded (the next run decodes the folder again)"
        )
    ]
    monkeypatch.setattr(cache, "decode", real)
    again = load(folder, tmp_path / "c")
    np.testing.assert_array_equal(again.images[-1], expected(victim, 16))
    assert entries(tmp_path / "c") == [os.path.basename(again.path)]


def test_a_copied_folder_is_decoded_again_a_moved_one_is_not(folder, tmp_path, monkeypatch):
    import shutil

    first = load(folder, tmp_path / "c")
    shutil.copytree(folder, tmp_path / "copy")  # copy2: mtimes and sizes kept, as cp -a
    copied = load(tmp_path / "copy", tmp_path / "c")
    assert copied.path != first.path
    os.rename(tmp_path / "copy", tmp_path / "moved")  # the files keep their inodes and ctimes
    calls = count_decodes(monkeypatch)
    moved = load(tmp_path / "moved", tmp_path / "c")
    assert moved.path == copied.path and not calls
    assert moved.files[0].startswith(str(tmp_path / "moved"))


# ---------------------------------------------------------------- the header facts


@pytest.mark.parametrize(
    "text,why",
    [
        (
            '{"gray": "yes", "sizes": {"axb": 1}, "modes": {}, "examples": {}}',
            "gray is not true or false",
        ),
        (
            '{"gray": false, "sizes": {"axb": 1}, "modes": {"L": 1}, "examples": {"L": "x"}}',
            "sizes is not a table of positive counts",
        ),
        (
            '{"gray": false, "sizes": {"20x20": 12}, "modes": {"RGB": 8, "L": 4}, "examples": {"RGB": "x"}}',
            "examples do not name one file per mode",
        ),
        (
            '{"gray": false, "sizes": {"20x20": 99}, "modes": {"RGB": 99}, "examples": {"RGB": "x"}}',
            "its counts do not add up to at most the 12 files",
        ),
        ("[]", "gray is not true or false"),
        ("[" * 100_000, "nested too deeply"),
    ],
)
def test_a_garbled_facts_file_is_read_again_with_a_warning(folder, tmp_path, caplog, text, why):
    split = scan_split(str(folder), "train")
    facts = cache.folder_facts(split, str(tmp_path / "c"))
    [stored] = (tmp_path / "c").glob("facts-*.json")
    stored.write_text(text)
    with caplog.at_level(logging.WARNING, logger="cnntrain"):
        assert cache.folder_facts(scan_split(str(folder), "train"), str(tmp_path / "c")) == facts
    assert caplog.messages == [
        f"cache file {stored} is not valid ({why}); reading the image headers again"
    ]


def test_a_garbled_meta_of_another_entry_is_left_alone(folder, tmp_path):
    load(folder, tmp_path / "c")
    other = tmp_path / "c" / ("0" * 32)
    other.mkdir()
    (other / "meta.json").write_text("[]")
    Image.new("RGB", (20, 20)).save(
        folder / "train" / "cat" / "new.png"
    )  # a rebuild prunes the rest
    assert len(load(folder, tmp_path / "c").files) == 13
    assert (other / "meta.json").exists()


# ---------------------------------------------------------------- decisions (torchvision's)


def test_exif_orientation_is_not_applied_and_an_animation_gives_its_first_frame(tmp_path):
    for c in CLASSES[:2]:
        (tmp_path / "d" / "train" / c).mkdir(parents=True)
    cat, dog = (tmp_path / "d" / "train" / c for c in CLASSES[:2])
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": a viewer shows it upright and 20 x 40
    img.save(cat / "rotated.jpg", exif=exif.tobytes(), quality=95)
    frames = [Image.new("RGB", (20, 20), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(dog / "animated.png", save_all=True, append_images=frames[1:])  # APNG
    with Image.open(dog / "animated.png") as anim:
        assert anim.n_frames == 2
    out = load(tmp_path / "d", tmp_path / "c")
    assert out.images[0, 2, 8, 1] > 200 and out.images[0, 0, 8, 1] < 50  # stored left half: blue
    np.testing.assert_array_equal(out.images[0], expected(cat / "rotated.jpg", 16))
    assert (out.images[1].transpose(1, 2, 0) == (255, 0, 0)).all()
