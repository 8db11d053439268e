"""The regularizers of the recipes each do what they say (mixup/cutmix, EMA, early stopping,
test-time flips), and every experiment config composes and states its target and source."""

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from hydra import compose, initialize_config_module

from cnntrain.checkpoint import load_checkpoint
from cnntrain.data.augment import BatchTransform
from cnntrain.data.loaders import BatchLoader
from cnntrain.engine import Placement, evaluate_loader
from cnntrain.models import create_model
from cnntrain.train import train

EXPERIMENTS = sorted(
    p.stem for p in (Path(__file__).parents[1] / "configs/experiment").glob("*.yaml")
)


def make_cfg(data_root, *overrides):
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[
                "data=mnist",
                f"data.root={data_root}",
                "data.download=false",
                "device=cpu",
                *overrides,
            ],
        )


def batch(n=16):
    torch.manual_seed(0)
    return torch.rand(n, 3, 8, 8), torch.arange(n) % 4


CPU = torch.device("cpu")


def plain_loader(images, labels, batch_size):
    """Unshuffled batches, normalized with mean 0.5 and std 0.25, nothing else."""
    size = images.shape[-1]
    return BatchLoader(
        images,
        labels,
        batch_size,
        BatchTransform([0.5] * 3, [0.25] * 3, CPU, size=size),
        device=CPU,
    )


def test_training_with_mixup_and_cutmix(data_root, tmp_path):
    results = train(
        make_cfg(data_root, "epochs=1", "aug.mixup_alpha=0.2", "aug.cutmix_alpha=1.0"),
        run_dir=tmp_path,
    )
    assert results["test_acc"] is not None and (tmp_path / "checkpoints/best.pt").is_file()


@pytest.mark.e2e
def test_ema_weights_are_the_ones_validated_and_saved(data_root, tmp_path):
    train(make_cfg(data_root, "epochs=2", "ema.decay=0.9"), run_dir=tmp_path)
    last = load_checkpoint(tmp_path / "checkpoints/last.pt")
    ema, raw = last["model"], last["train_model"]
    assert last["ema_n_averaged"] == 10  # 5 steps per epoch
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    # the val accuracy training logged is the EMA model's: cnneval of best.pt on val reproduces it
    best = load_checkpoint(tmp_path / "checkpoints/best.pt")
    run_cli(
        "cnneval",
        f"ckpt={tmp_path}/checkpoints/best.pt",
        "split=val",
        "device=cpu",
        f"hydra.run.dir={tmp_path / 'ev'}",
        cwd=tmp_path,
    )
    report = json.loads((tmp_path / "ev/report.json").read_text())
    assert report["top1"] == best["metrics"]["val_acc"]


def test_early_stopping_ends_after_patience_epochs_without_progress(data_root, tmp_path):
    # a learning rate too small to change any prediction: val accuracy never improves on epoch 1
    results = train(
        make_cfg(data_root, "epochs=6", "optim.lr=1e-12", "early_stop.patience=2"), run_dir=tmp_path
    )
    assert results["epochs_run"] == 3 and results["best_epoch"] == 1
    assert [int(r["epoch"]) for r in csv.DictReader(open(tmp_path / "metrics.csv"))] == [1, 2, 3]


def test_flip_tta_averages_the_logits_of_both_views():
    torch.manual_seed(0)
    images, labels = (
        torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8),
        torch.randint(0, 10, (20,)),
    )
    loader = plain_loader(images, labels, 8)
    model = create_model("resnet20", in_channels=3, num_classes=10, image_size=32).eval()
    r = evaluate_loader(model, loader, num_classes=10, tta="flip")
    x = (images.float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        out = (model(x) + model(x.flip(-1))) / 2
    assert r["loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(out, labels).item(), rel=1e-5
    )
    assert r["acc"] == (out.argmax(1) == labels).sum().item() / 20


def test_flip_shift_tta_weighs_airbench_six_views():
    """Half the weight on the image and its mirror, a quarter on each of the two views shifted
    by 1 px (reflection padding), each with its mirror: airbench94's tta_level=2."""
    torch.manual_seed(0)
    images, labels = (
        torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8),
        torch.randint(0, 10, (12,)),
    )
    model = create_model("resnet20", in_channels=3, num_classes=10, image_size=32).eval()
    x = (images.float() / 255 - 0.5) / 0.25
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[..., :32, :32], padded[..., 2:, 2:]
    assert torch.equal(up_left[..., 1:, 1:], x[..., :31, :31])  # content moved down-right by 1

    def pair(v):
        return (model(v) + model(v.flip(-1))) / 2

    with torch.no_grad():
        out = 0.5 * pair(x) + 0.25 * pair(up_left) + 0.25 * pair(down_right)
    for layout in (torch.contiguous_format, torch.channels_last):
        loader = plain_loader(images, labels, 5)
        on = Placement(channels_last=layout == torch.channels_last)
        r = evaluate_loader(model, loader, on, num_classes=10, tta="flip_shift")
        assert r["loss"] == pytest.approx(
            torch.nn.functional.cross_entropy(out, labels).item(), rel=1e-5
        )
        assert r["acc"] == (out.argmax(1) == labels).sum().item() / 12


def test_training_final_test_uses_the_configured_tta(data_root, tmp_path, monkeypatch):
    from cnntrain import trainer

    seen = []
    real = trainer.evaluate_loader

    def spy(*args, **kwargs):
        seen.append((kwargs["desc"], kwargs.get("tta")))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate_loader", spy)
    results = train(
        make_cfg(data_root, "epochs=1", "max_steps_per_epoch=1", "tta=flip"), run_dir=tmp_path
    )
    assert seen == [("val", None), ("test", "flip")] and results["test_tta"] == "flip"


@pytest.mark.e2e
def test_cnneval_tta_flip_and_a_bad_tta(data_root, tmp_path):
    train(make_cfg(data_root, "epochs=1"), run_dir=tmp_path / "run")
    ckpt = f"ckpt={tmp_path}/run/checkpoints/best.pt"
    run_cli(
        "cnneval", ckpt, "tta=flip", "device=cpu", f"hydra.run.dir={tmp_path / 'ev'}", cwd=tmp_path
    )
    assert json.loads((tmp_path / "ev/report.json").read_text())["num_samples"] == 200
    proc = run_cli(
        "cnneval",
        ckpt,
        "tta=rotate",
        "device=cpu",
        f"hydra.run.dir={tmp_path / 'bad'}",
        cwd=tmp_path,
        check=False,
    )
    assert (
        proc.returncode == 1
        and "error: tta=rotate is not allowed: it must be one of null, flip" in proc.stderr
    )


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_states_its_target(name):
    text = (Path(__file__).parents[1] / f"configs/experiment/{name}.yaml").read_text()
    assert text.startswith("# @package _global_") and "Target:" in text
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={name}"])
    assert cfg.epochs > 0 and cfg.model.name and cfg.data.name


def one_batch_epoch(model, criterion, lr, grad_clip=None):
    from cnntrain.engine import Update, train_one_epoch

    x, y = batch(8)
    loader = plain_loader((x * 255).to(torch.uint8), y, 8)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return train_one_epoch(
        model, loader, criterion, Update(opt, grad_clip=grad_clip), progress=False
    )


def test_label_smoothing_mixes_the_uniform_distribution_into_the_target():
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=3, num_classes=4, image_size=8)
    smoothed = one_batch_epoch(model, torch.nn.CrossEntropyLoss(label_smoothing=0.3), lr=0.0)[
        "loss"
    ]
    x, y = batch(8)
    x = ((x * 255).to(torch.uint8).float() / 255 - 0.5) / 0.25
    model.train()
    with torch.no_grad():
        logp = model(x).log_softmax(1)
    expected = 0.7 * torch.nn.functional.nll_loss(logp, y) + 0.3 * (-logp.mean(1)).mean()
    assert smoothed == pytest.approx(expected.item(), rel=1e-4)


def test_grad_clip_bounds_the_update():
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=3, num_classes=4, image_size=8)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    one_batch_epoch(model, torch.nn.CrossEntropyLoss(), lr=1.0, grad_clip=1e-3)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert 0 < (after - before).norm() <= 1e-3 * 1.0001  # plain SGD: |update| = lr * |clipped grad|
