"""Every file the tools write (checkpoints, CSV, JSON, Markdown, plots) is written atomically: a
temp file in the same folder, flushed, fsynced and renamed over the final name (os.replace),
so a crash, `kill -9` or a full disk leaves the previous file whole or no file, never a
truncated one. A failed write is one UserError naming the file, with no temp file left."""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from cnntrain.errors import UserError

# A temp file left by a writer killed mid-write (kill -9, power loss) is never read: readers
# look at final names only. The next successful write of the same file removes such leftovers
# once they have been idle this long, so a concurrent writer's live temp is safe.
STALE_TEMP_S = 60.0


@contextmanager
def atomic_write(
    path: str | os.PathLike,
    mode: str = "w",
    what: str = "",
    setting: str = "hydra.run.dir=",
    **open_kwargs,
):
    """`with atomic_write(path, "wb") as f: ...`: the file appears under `path` only once the
    block has finished without an exception. `what` names the kind of file in errors, `setting`
    the key that chooses where it goes."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise write_error(path, e, what, setting) from None
    try:
        started = os.fstat(fd).st_mtime
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        error = os_error(e)
        if error is not None and not isinstance(e, UserError):
            raise write_error(path, error, what, setting) from None
        raise
    _remove_stale_temps(path, started - STALE_TEMP_S)


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


def irregular(path: str | os.PathLike) -> str | None:
    """What `path` is when it is there but is not a regular file ("a FIFO", "a character
    device", ...), else None (a regular file, or nothing there). Readers ask before opening: a
    FIFO blocks until a writer comes and a device such as /dev/zero never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        return "a symbolic link loop" if e.errno == errno.ELOOP else None
    return next((kind for test, kind in _KINDS if test(mode)), None)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    """A matplotlib figure as a PNG, atomically (savefig alone truncates on a full disk)."""
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", **kwargs)


def os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind `e`: torch.save and matplotlib report a failed write as an error of
    their own whose cause or context is the OSError."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def write_error(
    path: Path, error: OSError, what: str = "", setting: str = "hydra.run.dir="
) -> UserError:
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        why = f"disk full; free space or choose another {setting}"
    else:
        why = f"{error.strerror or error}; choose a writable {setting}"
    return UserError(f"cannot write {what + ' ' if what else ''}{path}: {why}")


def _remove_stale_temps(path: Path, before: float) -> None:
    own = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")  # mkstemp's pattern, ours
    for entry in os.scandir(path.parent):
        try:
            if own.fullmatch(entry.name) and entry.stat().st_mtime < before:
                os.unlink(entry.path)
        except OSError:  # removed meanwhile, or not ours to remove: it is only tidying
            pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
