"""What a resumed run may change, decided per key. Every key of the stored config is compared
with the new one:
- FREE keys say where or how fast to compute, not what: they may differ (a resume on another
  device, with more workers or another `max_eval_steps`).
- FIXED keys define the network and what it learns from: a change is always refused.
- Every other key (epochs, seed, batch size, optimizer and schedule settings, augmentation and
  data.kind, which picks the augmentation, regularizers) may change only on purpose, listed in
  `resume_allow_changes` (a key, or a whole group such as `sched`). A change to a SCHEDULE key
  re-plans the learning-rate schedule for the new settings, continuing from the step the run has
  reached.
The aug sections of other kinds of data than the run's (aug.natural of an MNIST run) are not
compared: the run never applies them."""

from __future__ import annotations

from cnntrain.errors import UserError

FREE = (
    "name",
    "device",
    "amp",
    "amp_dtype",
    "channels_last",
    "compile",
    "sync_batchnorm",
    "deterministic",
    "debug",
    "resume",
    "resume_allow_changes",
    "on_nan",
    "max_eval_steps",
    "summary",
    "optimized_metric",
    "data.root",
    "data.download",
    "data.num_workers",
    "data.skip_bad_images",
    "data.cache_dir",
    "data.memory_budget_gb",
    "checkpoint",
    "early_stop",
    "optim.fused",
)
FIXED = (
    "model",
    "data.name",
    "data.image_size",
    "data.channels",
    "data.mean",
    "data.std",
    "data.val_split",
    "optim.name",
    "ema",
)
SCHEDULE = ("epochs", "optim.lr", "sched", "data.batch_size", "max_steps_per_epoch")
# the batches of an epoch: they cannot change in the middle of one
STEPS = ("data.batch_size", "max_steps_per_epoch")


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def check_allowed_changes(keys: list[str]) -> None:
    """`resume_allow_changes`: keys or groups that a resume may change."""
    from cnntrain.schema import declared_keys

    for key in keys:
        if key.rsplit(".", 1)[-1] not in declared_keys("train", key):
            raise UserError(
                f"resume_allow_changes=[{key}]: {key} is not a key of the config "
                "(e.g. epochs, optim.lr, data.batch_size, sched)"
            )
        if _under(key, FIXED):
            raise UserError(
                f"resume_allow_changes=[{key}]: {key} can never change when resuming (it "
                "defines the network or its data); start a new run instead"
            )
        if _under(key, FREE):
            raise UserError(
                f"resume_allow_changes=[{key}]: {key} may change on resume anyway; "
                "leave it out of the list"
            )


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _seen(flat: dict, kinds: set) -> dict:
    """`flat` without the aug sections of kinds of data other than `kinds`."""
    from cnntrain.schema import KINDS

    return {
        k: v
        for k, v in flat.items()
        if not (k.startswith("aug.") and k.split(".")[1] in KINDS and k.split(".")[1] not in kinds)
    }


def changed_keys(old: dict, new: dict, allowed: list[str], path, partial: bool) -> list[str]:
    """The keys whose values differ between the config a checkpoint was trained with (`old`) and
    the new one, once each change is found legitimate; a change that is not is a UserError
    naming the key, both values and the way out. Keys an older checkpoint lacks are skipped."""
    kinds = {config.get("data", {}).get("kind") for config in (old, new)}
    was, now = _seen(_flat(old), kinds), _seen(_flat(new), kinds)
    # the keys that define the network first, then the optimizer's or schedule's name (it
    # explains the differences of the keys that come with it): the most telling refusal
    changed = sorted(
        (k for k in set(was) & set(now) if was[k] != now[k] and not _under(k, FREE)),
        key=lambda k: (not _under(k, FIXED), k not in ("optim.name", "sched.name"), k),
    )
    for key in changed:
        values = f"it was trained with {key}={was.get(key)}, not {now.get(key)}"
        if _under(key, FIXED):
            raise UserError(
                f"cannot resume {path}: {values}, and {key} cannot change in a resumed "
                "run; start a new run (or resume with the old value)"
            )
        if not _under(key, allowed):
            raise UserError(
                f"cannot resume {path}: {values}; to change it on purpose add "
                f"resume_allow_changes=[{key}] (or resume with the old value)"
            )
        if partial and _under(key, STEPS):
            raise UserError(
                f"cannot change {key} when resuming {path}: it stopped in the middle of "
                "an epoch; resume once to the end of the epoch first"
            )
    return changed


def replans_schedule(changed: list[str]) -> bool:
    return any(_under(key, SCHEDULE) for key in changed)
