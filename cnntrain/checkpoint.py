"""Checkpoints: plain dicts of tensors and containers, so `torch.load(weights_only=True)` reads
them, written atomically (a temp file in the same folder, fsync, os.replace): a crash mid-write
leaves the previous file intact, never a truncated one under the final name."""

from __future__ import annotations

import os
import pickle
import random
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import cast

import numpy as np
import torch

from cnntrain.errors import UserError
from cnntrain.filekind import not_a_checkpoint, require_regular
from cnntrain.files import atomic_write

REQUIRED_KEYS = ("model", "config", "classes", "epoch", "metrics")


def save_checkpoint(state: dict, path: str | os.PathLike, setting: str = "hydra.run.dir=") -> None:
    """Writes `state` to `path` atomically; a failed write (disk full, no permission) is one
    UserError naming the path and the `setting` that chooses it, with the previous file intact
    and no temp file left."""
    with atomic_write(path, "wb", what="checkpoint", setting=setting) as f:
        torch.save(on_cpu(state), f)


def on_cpu(obj):
    """`obj` with every tensor in it moved to the CPU: a checkpoint written on a GPU then loads
    with a plain torch.load(path, weights_only=True) on a machine without one."""
    if torch.is_tensor(obj):
        return obj.cpu()
    if isinstance(obj, dict):
        out = {k: on_cpu(v) for k, v in obj.items()}
        if hasattr(obj, "_metadata"):
            # a state_dict: its module versions (weights_only loading keeps them) tell a module's
            # loader which layout the tensors have; MNASNet refuses weights without them
            out = OrderedDict(out)  # a plain OrderedDict, with the attribute state_dict() sets
            setattr(out, "_metadata", obj._metadata)  # noqa: B010 (mypy: not an OrderedDict field)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A cnntrain checkpoint, loaded safely on the CPU; any problem is one UserError naming the path."""
    path = require_file(path)
    try:
        with warnings.catch_warnings():
            # torch's notes on a file's pickle protocol or a TorchScript archive would stand above
            # the one line that says what the file is
            for note in ("Detected pickle protocol", ".*looks like a TorchScript archive"):
                warnings.filterwarnings("ignore", message=note, category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:  # the file is there but cannot be read: the bytes are not to blame
        raise UserError(f"checkpoint {path} cannot be read: {e.strerror or e}") from None
    except Exception as e:  # garbage makes the unpickler fail in many ways
        # torch words a refused global in several ways ("Unsupported global: GLOBAL x", "unsupported
        # GLOBAL x whose module is blocked"); the name tells a pickled model from an attack
        refused = (
            re.search(r"GLOBAL ([\w.]+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        )
        if refused:
            # never retried with weights_only=False: that would run the file's code
            raise UserError(
                f"checkpoint {path} holds Python objects ({refused[1]}) that need unsafe "
                "loading and was refused; only weights-only checkpoints are read"
            ) from None
        reason = _not_a_checkpoint(path)
        raise UserError(
            f"checkpoint {path} {reason}"
            if reason
            else f"checkpoint {path} is truncated or "
            f"not a PyTorch file ({type(e).__name__}); use another checkpoint"
        ) from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise UserError(
            f"{path} is not a cnntrain checkpoint (it lacks the keys {', '.join(REQUIRED_KEYS)})"
        )
    state["config"] = upgrade_config(state["config"])
    for key in ("model", "train_model"):
        bad = nonfinite(state.get(key) or {})
        if bad:
            raise UserError(
                f"checkpoint {path} holds non-finite weights ({bad}): the run it comes "
                "from diverged; use an earlier checkpoint or retrain with a lower optim.lr"
            )
    return state


# data.kind of the checkpoints written before it existed, from their data.name
OLD_KINDS = {"mnist": "digits", "fashion_mnist": "clothing"}
# What checkpoints written before optim.name and sched.name stored, exactly: each string is
# compared, never imported. Any other `_target_` stays, for stored.validated to refuse.
OLD_TARGETS: dict[str, dict[str, str | None]] = {
    "model": {"cnntrain.models.create_model": None},
    "optim": {"torch.optim.SGD": "sgd", "torch.optim.Adam": "adam", "torch.optim.AdamW": "adamw"},
    "sched": {
        f"torch.optim.lr_scheduler.{cls}": name
        for cls, name in (
            ("CosineAnnealingLR", "cosine"),
            ("StepLR", "step"),
            ("MultiStepLR", "multistep"),
            ("OneCycleLR", "onecycle"),
            ("ConstantLR", "none"),
        )
    },
}


def upgrade_config(config):
    """A stored config of an older checkpoint in today's keys (see _upgrade_targets and
    _upgrade_kind). Every tool reads stored configs through load_checkpoint, so they all see the
    upgraded one."""
    if not isinstance(config, dict):
        return config
    return _upgrade_kind(_upgrade_targets(config))


def _upgrade_targets(config: dict) -> dict:
    """Checkpoints written before optim.name/sched.name: the `_target_` and `_partial_: true`
    of the model, optimizer and schedule cnntrain's own configs had, as names."""
    config = dict(config)
    for group, known in OLD_TARGETS.items():
        node = config.get(group)
        if (
            not isinstance(node, dict)
            or node.get("_target_") not in known
            or node.get("_partial_") is not True
        ):
            continue
        node = {k: v for k, v in node.items() if k not in ("_target_", "_partial_")}
        if known[config[group]["_target_"]] is not None:
            node.setdefault("name", known[config[group]["_target_"]])
        config[group] = node
    return config


def _upgrade_kind(config: dict) -> dict:
    """A stored config written before data.kind, when aug.gray applied to 1-channel data and
    aug.rgb to the rest: data.kind from data.name and aug.<kind> the section that run trained
    with (it had no random zoom)."""
    data = config.get("data")
    if not isinstance(data, dict) or "kind" in data:
        return config
    kind = OLD_KINDS.get(str(data.get("name")), "natural")
    config = {**config, "data": {**data, "kind": kind}}
    aug = config.get("aug")
    if isinstance(aug, dict) and ("gray" in aug or "rgb" in aug):
        channels = data.get("channels")  # written by every run; the mean's length says it too
        gray = (channels if isinstance(channels, int) else len(data.get("mean") or ())) == 1
        config["aug"] = {k: v for k, v in aug.items() if k not in ("gray", "rgb")}
        config["aug"][kind] = {"scale": None, **aug.get("gray" if gray else "rgb", {})}
    return config


def require_file(path: str | os.PathLike) -> Path:
    return require_regular(
        Path(path),
        "checkpoint",
        "pass ckpt=/resume= a .pt file written by cnntrain, "
        "e.g. outputs/<date>/<time>_<model>_<data>/checkpoints/best.pt",
    )


def _not_a_checkpoint(path: Path) -> str | None:
    try:
        return not_a_checkpoint(path)
    except OSError:  # gone or unreadable since torch.load tried: the generic reason stands
        return None


def nonfinite(state_dict: dict) -> str | None:
    """Which floating-point tensors of a state_dict hold NaN or Inf ("fc.weight and 2 more"),
    or None: no tool computes or reports numbers from such weights."""
    bad = [
        name
        for name, t in state_dict.items()
        if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()
    ]
    return None if not bad else bad[0] + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")


def rng_state(device: torch.device) -> dict:
    """This process's RNG states (Python, NumPy, the CPU's and `device`'s generators), as
    weights-only-loadable values. Only the training device's CUDA state: a checkpoint must
    resume on a machine with another number of visible GPUs."""
    np_state = cast(tuple, np.random.get_state())  # the legacy tuple, not the dict form
    state = {
        "python": random.getstate(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].copy()),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restores what rng_state saved; a CUDA state only onto a CUDA device."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # older checkpoints: one state per visible GPU
        cuda = cuda[device.index] if device.type == "cuda" and device.index < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


class CheckpointSaver:
    """Keeps `last.pt` (everything needed to resume), `best.pt` (weights and metadata of the
    epoch with the best monitored metric) and, with `keep_top_k`, `epoch_NNN.pt` of the k best
    epochs, in one folder. Each file is written whole (save_checkpoint) before any file it
    supersedes is removed, and last.pt comes after best.pt and the top-k files, so a crash at
    any moment leaves a last.pt whose best and top-k files exist.
    With write=False (ranks > 0 under torchrun) it keeps the same bookkeeping and writes nothing."""

    def __init__(
        self,
        folder: str | os.PathLike,
        best_metric: float | None = None,
        keep_top_k: int = 0,
        top_k=(),
        write: bool = True,
    ):
        self.folder, self.write = Path(folder), write
        self.best_metric = best_metric
        self.keep_top_k = keep_top_k
        self.top_k = [
            list(entry) for entry in top_k
        ]  # [metric, epoch] of the kept epochs, best first
        self.last = self.folder / "last.pt"
        self.best = self.folder / "best.pt"

    def epoch_path(self, epoch: int) -> Path:
        return self.folder / f"epoch_{epoch:03d}.pt"

    def is_better(self, metric: float) -> bool:
        return self.best_metric is None or metric > self.best_metric

    def save(self, core: dict, resume_state: dict, metric: float) -> bool:
        """`core`: model/config/classes/epoch/metrics; `resume_state`: optimizer, scheduler, ....
        Writes the epoch's top-k file if it ranks, best.pt if `metric` improved, then last.pt,
        then removes the epoch files that fell out of the top k. Returns whether it improved."""
        improved = self.is_better(metric)
        if improved:
            self.best_metric = metric
        if self.keep_top_k:
            entry = [metric, core["epoch"]]
            # ties: the earlier epoch ranks first, as best.pt keeps the first best epoch
            self.top_k = sorted([*self.top_k, entry], key=lambda e: (-e[0], e[1]))[
                : self.keep_top_k
            ]
            if entry in self.top_k and self.write:
                save_checkpoint(core, self.epoch_path(core["epoch"]))
        if improved and self.write:
            save_checkpoint(core, self.best)
        self.save_last({**core, **resume_state})
        if (
            self.keep_top_k and self.write
        ):  # also clears files left over by a crash between the two steps
            kept = {self.epoch_path(epoch) for _, epoch in self.top_k}
            for path in self.folder.glob("epoch_*.pt"):
                if path not in kept:
                    path.unlink(missing_ok=True)
        return improved

    def save_last(self, state: dict) -> None:
        if self.write:
            save_checkpoint(
                {**state, "best_metric": self.best_metric, "top_k": self.top_k}, self.last
            )
