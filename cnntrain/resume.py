"""What a resumed run may change, decided per key by its declaration in the schema (`resume=`:
FREE, FIXED, ALLOW, REPLAN or EPOCH, see schema.py). Every key of the stored config is compared
with the new one: FREE keys may differ, a FIXED key's change is refused, and the others change
only on purpose, listed in `resume_allow_changes` (a key, or a whole group such as `sched`); a
change to a REPLAN or EPOCH key re-plans the learning-rate schedule for the new settings,
continuing from the step the run has reached, and an EPOCH key (it sets the batches of an epoch)
cannot change in the middle of one.
The aug sections of other kinds of data than the run's (aug.natural of an MNIST run) are not
compared: the run never applies them.
Restoring a resumed run (the optimizer, schedule, weight average, random streams and the
running sums of a stopped epoch) follows the comparison, below it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import overload

import torch
from omegaconf import DictConfig

from cnntrain import amp_step, distributed
from cnntrain.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from cnntrain.engine import EpochState
from cnntrain.errors import UserError
from cnntrain.optim import create_scheduler, fast_forward
from cnntrain.schema import EPOCH, FIXED, FREE, KINDS, REPLAN, resume_class
from cnntrain.stored import validated

log = logging.getLogger("cnntrain")


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


# --------------------------------------------------------------------------- restoring
def resume_path(cfg: DictConfig, ckpt_dir: Path) -> Path | None:
    """The checkpoint `resume=` names: auto is the run folder's last.pt, when there is one."""
    if cfg.resume == "auto":
        return ckpt_dir / "last.pt" if (ckpt_dir / "last.pt").exists() else None
    return Path(cfg.resume).expanduser() if cfg.resume else None


def load_resumed(resume: Path) -> dict:
    state = load_checkpoint(resume)
    validated(state["config"], resume)  # data, checked as the command line is, before any use
    if "optimizer" not in state:
        raise UserError(
            f"{resume} has no optimizer state (best.pt keeps weights only); resume from last.pt"
        )
    return state


def check_resumable(cfg: DictConfig, plan, resumed: dict, resume: Path) -> list[str]:
    """The keys this run changes on purpose from the checkpoint's (resume_allow_changes), once
    the data's classes, every change and the number of epochs are found to fit."""
    if resumed["classes"] != plan.classes:
        raise UserError(
            f"cannot resume: the checkpoint's classes {resumed['classes']} differ "
            f"from the data's {plan.classes}"
        )
    changed = changed_keys(
        resumed["config"],
        plan.config,
        list(cfg.resume_allow_changes),
        resume,
        bool(resumed.get("partial")),
    )
    if cfg.epochs < resumed["epoch"]:
        raise UserError(
            f"cannot resume {resume} with epochs={cfg.epochs}: it has already trained "
            f"{resumed['epoch']} epochs"
        )
    if changed:
        log.info("resuming with changed %s (resume_allow_changes)", ", ".join(changed))
    return changed


def carry_over(resume: Path, state: dict, ckpt_dir: Path) -> None:
    """A run continued in another folder takes along the files its last.pt refers to (best.pt,
    top-k), so that the final test still uses the best epoch of the whole run."""
    names = ["best.pt", *(f"epoch_{epoch:03d}.pt" for _, epoch in state.get("top_k", []))]
    for name in names:
        if (resume.parent / name).exists():
            save_checkpoint(load_checkpoint(resume.parent / name), ckpt_dir / name)


def restore_optimizer(optimizer, state: dict) -> None:
    """The optimizer's state (momentum buffers, Adam moments) from the checkpoint under the
    hyper-parameters of this config (e.g. a new weight decay or momentum, the fused flag)."""
    configured = [
        {k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")}
        for group in optimizer.param_groups
    ]
    try:
        optimizer.load_state_dict(state)
    except ValueError as e:
        raise UserError(
            f"cannot resume: the checkpoint's optimizer state does not fit this model "
            f"and optimizer ({e}); resume with the settings it was trained with"
        ) from None
    for group, settings in zip(optimizer.param_groups, configured):
        group.update(settings)
    amp_step.place_steps(optimizer)  # loaded where the saved flags wanted the step counters


def restore_schedule(
    cfg, resumed: dict, changed: list[str], optimizer, scheduler, steps: int, interval: str
):
    """The schedule where it stood, or, when a setting that shapes it changed
    (resume_allow_changes), a new plan for the new settings fast-forwarded to the step the run
    has reached. Returns the scheduler to use."""
    if not replans_schedule(changed):
        scheduler.load_state_dict(resumed["scheduler"])
        return scheduler
    done = resumed["epoch"] * (steps if interval == "step" else 1)
    if resumed.get("partial") and interval == "step":
        done += epoch_state(resumed["partial"]).step
    for group in optimizer.param_groups:
        group["lr"] = cfg.optim.lr * group.get("lr_scale", 1.0)  # optim.norm_lr_scale
        group.pop("initial_lr", None)
    scheduler, _ = create_scheduler(cfg.sched, optimizer, epochs=cfg.epochs, steps_per_epoch=steps)
    fast_forward(scheduler, done)
    log.info(
        "schedule re-planned for epochs=%d: lr %.4g at step %d",
        cfg.epochs,
        optimizer.param_groups[0]["lr"],
        done,
    )
    return scheduler


def restore_ema(ema, resumed: dict) -> None:
    """The weight average from the checkpoint's model (the one a checkpoint stores with ema)."""
    if ema is not None and "ema_n_averaged" in resumed:
        ema.module.load_state_dict(resumed["model"])
        ema.n_averaged = resumed["ema_n_averaged"]


def restore_rng(states, device: torch.device) -> None:
    """Each rank continues its own random streams (dropout & co.; each rank has its own seed).
    A run resumed by another number of processes cannot: the ranks without a saved state keep
    their fresh seeds, and the run is no longer exactly the uninterrupted one."""
    states = states if isinstance(states, list) else [states]  # older checkpoints: rank 0's only
    if len(states) != distributed.world_size():
        log.warning(
            "the checkpoint was written by %d process(es) and is resumed by %d: dropout "
            "and other random streams do not continue exactly",
            len(states),
            distributed.world_size(),
        )
    if distributed.rank() < len(states):
        set_rng_state(states[distributed.rank()], device)


@overload
def epoch_state(partial: dict) -> EpochState: ...
@overload
def epoch_state(partial: None) -> None: ...
@overload
def epoch_state(partial: dict | None) -> EpochState | None: ...


def epoch_state(partial: dict | None) -> EpochState | None:
    """Where a resumed epoch stopped. Each rank continues its own running sums, so the epoch's
    numbers are those of a run that never stopped, to the last bit. Resumed by another number
    of ranks (or from a checkpoint that kept only the totals), rank 0 carries the totals."""
    if partial is None:
        return None
    states = partial["state"] if isinstance(partial["state"], list) else [partial["state"]]
    if len(states) == distributed.world_size():
        return EpochState(**states[distributed.rank()])
    step = states[0]["step"]
    if not distributed.is_main():
        return EpochState(step=step)
    return EpochState(
        step=step,
        loss_sum=sum(float(s["loss_sum"]) for s in states),
        correct=sum(int(s["correct"]) for s in states),
        n=sum(s["n"] for s in states),
        skipped=states[0]["skipped"],
    )


def resume_point(resumed: dict, epochs: int, steps: int) -> str:
    """Where the resumed run continues, in the words of the stop message."""
    partial = resumed.get("partial")
    if partial:
        return (
            f"epoch {partial['epoch']}/{epochs} continues after step "
            f"{epoch_state(partial).step} of {steps}"
        )
    return f"epoch {resumed['epoch'] + 1}/{epochs} starts ({resumed['epoch']} done)"
