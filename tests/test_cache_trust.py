"""The decoded image cache trusts an entry only for what it can prove: a key a user cannot set
back (ctime, inode), a digest of each array checked on open, labels and files checked against
the scan. Whatever fails is decoded again with one warning naming the entry, never reused."""
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from cnntrain.data import cache
from cnntrain.data.cache import scan_split
from fakedata import write_image_folder
from test_cache import CLASSES, count_decodes, entries, expected, load


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
        Image.new("RGB", (20, 20), (10, 20, 30)).save(folder / "train" / c / "x.png", compress_level=0)
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

@pytest.mark.parametrize("label,keep_digest,why", [
    (7, False, "labels.npy does not match its digest"),
    (7, True, "label 7 is not one of the 3 classes"),
    (2, False, "labels.npy does not match its digest"),
    (2, True, "its labels differ from the folder's"),
])
def test_altered_labels_are_never_reused(folder, tmp_path, monkeypatch, caplog, label, keep_digest, why):
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
    rebuilt_once(folder, tmp_path / "c", first.path, monkeypatch, caplog,
                 "images.npy does not match its digest")


def _swap(meta):
    meta["files"][0], meta["files"][1] = meta["files"][1], meta["files"][0]


def _drop(meta):
    meta["files"].pop()


def _skip(meta):  # a readable file claimed unreadable, the rest left as they were
    meta["skipped"].append([meta["files"][-1], "broken"])


def _not_a_list(meta):
    meta["files"] = "cat/0000.jpg"


@pytest.mark.parametrize("edit,why", [
    (_swap, "its file list differs from the folder's"),
    (_drop, "its file list differs from the folder's"),
    (_skip, "its file list differs from the folder's"),
    (_not_a_list, "meta.json is not valid"),
])
def test_a_meta_file_list_unlike_the_scan_is_never_reused(folder, tmp_path, monkeypatch, caplog, edit, why):
    first = load(folder, tmp_path / "c")
    rewrite_meta(first.path, edit)
    rebuilt_once(folder, tmp_path / "c", first.path, monkeypatch, caplog, why)


def test_a_file_recorded_unreadable_that_now_reads_is_decoded_again(folder, tmp_path, monkeypatch, caplog):
    """A consistent tampering (files, skipped, arrays and digests agree) still has to prove its
    skipped files: they are decoded again on open, and one that reads breaks the entry."""
    first = load(folder, tmp_path / "c")
    rewrite_meta(first.path, lambda meta: (meta["skipped"].append([meta["files"][-1], "broken"]),
                                           meta["files"].pop()))
    for name in ("images.npy", "labels.npy"):
        path = os.path.join(first.path, name)
        np.save(path, np.load(path)[:-1])
    redigest(first.path)
    rebuilt_once(folder, tmp_path / "c", first.path, monkeypatch, caplog,
                 "recorded as unreadable, now reads", skip_bad=True)
