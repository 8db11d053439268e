"""Data-parallel training under torchrun: one process per device, NCCL between GPUs, gloo on the
CPU. torch.distributed does the work; this module only says who does what. Every rank trains on
its slice of each global batch, DDP averages the gradients, training and evaluation metrics are
summed exactly over the ranks (no padded duplicates), and rank 0 alone logs, writes
TensorBoard and saves checkpoints. Outside torchrun every function is a no-op."""

from __future__ import annotations

import io
import os
import time

import torch
import torch.distributed as dist

from cnntrain.errors import UserError


def launched() -> bool:
    """Started by torchrun (or any launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Joins the process group, before Hydra composes the config: rank 0's start time is then
    shared (CNNTRAIN_RUN_TIME) so that every rank resolves the same run folder. Hydra's own
    ${now:} would give each rank the second it started in (lightning-hydra-template #393)."""
    if not launched() or dist.is_initialized():
        return
    # gloo for CPU tensors (device=cpu, and the small collectives below), NCCL for CUDA ones.
    # No CUDA device is made current here: the config (device=) is not known yet, and a CPU run
    # must not touch the GPUs; runtime.select_device makes this rank's GPU current.
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    start = [time.time()]
    dist.broadcast_object_list(start, src=0)
    os.environ["CNNTRAIN_RUN_TIME"] = repr(start[0])


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def shard() -> dict:
    """The loaders' sharding arguments for this process."""
    return {"rank": rank(), "world": world_size()}


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK): its GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def summed(*values) -> list[float]:
    """Each number (or one-element tensor) summed over the ranks. CPU tensors, so that gloo
    carries them even next to NCCL; float64 keeps counts exact."""
    if world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def largest(value: float) -> float:
    """The largest of the ranks' values, on every rank."""
    if world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (a signal reached one rank first)."""
    return summed(flag)[0] > 0


def main_buffers(module: torch.nn.Module) -> None:
    """`module`'s buffers (BatchNorm's running statistics) made rank 0's on every rank. Each rank
    updates them from its own batches; DDP's forward broadcasts them, but evaluation runs on the
    plain module (trainer.Trainer.begin), so the ranks would otherwise each validate with their
    own statistics and not with those of the checkpoint rank 0 saves. One call per validation."""
    if world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def gathered(obj) -> list:
    """Every rank's `obj` (containers of tensors and plain values), in rank order, on every rank.
    Sent as torch.save bytes: all_gather_object's plain pickle cannot carry a uint32 tensor (the
    NumPy RNG state) in torch 2.14, and weights_only loading runs no code from other ranks."""
    if world_size() == 1:
        return [obj]
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    parts = [None] * world_size()
    dist.all_gather_object(parts, buffer.getvalue())
    return [torch.load(io.BytesIO(part), weights_only=True) for part in parts]


def gather_cat(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor concatenated over the ranks in rank order: the ranks evaluate consecutive
    chunks of a split, so the result is in the split's own order, each sample once."""
    if world_size() == 1:
        return tensors
    parts = gathered([t.cpu() for t in tensors])
    return [torch.cat([p[i] for p in parts]).to(tensors[i].device) for i in range(len(tensors))]


def on_main(fn):
    """fn() on rank 0 alone (None elsewhere); its UserError ends every rank, which would
    otherwise wait for rank 0 in the next collective."""
    return _first(fn, is_main())[0]


def local_first(fn):
    """fn() on local rank 0 of each machine, then on the other ranks: a download into the folder
    the ranks of a machine share happens once, and the others then read what it put there. A
    UserError of local rank 0 ends every rank."""
    value, first = _first(fn, local_rank() == 0)
    return value if first else fn()


def _first(fn, mine: bool):
    if world_size() == 1:
        return fn(), True
    value, error = None, None
    if mine:
        try:
            value = fn()
        except UserError as e:
            error = e
    if any_rank(error is not None):
        raise error or UserError(
            f"rank {rank()} stops: another rank failed (its error line says why)"
        )
    return value, mine


def barrier() -> None:
    """Every rank waits for all. A CPU all-reduce rather than dist.barrier(), which with NCCL
    beside gloo runs on the current GPU: a device=cpu run must not touch the GPUs."""
    summed(0)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
