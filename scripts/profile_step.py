#!/usr/bin/env python
"""Where one training step of a recipe goes: the batch (gather, augmentation, normalization),
the forward pass (with the loss), the backward pass and the update (optimizer, EMA), timed
apart with a device sync between them, for the median of --steps steps after --warmup; then,
with --ops, torch.profiler's top operators of one more step. The model, optimizer, precision,
layout, EMA and data-dependent init are the Trainer's own for the composed config; the data are
CIFAR-format files written by tests/fakedata.py (or data.root= with real ones).

    python scripts/profile_step.py experiment=cifar10_airbench compile=false data.batch_size=256
    python scripts/profile_step.py --ops --json step.json experiment=cifar10_fast device=cuda

The split is what the step costs with the phases serialized (a sync after each); a real step
overlaps the host's work on the next phase with the device's on this one, so on a GPU the sum is
an upper bound of the step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from cnntrain.data import build_data
from cnntrain.engine import autocast
from cnntrain.plan import input_config, make_plan
from cnntrain.runtime import input_layout, seed_everything, select_device
from cnntrain.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import fakedata  # noqa: E402  (the tests' writers of the real on-disk formats)

PHASES = ("batch", "forward", "backward", "update")


def compose_train(overrides: list[str]):
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def make_trainer(overrides: list[str], images: int, folder: Path) -> Trainer:
    cfg = compose_train(overrides)
    if "data.root=" not in " ".join(overrides):  # fake CIFAR-10 files: the batches of the steps
        root = fakedata.write_cifar(folder / "data", n_train=images, n_test=10)
        fake = [f"data.root={root}", "data.download=false", "data.val_split=0"]
        cfg = compose_train([*overrides, *fake])
    device = select_device(cfg.device)
    seed_everything(cfg.seed, cfg.deterministic)
    data_cfg = input_config(cfg)
    nhwc = input_layout(cfg, device)
    data = build_data(data_cfg, cfg.aug, device=device, seed=cfg.seed, channels_last=nhwc)
    trainer = Trainer(cfg, make_plan(cfg, data_cfg, data), data, folder / "run", device)
    trainer.init_from_data()
    trainer.step_model = torch.compile(trainer.model) if cfg.compile else trainer.model
    return trainer


def step(trainer: Trainer, batches, sync) -> dict:
    """One training step, its phases timed apart: wall seconds, and this process's CPU seconds
    (all its threads: on a shared machine, what the step costs whatever else runs)."""
    model, on, opt, scaler = trainer.step_model, trainer.on, trainer.optimizer, trainer.scaler
    times, t, c = {}, time.perf_counter(), time.process_time()

    def lap(name):
        nonlocal t, c
        sync()
        now, cpu = time.perf_counter(), time.process_time()
        times[name], times[f"{name}_cpu"], t, c = now - t, cpu - c, now, cpu

    x, y = next(batches)
    if on.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    lap("batch")
    with autocast(on.device, on.amp_dtype):
        loss = trainer.criterion(model(x), y)
    lap("forward")
    opt.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    lap("backward")
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    if trainer.ema is not None:
        trainer.ema.update(model)
    lap("update")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--ops", action="store_true", help="torch.profiler's top ops of a step")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("overrides", nargs="*", help="cnntrain overrides (experiment=...)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        batch = compose_train(args.overrides).data.batch_size
        total = args.warmup + args.steps + args.ops
        trainer = make_trainer(args.overrides, batch * total, Path(tmp))
        device = trainer.device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        loader = trainer.data.loaders["train"]
        trainer.model.train()
        batches = iter(loader)
        runs = [step(trainer, batches, sync) for _ in range(args.warmup + args.steps)]
        timed = runs[args.warmup :]
        median = {p: statistics.median(r[p] for r in timed) for p in PHASES}
        cpu = {p: statistics.median(r[f"{p}_cpu"] for r in timed) for p in PHASES}
        total_s, cpu_s = sum(median.values()), sum(cpu.values())
        out = {
            "overrides": args.overrides,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "batch": batch,
            "amp": str(trainer.on.amp_dtype),
            "channels_last": trainer.on.channels_last,
            "step_s": total_s,
            "img_per_s": batch / total_s,
            "step_cpu_s": cpu_s,
            **{f"{p}_s": v for p, v in median.items()},
            **{f"{p}_cpu_s": v for p, v in cpu.items()},
        }
        split = ", ".join(
            f"{p} {median[p] * 1e3:.0f} ms ({median[p] / total_s:.0%})" for p in PHASES
        )
        print(
            f"{' '.join(args.overrides)}: batch {batch}, {total_s * 1e3:.0f} ms/step "
            f"({cpu_s:.2f} CPU s), {batch / total_s:.0f} img/s on {device} "
            f"({out['threads']} threads): {split}"
        )
        if args.ops:
            out["top_ops"] = top_ops(trainer, batches, sync)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


def top_ops(trainer: Trainer, batches, sync, rows: int = 12) -> list[dict]:
    """torch.profiler over one step: the operators with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if trainer.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        step(trainer, batches, sync)
    key = "self_device_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows))
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:rows]
    return [{"op": e.key, "self_ms": getattr(e, key) / 1e3, "calls": e.count} for e in events]


if __name__ == "__main__":
    main()
