"""Device, mixed precision, seeding and determinism: the settings around the model."""

from __future__ import annotations

import logging
import os
import random
import signal
import threading

import numpy as np
import torch

from cnntrain import distributed
from cnntrain.errors import Interrupted, UserError

log = logging.getLogger("cnntrain")


def select_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU; an explicit cuda without a GPU is an error
    rather than a silent CPU run. Under torchrun, `cuda` is this rank's GPU (LOCAL_RANK)."""
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"device={name} but no CUDA GPU is available; use device=cpu or device=auto"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device={name} but MPS is not available; use device=cpu or device=auto")
    return use_device(device)


def use_device(device: torch.device) -> torch.device:
    """Makes a CUDA device the current one: pinned memory, CUDA contexts and anything else that
    takes the current device would otherwise go to GPU 0 (device=cuda:1 in a sweep job, a
    torchrun rank). Returns the device with its index."""
    if device.type == "cuda":
        if device.index is None:
            local = (
                distributed.local_rank() if distributed.launched() else torch.cuda.current_device()
            )
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    return device


def amp_dtype(enabled: bool, device: torch.device, choice: str = "auto") -> torch.dtype | None:
    """None (full fp32) unless `amp`. bf16 needs no loss scaling and is preferred where the
    hardware has it; fp16 (with a GradScaler) otherwise. On the CPU only bf16 autocast exists."""
    if not enabled:
        return None
    if choice == "fp16":
        if device.type == "cpu":
            raise UserError("amp_dtype=fp16 needs a GPU; on the CPU use amp_dtype=bf16 (or auto)")
        return torch.float16
    if choice == "bf16" or device.type == "cpu":
        return torch.bfloat16
    # emulated bf16 (V100, T4: no bf16 tensor cores) runs slow fallback kernels; fp16 there
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float16


def channels_last(setting, device: torch.device, dtype: torch.dtype | None) -> bool:
    """NHWC activations: oneDNN's fast layout on the CPU (measured here: LeNet-5 -20 %, ResNet-20
    -18 %, MobileNetV2 -41 % per training step) and cuDNN's on tensor cores, which fp32 convs
    only use as TF32; so `auto` is on for the CPU and for CUDA with mixed precision."""
    if setting != "auto":
        return bool(setting)
    return device.type == "cpu" or (device.type == "cuda" and dtype is not None)


def input_layout(cfg, device: torch.device) -> bool:
    """Whether a run's model and batches are channels_last: the one decision, read by the
    Trainer (the model) and by build_data (the batches, normalized straight into NHWC)."""
    return channels_last(cfg.channels_last, device, amp_dtype(cfg.amp, device, cfg.amp_dtype))


def grad_scaler(dtype: torch.dtype | None, device: torch.device):
    if dtype == torch.float16 and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


# cuBLAS is deterministic only with one of these workspace settings (NVIDIA's cuBLAS docs,
# "Results reproducibility"); torch reads the variable once, when the process first uses cuBLAS,
# so the console scripts set it before any CUDA work (cli._console_script) and a run that
# would set it too late refuses instead of training without the determinism it asked for.
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")


def deterministic_cublas() -> None:
    """The cuBLAS workspace setting of a deterministic run, or the reason it cannot have one."""
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") in CUBLAS_DETERMINISTIC:
        return
    if not torch.cuda.is_available():
        return  # no cuBLAS in this process
    if "CUBLAS_WORKSPACE_CONFIG" in os.environ or torch.cuda.is_initialized():
        raise UserError(
            "deterministic=true: CUBLAS_WORKSPACE_CONFIG must be :4096:8 (or :16:8) before this "
            "process first uses CUDA; set it in the environment before starting Python, as the "
            "console scripts do"
        )
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC[0]


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        deterministic_cublas()
        # warn_only: a few CUDA backward kernels (e.g. adaptive average pooling) have no
        # deterministic version; warn about those instead of refusing to train
        torch.use_deterministic_algorithms(True, warn_only=True)
    # benchmark mode picks the fastest conv algorithm per input shape, which is not reproducible
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


class StopSignals:
    """While active, SIGINT, SIGTERM, SIGUSR1 and SIGUSR2 (Ctrl-C, `kill`, SLURM's warnings before
    preemption or the time limit) only set `requested`, which the training loop reads after
    every batch to checkpoint and exit; a second Ctrl-C interrupts at once. A handler that was
    there before (submitit's, which requeues the job on SIGUSR2) is called once the state is
    saved and the run stops (Interrupted). Outside the main thread (where Python cannot install handlers) it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            log.warning(
                "received %s: saving a checkpoint and stopping after this batch",
                signal.Signals(signum).name,
            )
            self.signum = signum
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        previous = self._previous.get(self.signum)
        stopped = exc_type is not None and issubclass(exc_type, Interrupted)  # not: finished anyway
        if stopped and callable(previous) and previous is not signal.default_int_handler:
            previous(self.signum, None)
