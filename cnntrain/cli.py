"""Console entry points: thin @hydra.main wrappers around train(cfg), evaluate(cfg), predict(cfg)
and visualize(cfg).

A bad input ends its job with one line and a non-zero exit code instead of a traceback; in a
sweep (-m) the failed job is reported and the other jobs still run."""
from __future__ import annotations

import importlib
import logging
import sys

import hydra
from omegaconf import DictConfig

log = logging.getLogger("cnntrain")
_failures: list[str] = []


def _run(task, cfg: DictConfig):
    from cnntrain.errors import Interrupted, UserError

    try:
        return task(cfg)
    except Interrupted as e:  # its state is saved; a sweep stops here too, as Ctrl-C would
        log.warning("%s", e)
        sys.exit(e.exit_code)
    except UserError as e:
        message = f"error: {e}"
    except Exception as e:  # a bug: keep the traceback in the log, let the other jobs run
        log.exception("job failed")
        message = f"error: {type(e).__name__}: {e}"
    log.error(message)
    _failures.append(message)
    return None


def _train_task(cfg: DictConfig):
    from cnntrain.config import validate_train

    validate_train(cfg)  # a bad value fails before torch is imported (seconds sooner)
    from cnntrain.train import train

    return train(cfg)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def _train(cfg: DictConfig):
    return _run(_train_task, cfg)


def _lazy(module: str, function: str):
    """The task `module.function`, imported when it runs: --help and config errors stay fast."""
    def task(cfg: DictConfig):
        return getattr(importlib.import_module(module), function)(cfg)
    return task


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def _evaluate(cfg: DictConfig):
    return _run(_lazy("cnntrain.evaluate", "evaluate"), cfg)


@hydra.main(version_base="1.3", config_path="configs", config_name="predict")
def _predict(cfg: DictConfig):
    return _run(_lazy("cnntrain.predict", "predict"), cfg)


@hydra.main(version_base="1.3", config_path="configs", config_name="viz")
def _viz(cfg: DictConfig):
    return _run(_lazy("cnntrain.viz", "visualize"), cfg)


def _exit() -> None:
    if _failures and ({"-m", "--multirun"} & set(sys.argv[1:])):
        print(f"{len(_failures)} job(s) failed:", *_failures, sep="\n  ", file=sys.stderr)
    sys.exit(1 if _failures else 0)


def _console_script(hydra_main):
    """A console-script entry: the Hydra app, then exit code 1 if any job failed."""
    def run() -> None:
        hydra_main()
        _exit()
    return run


train_cli = _console_script(_train)
eval_cli = _console_script(_evaluate)
predict_cli = _console_script(_predict)
viz_cli = _console_script(_viz)
