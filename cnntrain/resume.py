"""What a resumed run may change, decided per key by its declaration in the schema (`resume=`:
FREE, FIXED, ALLOW, REPLAN or EPOCH, see schema.py). Every key of the stored config is compared
with the new one: FREE keys may differ, a FIXED key's change is refused, and the others change
only on purpose, listed in `resume_allow_changes` (a key, or a whole group such as `sched`); a
change to a REPLAN or EPOCH key re-plans the learning-rate schedule for the new settings,
continuing from the step the run has reached, and an EPOCH key (it sets the batches of an epoch)
cannot change in the middle of one.
The aug sections of other kinds of data than the run's (aug.natural of an MNIST run) are not
compared: the run never applies them."""

from __future__ import annotations

from cnntrain.errors import UserError
from cnntrain.schema import EPOCH, FIXED, FREE, KINDS, REPLAN, resume_class


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


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
    classes = {k: resume_class(k) for k in set(was) & set(now) if was[k] != now[k]}
    # the keys that define the network first, then the optimizer's or schedule's name (it
    # explains the differences of the keys that come with it): the most telling refusal
    changed = sorted(
        (k for k, c in classes.items() if c != FREE),
        key=lambda k: (classes[k] != FIXED, k not in ("optim.name", "sched.name"), k),
    )
    for key in changed:
        values = f"it was trained with {key}={was.get(key)}, not {now.get(key)}"
        if classes[key] == FIXED:
            raise UserError(
                f"cannot resume {path}: {values}, and {key} cannot change in a resumed "
                "run; start a new run (or resume with the old value)"
            )
        if not _under(key, allowed):
            raise UserError(
                f"cannot resume {path}: {values}; to change it on purpose add "
                f"resume_allow_changes=[{key}] (or resume with the old value)"
            )
        if partial and classes[key] == EPOCH:
            raise UserError(
                f"cannot change {key} when resuming {path}: it stopped in the middle of "
                "an epoch; resume once to the end of the epoch first"
            )
    return changed


def replans_schedule(changed: list[str]) -> bool:
    return any(resume_class(key) in (REPLAN, EPOCH) for key in changed)
