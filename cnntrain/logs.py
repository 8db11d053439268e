"""Where log records go: INFO to stdout, warnings and errors to stderr, everything to the run's
log file, which is opened only once the run has claimed its folder (see rundir)."""

from __future__ import annotations

import logging
import os
from pathlib import Path


class BelowWarning(logging.Filter):
    """The stdout handler's filter: warnings and errors go to stderr instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def drop_file_handlers() -> None:
    """A run refused its folder (or failing before it has one) must not write its error into a
    log file there: that folder is another run's, or is about to be removed."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()


def to_file(message: str) -> None:
    """A record for the log file only (a bug's traceback: the console gets one line)."""
    record = logging.LogRecord("cnntrain", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def shown(path: str | os.PathLike) -> str:
    """A path as a user would type it from here: relative to the working directory when it
    lies below it, else absolute."""
    path = os.path.abspath(path)
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def outputs(folder: str | os.PathLike, *, skip=()) -> list[str]:
    """The files a run left in `folder` (checkpoints and other sub-folders listed by their files,
    .hydra/ and the lock left out), for the end-of-run message."""
    folder = Path(folder)
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.name in skip:
            continue
        if entry.is_dir() and entry.name == "checkpoints":
            found += [
                f"checkpoints/{p.name}"
                for p in sorted(entry.iterdir())
                if not p.name.startswith(".")
            ]
        else:
            found.append(entry.name + ("/" if entry.is_dir() else ""))
    return found


def log_outputs(folder: str | os.PathLike, commands: list[str], *, skip=()) -> None:
    """Where everything is and what to run next (Ultralytics' "Results saved to ...")."""
    log = logging.getLogger("cnntrain")
    log.info("results saved to %s: %s", shown(folder), ", ".join(outputs(folder, skip=skip)))
    for command in commands:
        log.info("next: %s", command)
