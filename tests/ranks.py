"""Runs a function on N gloo ranks, each a spawned process with torchrun's environment, for the
tests that change one rank's behaviour (a signal on rank 0, an inf loss on rank 1): torchrun's
processes cannot be monkeypatched from a test. A hang (ranks out of step in a collective) is a
failure after `timeout` seconds, not a stuck test run."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(fn, *args, world: int = 2, timeout: float = 240) -> list:
    """[fn(*args) of rank 0, of rank 1, ...]; a rank that raised gives ("raised", "Type: message").
    `fn` must be importable by name (a module-level function)."""
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(rank, world, port, fn, args, results), daemon=True)
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    out, deadline = {}, time.monotonic() + timeout
    try:
        while len(out) < world:
            try:
                rank, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"ranks {sorted(set(range(world)) - set(out))} did not finish "
                    f"within {timeout} s (a hang?); finished: {out}"
                ) from None
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[rank] for rank in range(world)]


def _rank_main(rank, world, port, fn, args, results) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch

    from cnntrain import distributed

    torch.set_num_threads(1)
    distributed.init()
    try:
        value = fn(*args)
    except BaseException as e:
        value = ("raised", f"{type(e).__name__}: {e}")
        if not isinstance(e, Exception) or type(e).__name__ not in ("UserError", "Interrupted"):
            traceback.print_exc()
    results.put((rank, value))
    distributed.destroy()
