"""cnnpredict and cnnviz end to end on a LeNet (MNIST format) and a ResNet (image folder) trained
for two epochs, fed image files of other sizes and modes than they were trained on."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

# console scripts in subprocesses: the end-to-end tier
pytestmark = pytest.mark.e2e


PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def lenet(data_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pv_lenet")
    run_cli(
        "cnntrain",
        "data=mnist",
        f"data.root={data_root}",
        "data.download=false",
        "epochs=2",
        "optim=adam",
        "aug=none",
        f"hydra.run.dir={run_dir}",
        cwd=run_dir.parent,
    )
    return run_dir / "checkpoints/best.pt"


@pytest.fixture(scope="module")
def resnet(folder_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pv_resnet")
    run_cli(
        "cnntrain",
        "model=resnet18",
        "data=imagefolder",
        f"data.root={folder_root}",
        "data.image_size=32",
        "data.num_workers=0",
        "epochs=2",
        f"hydra.run.dir={run_dir}",
        cwd=run_dir.parent,
    )
    return run_dir / "checkpoints/best.pt"


@pytest.fixture(scope="module")
def images(folder_root, tmp_path_factory):
    """Test images re-saved the way the models did not see them: RGB 50x40 (the MNIST model is
    gray 28x28) and gray 45x60 (the folder model is RGB 32x32), in nested folders."""
    root = tmp_path_factory.mktemp("pv_images")
    sources = sorted((folder_root / "test").rglob("*.*"))[::7][:4]
    for i, src in enumerate(sources):
        with Image.open(src) as img:
            (root / "sub").mkdir(exist_ok=True)
            img.convert("RGB").resize((50, 40)).save(root / f"rgb_{i}.png")
            img.convert("L").resize((45, 60)).save(root / "sub" / f"gray_{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def predict(ckpt, inputs, out, *extra, check=True):
    return run_cli(
        "cnnpredict",
        f"ckpt={ckpt}",
        f"inputs={inputs}",
        f"hydra.run.dir={out}",
        "device=cpu",
        *extra,
        cwd=out.parent,
        check=check,
    )


def read_rows(out: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for row in csv.DictReader(open(out / "predictions.csv")):
        rows.setdefault(row["file"], []).append(row)
    return rows


@pytest.mark.parametrize("model", ["lenet", "resnet"])
def test_predict_folder_topk(model, request, images, tmp_path):
    ckpt = request.getfixturevalue(model)
    classes = torch.load(ckpt, weights_only=True)["classes"]
    proc = predict(ckpt, images, tmp_path / "out", "topk=3")
    rows = read_rows(tmp_path / "out")
    assert sorted(rows) == sorted(str(p) for p in images.rglob("*.png"))  # recursive, no .txt
    for file, ranks in rows.items():
        assert [r["rank"] for r in ranks] == ["1", "2", "3"] and file in proc.stdout
        probs = [float(r["probability"]) for r in ranks]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6 and probs[-1] >= 0
        assert all(r["class"] in classes for r in ranks)
    assert f"{ranks[0]['class']} {float(ranks[0]['probability']):.4f}" in proc.stdout


def test_predict_agrees_with_the_model_on_its_own_input(lenet, data_root, tmp_path):
    """A 28x28 gray PNG of an MNIST test image goes through no resizing: the top-1 must be the
    class the model itself gives the IDX pixels."""
    from cnntrain.data.augment import Normalize
    from cnntrain.inference import load_trained_model

    raw = (data_root / "MNIST/raw/t10k-images-idx3-ubyte").read_bytes()
    pixels = np.frombuffer(raw[16 : 16 + 4 * 784], dtype=np.uint8).reshape(4, 28, 28)
    for i, img in enumerate(pixels):
        Image.fromarray(img).save(tmp_path / f"digit_{i}.png")
    model, trained, classes = load_trained_model(lenet, torch.device("cpu"))
    x = Normalize(trained.data.mean, trained.data.std, "cpu")(
        torch.from_numpy(pixels.copy())[:, None]
    )
    with torch.no_grad():
        expected = [classes[i] for i in model(x).argmax(1)]
    predict(lenet, f"{tmp_path}/digit_*.png", tmp_path / "out", "topk=1")
    rows = read_rows(tmp_path / "out")
    assert [rows[str(tmp_path / f"digit_{i}.png")][0]["class"] for i in range(4)] == expected


def test_predict_glob_and_topk_capped_at_class_count(resnet, images, tmp_path):
    predict(resnet, f"'{images}/**/gray_*.png'", tmp_path / "out")  # topk=5 > 3 classes
    rows = read_rows(tmp_path / "out")
    assert sorted(rows) == sorted(str(p) for p in images.glob("sub/gray_*.png"))
    assert all(len(ranks) == 3 for ranks in rows.values())
    assert all(
        sum(float(r["probability"]) for r in ranks) == pytest.approx(1, abs=1e-5)
        for ranks in rows.values()
    )


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 1
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error:" in line]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_predict_bad_inputs_are_one_line_errors(lenet, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = predict(lenet, tmp_path / "empty", tmp_path / "o1", check=False)
    assert_one_line_error(proc, "no images found", str(tmp_path / "empty"))
    (tmp_path / "x.png").write_bytes(b"\x00garbage" * 20)
    proc = predict(lenet, tmp_path, tmp_path / "o2", check=False)
    assert_one_line_error(proc, "cannot be read", str(tmp_path / "x.png"), "remove it from inputs=")
    proc = predict(tmp_path / "missing.pt", tmp_path / "x.png", tmp_path / "o3", check=False)
    assert_one_line_error(proc, "missing.pt", "not found")
    proc = predict(tmp_path / "x.png", tmp_path / "x.png", tmp_path / "o4", check=False)
    assert_one_line_error(proc, "x.png", "not a PyTorch file")


def test_viz_writes_pngs(resnet, images, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(
        "cnnviz",
        f"ckpt={resnet}",
        f"inputs={images}",
        "max_images=2",
        "target_class=dog",
        f"hydra.run.dir={out}",
        "device=cpu",
        cwd=tmp_path,
    )
    names = [
        "filters.png",
        "feature_maps_0.png",
        "gradcam_0.png",
        "feature_maps_1.png",
        "gradcam_1.png",
    ]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(names)
    for name in names:
        assert (out / name).read_bytes()[:8] == PNG and str(out / name) in proc.stdout
    with Image.open(out / "filters.png") as img:  # 64 filters 3x7x7, upscaled to be seen
        assert min(img.size) >= 400


def test_viz_lenet_with_chosen_layers(lenet, images, tmp_path):
    out = tmp_path / "out"
    run_cli(
        "cnnviz",
        f"ckpt={lenet}",
        f"inputs={images}/rgb_0.png",
        "layers=[features.0,features.3]",
        f"hydra.run.dir={out}",
        "device=cpu",
        cwd=tmp_path,
    )
    assert all(
        (out / n).read_bytes()[:8] == PNG
        for n in ("filters.png", "feature_maps_0.png", "gradcam_0.png")
    )
    with Image.open(out / "filters.png") as img:  # 6 filters 1x5x5: was a 98x66 thumbnail
        assert img.size[0] >= 400


def test_viz_bad_layer_is_one_line_error(lenet, images, tmp_path):
    proc = run_cli(
        "cnnviz",
        f"ckpt={lenet}",
        f"inputs={images}",
        "layers=[features.1,nope]",
        f"hydra.run.dir={tmp_path / 'out'}",
        cwd=tmp_path,
        check=False,
    )
    assert_one_line_error(proc, "unknown layer(s) nope", "features.1")


@pytest.mark.parametrize("model", ["lenet", "resnet"])
def test_grad_cam_and_default_stages(model, request, images):
    from cnntrain.inference import Preprocess, load_trained_model
    from cnntrain.viz import grad_cam, stage_layers

    net, trained, _ = load_trained_model(request.getfixturevalue(model), torch.device("cpu"))
    prep = Preprocess(trained, torch.device("cpu"))
    x = prep(torch.stack([prep.pixels(p) for p in sorted(images.rglob("*.png"))]))
    layers = stage_layers(net, x[:1])
    expected = {
        "lenet": ["features.1", "features.2", "features.4", "features"],
        "resnet": ["layer1", "layer2", "layer3", "layer4"],
    }[model]
    assert layers == expected
    maps = [grad_cam(net, img, layers[-1]) for img in x]
    size = int(trained.data.image_size)
    for cam in maps:
        assert cam.shape == (size, size) and cam.min() >= 0 and cam.max() <= 1
    assert any(cam.max() - cam.min() > 0.5 for cam in maps)  # some image gets a real map
    assert not any(p.grad is not None for p in net.parameters())


def test_find_images_skips_hidden_folders_and_files(tmp_path):
    from cnntrain.inference import find_images

    for name in ("a.png", "sub/b.jpg", ".ipynb_checkpoints/c.png", "sub/._d.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(
            tmp_path / name, format="PNG" if name.endswith("png") else "JPEG"
        )
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == [
        "a.png",
        "sub/b.jpg",
    ]
