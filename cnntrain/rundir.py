"""The run folder as a claimed resource. A run (training, cnneval, cnnpredict, cnnviz) writes
into its folder only after claiming it: an exclusive lock (flock on `.cnntrain.lock`, held for
the run's life and released by the kernel however the process ends, kill -9 included), then a
look at what the folder holds. A second run into a folder that is locked, or that holds the
results of another run, is refused with one line before anything is written; only resuming
the run that is there may continue in it. Hydra writes nothing of its own into the folder
(`hydra.output_subdir: null`): its `.hydra/` files are written here, after the claim.

Hand-written because Hydra has no notion of an occupied output folder: two runs given the same
`hydra.run.dir` (or started in the same second with the default one) share it silently."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cnntrain.errors import UserError
from cnntrain.files import atomic_write

LOCK = ".cnntrain.lock"
# What a run that produced nothing may leave (a failed start): a later run may take its folder.
LEFTOVERS = (".hydra", LOCK)

_claimed: Path | None = None  # the folder this process's current job has claimed


class RunFolderRefused(UserError):
    """The folder cannot be this run's: nothing may be written into it, not even a log line."""


def run_dir_from_hydra() -> Path:
    """The run folder Hydra chose for this job (hydra.run.dir, or a sweep job's folder)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def claimed() -> Path | None:
    """The folder the current job has claimed (held or released since), None before a claim."""
    return _claimed


def in_sweep() -> bool:
    """Whether this job is one of a sweep (cnntrain -m)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def new_job() -> None:
    global _claimed
    _claimed = None


def results(folder: Path) -> list[str]:
    """What in `folder` is the work of a run (checkpoints, metrics, reports, plots, TensorBoard
    events) or anything else that is not ours to overwrite; logs and `.hydra/` do not count."""
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name in LEFTOVERS or entry.suffix == ".log" and entry.is_file():
            continue
        if entry.is_dir() and entry.name == "checkpoints":
            found += [f"checkpoints/{p.name}" for p in sorted(entry.iterdir())] or ["checkpoints/"]
        else:
            found.append(entry.name + ("/" if entry.is_dir() else ""))
    return found


class RunFolder:
    """A run's folder: `claim()` takes the lock on it (creating it if needed) until `release()`
    (or `with RunFolder(path) as folder:`); refusals are RunFolderRefused naming the folder and
    the way out."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None

    def claim(self) -> "RunFolder":
        global _claimed
        self._created = not (self.path / LOCK).exists()
        self._fd = _lock(self.path)
        _claimed = self.path
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

    def __enter__(self) -> "RunFolder":
        return self.claim()

    def __exit__(self, *exc) -> None:
        self.release()

    def results(self) -> list[str]:
        return results(self.path)

    def require_empty(self, hint: str = "") -> None:
        found = self.results()
        if found:
            if self._created:  # leave the folder exactly as it was
                (self.path / LOCK).unlink(missing_ok=True)
            shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
            raise RunFolderRefused(
                f"{self.path} already holds files that are not this run's ({shown}); "
                f"{hint or 'choose another hydra.run.dir= (or leave it out for a new folder)'}"
            )

    def take(self) -> None:
        """The folder is this run's: its lock file says whose, for a run refused meanwhile."""
        os.ftruncate(self._fd, 0)
        os.pwrite(
            self._fd,
            f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(),
            0,
        )

    def write_hydra_files(self, task_cfg: DictConfig) -> None:
        """What Hydra would have written into `.hydra/` (the job's config, Hydra's config and the
        overrides), now that the folder is this run's."""
        from hydra.core.hydra_config import HydraConfig

        self.take()
        if not HydraConfig.initialized():
            return
        hydra = HydraConfig.get()
        for name, node in (
            ("config.yaml", task_cfg),
            ("hydra.yaml", {"hydra": hydra}),
            ("overrides.yaml", hydra.overrides.task),
        ):
            with atomic_write(self.path / ".hydra" / name) as f:
                f.write(OmegaConf.to_yaml(node))


def _lock(path: Path) -> int:
    if path.exists() and not path.is_dir():
        raise RunFolderRefused(f"hydra.run.dir={path} is a file, not a folder; choose a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunFolderRefused(
            f"cannot write into the run folder {path} ({e.strerror}); choose a "
            "writable hydra.run.dir="
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunFolderRefused(
            f"{path} is in use by another run ({owner}); wait for it to end or "
            "choose another hydra.run.dir="
        ) from None
    return fd


def keep_failed_job(path: str | os.PathLike | None, cfg: DictConfig) -> bool:
    """A sweep's job that failed before it claimed its folder still gets one, with its config
    and its error in the log, for the sweep summary (and the sweep's exit code) to find it."""
    if path is None:
        return False
    try:
        with RunFolder(path) as folder:
            if folder.results():
                return False
            folder.write_hydra_files(cfg)
            return True
    except UserError:
        return False


def unique_dir(path: str) -> str:
    """`path`, or `path-2`, `path-3`, ... if a run that started in the same second has it:
    claimed with mkdir, which only one process can win; the same answer for the whole process
    (Hydra composes twice). Under torchrun every rank must name the same folder, so there it is
    `path` as resolved from rank 0's start time."""
    if "CNNTRAIN_RUN_TIME" in os.environ:
        return path
    if path not in _made:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        for n in range(1, 1000):
            candidate = path if n == 1 else f"{path}-{n}"
            try:
                os.mkdir(candidate)
                break
            except FileExistsError:
                continue
        else:
            raise RuntimeError(f"no free folder next to {path}")
        _made[path] = candidate
    return _made[path]


_made: dict[str, str] = {}  # default folders this process created: asked path -> folder


def is_default(path: str | os.PathLike) -> bool:
    """Whether `path` is a default folder this process made (unique_dir), not one a user named."""
    return os.path.relpath(path) in _made.values()


def discard_failed_start(path: str | os.PathLike) -> None:
    """A default folder of a run that failed on a bad input before it had any result (its error
    is on stderr): its `.hydra/`, log and lock go, then the folder and its empty parents."""
    path = Path(path)
    if not is_default(path) or results(path):
        return
    shutil.rmtree(path / ".hydra", ignore_errors=True)
    for log in path.glob("*.log"):
        log.unlink(missing_ok=True)
    remove_if_empty(path)


def remove_if_empty(path: str | os.PathLike | None) -> None:
    """A folder that a failed or file-less start (a bad input, summary=true) created and left
    empty goes away; a default folder (unique_dir) takes its empty parents up to outputs/ along,
    never a folder a user named. Its lock file goes too, but only while nobody holds it."""
    if path is None or not Path(path).is_dir():
        return
    relative = os.path.relpath(path)
    parents = len(Path(relative).parts) - 1 if relative in _made.values() else 0
    path = Path(path)
    try:
        if {p.name for p in path.iterdir()} == {LOCK}:
            fd = os.open(path / LOCK, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                (path / LOCK).unlink()
            finally:
                os.close(fd)
        os.rmdir(path)  # removes nothing but an empty folder
        for parent in list(path.parents)[:parents]:
            os.rmdir(parent)
    except OSError:
        pass


@contextmanager
def fresh_run(path: str | os.PathLike, cfg: DictConfig):
    """The folder of a run that starts from nothing (cnneval, cnnpredict, cnnviz), held for the
    block: claimed, free of other runs' files, with its `.hydra/` files."""
    with RunFolder(path) as folder:
        folder.require_empty()
        folder.write_hydra_files(cfg)
        yield folder
