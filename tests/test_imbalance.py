"""Imbalanced classes: loss.class_weights (the cross-entropy's weights), data.sampler=balanced
(class-balanced batches, resumable), the run log's note on imbalanced counts, and the scores
that weigh every class alike (macro-F1, balanced accuracy) in results.json and cnneval's report.
In-process, on a fake MNIST (real IDX files) whose last three classes are rare."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import refusal
from fakedata import make_images, write_idx_dataset
from hydra import compose, initialize_config_module

from cnntrain.checkpoint import load_checkpoint
from cnntrain.data.loaders import BatchLoader
from cnntrain.errors import Interrupted, UserError
from cnntrain.imbalance import class_weights
from cnntrain.report import class_averages
from cnntrain.train import train

# per class of the fake training split: 7 common classes, 3 rare ones
COMMON, RARE = 60, 10


def imbalanced_split(n_per_class: list[int], seed: int):
    """(images (N, 28, 28), labels) with n_per_class[c] images of class c."""
    images, labels = make_images(max(n_per_class) * 10, 10, 28, 1, seed)
    keep = np.concatenate([np.flatnonzero(labels == c)[:n] for c, n in enumerate(n_per_class)])
    keep.sort()
    return images[keep, ..., 0], labels[keep]


@pytest.fixture(scope="module")
def rare_root(tmp_path_factory) -> Path:
    """MNIST's layout: a training split of 7 x 60 + 3 x 10 images, a balanced test of 200."""
    root = tmp_path_factory.mktemp("imbalanced")
    train_split = imbalanced_split([COMMON] * 7 + [RARE] * 3, seed=0)
    test_split = imbalanced_split([20] * 10, seed=1)
    return write_idx_dataset(root, "MNIST", train_split, test_split)


def make_cfg(root, *overrides, data="mnist"):
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[
                f"data={data}",
                f"data.root={root}",
                "data.download=false",
                "device=cpu",
                "epochs=1",
                "aug=none",
                *overrides,
            ],
        )


def train_counts() -> list[int]:
    # the val hold-out takes round(10 %) of every class (stratified): 6 of 60, 1 of 10
    return [COMMON - 6] * 7 + [RARE - 1] * 3


# --------------------------------------------------------------------------- class weights
def test_balanced_weights_are_n_over_classes_times_count():
    # scikit-learn's compute_class_weight("balanced", classes=[0,1,2], y) for these counts
    assert class_weights("balanced", [50, 10, 40], "x") == pytest.approx(
        [100 / 150, 100 / 30, 100 / 120]
    )
    assert class_weights("balanced", [5, 0, 5], "x") == [10 / 15, 0.0, 10 / 15]  # none: unused
    assert class_weights([1, 2, 3], [5, 5, 5], "x") == [1.0, 2.0, 3.0]
    assert class_weights(None, [5, 5], "x") is None


def test_the_run_weighs_its_loss_by_the_training_splits_counts(
    rare_root, tmp_path, monkeypatch, caplog
):
    """balanced: the weights of the split that trains (after the val hold-out), handed to the
    cross-entropy together with the label smoothing, and named in the log with the counts."""
    made = []

    class Recorded(torch.nn.CrossEntropyLoss):
        def __init__(self, **kwargs):
            made.append(kwargs)
            super().__init__(**kwargs)

    monkeypatch.setattr("cnntrain.trainer.nn.CrossEntropyLoss", Recorded)
    caplog.set_level("INFO", logger="cnntrain")
    train(
        make_cfg(rare_root, "loss.class_weights=balanced", "label_smoothing=0.1"),
        run_dir=tmp_path,
    )
    counts = train_counts()
    expected = [sum(counts) / (10 * c) for c in counts]
    assert made[-1]["weight"].tolist() == pytest.approx(expected)
    assert made[-1]["label_smoothing"] == 0.1
    shown = ", ".join(f"{w:.4g}" for w in expected)
    assert f"loss.class_weights=balanced: cross-entropy weights [{shown}]" in caplog.text
    assert "imbalanced training split: 54 to 9" in caplog.text  # the counts, no suggestion
    assert "to weigh every class alike" not in caplog.text


def test_a_weight_list_of_the_wrong_length_is_one_line_naming_the_count(rare_root, tmp_path):
    with pytest.raises(UserError) as refused:
        train(make_cfg(rare_root, "loss.class_weights=[1,2,3]"), run_dir=tmp_path)
    message = str(refused.value)
    assert "\n" not in message
    assert "loss.class_weights has 3 value(s) but data=mnist has 10 classes: give 10" in message


@pytest.mark.parametrize(
    "override",
    [
        "loss.class_weights=balance",
        "loss.class_weights=[1,-1]",
        "loss.class_weights=[1,0]",
        "loss.class_weights=[a,b]",
        "loss.class_weights=[]",
        "loss.class_weights=[1,true]",
        "loss.class_weights=[1,inf]",
        "loss.class_weights=2",
        "data.sampler=weighted",
        "data.sampler=[balanced]",
    ],
)
def test_bad_balancing_values_are_one_line_naming_the_key(override):
    message = refusal(override)
    key = override.split("=")[0]
    assert message.startswith(f"{key}=") and " is not allowed: it must be " in message, message
    assert "\n" not in message


# --------------------------------------------------------------------------- the sampler
class _Identity:
    def __call__(self, x, y, seed, **part):
        return x, y


def _loader(labels, *, streamed=False, sampler="balanced", batch_size=50):
    """A training loader whose images are their own index (a 1x1 int image would not do:
    uint8), so a batch says which samples it drew."""
    n = len(labels)
    images = torch.stack([torch.tensor([i // 256, i % 256], dtype=torch.uint8) for i in range(n)])
    loader = BatchLoader(
        images.view(n, 1, 1, 2),
        labels,
        batch_size,
        _Identity(),
        device=torch.device("cpu"),
        streamed=streamed,
        shuffle=True,
        drop_last=True,
        seed=7,
        sampler=sampler,
    )
    return loader


def _drawn(batches) -> torch.Tensor:
    return torch.cat([(x[:, 0, 0, 0].long() * 256 + x[:, 0, 0, 1].long()) for x, _ in batches])


def test_the_balanced_sampler_draws_every_class_about_equally_often():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    loader = _loader(labels)
    loader.set_epoch(1)
    batches = list(loader)
    assert len(batches) == len(_loader(labels, sampler="random")) == 20  # the epoch's length
    drawn = _drawn(batches)
    assert all(torch.equal(y, labels[_drawn([(x, y)])]) for x, y in batches)  # labels go along
    share = torch.bincount(labels[drawn], minlength=3) / len(drawn)
    assert share.tolist() == pytest.approx([1 / 3] * 3, abs=0.05), share
    assert len(drawn.unique()) < len(drawn)  # with replacement: the 10 rare images repeat
    assert set(drawn[labels[drawn] == 2].tolist()) == set(range(990, 1000))  # each of them drawn
    loader.set_epoch(2)
    assert not torch.equal(_drawn(loader), drawn)  # another epoch, other draws


def test_the_balanced_sampler_continues_mid_epoch_and_streamed_as_in_memory():
    labels = torch.tensor([0] * 400 + [1] * 40 + [2] * 60)
    loader, streamed = _loader(labels), _loader(labels, streamed=True)
    for each in (loader, streamed):
        each.set_epoch(3)
    whole = list(loader)
    tail = list(loader.iter_from(4))
    assert len(tail) == len(whole) - 4
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(tail, whole[4:]))
    assert torch.equal(_drawn(streamed), _drawn(whole))


def test_a_mid_epoch_resume_with_the_balanced_sampler_is_exact(
    rare_root, tmp_path, signal_at_batch
):
    """Stopped in the middle of epoch 2 and resumed streaming from host memory: the run ends
    as one that never stopped (480 - 48 held out = 432 images: 6 batches of 64 an epoch)."""

    def cfg(*extra):
        return make_cfg(
            rare_root, "data.sampler=balanced", "deterministic=true", "epochs=2", *extra
        )

    full, part = tmp_path / "full", tmp_path / "part"
    train(cfg(), run_dir=full)
    signal_at_batch(8)
    with pytest.raises(Interrupted):
        train(cfg(), run_dir=part)
    assert load_checkpoint(part / "checkpoints/last.pt")["partial"]["state"][0]["step"] == 2
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    train(cfg("resume=auto", "data.memory_budget_gb=0"), run_dir=part)
    a, b = (load_checkpoint(d / "checkpoints/last.pt") for d in (full, part))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    metrics = [
        [line.split(",")[:5] for line in (d / "metrics.csv").read_text().splitlines()]
        for d in (full, part)
    ]
    assert metrics[0] == metrics[1]


# --------------------------------------------------------------------------- the run log
@pytest.fixture(scope="module")
def plain_run(rare_root, tmp_path_factory):
    """One run on the imbalanced data without either key: (its folder, its log)."""
    import io
    import logging

    run_dir, text = tmp_path_factory.mktemp("plain"), io.StringIO()
    handler, logger = logging.StreamHandler(text), logging.getLogger("cnntrain")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        results = train(make_cfg(rare_root), run_dir=run_dir)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return run_dir, results, text.getvalue()


DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def test_the_log_names_imbalanced_counts_and_suggests_the_keys(plain_run):
    log = plain_run[2]
    counts = ", ".join(
        f"{c} - {name} {n}" for c, (name, n) in enumerate(zip(DIGITS, train_counts()))
    )
    assert f"imbalanced training split: 54 to 9 images per class (6.0x): {counts}\n" in log
    assert (
        "  to weigh every class alike: loss.class_weights=balanced (the loss, by inverse class "
        "frequency) or data.sampler=balanced (the batches, every class equally often)\n"
    ) in log


def test_the_note_is_only_for_counts_more_than_3x_apart(caplog):
    from cnntrain.imbalance import imbalanced, log_balance

    assert not imbalanced([30, 10, 20]) and imbalanced([31, 10, 20]) and imbalanced([5, 0])
    caplog.set_level("INFO", logger="cnntrain")
    log_balance([40] * 9 + [14], DIGITS, None, None, "random")
    assert caplog.text == ""
    log_balance([40] * 9 + [13], DIGITS, None, None, "random")
    assert "40 to 13 images per class (3.1x)" in caplog.text
    caplog.clear()
    many = [f"c{i}" for i in range(12)]
    log_balance([100] * 11 + [0], many, None, None, "balanced")
    assert "(a class has none): smallest c11 0, c0 100" in caplog.text
    assert "largest c10 100" in caplog.text and "to weigh" not in caplog.text


def test_both_balancing_keys_at_once_are_warned_of(caplog):
    from cnntrain.imbalance import log_balance

    log_balance([40, 40], ["a", "b"], [1.0, 1.0], "balanced", "balanced")
    assert "balances twice" in caplog.text


# --------------------------------------------------------------------------- the scores
def test_macro_f1_and_balanced_accuracy_as_computed_by_hand():
    # rows = true class, columns = predicted; class 3 is predicted once but never true
    confusion = torch.tensor([[3, 1, 0, 0], [1, 1, 0, 1], [0, 2, 0, 0], [0, 0, 0, 0]])
    scores = class_averages(confusion)
    # F1 = 2 TP / (true + predicted): 6/8, 2/7, 0/2, 0/1 over the 4 classes seen
    assert scores["macro_f1"] == pytest.approx((0.75 + 2 / 7) / 4)
    # recall of the 3 classes that are true somewhere: 3/4, 1/3, 0/2
    assert scores["balanced_acc"] == pytest.approx((0.75 + 1 / 3) / 3)
    perfect = class_averages(torch.diag(torch.tensor([5, 1, 9])))
    assert perfect == {"macro_f1": 1.0, "balanced_acc": 1.0}


def test_results_and_the_cnneval_report_show_both_beside_top1(plain_run, tmp_path):
    from cnntrain.evaluate import evaluate

    run_dir, results, _ = plain_run
    stored = json.loads((run_dir / "results.json").read_text())
    assert stored["test_macro_f1"] == results["test_macro_f1"]
    assert 0 <= results["test_macro_f1"] <= 1 and 0 <= results["test_balanced_acc"] <= 1
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        cfg = compose(
            config_name="eval", overrides=[f"ckpt={run_dir}/checkpoints/best.pt", "device=cpu"]
        )
    report = evaluate(cfg, run_dir=tmp_path)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["macro_f1"] == pytest.approx(results["test_macro_f1"])
    assert on_disk["balanced_acc"] == pytest.approx(results["test_balanced_acc"])
    per_class = report["per_class"]
    # the test split is balanced: balanced accuracy is top-1, macro-F1 the mean per-class F1
    assert report["balanced_acc"] == pytest.approx(report["top1"])
    assert report["macro_f1"] == pytest.approx(sum(c["f1"] for c in per_class) / len(per_class))
    md = (tmp_path / "report.md").read_text()
    assert f"macro-F1 {report['macro_f1']:.4f}  balanced acc {report['balanced_acc']:.4f}" in md


# --------------------------------------------------------------------------- real data
FASHION = os.environ.get("CNNTRAIN_FASHION_MNIST", "")
RARE_CLASSES = (2, 4, 6)  # Pullover, Coat, Shirt: the classes most often mistaken for others


def fashion_subset(root: Path, keep: float = 0.05) -> Path:
    """Real Fashion-MNIST with only `keep` of the training images of RARE_CLASSES (the first
    ones of each), as IDX files in torchvision's layout; the test set as it is."""
    from cnntrain.data.datafiles import read_idx

    raw = Path(FASHION) / "FashionMNIST" / "raw"
    images = read_idx(str(raw / "train-images-idx3-ubyte"), 3).numpy()
    labels = read_idx(str(raw / "train-labels-idx1-ubyte"), 1).numpy()
    drop = np.zeros(len(labels), dtype=bool)
    for c in RARE_CLASSES:
        rows = np.flatnonzero(labels == c)
        drop[rows[round(len(rows) * keep) :]] = True
    test = (
        read_idx(str(raw / "t10k-images-idx3-ubyte"), 3).numpy(),
        read_idx(str(raw / "t10k-labels-idx1-ubyte"), 1).numpy(),
    )
    return write_idx_dataset(root, "FashionMNIST", (images[~drop], labels[~drop]), test)


def rare_recall(run_dir: Path, out: Path) -> float:
    """The mean test recall of RARE_CLASSES for the run's best.pt (cnneval's report)."""
    from cnntrain.evaluate import evaluate

    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        cfg = compose(
            config_name="eval",
            overrides=[f"ckpt={run_dir}/checkpoints/best.pt", "device=cpu", "predictions=false"],
        )
    per_class = evaluate(cfg, run_dir=out)["per_class"]
    return sum(per_class[c]["recall"] for c in RARE_CLASSES) / len(RARE_CLASSES)


@pytest.mark.slow
@pytest.mark.skipif(
    not (Path(FASHION) / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file(),
    reason="real Fashion-MNIST not available (set CNNTRAIN_FASHION_MNIST)",
)
def test_balancing_raises_macro_f1_on_imbalanced_fashion_mnist(tmp_path):
    """Pullover, Coat and Shirt at 5 % of their training images (300 each, the other classes
    6000), LeNet-5 for 3 epochs of 200 batches (about 4 minutes each on 2 busy cores), scored
    on the whole (balanced) test set. The balanced sampler raises macro-F1 and balanced
    accuracy by several points. The weighted loss raises the rare classes' recall, but in so
    few steps it gains little overall (docs/training.md has the numbers): it must not lose."""
    import time

    root = fashion_subset(tmp_path / "data")
    scores = {}
    for name, override in (
        ("none", []),
        ("weights", ["loss.class_weights=balanced"]),
        ("sampler", ["data.sampler=balanced"]),
    ):
        cfg = make_cfg(
            root,
            "epochs=3",
            "max_steps_per_epoch=200",
            "aug=basic",
            *override,
            data="fashion_mnist",
        )
        started = time.perf_counter()
        results = train(cfg, run_dir=tmp_path / name)
        scores[name] = {
            k: round(results[f"test_{k}"], 4) for k in ("acc", "macro_f1", "balanced_acc")
        }
        scores[name]["rare_recall"] = round(
            rare_recall(tmp_path / name, tmp_path / f"eval_{name}"), 4
        )
        scores[name]["seconds"] = round(time.perf_counter() - started)
    print(json.dumps(scores, indent=2))
    none, weights, sampler = scores["none"], scores["weights"], scores["sampler"]
    assert sampler["macro_f1"] > none["macro_f1"] + 0.03, scores
    assert sampler["balanced_acc"] > none["balanced_acc"] + 0.03, scores
    assert sampler["rare_recall"] > none["rare_recall"] + 0.1, scores
    assert weights["rare_recall"] > none["rare_recall"] + 0.03, scores
    assert weights["macro_f1"] > none["macro_f1"] - 0.005, scores
