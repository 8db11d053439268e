"""A property of the one schema: for every declared key and any value drawn for it (numbers of
any size and sign, NaN and infinities, booleans, null, strings, lists), the outcome is either a
run - the value arrives unchanged and everything it feeds builds and trains one step - or one
error line that names the key; never a traceback, never a silent change."""

import math
import os
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cnntrain import schema
from cnntrain.cli import one_line
from cnntrain.errors import UserError

EXAMPLES = int(os.environ.get("CNNTRAIN_PROPERTY_EXAMPLES", "100"))


def _leaves(node, prefix=""):
    for f in fields(node):
        if f.name.startswith("_") or f.name in schema.GROUP_OPTIONS:
            continue
        if is_dataclass(f.type):
            yield from _leaves(f.type, f"{prefix}{f.name}.")
        else:
            yield None, f"{prefix}{f.name}", f


# (the group option to compose with, the key, its declaration) for every declared key
KEYS = list(_leaves(schema.TrainConfig)) + [
    (f"{group}={option}", f"{group}.{f.name}", f)
    for group, options in schema.GROUP_OPTIONS.items()
    for option, node in options.items()
    for f in fields(node)
    if not f.name.startswith("_")
]

WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_./:-", min_size=1, max_size=10)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-2, 2),
    WORDS,
)


def values_for(f):
    """Anything, with the declared choices and the edges of the declared range drawn often."""
    rules = f.metadata
    edges = [rules[k] for k in ("ge", "gt", "le", "lt") if k in rules]
    special = [st.sampled_from(list(rules.get("choices", [None])))]
    special += (
        [
            st.sampled_from(edges),
            st.sampled_from([e + d for e in edges for d in (-1, -1e-9, 1e-9, 1)]),
        ]
        if edges
        else []
    )
    return st.one_of(SCALARS, *special, st.lists(SCALARS, max_size=4))


def render(value) -> str:
    """A value as a command-line override writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(render(v) for v in value) + "]"
    return f"'{value}'"  # quoted: 0 or true would be read as a number or a boolean


def same(given, got) -> bool:
    """Whether the composed value is the given one: numbers equal, booleans as booleans,
    strings as written."""
    if isinstance(got, (ListConfig, list)):
        return isinstance(given, list) and len(given) == len(got) and all(map(same, given, got))
    if isinstance(got, bool):
        return type(given) is bool and got == given
    if isinstance(got, str):  # a number or true/false given for a text key is its text (nan too)
        return got == str(given)
    if isinstance(given, float) and math.isnan(given):
        return isinstance(got, float) and math.isnan(got)
    if isinstance(given, str):  # '3' for a number key: the number written as text
        try:
            return float(given) == got
        except ValueError:
            return False
    return got == given


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from fakedata import write_mnist

    root = tmp_path_factory.mktemp("tiny")
    write_mnist(root, "MNIST", n_train=60, n_test=20)
    return root


def run_one_step(cfg: DictConfig) -> None:
    """What a run does with the config, up to one training step: device, data, model,
    optimizer, schedule, augmentation, regularizers, resume file, and the step itself."""
    import torch
    from torch import nn

    from cnntrain.data import build_data
    from cnntrain.engine import Placement, Update, train_one_epoch
    from cnntrain.imbalance import class_counts, class_weights
    from cnntrain.models import build_model
    from cnntrain.optim import create_optimizer, create_scheduler
    from cnntrain.plan import input_config
    from cnntrain.resume import load_resumed, resume_path
    from cnntrain.runtime import amp_dtype, select_device

    device = select_device(cfg.device)
    amp_dtype(cfg.amp, device, cfg.amp_dtype)
    path = resume_path(cfg, Path("/nonexistent/checkpoints"))  # resume=auto: nothing there
    if path is not None:
        load_resumed(path)
    data = build_data(input_config(cfg), cfg.aug, device=device, seed=cfg.seed)
    model, _ = build_model(cfg.model, data.in_channels, len(data.classes), data.image_size, device)
    optimizer = create_optimizer(cfg.optim, model)
    loader = data.loaders["train"]
    scheduler, interval = create_scheduler(
        cfg.sched,
        optimizer,
        epochs=cfg.epochs,
        steps_per_epoch=min(len(loader), cfg.max_steps_per_epoch or len(loader)),
    )
    counts = class_counts(loader.labels, len(data.classes))
    weights = class_weights(cfg.loss.class_weights, counts, cfg.data.name)
    out = train_one_epoch(
        model,
        loader,
        nn.CrossEntropyLoss(
            weight=None if weights is None else torch.tensor(weights),
            label_smoothing=cfg.label_smoothing,
        ),
        Update(optimizer, scheduler if interval == "step" else None, grad_clip=cfg.grad_clip),
        Placement(device),
        max_steps=1,
        progress=False,
        on_nan=cfg.on_nan,
    )
    assert out["state"].step == 1


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_value_of_any_key_is_a_run_or_one_line_naming_it(tiny_data, data):
    option, key, f = data.draw(st.sampled_from(KEYS), label="key")
    value = data.draw(values_for(f), label="value")
    override = f"{key}={render(value)}"
    base = [
        "data=mnist",
        f"data.root={tiny_data}",
        "data.download=false",
        "device=cpu",
        "data.batch_size=16",
        "max_eval_steps=1",
        *([option] if option else []),
    ]
    try:
        with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
            cfg = compose(config_name="train", overrides=[*base, override])
        schema.check(cfg)
        assert same(value, OmegaConf.select(cfg, key)), (override, OmegaConf.select(cfg, key))
        run_one_step(cfg)
    except (UserError, HydraException, OmegaConfBaseException) as e:
        message = one_line(e, "train")
        assert "\n" not in message, (override, message)
        named = {key, key.rsplit(".", 1)[-1], key.split(".")[0], override}
        assert any(n in message for n in named), (override, message)
