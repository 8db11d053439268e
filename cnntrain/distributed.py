"""Data-parallel training under torchrun: one process per device, NCCL between GPUs, gloo on the
CPU. torch.distributed does the work; this module only says who does what. Every rank trains on
its slice of each global batch, DDP averages the gradients, training and evaluation metrics are
summed exactly over the ranks (no padded duplicates), and rank 0 alone logs, writes
TensorBoard and saves checkpoints. Outside torchrun every function is a no-op."""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist


def launched() -> bool:
    """Started by torchrun (or any launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Joins the process group, before Hydra composes the config: rank 0's start time is then
    shared (CNNTRAIN_RUN_TIME) so that every rank resolves the same run folder. Hydra's own
    ${now:} would give each rank the second it started in (lightning-hydra-template #393)."""
    if not launched() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"  # gloo for CPU tensors (device=cpu), NCCL for CUDA ones
    else:
        backend = "gloo"
    dist.init_process_group(backend)
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


def local_device(device: torch.device) -> torch.device:
    """This rank's GPU (LOCAL_RANK) when training on CUDA under torchrun."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def summed(*values) -> list[float]:
    """Each number (or one-element tensor) summed over the ranks. CPU tensors, so that gloo
    carries them even next to NCCL; float64 keeps counts exact."""
    if world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (a signal reached one rank first)."""
    return summed(flag)[0] > 0


def gather_cat(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor concatenated over the ranks in rank order: the ranks evaluate consecutive
    chunks of a split, so the result is in the split's own order, each sample once."""
    if world_size() == 1:
        return tensors
    parts = [None] * world_size()
    dist.all_gather_object(parts, [t.cpu() for t in tensors])
    return [torch.cat([p[i] for p in parts]).to(tensors[i].device) for i in range(len(tensors))]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
