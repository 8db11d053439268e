"""Checkpoint files: atomic writes, safe loading, clear refusals."""

import os

import pytest
import torch

from cnntrain.checkpoint import (
    CheckpointSaver,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    upgrade_config,
)
from cnntrain.errors import UserError


def core(epoch=1, value=0.0):
    return {
        "model": {"w": torch.full((3,), value)},
        "config": {"a": 1},
        "classes": ["x", "y"],
        "epoch": epoch,
        "metrics": {"val_acc": value},
    }


def test_save_then_load_weights_only(tmp_path):
    save_checkpoint(core(), tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert state["classes"] == ["x", "y"] and torch.equal(state["model"]["w"], torch.zeros(3))
    assert load_checkpoint(tmp_path / "c.pt")["epoch"] == 1
    assert oct(os.stat(tmp_path / "c.pt").st_mode & 0o777) != oct(
        0o600
    )  # not mkstemp's private mode


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    save_checkpoint(core(value=1.0), tmp_path / "last.pt")

    def half_write(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(UserError, match="last.pt: disk full"):
        save_checkpoint(core(value=2.0), tmp_path / "last.pt")
    assert load_checkpoint(tmp_path / "last.pt")["metrics"]["val_acc"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    save_checkpoint({**core(), "rng": rng_state(torch.device("cpu"))}, tmp_path / "c.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"], torch.device("cpu"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_saver_keeps_last_and_best(tmp_path):
    saver = CheckpointSaver(tmp_path)
    for epoch, acc in enumerate([0.5, 0.7, 0.6], 1):
        saver.save(core(epoch, acc), {"optimizer": {"state": {}}}, acc)
    assert load_checkpoint(saver.last)["epoch"] == 3 and "optimizer" in load_checkpoint(saver.last)
    best = load_checkpoint(saver.best)
    assert best["epoch"] == 2 and "optimizer" not in best
    assert CheckpointSaver(tmp_path, best_metric=0.7).is_better(0.65) is False


def test_load_refusals_name_the_path(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    save_checkpoint(core(), tmp_path / "ok.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:200])
    with pytest.raises(UserError, match="cut.pt is truncated"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UserError, match="not a cnntrain checkpoint"):
        load_checkpoint(tmp_path / "list.pt")


def old_config(name, channels, gray=None, rgb=None):
    """A stored config as runs wrote it before data.kind: aug.gray for 1 channel, aug.rgb else."""
    off = dict(shift=0, degrees=0.0, hflip=False, crop_scale=None)
    return {
        "data": {
            "name": name,
            "channels": channels,
            "mean": [0.5] * channels,
            "std": [0.25] * channels,
        },
        "aug": {
            "name": "basic",
            "gray": {**off, **(gray or {})},
            "rgb": {**off, **(rgb or {})},
            "policy": None,
        },
    }


@pytest.mark.parametrize(
    "name,channels,kind,section",
    [
        ("mnist", 1, "digits", "gray"),
        ("fashion_mnist", 1, "clothing", "gray"),
        ("cifar10", 3, "natural", "rgb"),
        ("imagefolder", 1, "natural", "gray"),
        ("imagefolder", 3, "natural", "rgb"),
    ],
)
def test_an_old_stored_config_is_upgraded_to_data_kind(tmp_path, name, channels, kind, section):
    config = old_config(name, channels, gray=dict(shift=1), rgb=dict(shift=4, hflip=True))
    save_checkpoint({**core(), "config": config}, tmp_path / "old.pt")
    upgraded = load_checkpoint(tmp_path / "old.pt")["config"]
    assert upgraded["data"] == {**config["data"], "kind": kind}
    assert upgraded["aug"] == {
        "name": "basic",
        "policy": None,  # the section it trained with, no zoom then
        kind: {**config["aug"][section], "scale": None},
    }
    assert upgrade_config(upgraded) == upgraded  # a config with data.kind is left as it is
