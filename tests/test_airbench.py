"""model=airbench94 and experiment=cifar10_airbench on the CPU: the whitening layer whitens the
training patches, a new run computes it from the training images before its first step, a
resumed run keeps the stored one, and the recipe learns from CIFAR-format files."""

import pytest
import torch
import torch.nn.functional as F
from fakedata import make_color_images, write_cifar
from hydra import compose, initialize_config_module

from cnntrain.checkpoint import load_checkpoint
from cnntrain.data import build_data
from cnntrain.datainit import init_images
from cnntrain.models import create_model
from cnntrain.models.airbench import WHITEN_EPS, Airbench94, patch_eigens
from cnntrain.train import train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """100 training and 50 test images in CIFAR-10's files, a class per colour."""
    return write_cifar(
        tmp_path_factory.mktemp("colours"), n_train=100, n_test=50, make=make_color_images
    )


def recipe(root, *overrides):
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[
                "experiment=cifar10_airbench",
                f"data.root={root}",
                "data.download=false",
                "device=cpu",
                "compile=false",  # minutes of compiling on 2 cores; test_training covers it
                "amp=false",  # bf16 on a CPU without AMX: several times slower
                *overrides,
            ],
        )


def test_whitening_layer_whitens_the_patches_it_was_computed_from():
    torch.manual_seed(0)
    # neighbouring pixels correlated, as in photos: a blurred noise image
    x = F.avg_pool2d(torch.randn(64, 3, 36, 36), 5, 1)
    x = (x - x.mean()) / x.std()
    model = Airbench94(3, 10)
    model.init_from_data(x)
    out = F.conv2d(x, model.whiten.weight)  # the layer without its (trained) bias
    rows = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
    half = rows.shape[1] // 2
    assert half == 12 and torch.equal(rows[:, half:], -rows[:, :half])
    moment = rows[:, :half].T @ rows[:, :half] / len(rows)
    eigenvalues, _ = patch_eigens(x, 2)
    # the second moment is diag(l / (l + eps)): the identity, but for the eps of the scaling
    expected = torch.diag(eigenvalues / (eigenvalues + WHITEN_EPS))
    assert torch.allclose(moment, expected, atol=1e-4)
    assert torch.allclose(moment, torch.eye(half), atol=0.02)


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32), (3, 9)])
def test_any_channel_count_and_size_down_to_9px(channels, size):
    model = create_model("airbench94", in_channels=channels, num_classes=7, image_size=size)
    model.init_from_data(torch.randn(4, channels, size, size))
    assert model(torch.randn(2, channels, size, size)).shape == (2, 7)
    assert model.whiten.out_channels == 8 * channels and not model.whiten.weight.requires_grad


def test_below_9px_is_one_line():
    from cnntrain.errors import UserError
    from cnntrain.models import build_model

    with pytest.raises(UserError, match=r"^model airbench94 cannot take 3x8x8 input \("):
        build_model({"name": "airbench94"}, 3, 10, 8, CPU)


def test_recipe_learns_on_cifar_files_with_whitening_from_the_training_images(colours, tmp_path):
    # the recipe at a batch of 20 (100 images: 5 steps an epoch): airbench's lr per image (1.5
    # per 1024) would give 0.03, too little for 10 steps; an EMA of 0.95 would still hold
    # 60 % of the initial weights after 10 steps
    cfg = recipe(colours, "epochs=2", "data.batch_size=20", "optim.lr=0.1", "ema.decay=null")
    results = train(cfg, run_dir=tmp_path)
    assert results["test_acc"] > 0.3 and results["test_tta"] == "flip_shift"  # chance: 0.1
    # a new run's whitening weights are those of its training images (init_from_data), kept
    data = build_data(cfg.data, cfg.aug, device=CPU, seed=cfg.seed)
    expected = Airbench94(3, 10)
    expected.init_from_data(init_images(data.loaders["train"], CPU))
    stored = load_checkpoint(tmp_path / "checkpoints/best.pt")["model"]["whiten.weight"]
    assert torch.allclose(stored, expected.whiten.weight)
    assert not torch.allclose(stored, Airbench94(3, 10).whiten.weight)


def test_a_resumed_run_keeps_its_whitening_weights(colours, tmp_path, monkeypatch):
    first = tmp_path / "first"
    train(recipe(colours, "epochs=1", "max_steps_per_epoch=1", "tta=null"), run_dir=first)
    before = load_checkpoint(first / "checkpoints/last.pt")

    def fail(self, images):
        raise AssertionError("a resumed run computed its whitening weights again")

    monkeypatch.setattr(Airbench94, "init_from_data", fail)
    cfg = recipe(
        colours,
        "epochs=2",
        "max_steps_per_epoch=1",
        "tta=null",
        f"resume={first}/checkpoints/last.pt",
        "resume_allow_changes=[epochs]",
    )
    train(cfg, run_dir=tmp_path / "second")
    after = load_checkpoint(tmp_path / "second/checkpoints/last.pt")
    assert after["epoch"] == 2
    for state in ("model", "train_model"):  # the EMA's and the trained one
        assert torch.equal(after[state]["whiten.weight"], before[state]["whiten.weight"])
        assert not torch.equal(after[state]["whiten.bias"], before[state]["whiten.bias"])
