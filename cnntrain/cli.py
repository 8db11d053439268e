"""Console entry points: thin @hydra.main wrappers around train(cfg), evaluate(cfg), predict(cfg)
and visualize(cfg).

A bad input ends its job with one line and a non-zero exit code instead of a traceback; in a
sweep (-m) the failed job is reported and the other jobs still run."""
from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from datetime import datetime

import hydra
from omegaconf import DictConfig, OmegaConf

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

    results = train(cfg)
    if cfg.optimized_metric:  # what a sweeper (Optuna) maximizes
        if cfg.optimized_metric not in results:
            from cnntrain.errors import UserError

            raise UserError(f"optimized_metric={cfg.optimized_metric} is not a result; choose one "
                            f"of {', '.join(k for k, v in results.items() if isinstance(v, float))}")
        return results[cfg.optimized_metric]
    return results


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def _train(cfg: DictConfig):
    result = _run(_train_task, cfg)
    # a failed job in a sweep: NaN makes Optuna record a failed trial and go on
    return float("nan") if result is None and cfg.optimized_metric else result


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


def _run_time() -> float:
    """When this run started: rank 0's clock under torchrun (distributed.init shares it)."""
    return float(os.environ.get("CNNTRAIN_RUN_TIME", _STARTED))


_STARTED = repr(time.time())


def _unique_dir(path: str) -> str:
    """`path`, or `path-2`, `path-3`, ... if a run that started in the same second has it:
    claimed with mkdir, which only one process can win. Under torchrun every rank must name the
    same folder, so there it is `path` as resolved from rank 0's start time."""
    if "CNNTRAIN_RUN_TIME" in os.environ:
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    for n in range(1, 1000):
        candidate = path if n == 1 else f"{path}-{n}"
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"no free folder next to {path}")


# Cached: Hydra copies the resolver cache into every job's config (also in joblib or SLURM
# workers), so all jobs of a sweep resolve the same folder.
OmegaConf.register_new_resolver(
    "cnntrain.now", lambda pattern: datetime.fromtimestamp(_run_time()).strftime(pattern),
    use_cache=True, replace=True)
OmegaConf.register_new_resolver("cnntrain.unique", _unique_dir, use_cache=True, replace=True)


def _console_script(hydra_main):
    """A console-script entry: the Hydra app, then exit code 1 if any job failed. Under torchrun
    the ranks first join their process group; ranks > 0 write no Hydra files and log errors only."""
    def run() -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # torch stays unimported for --help
            hydra_main()
            _exit()
        from cnntrain import distributed

        distributed.init()
        if not distributed.is_main():
            sys.argv += ["hydra.output_subdir=null", "hydra.job_logging.root.level=ERROR",
                         "hydra.job_logging.handlers.file.filename="
                         f"${{hydra.runtime.output_dir}}/rank{distributed.rank()}.log",
                         "+hydra.job_logging.handlers.file.delay=true"]
        try:
            hydra_main()
        finally:
            distributed.destroy()
        _exit()
    return run


train_cli = _console_script(_train)
eval_cli = _console_script(_evaluate)
predict_cli = _console_script(_predict)
viz_cli = _console_script(_viz)
