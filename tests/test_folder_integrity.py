"""Image folders whose files are not what they seem, on real files read by the real loaders:
symbolic links that loop, duplicate or cross class folders; image modes (16-bit, float,
transparency, CMYK, 1-bit) that a plain PIL convert("RGB") gets wrong; and splits whose files
disagree with each other in mode."""

import logging
import os

import numpy as np
import pytest
import torch
from fakedata import write_image_folder
from omegaconf import OmegaConf
from PIL import Image, ImageFile

from cnntrain.data import build_data
from cnntrain.errors import UserError
from cnntrain.inference import Preprocess, find_images

CPU = torch.device("cpu")
CLASSES = ["cat", "dog", "fox"]


def folder_cfg(root, **kw):
    base = dict(
        name="imagefolder",
        root=str(root),
        download=False,
        batch_size=64,
        num_workers=0,
        val_split=0.0,
        image_size=8,
        mean=[0.0] * 3,
        std=[1.0] * 3,
        skip_bad_images=False,
    )
    return OmegaConf.create({**base, **kw})


def samples(root, split="train"):
    """(file relative to root/split, class) of every sample the loader reads, in its order."""
    data = build_data(folder_cfg(root), None, device=CPU, seed=0, splits=(split,))
    loader = data.loaders[split]
    return [
        (os.path.relpath(loader.sample_name(i), root / split), data.classes[c])
        for i, c in enumerate(loader.labels.tolist())
    ]


@pytest.fixture()
def folder(tmp_path):
    """4 train images per class (PNG and JPEG), no other split."""
    return write_image_folder(tmp_path / "imgs", CLASSES, {"train": 4}, size=16)


def originals(root, split="train"):
    return sorted(
        (str(p.relative_to(root / split)), p.parent.name) for p in (root / split).glob("*/*.*")
    )


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
    os.symlink(ext / "more_cats", cat / "linked_again")  # the same real folder
    os.symlink("linked/more_cats0.png", cat / "dup.png")  # a file already in the class
    (cat / "sub").mkdir()
    os.symlink("../linked", cat / "sub" / "deeper")  # the same real folder, deeper
    for f in (folder / "train" / "fox").iterdir():
        f.unlink()
    (folder / "train" / "fox").rmdir()
    os.symlink(ext / "foxes", folder / "train" / "fox")  # a whole class linked in
    got = samples(folder)
    real = [os.path.realpath(folder / "train" / p) for p, _ in got]
    assert len(real) == len(set(real))  # no file twice
    counts = {c: sum(1 for _, k in got if k == c) for c in CLASSES}
    assert counts == {"cat": 4 + 3, "dog": 4, "fox": 3}
    assert ("cat/dup.png", "cat") in got  # a link to a file is followed (and is the first name met)
    assert all(k == "fox" for p, k in got if "foxes" in os.path.realpath(folder / "train" / p))


@pytest.mark.parametrize(
    "link,target",
    [
        ("train/cat/dogs", "../dog"),  # a folder link into another class
        ("train/cat/sub/dogs", "../../dog"),  # ... from below
        ("train/cat/a_dog.png", "../dog/0001.png"),  # a file link into another class
    ],
)
def test_a_link_into_another_class_is_an_error(folder, link, target):
    path = folder / link
    path.parent.mkdir(exist_ok=True)
    if target.endswith(".png"):
        target = os.path.relpath(next((folder / "train" / "dog").glob("*.png")), path.parent)
    os.symlink(target, path)
    with pytest.raises(UserError) as info:
        samples(folder)
    msg = str(info.value)
    assert (
        "\n" not in msg
        and f"symbolic link {path} points into class folder {folder / 'train' / 'dog'}" in msg
    )


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
        "a.png",
        "sub/b.png",
        "sub/ext/e.png",
    ]


@pytest.mark.parametrize(
    "pattern,found",
    [
        ("**/*.png", ["a.png", "sub/b.png", "sub/ext/e.png"]),
        ("sub/**/*.png", ["sub/b.png", "sub/ext/e.png"]),
        ("**/e.png", ["sub/ext/e.png"]),
        (
            "*.png",
            ["a.png", "dup.png"],
        ),  # no '**': glob's own answer (a file named is a file chosen)
    ],
)
def test_find_images_recursive_glob_follows_links_once_without_loops(loose, pattern, found):
    files = find_images(str(loose / pattern))
    assert [p.relative_to(loose).as_posix() for p in files] == found


# ---------------------------------------------------------------- image modes


def half(left, right, dtype=np.uint8, channels=None):
    """An 8x8 array whose left half is `left` and right half `right` (per channel if tuples)."""
    shape = (8, 8) if channels is None else (8, 8, channels)
    a = np.zeros(shape, dtype=dtype)
    a[:, :4], a[:, 4:] = left, right
    return a


def palette_image(mode):
    """A P/PA image: index 0 opaque red, index 1 stored black but transparent."""
    img = Image.fromarray(half(0, 1)).convert("P") if mode == "P" else Image.new("PA", (8, 8))
    img.putpalette([255, 0, 0, 0, 0, 0] + [0] * 762)
    if mode == "PA":
        img.putdata([(0, 255) if x < 4 else (1, 0) for _ in range(8) for x in range(8)])
    else:
        img.putdata([0 if x < 4 else 1 for _ in range(8) for x in range(8)])
    return img


WHITE, RED = (255, 255, 255), (255, 0, 0)
# mode opened from the file -> (writer, expected RGB of the left and right halves)
MODES = {
    # 16-bit: 1000 and 30000 of 65535 are 3 and 117 of 255 (a plain convert makes both 255)
    "I;16": (
        lambda p: Image.fromarray(half(1000, 30000, np.uint16)).save(p / "x.png"),
        (3,) * 3,
        (117,) * 3,
    ),
    "I;16B": (
        lambda p: Image.fromarray(half(1000, 30000, np.uint16).astype(">u2")).save(p / "x.tif"),
        (3,) * 3,
        (117,) * 3,
    ),
    "I": (
        lambda p: Image.fromarray(half(1000, 30000, np.uint16)).save(p / "x.pgm"),
        (3,) * 3,
        (117,) * 3,
    ),
    # float: 0..1 (a plain convert makes 0.25 and 0.75 both 0)
    "F": (
        lambda p: Image.fromarray(half(0.25, 0.75, np.float32)).save(p / "x.tif"),
        (64,) * 3,
        (191,) * 3,
    ),
    # transparency: transparent pixels are white, whatever colour is stored under them
    "RGBA": (
        lambda p: Image.fromarray(half((255, 0, 0, 255), (0, 0, 0, 0), channels=4)).save(
            p / "x.png"
        ),
        RED,
        WHITE,
    ),
    "LA": (
        lambda p: Image.fromarray(half((100, 255), (0, 0), channels=2), "LA").save(p / "x.png"),
        (100,) * 3,
        WHITE,
    ),
    "P": (lambda p: palette_image("P").save(p / "x.png", transparency=1), RED, WHITE),
    "PA": (lambda p: palette_image("PA").save(p / "x.tif"), RED, WHITE),
    "L": (
        lambda p: Image.fromarray(half(50, 90)).save(p / "x.png", transparency=90),
        (50,) * 3,
        WHITE,
    ),
    # converted right by PIL already: must stay so
    "CMYK": (
        lambda p: Image.fromarray(half((0, 255, 0, 0), (0, 0, 0, 255), channels=4), "CMYK").save(
            p / "x.tif"
        ),
        (255, 0, 255),
        (0, 0, 0),
    ),
    "1": (lambda p: Image.fromarray(half(0, 255)).convert("1").save(p / "x.png"), (0,) * 3, WHITE),
    "RGB": (
        lambda p: Image.fromarray(half((10, 20, 30), (200, 100, 0), channels=3)).save(p / "x.png"),
        (10, 20, 30),
        (200, 100, 0),
    ),
}


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_is_read_as_the_right_rgb_pixels(tmp_path, mode):
    write, left, right = MODES[mode]
    folder = tmp_path / "test" / "only"
    folder.mkdir(parents=True)
    write(folder)
    path = next(folder.iterdir())
    with Image.open(path) as img:
        assert img.mode == mode  # the file really has the mode under test
    expected = (
        torch.tensor([left] * 4 + [right] * 4, dtype=torch.uint8).T[:, None, :].expand(3, 8, 8)
    )

    x, _ = next(
        iter(
            build_data(folder_cfg(tmp_path), None, device=CPU, seed=0, splits=("test",)).loaders[
                "test"
            ]
        )
    )  # training and evaluation: mean 0, std 1 gives pixels / 255
    assert torch.equal((x[0] * 255).round().to(torch.uint8), expected)
    prep = Preprocess(
        OmegaConf.create({"data": {"image_size": 8, "mean": [0.5] * 3, "std": [0.5] * 3}}), CPU
    )
    assert torch.equal(prep.pixels(path), expected)  # cnnpredict / cnnviz: the same pixels
    gray = Preprocess(
        OmegaConf.create({"data": {"image_size": 8, "mean": [0.5], "std": [0.5]}}), CPU
    )
    expected_gray = Image.fromarray(expected.permute(1, 2, 0).numpy()).convert("L")
    assert torch.equal(gray.pixels(path)[0], torch.from_numpy(np.array(expected_gray)))


def test_mean_std_is_measured_on_the_converted_pixels(tmp_path):
    folder = tmp_path / "train" / "only"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(folder / "x.png")  # 117 of 255
    data = build_data(
        folder_cfg(tmp_path, mean=None, std=None), None, device=CPU, seed=0, splits=("train",)
    )
    assert data.mean == [round(117 / 255, 4)]  # a gray folder trains with one channel


# ---------------------------------------------------------------- mixed modes in one split


def mode_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "mixes image modes" in r.getMessage()]


def test_a_split_of_mixed_modes_logs_one_warning(tmp_path, caplog):
    for c in ("cat", "dog"):
        (tmp_path / "train" / c).mkdir(parents=True)
        (tmp_path / "test" / c).mkdir(parents=True)
        for i in range(6):
            Image.new("L", (16, 16), 40 * i).save(tmp_path / "train" / c / f"{i}.png")
            Image.new("RGB", (16, 16)).save(tmp_path / "test" / c / f"{i}.jpg")
    Image.new("RGB", (16, 16)).save(tmp_path / "train" / "cat" / "photo.jpg")
    Image.new("RGB", (16, 16)).save(tmp_path / "train" / "dog" / "photo.jpg")
    Image.new("RGBA", (16, 16)).save(tmp_path / "train" / "dog" / "sticker.png")
    with caplog.at_level(logging.WARNING, logger="cnntrain"):
        build_data(folder_cfg(tmp_path), None, device=CPU, seed=0)
    [msg] = mode_warnings(caplog)  # one line for train/, none for the uniform test/
    assert msg.startswith(
        "train/ mixes image modes: L 12, RGB 2, RGBA 1 (e.g. train/cat/photo.jpg, "
        "train/dog/sticker.png); all are converted to RGB"
    )
    assert "transparent pixels on white" in msg and "\n" not in msg


def test_mixed_bit_depths_are_reported(tmp_path, caplog):
    folder = tmp_path / "train" / "x"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("L", (16, 16)).save(folder / f"{i}.png")
    Image.fromarray(np.zeros((16, 16), np.uint16)).save(folder / "deep.png")
    with caplog.at_level(logging.WARNING, logger="cnntrain"):
        build_data(folder_cfg(tmp_path), None, device=CPU, seed=0)
    [msg] = mode_warnings(caplog)
    assert "L 3, I;16 1 (e.g. train/x/deep.png)" in msg and "16-bit scaled to 8-bit" in msg


def test_the_mode_scan_reads_headers_only(tmp_path, monkeypatch):
    from cnntrain.data.cache import folder_facts, scan_split

    write_image_folder(tmp_path, CLASSES, {"train": 5}, size=16)
    split = scan_split(str(tmp_path), "train")

    def decode(self):
        raise AssertionError("the scan decoded an image")

    monkeypatch.setattr(Image.Image, "load", decode)
    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)
    folder_facts(split, str(tmp_path / "cache")).warn_mixed_modes()  # L and RGB: no pixel needed
