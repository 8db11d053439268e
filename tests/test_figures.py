"""The pictures' content, checked on the matplotlib figures before they are saved: titles and
labels say what is shown, colour bars exist, epoch ticks are whole, no caption covers an image."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cnntrain.models import create_model
from cnntrain.report import _pyplot, per_class_figure, prediction_captions, samples_figure
from cnntrain.viz import (
    _capture,
    feature_maps_figure,
    filters_figure,
    grad_cam,
    grad_cam_figure,
    layer_maps,
    stage_layers,
)

plt = _pyplot()


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def png_size(fig) -> tuple[int, int]:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return Image.open(buffer).size


def model(name, channels, size=32):
    torch.manual_seed(0)
    return create_model(name, in_channels=channels, num_classes=10, image_size=size).eval()


def test_filters_gray_have_layer_shape_and_weight_colour_bar():
    net = model("lenet5", 1, 28)
    fig = filters_figure(net, plt)
    ax = fig.axes[0]
    assert ax.get_title() == "features.0: 6 filters 1x5x5"
    image = ax.images[0]
    assert image.colorbar is not None and image.colorbar.ax.get_ylabel() == "weight"
    low, high = image.get_clim()  # one scale centred on 0 that holds every weight
    assert low == -high and high == pytest.approx(net.features[0].weight.abs().max().item())
    assert png_size(fig)[0] >= 400  # was a 98x66 thumbnail


def test_filters_rgb_say_how_they_are_scaled():
    fig = filters_figure(model("resnet20", 3), plt)
    ax = fig.axes[0]
    assert ax.get_title().startswith("stem.0: 16 filters 3x3x3") and "min-max" in ax.get_title()
    assert len(fig.axes) == 1  # no colour bar: RGB has no single scale
    assert min(png_size(fig)) >= 400  # was 130x130


def lenet_maps():
    net = model("lenet5", 1, 28)
    x = torch.randn(1, 1, 28, 28)
    outputs, hooks = _capture(net, stage_layers(net, x))
    with torch.inference_mode():
        net(x)
    for h in hooks:
        h.remove()
    return net, x, layer_maps(net, outputs, 0)


def test_feature_maps_rows_say_module_class_and_output_size():
    _, _, maps = lenet_maps()
    assert list(maps) == [
        "features.1 (ReLU) → 6×28×28",
        "features.2 (MaxPool2d) → 6×14×14",
        "features.4 (ReLU) → 16×10×10",
        "features (Sequential) → 16×5×5",
    ]
    pixels = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    fig = feature_maps_figure(pixels, maps, "digit.png: 3 (0.900)", plt)
    labels = [sub._suptitle.get_text() for sub in fig.subfigs]
    assert labels == ["digit.png: 3 (0.900)", *maps]
    for sub, fmap in zip(fig.subfigs[1:], maps.values()):
        images = [ax.images[0] for ax in sub.axes if ax.images]
        assert len(images) == len(fmap)
        assert (
            sum(im.colorbar is not None for im in images) == 1
        )  # one per layer: its channels share the scale
        assert all(im.get_clim() == images[0].get_clim() for im in images)
    width, height = png_size(fig)
    assert width <= 1000 and height <= 1100  # rows of 8, not 17 columns mostly empty (1870 px wide)


def test_grad_cam_has_importance_colour_bar():
    net, x, _ = lenet_maps()
    cam = grad_cam(net, x[0], "features")
    fig = grad_cam_figure(
        torch.zeros(1, 28, 28, dtype=torch.uint8), cam, "Grad-CAM at features", plt
    )
    heat = fig.axes[1].images[-1]
    assert heat.colorbar is not None and heat.get_clim() == (0, 1)
    assert "importance" in heat.colorbar.ax.get_ylabel()


def tracked_figure(tmp_path, monkeypatch, **kwargs):
    import cnntrain.tracking
    from cnntrain.tracking import RunTracker

    saved = []
    monkeypatch.setattr(cnntrain.tracking, "save_figure", lambda fig, path, **kw: saved.append(fig))
    run_dir = tmp_path / "2026-11-22" / "10-00-00"
    run_dir.mkdir(parents=True)
    tracker = RunTracker(run_dir, epochs=3, **kwargs)
    for epoch in (1, 2, 3):
        tracker.log_epoch(
            {
                "epoch": epoch,
                "train_loss": 1 / epoch,
                "train_acc": 0.5,
                "val_loss": 1.0,
                "val_acc": 0.5,
                "lr": 0.1 / epoch,
                "time": 1.0,
                "img_per_s": 10.0,
            }
        )
    tracker.close()
    return saved[-1]


def test_curves_have_integer_epochs_and_a_title(tmp_path, monkeypatch):
    fig = tracked_figure(tmp_path, monkeypatch, title="lenet5 on mnist")
    assert fig._suptitle.get_text() == "lenet5 on mnist (2026-11-22/10-00-00)"
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks == [1, 2, 3]  # not 1.25, 1.5, ...


def test_curves_title_defaults_to_run_folder(tmp_path, monkeypatch):
    assert tracked_figure(tmp_path, monkeypatch)._suptitle.get_text() == "2026-11-22/10-00-00"


def test_per_class_bars_carry_values_and_title():
    report = {
        "model": "lenet5",
        "dataset": "mnist",
        "split": "test",
        "top1": 0.75,
        "classes": ["a", "b"],
        "per_class": [{"accuracy": 1.0}, {"accuracy": 0.5}],
    }
    fig = per_class_figure(report)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["1.00", "0.50"]
    assert all(s in ax.get_title() for s in ("lenet5", "mnist", "test"))
    fig.canvas.draw()  # the value over a full bar stays inside the axes
    assert ax.texts[0].get_window_extent().y1 <= ax.get_window_extent().y1


class FakeLoader:
    def sample(self, i):
        return np.full((32, 32, 3 if i % 2 else 1), 20 * i, dtype=np.uint8)


@pytest.mark.parametrize("count", [8, 12, 3])
def test_sample_captions_do_not_cover_images(count):
    """The grid of val/predictions in TensorBoard and cnneval's misclassified.png: the two-line
    caption of a second-row image used to lie over the first row's images."""
    classes = ["airplane", "automobile", "bird"]
    result = {
        "target": torch.arange(count) % 3,
        "predicted": (torch.arange(count) + 1) % 3,
        "confidence": torch.rand(count),
    }
    indices = list(range(count))
    fig = samples_figure(
        FakeLoader(), indices, prediction_captions(result, classes, indices), "validation, epoch 2"
    )
    fig.canvas.draw()
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == count
    for ax in shown:
        caption = ax.title.get_window_extent()
        assert ax.title.get_text().startswith("true: ")
        assert not any(caption.overlaps(other.get_window_extent()) for other in shown)
