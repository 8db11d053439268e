"""Calibration: ECE / NLL / Brier against hand-computed values, temperature scaling of an
over-confident model (cnneval calibrate=true) and the temperature a calibrated copy stores, used
by cnnpredict and refused when damaged. In-process: the eval and predict functions, not the
console scripts."""

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import refusal
from hydra import compose, initialize_config_module
from PIL import Image

from cnntrain.calibration import (
    expected_calibration_error,
    metrics,
    of_logits,
    reliability,
    sample_terms,
    terms_of,
)
from cnntrain.errors import UserError
from cnntrain.temperature import calibrated_path, fit_temperature

# five samples, three classes, chosen as probabilities (logits = their logs), each confidence
# well inside one of the 15 bins: 0.70 and 0.72 share (10/15, 11/15], the others are alone
PROBS = torch.tensor(
    [
        [0.70, 0.20, 0.10],  # y=0: right, confidence 0.70
        [0.72, 0.18, 0.10],  # y=1: wrong, 0.72
        [0.62, 0.28, 0.10],  # y=1: wrong, 0.62
        [0.90, 0.05, 0.05],  # y=0: right, 0.90
        [0.45, 0.35, 0.20],  # y=2: wrong, 0.45
    ]
)
TARGET = torch.tensor([0, 1, 1, 0, 2])


def compose_app(app, *overrides):
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        return compose(config_name=app, overrides=list(overrides))


def test_ece_nll_brier_match_hand_computed_values():
    cal = of_logits(PROBS.log(), TARGET)
    # bin (10/15, 11/15]: 2 images, accuracy 1/2, confidence 0.71; the others: |0-.62|, |1-.9|,
    # |0-.45|: (2 * 0.21 + 0.62 + 0.10 + 0.45) / 5
    assert cal["ece"] == pytest.approx(0.318, abs=1e-6)
    assert cal["nll"] == pytest.approx(
        -(math.log(0.70) + math.log(0.18) + math.log(0.28) + math.log(0.90) + math.log(0.20)) / 5,
        abs=1e-6,
    )
    # sum_k (p_k - y_k)^2 per sample: 0.14, 1.2008, 0.9128, 0.015, 0.965
    assert cal["brier"] == pytest.approx(3.2336 / 5, abs=1e-6)
    table = cal["reliability"]
    assert len(table) == 15 and sum(b["count"] for b in table) == 5
    assert table[10]["count"] == 2 and table[10]["accuracy"] == 0.5
    assert table[10]["confidence"] == pytest.approx(0.71, abs=1e-6)
    assert table[0]["count"] == 0 and table[0]["accuracy"] is None
    # softmax(2z / 2) = softmax(z): the metrics of the same probabilities
    assert of_logits(2 * PROBS.log(), TARGET, temperature=2.0)["ece"] == pytest.approx(cal["ece"])


def test_ece_bins_are_right_closed_and_a_perfect_model_scores_zero():
    # a confidence on an edge belongs to the bin below it (lower < conf <= upper), as Guo et al.
    table = reliability(torch.tensor([1.0, 2 / 15 + 1e-9, 2 / 15 - 1e-9]), torch.tensor([1, 1, 1]))
    assert table[14]["count"] == 1 and table[2]["count"] == 1 and table[1]["count"] == 1
    sure = of_logits(torch.tensor([[50.0, 0.0], [0.0, 50.0]]), torch.tensor([0, 1]))
    assert sure["ece"] == pytest.approx(0, abs=1e-6) and sure["brier"] == pytest.approx(0, abs=1e-6)
    assert expected_calibration_error(table) == pytest.approx((0 + 13 / 15 + 13 / 15) / 3)


@pytest.mark.parametrize("tta", [None, "flip"])
def test_evaluate_loader_keeps_the_terms_of_its_logits(tta):
    """What cnneval reports comes from the per-sample terms evaluate_loader keeps; they are those
    of the logits it computed (tta=flip: the mean of an image's and its mirror's)."""
    from cnntrain.data.augment import BatchTransform
    from cnntrain.data.loaders import BatchLoader
    from cnntrain.engine import evaluate_loader
    from cnntrain.models import create_model

    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (40,))
    cpu = torch.device("cpu")
    loader = BatchLoader(
        images, labels, 16, BatchTransform([0.5], [0.25], cpu, size=28), device=cpu
    )
    model = create_model("lenet5", in_channels=1, num_classes=10, image_size=28).eval()
    r = evaluate_loader(
        model, loader, num_classes=10, keep_predictions=True, keep_logits=True, tta=tta
    )
    with torch.no_grad():
        x = (images.float() / 255 - 0.5) / 0.25
        out = model(x) if tta is None else (model(x) + model(x.flip(-1))) / 2
    torch.testing.assert_close(r["logits"], out)
    kept, direct = terms_of(r), sample_terms(out, labels)
    for name in ("confidence", "nll", "brier"):
        torch.testing.assert_close(kept[name], direct[name])
    assert metrics(kept)["ece"] == pytest.approx(metrics(direct)["ece"])
    assert metrics(kept)["nll"] == pytest.approx(r["loss"])


def test_fit_temperature_recovers_the_temperature_a_calibrated_model_was_sharpened_by():
    torch.manual_seed(0)
    logits = torch.randn(4000, 10) * 2
    target = torch.distributions.Categorical(logits=logits).sample()  # calibrated at T = 1
    assert fit_temperature(logits * 3, target) == pytest.approx(3, rel=0.1)
    assert fit_temperature(logits / 2, target) == pytest.approx(0.5, rel=0.1)
    # all right and confident: the NLL falls as T -> 0; the fit ends at a number, within bounds
    t = fit_temperature(torch.eye(3).repeat(5, 1) * 10, torch.arange(3).repeat(5))
    assert 0.01 <= t < 1
    assert fit_temperature(torch.eye(3).repeat(5, 1) * 0.01, torch.arange(3).repeat(5)) == (
        pytest.approx(0.01)
    )


def test_calibrated_copy_is_named_beside_the_checkpoint():
    assert calibrated_path(Path("/r/best.pt")) == Path("/r/best.calibrated.pt")
    assert calibrated_path(Path("/r/best.calibrated.pt")) == Path("/r/best.calibrated.pt")
    assert calibrated_path(Path("/r/model")) == Path("/r/model.calibrated.pt")


def test_calibrate_is_a_flag():
    assert "calibrate=2" in refusal("ckpt=x.pt", "calibrate=2", config="eval")


# ------------------------------------------------------------------ a trained model, in-process


@pytest.fixture(scope="module")
def overconfident(tmp_path_factory):
    """A LeNet trained briefly on the bundled Fashion-MNIST sample, and a copy whose last layer
    is multiplied by 5: the same top-1, logits 5x larger, confidences far above its accuracy."""
    from cnntrain.train import train

    root = tmp_path_factory.mktemp("calibration")
    results = train(
        compose_app(
            "train",
            "data=fashion_mnist_mini",
            "device=cpu",
            "epochs=2",
            "optim=adam",
            "aug=none",
            "max_steps_per_epoch=30",
        ),
        run_dir=root / "run",
    )
    assert 0 < results["test_ece"] < 1  # training's results.json has the test ECE too
    state = torch.load(root / "run/checkpoints/best.pt", weights_only=True)
    for name in ("classifier.5.weight", "classifier.5.bias"):
        state["model"][name] = state["model"][name] * 5
    path = root / "overconfident" / "best.pt"
    path.parent.mkdir()
    torch.save(state, path)
    return path


def evaluate_at(ckpt: Path, out: Path, *overrides):
    from cnntrain.evaluate import evaluate

    return evaluate(compose_app("eval", f"ckpt={ckpt}", "device=cpu", *overrides), run_dir=out)


@pytest.fixture(scope="module")
def calibrated(overconfident, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrated_eval")
    digest = hashlib.sha256(overconfident.read_bytes()).hexdigest()
    report = evaluate_at(overconfident, out, "calibrate=true")
    assert hashlib.sha256(overconfident.read_bytes()).hexdigest() == digest  # never modified
    return report, out


def test_calibrate_lowers_the_ece_of_an_overconfident_model(calibrated, overconfident):
    report, out = calibrated
    before, after = report["calibration"], report["calibration"]["calibrated"]
    assert before["temperature"] == 1.0 and after["temperature"] > 2  # the x5 is undone
    assert after["ece"] < before["ece"] / 2 and after["nll"] < before["nll"]
    assert after["val_nll_after"] < after["val_nll_before"] and after["fit_split"] == "val"
    assert after["fit_samples"] == 600 and after["checkpoint"] == str(
        overconfident.with_name("best.calibrated.pt")
    )
    written = json.loads((out / "report.json").read_text())["calibration"]
    assert written["calibrated"]["ece"] == pytest.approx(after["ece"])
    md = (out / "report.md").read_text()
    assert f"ECE {before['ece']:.4f}" in md and f"T = {after['temperature']:.4g}" in md
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_calibrated_copy_loads_weights_only_and_reports_at_its_temperature(
    calibrated, overconfident, tmp_path
):
    report, _ = calibrated
    copy = overconfident.with_name("best.calibrated.pt")
    state = torch.load(copy, weights_only=True)
    assert state["calibration"]["temperature"] == report["calibration"]["calibrated"]["temperature"]
    assert "optimizer" not in state  # an inference checkpoint
    again = evaluate_at(copy, tmp_path / "ev", "predictions=false")
    assert again["top1"] == report["top1"]  # dividing by T > 0 keeps every argmax
    assert again["calibration"]["ece"] == pytest.approx(report["calibration"]["calibrated"]["ece"])
    assert again["loss"] == pytest.approx(report["calibration"]["calibrated"]["nll"], rel=1e-4)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration_images")
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        pixels = torch.randint(0, 256, (28, 28), dtype=torch.uint8, generator=g)
        Image.fromarray(pixels.numpy()).save(folder / f"img_{i}.png")
    return folder


def predict_with(ckpt: Path, images: Path, out: Path):
    from cnntrain.predict import predict

    cfg = compose_app("predict", f"ckpt={ckpt}", f"inputs={images}", "device=cpu", "topk=10")
    return {Path(r["file"]).name: dict(r["top"]) for r in predict(cfg, run_dir=out)}


def test_cnnpredict_uses_the_stored_temperature(
    calibrated, overconfident, images, tmp_path, caplog
):
    temperature = calibrated[0]["calibration"]["calibrated"]["temperature"]
    raw = predict_with(overconfident, images, tmp_path / "raw")
    with caplog.at_level("INFO", logger="cnntrain"):
        tempered = predict_with(
            overconfident.with_name("best.calibrated.pt"), images, tmp_path / "t"
        )
    assert f"stores the temperature T = {temperature:.4g}" in caplog.text
    for name, probs in raw.items():
        classes = sorted(probs)
        p = torch.tensor([probs[c] for c in classes], dtype=torch.float64)
        q = torch.tensor([tempered[name][c] for c in classes], dtype=torch.float64)
        # softmax(z / T) = p^(1/T), renormalized
        expected = p.log().div(temperature).softmax(0)
        torch.testing.assert_close(q, expected, rtol=1e-3, atol=1e-5)
        assert max(probs, key=probs.get) == max(tempered[name], key=tempered[name].get)
        assert q.max() < p.max()  # T > 1: less confident


@pytest.mark.parametrize(
    "value, shown",
    [
        (-1.5, "-1.5"),
        (float("nan"), "nan"),
        ("1.5", "'1.5'"),
        (0, "0"),
        (True, "true"),
        (float("inf"), "inf"),
        (None, "null"),
    ],
)
def test_a_damaged_stored_temperature_is_refused_in_one_line(
    calibrated, overconfident, images, tmp_path, value, shown
):
    state = torch.load(overconfident.with_name("best.calibrated.pt"), weights_only=True)
    state["calibration"]["temperature"] = value
    damaged = tmp_path / "damaged.pt"
    torch.save(state, damaged)
    needle = f"{damaged}: its stored calibration.temperature={shown} is not a finite number > 0"
    for run in (
        lambda: predict_with(damaged, images, tmp_path / "p"),
        lambda: evaluate_at(damaged, tmp_path / "e"),
    ):
        with pytest.raises(UserError) as e:
            run()
        assert str(e.value).startswith(needle) and "\n" not in str(e.value)


def test_calibrate_without_a_val_split_is_one_line(overconfident, tmp_path):
    state = torch.load(overconfident, weights_only=True)
    state["config"]["data"]["val_split"] = 0.0
    path = tmp_path / "noval" / "best.pt"
    path.parent.mkdir()
    torch.save(state, path)
    with pytest.raises(UserError) as e:
        evaluate_at(path, tmp_path / "ev", "calibrate=true")
    message = str(e.value)
    assert "has no val split" in message and "data.val_split>0" in message and "\n" not in message
    assert not path.with_name("best.calibrated.pt").exists()


def test_calibrate_with_tta_flip_fits_on_the_flip_averaged_logits(overconfident, tmp_path):
    copy = tmp_path / "flip" / "best.pt"
    copy.parent.mkdir()
    copy.write_bytes(overconfident.read_bytes())
    report = evaluate_at(copy, tmp_path / "ev", "calibrate=true", "tta=flip", "predictions=false")
    before, after = report["calibration"], report["calibration"]["calibrated"]
    assert after["tta"] == "flip" and after["ece"] < before["ece"] and after["temperature"] > 2
    stored = torch.load(copy.with_name("best.calibrated.pt"), weights_only=True)["calibration"]
    assert stored["tta"] == "flip" and stored["temperature"] == after["temperature"]


def test_reliability_figure_shows_counts_the_diagonal_and_the_ece():
    from cnntrain.calibration import reliability_figure

    cal = of_logits(PROBS.log(), TARGET)
    after = {**of_logits(PROBS.log(), TARGET, temperature=2.0), "temperature": 2.0}
    report = {"model": "lenet5", "dataset": "mnist", "split": "test", "num_samples": 5}
    for calibration, panels in ((cal, 1), ({**cal, "calibrated": after}, 2)):
        fig, plt = reliability_figure({**report, "calibration": calibration})
        try:
            assert len(fig.axes) == panels
            ax = fig.axes[0]
            assert ax.get_title() == f"T = 1: ECE {cal['ece']:.4f}"
            assert sorted(t.get_text() for t in ax.texts) == ["1", "1", "1", "2"]  # per bin
            assert any(list(line.get_xdata()) == [0, 1] for line in ax.lines)  # the diagonal
            fig.canvas.draw()  # a count over a full bar stays inside the axes
            top = max(ax.texts, key=lambda t: t.get_position()[1])
            assert top.get_window_extent().y1 <= ax.get_window_extent().y1
            if panels == 2:
                assert fig.axes[1].get_title().startswith("T = 2: ECE")
        finally:
            plt.close(fig)
