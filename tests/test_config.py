"""Config composition: every option of every group composes, and bad values are refused."""

import pytest
from conftest import BY_NAME, refusal
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from cnntrain.errors import UserError
from cnntrain.options import config_dir
from cnntrain.options import config_options as options
from cnntrain.schema import check as validate_train

CONFIGS = config_dir()
GROUPS = ("model", "data", "optim", "sched", "aug")


def make_cfg(*overrides):
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_contract_options_exist():
    assert set(options("model")) >= {
        "lenet5",
        "alexnet",
        "vgg11",
        "vgg13",
        "vgg16",
        "vgg19",
        "vgg16_bn",
        "googlenet",
        "resnet18",
        "resnet34",
        "resnet50",
    }
    assert options("data") == [
        "cifar10",
        "cifar100",
        "fashion_mnist",
        "fashion_mnist_mini",
        "imagefolder",
        "mnist",
    ]
    assert options("optim") == ["adam", "adamw", "sgd"]
    assert options("sched") == ["cosine", "multistep", "none", "onecycle", "step"]
    assert options("aug") == ["basic", "none", "strong"]


def test_defaults():
    cfg = make_cfg()
    assert (
        cfg.model.name == "lenet5" and cfg.data.name == "fashion_mnist_mini"
    )  # bundled: runs offline
    for key in ("epochs", "seed", "device", "amp", "channels_last", "resume"):
        assert key in cfg
    assert cfg.device == "auto" and cfg.resume is None and cfg.amp is False
    for key in ("root", "download", "batch_size", "num_workers", "val_split"):
        assert key in cfg.data
    assert cfg.optim.name == "sgd" and cfg.sched.name == "cosine"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if (group, option) == ("data", "imagefolder"):
        overrides.append("data.root=/somewhere")
    by_name = group == "model" and option in BY_NAME  # any torchvision/timm model by name
    if by_name:
        overrides.append("model.name=resnet18")
    cfg = make_cfg(*overrides)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert OmegaConf.missing_keys(cfg) == set()
    node = cfg[group]
    if group in ("model", "data", "aug") and not by_name:
        assert node.name == option
    if group in ("optim", "sched"):
        from cnntrain.optim import OPTIMIZERS, SCHEDULES

        assert node.name == option
        assert {**OPTIMIZERS, **SCHEDULES}[option].__module__.startswith("torch.optim")
    validate_train(cfg)


def test_sgd_has_momentum_and_nesterov():
    cfg = make_cfg("optim=sgd")
    assert cfg.optim.momentum > 0 and cfg.optim.nesterov is True
    assert make_cfg("sched=step").sched.step_size == 7 and make_cfg("sched=step").sched.gamma == 0.1


def test_unknown_option_lists_the_available_ones():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="resnet18"):
        make_cfg("model=resnet81")


@pytest.mark.parametrize(
    "override,key",
    [
        ("epochs=0", "epochs"),
        ("epochs=-3", "epochs"),
        ("epochs=1.5", "epochs"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.batch_size=-1", "data.batch_size"),
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=-0.1", "optim.lr"),
        ("data.val_split=1", "data.val_split"),
        ("data.val_split=-0.1", "data.val_split"),
        ("data.val_split=1.5", "data.val_split"),
        ("data.num_workers=-1", "data.num_workers"),
        ("device=gpu", "device"),
        ("amp_dtype=fp8", "amp_dtype"),
        ("max_steps_per_epoch=0", "max_steps_per_epoch"),
        ("max_eval_steps=-1", "max_eval_steps"),
        # a list for a key of choices (found by tests/test_schema_property.py: [] reached SGD)
        ("optim.nesterov=[]", "optim.nesterov"),
        ("amp=[true]", "amp"),
        ("device=[cpu]", "device"),
    ],
)
def test_bad_values_are_refused_naming_the_key(override, key):
    message = refusal(override)
    assert message.startswith(f"{key}=") and " is not allowed: it must be " in message, message


def test_model_by_name_needs_a_name():
    assert refusal("model=tv").startswith("model.name is required")


def test_imagefolder_needs_a_root():
    with pytest.raises(UserError, match="data.root"):
        validate_train(make_cfg("data=imagefolder"))


def test_experiment_config_sets_several_groups():
    cfg = make_cfg("experiment=cifar10_resnet18")
    assert (cfg.model.name, cfg.data.name, cfg.epochs, cfg.optim.lr, cfg.data.batch_size) == (
        "resnet18",
        "cifar10",
        200,
        0.1,
        128,
    )
    assert make_cfg("experiment=cifar10_resnet18", "epochs=3").epochs == 3


# what aug=basic applies to each kind of image (configs/aug/basic.yaml): (shift, degrees, scale, hflip)
BASIC = {
    "digits": (2, 10.0, (0.9, 1.1), False),
    "clothing": (1, 0.0, None, True),
    "natural": (4, 0.0, None, True),
}


@pytest.mark.parametrize(
    "overrides,kind",
    [
        (["data=mnist"], "digits"),
        (["data=fashion_mnist"], "clothing"),
        (["data=cifar10"], "natural"),
        (["data=imagefolder", "data.kind=digits", "data.image_size=28"], "digits"),
    ],
)
def test_data_kind_picks_the_geometry_the_training_transform_gets(
    data_root, folder_root, overrides, kind
):
    import torch

    from cnntrain.data import build_data

    root = folder_root if "data=imagefolder" in overrides else data_root
    cfg = make_cfg(*overrides, f"data.root={root}", "data.download=false", "aug=basic")
    validate_train(cfg)
    assert cfg.data.kind == kind
    data = build_data(cfg.data, cfg.aug, device=torch.device("cpu"), seed=0, splits=("train",))
    geo = data.loaders["train"].transform.ops[0]  # the geometry runs first; shifts and flips
    # alone are a ShiftFlip, which has no rotation or zoom
    got = geo.shift, getattr(geo, "degrees", 0.0), getattr(geo, "scale", None), geo.hflip
    assert got == BASIC[kind]


def test_strong_is_basic_with_larger_distortions_and_the_policy():
    cfg = make_cfg("aug=strong")
    assert cfg.aug.policy == "randaugment" and cfg.aug.random_erasing == 0.25
    assert (cfg.aug.digits.shift, cfg.aug.digits.degrees, list(cfg.aug.digits.scale)) == (
        3,
        15,
        [0.85, 1.15],
    )
    assert (cfg.aug.clothing.shift, cfg.aug.clothing.hflip, cfg.aug.clothing.degrees) == (
        2,
        True,
        0,
    )
    assert cfg.aug.natural == make_cfg("aug=basic").aug.natural
    none = make_cfg("aug=none").aug
    assert all(not any(none[kind].values()) for kind in ("digits", "clothing", "natural"))


@pytest.mark.parametrize(
    "override,start",
    [
        (
            "data.kind=photos",
            "data.kind=photos is not allowed: it must be one of digits, clothing, natural",
        ),
        ("aug.digits.scale=[0,1.1]", "aug.digits.scale=[0.0, 1.1] is not allowed: it must be > 0"),
        (
            "aug.digits.scale=[0.9]",
            "aug.digits.scale=[0.9] is not allowed: it must be > 0, a list of 2 value(s)",
        ),
        (
            "aug.digits.scale=[1.1,0.9]",
            "aug.digits.scale=[1.1, 0.9]: give [min, max] with min <= max",
        ),
        (
            "aug.natural.crop_scale=[0.08,1]",
            "aug.natural.crop_scale replaces aug.natural.shift (the random-resized "
            "crop moves and scales the image itself): set aug.natural.shift=0",
        ),
    ],
)
def test_bad_kind_or_scale_is_one_line_naming_the_key(override, start):
    assert refusal(override).startswith(start), refusal(override)


def test_every_option_name_is_one_the_code_builds():
    """The YAML files list each group's options; the schema's declarations and name choices, the
    torch classes and the datasets cnntrain reads name the same ones."""
    from cnntrain.data import DATASETS
    from cnntrain.optim import OPTIMIZERS, SCHEDULES
    from cnntrain.schema import GROUP_OPTIONS, OPTIMIZER_NAMES, SCHEDULE_NAMES

    for group, names, classes in (
        ("optim", OPTIMIZER_NAMES, OPTIMIZERS),
        ("sched", SCHEDULE_NAMES, SCHEDULES),
    ):
        assert list(names) == sorted(GROUP_OPTIONS[group]) == sorted(classes) == options(group)
    assert sorted(DATASETS) == options("data")


def test_option_lists_leave_out_shared_pieces_and_hydras_settings(tmp_path, monkeypatch):
    """A `_name.yaml` (a piece options could share through their defaults list) or an editor's
    dot file is no option; hydra/ is no group of options."""
    import cnntrain.options

    for path in (
        "model/a.yaml",
        "model/_base.yaml",
        "model/.#a.yaml",
        "model/a.txt",
        "hydra/x.yaml",
    ):
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text("name: a\n")
    (tmp_path / "__pycache__").mkdir()
    monkeypatch.setattr(cnntrain.options, "config_dir", lambda: tmp_path)
    assert cnntrain.options.config_groups() == ["model"]
    assert options("model") == ["a"]


def test_every_data_option_says_what_kind_of_images_it_has():
    for option in options("data"):
        assert (CONFIGS / "data" / f"{option}.yaml").read_text().count("\nkind: ") == 1, option


def _train_leaves(node, prefix=""):
    """(path, field) of every leaf key a training config can have, every optim/sched option's."""
    from dataclasses import fields, is_dataclass

    from cnntrain.schema import GROUP_OPTIONS, TrainConfig

    for f in fields(node):
        path = f"{prefix}{f.name}"
        if node is TrainConfig and f.name in GROUP_OPTIONS:
            for option in GROUP_OPTIONS[f.name].values():
                yield from _train_leaves(option, f"{path}.")
        elif is_dataclass(f.type) and "resume" not in f.metadata:
            yield from _train_leaves(f.type, f"{path}.")
        else:
            yield path, f


def test_every_training_key_declares_what_a_resume_may_do_with_it():
    """One declaration per key: its type, range, meaning and resume class together; a new key
    without `resume=` fails here instead of silently falling to a default."""
    from cnntrain.schema import RESUME_CLASSES, TrainConfig

    leaves = list(_train_leaves(TrainConfig))
    assert len(leaves) > 60
    missing = [path for path, f in leaves if f.metadata.get("resume") not in RESUME_CLASSES]
    assert not missing, f"declare resume= for: {', '.join(missing)}"


@pytest.mark.parametrize(
    "path, expected",
    [
        ("model", "fixed"),
        ("model.args.drop_rate", "fixed"),
        ("data.root", "free"),
        ("data.batch_size", "epoch"),
        ("optim.name", "fixed"),
        ("optim.lr", "replan"),
        ("optim.momentum", "allow"),
        ("optim.fused", "free"),
        ("sched", "replan"),
        ("aug", "allow"),
        ("data", "allow"),
        ("checkpoint", "free"),
        ("ema", "fixed"),
        ("epochs", "replan"),
        ("seed", "allow"),
    ],
)
def test_resume_classes_of_keys_and_groups(path, expected):
    """A group's classes are those of its keys; resume_allow_changes accepts a group when some
    key in it may change on purpose."""
    from cnntrain.schema import resume_classes

    classes = resume_classes(path)
    assert expected in classes
    if path in ("model", "checkpoint", "ema", "optim.name", "data.root"):
        assert classes == {expected}
