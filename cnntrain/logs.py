"""Where log records go: INFO to stdout, warnings and errors to stderr, everything to the run's
log file, which is opened only once the run has claimed its folder (see rundir)."""
from __future__ import annotations

import logging


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
