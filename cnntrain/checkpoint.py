"""Checkpoints: plain dicts of tensors and containers, so `torch.load(weights_only=True)` reads
them, written atomically (a temp file in the same folder, fsync, os.replace): a crash mid-write
leaves the previous file intact, never a truncated one under the final name."""
from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from cnntrain.errors import UserError

REQUIRED_KEYS = ("model", "config", "classes", "epoch", "metrics")


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A cnntrain checkpoint, loaded safely on the CPU; any problem is one UserError naming the path."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found (pass ckpt=/resume= a .pt file written by "
                        "cnntrain, e.g. outputs/<date>/<time>/checkpoints/best.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # garbage makes the unpickler fail in many ways
        if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):
            # pickled Python objects: refused, never retried with weights_only=False
            raise UserError(f"checkpoint {path} holds Python objects that need unsafe loading and "
                            "was refused; only weights-only checkpoints are read") from None
        raise UserError(f"checkpoint {path} is truncated or not a PyTorch file "
                        f"({type(e).__name__}); use another checkpoint") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise UserError(f"{path} is not a cnntrain checkpoint (it lacks the keys "
                        f"{', '.join(REQUIRED_KEYS)})")
    return state


def rng_state() -> dict:
    """All RNG states, as weights-only-loadable values."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointSaver:
    """Keeps `last.pt` (everything needed to resume) and `best.pt` (weights and metadata of the
    epoch with the best monitored metric) in one folder."""

    def __init__(self, folder: str | os.PathLike, best_metric: float | None = None):
        self.folder = Path(folder)
        self.best_metric = best_metric
        self.last = self.folder / "last.pt"
        self.best = self.folder / "best.pt"

    def is_better(self, metric: float) -> bool:
        return self.best_metric is None or metric > self.best_metric

    def save(self, core: dict, resume_state: dict, metric: float) -> bool:
        """`core`: model/config/classes/epoch/metrics; `resume_state`: optimizer, scheduler, ....
        Writes last.pt, then best.pt if `metric` improved. Returns whether it did."""
        improved = self.is_better(metric)
        if improved:
            self.best_metric = metric
        save_checkpoint({**core, **resume_state, "best_metric": self.best_metric}, self.last)
        if improved:
            save_checkpoint(core, self.best)
        return improved
