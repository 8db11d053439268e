import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

# xdist runs one process per core; torch's default of one OpenMP thread per core in each of
# them (and in every console script they start) puts N spinning threads on each core, which
# made the suite ~40 % slower. One thread per process: the workers are the parallelism.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from fakedata import write_cifar, write_image_folder, write_mnist


@contextlib.contextmanager
def _no_processes(item):
    """The fast tier (`-m "not e2e"`) runs in this process: a test not marked e2e that starts
    a process (a console script, torchrun, mount, pip), in its body or in a fixture of any
    scope, fails here, naming the mark it needs, so that the tier stays fast and its marks stay
    true. The product's own worker pools (multiprocessing) stay allowed; tests of gloo ranks
    (ranks.py) are marked by hand."""
    if item.get_closest_marker("e2e") is not None:
        yield
        return

    def refuse(self, *args, **kwargs):
        raise AssertionError(
            f"{item.nodeid} starts a process ({str(args)[:80]}): mark it "
            "@pytest.mark.e2e (the end-to-end tier) or test it in-process"
        )

    real = subprocess.Popen.__init__
    subprocess.Popen.__init__ = refuse
    try:
        yield
    finally:
        subprocess.Popen.__init__ = real


# around set-up too: a module- or session-scoped fixture is set up in its first test's set-up
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _no_processes(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _no_processes(item):
        yield


# The files that take longest (minutes of subprocesses each), longest first. pytest-xdist's
# loadfile hands whole files to the two workers in collection order, so a long file collected
# late (test_scale, test_transfer) left one worker running it alone at the end; starting the
# longest first (longest-processing-time-first scheduling) evens the two. A stale list costs
# time, never a result.
LONGEST_FIRST = (
    "test_distributed.py",
    "test_scale.py",
    "test_bench.py",
    "test_learning.py",
    "test_install.py",
    "test_schema_property.py",
    "test_cli.py",
    "test_export.py",
    "test_promises.py",
    "test_predict_viz.py",
    "test_transfer.py",
)


def pytest_collection_modifyitems(config, items):
    """The longest files first (LONGEST_FIRST); tests marked `cuda` run where a GPU is visible
    (CI on a GPU machine) and are skipped here."""
    import torch

    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """Image folders are decoded into a cache under the test session's temporary folder, never
    into the user's ~/.cache (subprocesses inherit the variable)."""
    os.environ["CNNTRAIN_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """One folder with every built-in dataset in its real format, as torchvision lays them out."""
    root = tmp_path_factory.mktemp("data")
    write_mnist(root, "MNIST")
    write_mnist(root, "FashionMNIST")
    write_cifar(root, 10)
    write_cifar(root, 100, n_train=600, n_test=200)
    return root


@pytest.fixture(scope="session")
def folder_root(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture
def signal_at_batch(monkeypatch):
    """Sends a real signal to this process while training batch number `n` (1-based, counted
    across epochs) is being prepared: the loop trains on it, then stops."""
    import signal

    from cnntrain.data.loaders import BatchLoader

    def arm(n, signum=signal.SIGUSR1):
        original, seen = BatchLoader.iter_from, [0]

        def iter_from(self, start):
            for batch in original(self, start):
                if self.shuffle:  # the training loader
                    seen[0] += 1
                    if seen[0] == n:
                        signal.raise_signal(signum)
                yield batch

        monkeypatch.setattr(BatchLoader, "iter_from", iter_from)

    return arm


def run_cli(*args, cwd=None, check=True, timeout=600, env=None) -> subprocess.CompletedProcess:
    """Run a console script (cnntrain/cnneval) as a user would, from `cwd`, with `env` added to
    the environment (a None value removes that variable). The scripts of the environment running
    the tests are used, whether or not it is activated."""
    env = {
        k: v
        for k, v in {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}.items()
        if v is not None
    }
    script = Path(sys.executable).parent / args[0]
    if script.is_file():
        args = (str(script), *args[1:])
    proc = subprocess.run(
        [*args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def refusal(*overrides, config="train") -> str:
    """The one-line error that composing `config` with `overrides` and checking it against the
    schema ends with (AssertionError if the config is accepted)."""
    from hydra import compose, initialize_config_module

    from cnntrain.cli import one_line
    from cnntrain.schema import check

    try:
        with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
            check(compose(config_name=config, overrides=list(overrides)))
    except Exception as e:
        message = one_line(e, config)
        assert "\n" not in message, message
        return message
    raise AssertionError(f"{overrides} accepted")


def model_yaml(option: str) -> Path:
    """configs/model/<option>.yaml as installed."""
    from cnntrain.options import config_dir

    return config_dir() / "model" / f"{option}.yaml"


def _by_name() -> frozenset[str]:
    from omegaconf import OmegaConf

    from cnntrain.options import config_options

    return frozenset(
        o for o in config_options("model") if "source" in OmegaConf.load(model_yaml(o))
    )


# model=tv / model=timm: any torchvision / timm model by name (their YAML names the `source`;
# tests/test_transfer.py); every other model= option is one of cnntrain's registered models
BY_NAME = _by_name()
