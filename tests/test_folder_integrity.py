"""Image folders whose files are not what they seem, on real files read by the real loaders:
symbolic links that loop, duplicate or cross class folders; image modes (16-bit, float,
transparency, CMYK, 1-bit) that a plain PIL convert("RGB") gets wrong; and splits whose files
disagree with each other in mode."""
import logging
import os

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from cnntrain.data import build_data
from cnntrain.errors import UserError
from cnntrain.inference import find_images
from fakedata import write_image_folder

CPU = torch.device("cpu")
CLASSES = ["cat", "dog", "fox"]


def folder_cfg(root, **kw):
    base = dict(name="imagefolder", root=str(root), download=False, batch_size=64, num_workers=0,
                val_split=0.0, image_size=8, mean=[0.0] * 3, std=[1.0] * 3, skip_bad_images=False)
    return OmegaConf.create({**base, **kw})


def samples(root, split="train"):
    """(file relative to root/split, class) of every sample the loader reads, in its order."""
    loader = build_data(folder_cfg(root), None, device=CPU, seed=0, splits=(split,)).loaders[split]
    ds = loader.loader.dataset
    return [(os.path.relpath(path, root / split), ds.classes[c]) for path, c in ds.samples]


@pytest.fixture()
def folder(tmp_path):
    """4 train images per class (PNG and JPEG), no other split."""
    return write_image_folder(tmp_path / "imgs", CLASSES, {"train": 4}, size=16)


def originals(root, split="train"):
    return sorted((str(p.relative_to(root / split)), p.parent.name)
                  for p in (root / split).glob("*/*.*"))


# ---------------------------------------------------------------- symbolic links

@pytest.mark.parametrize("name,target", [("loop", "../.."), ("again", "../cat"), ("self", ".")])
def test_a_link_that_loops_is_not_followed(folder, caplog, name, target):
    os.symlink(target, folder / "train" / "cat" / name)
    with caplog.at_level(logging.WARNING, logger="cnntrain"):
        assert sorted(samples(folder)) == originals(folder)
    loops = [r.getMessage() for r in caplog.records if "loop" in r.getMessage()]
    assert len(loops) == 1 and str(folder / "train" / "cat" / name) in loops[0]


def test_linked_in_data_is_read_once(folder, tmp_path):
    """A class folder and a sub-folder linked in from elsewhere are followed; the same folder
    or file reached twice in a class is read once."""
    ext = tmp_path / "elsewhere"
    for sub in ("more_cats", "foxes"):
        (ext / sub).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(ext / sub / f"{sub}{i}.png")
    cat = folder / "train" / "cat"
    os.symlink(ext / "more_cats", cat / "linked")
    os.symlink(ext / "more_cats", cat / "linked_again")       # the same real folder
    os.symlink("linked/more_cats0.png", cat / "dup.png")       # a file already in the class
    (cat / "sub").mkdir()
    os.symlink("../linked", cat / "sub" / "deeper")           # the same real folder, deeper
    for f in (folder / "train" / "fox").iterdir():
        f.unlink()
    (folder / "train" / "fox").rmdir()
    os.symlink(ext / "foxes", folder / "train" / "fox")       # a whole class linked in
    got = samples(folder)
    real = [os.path.realpath(folder / "train" / p) for p, _ in got]
    assert len(real) == len(set(real))  # no file twice
    counts = {c: sum(1 for _, k in got if k == c) for c in CLASSES}
    assert counts == {"cat": 4 + 3, "dog": 4, "fox": 3}
    assert ("cat/dup.png", "cat") in got  # a link to a file is followed (and is the first name met)
    assert all(k == "fox" for p, k in got if "foxes" in os.path.realpath(folder / "train" / p))


@pytest.mark.parametrize("link,target", [
    ("train/cat/dogs", "../dog"),                 # a folder link into another class
    ("train/cat/sub/dogs", "../../dog"),          # ... from below
    ("train/cat/a_dog.png", "../dog/0001.png"),   # a file link into another class
])
def test_a_link_into_another_class_is_an_error(folder, link, target):
    path = folder / link
    path.parent.mkdir(exist_ok=True)
    if target.endswith(".png"):
        target = os.path.relpath(next((folder / "train" / "dog").glob("*.png")), path.parent)
    os.symlink(target, path)
    with pytest.raises(UserError) as info:
        samples(folder)
    msg = str(info.value)
    assert "\n" not in msg and f"symbolic link {path} points into class folder {folder / 'train' / 'dog'}" in msg


def test_one_file_linked_into_two_classes_is_an_error(folder, tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "shared.png")
    os.symlink(tmp_path / "shared.png", folder / "train" / "cat" / "s.png")
    os.symlink(tmp_path / "shared.png", folder / "train" / "dog" / "s.png")
    with pytest.raises(UserError) as info:
        samples(folder)
    msg = str(info.value)
    assert "\n" not in msg and str(folder / "train" / "dog" / "s.png") in msg
    assert str(folder / "train" / "cat" / "s.png") in msg and "keep it in one class" in msg


@pytest.fixture()
def loose(tmp_path):
    """Images for cnnpredict: a.png, sub/b.png, a file link to a.png, a loop, a folder linked in."""
    root, ext = tmp_path / "in", tmp_path / "ext"
    (root / "sub").mkdir(parents=True)
    ext.mkdir()
    for path in (root / "a.png", root / "sub" / "b.png", ext / "e.png"):
        Image.new("RGB", (8, 8)).save(path)
    os.symlink("a.png", root / "dup.png")
    os.symlink("..", root / "sub" / "up")
    os.symlink(ext, root / "sub" / "ext")
    return root


def test_find_images_follows_links_once_without_loops(loose):
    assert [p.relative_to(loose).as_posix() for p in find_images(loose)] == [
        "a.png", "sub/b.png", "sub/ext/e.png"]


@pytest.mark.parametrize("pattern,found", [
    ("**/*.png", ["a.png", "sub/b.png", "sub/ext/e.png"]),
    ("sub/**/*.png", ["sub/b.png", "sub/ext/e.png"]),
    ("**/e.png", ["sub/ext/e.png"]),
    ("*.png", ["a.png", "dup.png"]),   # no '**': glob's own answer (a file named is a file chosen)
])
def test_find_images_recursive_glob_follows_links_once_without_loops(loose, pattern, found):
    files = find_images(str(loose / pattern))
    assert [p.relative_to(loose).as_posix() for p in files] == found
