"""Console entry points: thin @hydra.main wrappers around train(cfg), evaluate(cfg), predict(cfg),
visualize(cfg) and export(cfg), inside one error boundary.

The boundary: any bad input (a UserError, a Hydra or OmegaConf error, an OSError, Ctrl-C before
training) ends as one `error:` line on stderr (and in the run's log once it has a folder), exit
code 1 (130 for Ctrl-C); `debug=true` or HYDRA_FULL_ERROR=1 shows the traceback instead. In a
sweep (-m) a failed job is reported and the other jobs still run; the exit code counts them
whatever the launcher (the sweep summary finds failed jobs by their folders)."""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from cnntrain import rundir  # light: no torch, so --help stays fast

log = logging.getLogger("cnntrain")
_failures: list[str] = []
_job_debug = False  # a job asked for tracebacks (debug=true)


def _job(task, cfg: DictConfig, app: str):
    """One job of `app` (train, eval, predict, viz): the schema check, the task, and its
    failure as one line."""
    global _job_debug
    from cnntrain import logs
    from cnntrain.errors import Interrupted
    from cnntrain.schema import check

    run_dir = _output_dir()
    rundir.new_job()
    failed_start = False  # a bad input after the claim: its default folder goes (no results yet)
    try:
        check(cfg)  # before torch is imported: a bad value fails in a second
        return task(cfg)
    except Interrupted as e:  # its state is saved; a sweep stops here too, as Ctrl-C would
        log.warning("%s", e)
        sys.exit(e.exit_code)
    except Exception as e:
        if cfg.get("debug") is True:
            _job_debug = True  # the boundary shows the traceback too
            raise
        failed_start = (
            _is_user_error(e)
            and rundir.claimed() is not None
            and not rundir.in_sweep()
            and rundir.is_default(rundir.claimed())
            and not rundir.results(rundir.claimed())
        )
        if (
            isinstance(e, rundir.RunFolderRefused)
            or failed_start
            or (
                rundir.claimed() is None
                and not (rundir.in_sweep() and rundir.keep_failed_job(run_dir, cfg))
            )
        ):
            logs.drop_file_handlers()  # no folder of its own: stderr only, and no empty folder left
        message = f"error: {one_line(e, app)}"
        log.error(message)
        if not _is_user_error(e):
            import traceback

            logs.to_file(traceback.format_exc())
        _failures.append(message)
        return None
    finally:
        if rundir.claimed() is None:
            rundir.remove_if_empty(run_dir)
        elif failed_start:
            rundir.discard_failed_start(rundir.claimed())


def _output_dir() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None


def _train_task(cfg: DictConfig):
    from cnntrain.train import train

    results = train(cfg, checked=True)  # _job checked it
    if cfg.optimized_metric:  # what a sweeper (Optuna) maximizes
        return results[cfg.optimized_metric]
    return results


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def _train(cfg: DictConfig):
    result = _job(_train_task, cfg, "train")
    # a failed job in a sweep: NaN makes Optuna record a failed trial and go on
    return float("nan") if result is None and cfg.optimized_metric else result


def _lazy(module: str, function: str):
    """The task `module.function`, imported when it runs: --help and config errors stay fast."""

    def task(cfg: DictConfig):
        return getattr(importlib.import_module(module), function)(cfg)

    return task


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def _evaluate(cfg: DictConfig):
    return _job(_lazy("cnntrain.evaluate", "evaluate"), cfg, "eval")


@hydra.main(version_base="1.3", config_path="configs", config_name="predict")
def _predict(cfg: DictConfig):
    return _job(_lazy("cnntrain.predict", "predict"), cfg, "predict")


@hydra.main(version_base="1.3", config_path="configs", config_name="viz")
def _viz(cfg: DictConfig):
    return _job(_lazy("cnntrain.viz", "visualize"), cfg, "viz")


@hydra.main(version_base="1.3", config_path="configs", config_name="export")
def _export(cfg: DictConfig):
    return _job(_lazy("cnntrain.export", "export"), cfg, "export")


# --------------------------------------------------------------------------- one line per error
def _is_user_error(e: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from cnntrain.errors import UserError

    return isinstance(e, (UserError, HydraException, OmegaConfBaseException, OSError))


def _first(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def one_line(e: BaseException, app: str) -> str:
    """What went wrong and the fix, in one line, for any exception that reaches the boundary."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        InterpolationResolutionError,
        MissingMandatoryValue,
        ValidationError,
    )

    from cnntrain import schema
    from cnntrain.errors import UserError

    cause = e.__cause__ if e.__cause__ is not None else e
    key = getattr(cause, "full_key", None) or ""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        return _unknown_option(e)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        return str(
            schema.unknown_key(key, *schema.keys_of(app, key, getattr(cause, "object_type", None)))
        )
    if isinstance(cause, ValidationError) and key:
        # OmegaConf names a scalar it refused; for a list key only the override names it
        value = re.search(r"Value '(.*?)'", str(cause)) or re.search(
            rf"override \+*{re.escape(key)}=(.*)", str(e)
        )
        return str(schema.type_error(app, key, value[1] if value else "?"))
    if isinstance(cause, InterpolationResolutionError):
        return f"{key or 'a key'}: {_first(cause)} (check the ${{...}} in its value)"
    if isinstance(cause, MissingMandatoryValue):
        return f"{key} is required (set {key}=...)"
    if isinstance(e, OverrideParseException):
        return (
            f"cannot read the override {e.override!r} ({_first(e.message)}); write key=value, "
            "and quote values with brackets or special characters for the shell"
        )
    if isinstance(e, OSError):
        return f"{e.strerror or e}: {e.filename}" if e.filename else str(e)
    if _is_user_error(e):
        return _first(e) + (f" ({_first(e.__cause__)})" if e.__cause__ is not None else "")
    return (
        f"{type(e).__name__}: {_first(e)} (an unexpected failure: run again with debug=true "
        "for the traceback and report it)"
    )


def _unknown_option(e) -> str:
    import difflib

    group, _, name = str(e.missing_cfg_file).rpartition("/")
    options = list(e.options or [])
    close = difflib.get_close_matches(name, options, n=1)
    hint = f"; did you mean {group}={close[0]}?" if close else ""
    return f"unknown {group}={name}{hint} (options: {', '.join(options)})"


# --------------------------------------------------------------------------- run folders
def _run_time() -> float:
    """When this run started: rank 0's clock under torchrun (distributed.init shares it)."""
    return float(os.environ.get("CNNTRAIN_RUN_TIME", _STARTED))


_STARTED = repr(time.time())


def _safe(text) -> str:
    """`text` as a part of a folder name: letters, digits and . _ + - kept, the rest one '-'."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", str(text)).strip("-._")[:80]


def _select(root, key: str):
    try:
        value = OmegaConf.select(root, key, default=None, throw_on_missing=False)
    except Exception:  # a broken interpolation fails later, with its own message
        return None
    return value if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None


def _ckpt_run_name(ckpt) -> str:
    """The run name in a checkpoint's path (.../<time>_<name>/checkpoints/best.pt or a sweep
    job's .../<n>_<name>/...): what cnneval, cnnpredict, cnnviz and cnnexport add to their
    folders."""
    if not isinstance(ckpt, str) or not ckpt or ckpt == "???":
        return ""
    path = Path(ckpt)
    run = path.parent.parent if path.parent.name == "checkpoints" else path
    return re.sub(r"^(\d{2}-\d{2}-\d{2}(-\d+)?|\d+)(_|$)", "", run.name)


def _exported_run_name(exported) -> str:
    """cnnpredict model=FILE: the run name of cnnexport's folder (.../<time>_<name>/model.onnx),
    or the file's own name."""
    if not isinstance(exported, str) or not exported:
        return ""
    path = Path(exported)
    if path.stem != "model":
        return path.stem
    return re.sub(r"^(\d{2}-\d{2}-\d{2}(-\d+)?|\d+)(_|$)", "", path.parent.name)


def run_name(_root_=None) -> str:
    """What tells a run apart in `ls` and TensorBoard: `name=` when set, else <model>_<data>
    (model.name, data.name); for cnneval, cnnpredict, cnnviz and cnnexport the checkpoint's run
    name (cnnpredict model=: the exported file's). Filename-safe; "" when there is nothing to name."""
    if _root_ is None:
        return ""
    given = _select(_root_, "name")
    if given not in (None, ""):
        return _safe(given)
    parts = [_select(_root_, "model.name"), _select(_root_, "data.name")]
    if any(p is not None for p in parts):
        return "_".join(_safe(p) for p in parts if p is not None and _safe(p))
    return _safe(
        _ckpt_run_name(_select(_root_, "ckpt")) or _exported_run_name(_select(_root_, "exported"))
    )


def _default_run_dir(job: str, name: str = "") -> str:
    """A run's folder when hydra.run.dir is not given: outputs/<date>/<time>_<name> for training,
    outputs/<job>/<date>/<time>_<name> for cnneval, cnnpredict, cnnviz and cnnexport (<name>:
    run_name); claimed by rundir.unique_dir."""
    when = datetime.fromtimestamp(_run_time())
    return rundir.unique_dir(
        f"outputs/{'' if job == 'train' else job + '/'}{when:%Y-%m-%d}/"
        f"{when:%H-%M-%S}{'_' + name if name else ''}"
    )


# Cached: Hydra copies the resolver cache into every job's config (also in joblib or SLURM
# workers), so all jobs of a sweep resolve the same folder.
OmegaConf.register_new_resolver(
    "cnntrain.now",
    lambda pattern: datetime.fromtimestamp(_run_time()).strftime(pattern),
    use_cache=True,
    replace=True,
)
OmegaConf.register_new_resolver("cnntrain.unique", rundir.unique_dir, use_cache=True, replace=True)
# Defined once (hydra/default.yaml) and never merged over: OmegaConf evaluates an interpolation
# that a later config merges into, and this one creates a folder.
OmegaConf.register_new_resolver("cnntrain.run_dir", _default_run_dir, use_cache=True, replace=True)
# Not cached: each job of a sweep names its own subfolder (hydra.sweep.subdir).
OmegaConf.register_new_resolver("cnntrain.run_name", run_name, use_cache=False, replace=True)


def _keys_help(app: str, _root_) -> str:
    """--help's table of every key: its value in this composition and its meaning (schema)."""
    from cnntrain.schema import help_table

    return help_table(app, _root_).replace(
        "$", "$$"
    )  # Hydra fills the help in as a string.Template


def _groups_help(_root_) -> str:
    """--help's groups: each group's options and the one chosen, without the schema/ groups
    (declarations, not choices)."""
    from cnntrain.options import config_groups, config_options

    chosen = OmegaConf.select(_root_, "hydra.runtime.choices", default={}) or {}
    return "\n".join(
        f"  {group}={chosen.get(group) or '...'}: {', '.join(config_options(group))}"
        for group in config_groups()
    )


OmegaConf.register_new_resolver("cnntrain.keys_help", _keys_help, replace=True)
OmegaConf.register_new_resolver("cnntrain.groups_help", _groups_help, replace=True)


# --------------------------------------------------------------------------- console scripts
def _exit() -> None:
    from cnntrain.callbacks import FAILED_JOBS

    failures = FAILED_JOBS if len(FAILED_JOBS) > len(_failures) else _failures
    if failures and ({"-m", "--multirun"} & set(sys.argv[1:])):
        print(f"{len(failures)} job(s) failed:", *failures, sep="\n  ", file=sys.stderr)
    sys.exit(1 if failures else 0)


def _debug_asked() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or any(
        re.fullmatch(r"\+*debug=(true|True|TRUE)", arg) for arg in sys.argv[1:]
    )


def _renamed(args: list[str], aliases: dict[str, str]) -> list[str]:
    """Command-line overrides `key=value` of a key in `aliases` given as its config key."""
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        out.append(f"{aliases[key]}={value}" if eq and key in aliases else arg)
    return out


def _console_script(hydra_main, app: str, aliases: dict[str, str] | None = None):
    """A console-script entry: the Hydra app inside the error boundary, then exit code 1 if any
    job failed. Under torchrun the ranks first join their process group; ranks > 0 log errors
    only. `aliases`: keys the command line may use for config keys whose own name Hydra reads
    otherwise (cnnpredict model=FILE.onnx: `model` is the name of a config group)."""

    def run() -> None:
        if aliases:
            sys.argv[1:] = _renamed(sys.argv[1:], aliases)
        debug = _debug_asked()
        # Hydra then raises what it would print as a traceback, and the boundary reports it
        os.environ["HYDRA_FULL_ERROR"] = "1"
        # before any CUDA work (a sweep's earlier job, torchrun's set-up): cuBLAS reads it once
        # per process, and deterministic=true needs it (runtime.CUBLAS_DETERMINISTIC; written
        # out here, where torch is not imported yet); otherwise it is a fixed 32 MiB workspace
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        try:
            if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # torch stays unimported for --help
                hydra_main()
            else:
                _distributed(hydra_main)
        except KeyboardInterrupt:
            if debug or _job_debug:
                raise
            print(
                "error: interrupted (Ctrl-C) before training started; nothing was saved",
                file=sys.stderr,
            )
            sys.exit(130)
        except Exception as e:
            if debug or _job_debug:
                raise
            if (
                isinstance(e, OSError) and e.filename
            ):  # Hydra creating the run folder or writing into it
                message = (
                    f"cannot use {e.filename} for this run ({e.strerror}); choose another "
                    "hydra.run.dir= (or hydra.sweep.dir=)"
                )
            else:
                message = one_line(e, app)
            print(f"error: {message}", file=sys.stderr)
            sys.exit(1)
        _exit()

    return run


def _distributed(hydra_main) -> None:
    from cnntrain import distributed

    distributed.init()
    if not distributed.is_main():
        sys.argv += [
            "hydra.job_logging.root.level=ERROR",
            "hydra.job_logging.handlers.file.filename="
            f"${{hydra.runtime.output_dir}}/rank{distributed.rank()}.log",
        ]
    try:
        hydra_main()
    finally:
        distributed.destroy()


train_cli = _console_script(_train, "train")
eval_cli = _console_script(_evaluate, "eval")
predict_cli = _console_script(_predict, "predict", aliases={"model": "exported"})
viz_cli = _console_script(_viz, "viz")
export_cli = _console_script(_export, "export")
