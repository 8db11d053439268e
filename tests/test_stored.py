"""A checkpoint's stored config is data: no tool runs code named in it (`_target_` at any depth),
resolves an interpolation in it, or accepts a key, type, range or model name the command line
would refuse. Each crafted file below passes torch.load(weights_only=True): plain dicts and text."""

import ast
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from hydra import compose, initialize_config_module
from PIL import Image

from cnntrain.checkpoint import load_checkpoint
from cnntrain.errors import UserError
from cnntrain.inference import trained_config
from cnntrain.stored import refuse_code
from cnntrain.train import train

PACKAGE = Path(__file__).resolve().parents[1] / "cnntrain"


def compose_app(app, *overrides):
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        return compose(config_name=app, overrides=list(overrides))


@pytest.fixture(scope="module")
def run(data_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stored")
    train(
        compose_app(
            "train",
            "data=mnist",
            f"data.root={data_root}",
            "data.download=false",
            "device=cpu",
            "epochs=1",
            "max_steps_per_epoch=2",
            "max_eval_steps=1",
        ),
        run_dir=run_dir,
    )
    return run_dir


def crafted(run, tmp_path, change, name="last.pt") -> Path:
    state = torch.load(run / "checkpoints" / name, weights_only=True)
    change(state["config"])
    path = tmp_path / "crafted" / name
    path.parent.mkdir(exist_ok=True)
    torch.save(state, path)
    return path


def touch_at(marker: Path):
    """What an attacker puts under model.args: instantiate would call Path(marker).touch()."""
    return {"_target_": "pathlib.Path.touch", "_args_": [str(marker)]}


def tools(ckpt: Path, tmp_path: Path, data_root):
    """Every way a checkpoint's config is read back: cnneval, cnnexport, cnnpredict, cnnviz, resume."""
    from cnntrain.evaluate import evaluate
    from cnntrain.export import export
    from cnntrain.predict import predict
    from cnntrain.viz import visualize

    image = tmp_path / "x.png"
    Image.new("L", (28, 28)).save(image)
    return {
        "eval": lambda: evaluate(
            compose_app("eval", f"ckpt={ckpt}", "device=cpu"), run_dir=tmp_path / "ev"
        ),
        "export": lambda: export(compose_app("export", f"ckpt={ckpt}"), run_dir=tmp_path / "ex"),
        "predict": lambda: predict(
            compose_app("predict", f"ckpt={ckpt}", f"inputs={image}", "device=cpu"),
            run_dir=tmp_path / "pr",
        ),
        "viz": lambda: visualize(
            compose_app("viz", f"ckpt={ckpt}", f"inputs={image}", "device=cpu"),
            run_dir=tmp_path / "vz",
        ),
        "resume": lambda: train(
            compose_app(
                "train",
                "data=mnist",
                f"data.root={data_root}",
                "device=cpu",
                "data.download=false",
                "epochs=2",
                "max_steps_per_epoch=2",
                "max_eval_steps=1",
                "resume_allow_changes=[epochs]",
                f"resume={ckpt}",
            ),
            run_dir=tmp_path / "re",
        ),
    }


@pytest.mark.parametrize("tool", ["eval", "export", "predict", "viz", "resume"])
def test_a_target_in_the_stored_config_runs_nothing_in_any_tool(run, data_root, tmp_path, tool):
    marker = tmp_path / "PWNED"
    ckpt = crafted(run, tmp_path, lambda c: c["model"]["args"].update(x=touch_at(marker)))
    with pytest.raises(
        UserError,
        match=rf"{ckpt}: its stored config sets model\.args\.x\._target_="
        r"pathlib\.Path\.touch, which names code to run",
    ):
        tools(ckpt, tmp_path, data_root)[tool]()
    assert not marker.exists()


@pytest.mark.e2e
def test_the_refusal_is_one_line_on_stderr(run, tmp_path):
    marker = tmp_path / "PWNED"
    ckpt = crafted(run, tmp_path, lambda c: c["optim"].update(_target_="builtins.exec"), "best.pt")
    proc = run_cli(
        "cnneval", f"ckpt={ckpt}", f"hydra.run.dir={tmp_path / 'ev'}", cwd=tmp_path, check=False
    )
    assert proc.returncode == 1 and not marker.exists()
    assert proc.stderr.strip() == (
        f"error: {ckpt}: its stored config sets optim._target_=builtins.exec, "
        "which names code to run; a checkpoint's config is data, so the file is "
        "refused (use a checkpoint written by cnntrain, or train again)"
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c: c["data"].update(root="${oc.env:HOME}"),
            r"an interpolation at data\.root \('\$\{oc\.env:HOME\}'\)",
        ),
        (
            lambda c: c.update(name="${cnntrain.unique:made_by_a_checkpoint}"),
            r"an interpolation at name",
        ),
        (
            lambda c: c["aug"]["digits"].update(scale=[0.9, "${oc.env:HOME}"]),
            r"interpolation at aug\.digits\.scale\[1\]",
        ),
        (lambda c: c.update(epochs=-3), r"refused: epochs=-3 is not allowed: it must be >= 1"),
        (lambda c: c["optim"].update(weight_decay="fast"), r"refused at optim\.weight_decay"),
        (lambda c: c["optim"].update(lr="fast"), r"refused: optim\.lr=fast is not allowed"),
        (lambda c: c["optim"].update(lr="find"), r"refused: it stores optim\.lr=find"),
        (lambda c: c["data"].update(bogus=1), r"refused at data\.bogus"),
        (
            lambda c: c["model"].update(name="resnet81"),
            r"model\.name=resnet81, which cnntrain does not have",
        ),
        (
            lambda c: c["model"].update(source="torchvision", name="not_a_model"),
            r"torchvision model not_a_model",
        ),
        (
            lambda c: c["sched"].update(name="exponential"),
            r"sched\.name=exponential, not one of cosine",
        ),
        (lambda c: c["optim"].update(name="adam"), r"refused at optim\.momentum"),
        (
            lambda c: c["data"].update(mean=[0.5] * 3),
            r"data\.mean=\[0\.5, 0\.5, 0\.5\] and data\.std=",
        ),
        (
            lambda c: c["model"].update(stem={"_partial_": True}),
            r"sets model\.stem\._partial_=true",
        ),
    ],
    ids=[
        "env",
        "resolver",
        "in-list",
        "range",
        "type",
        "lr",
        "lr-find",
        "unknown-key",
        "unknown-model",
        "tv-model",
        "unknown-sched",
        "name-mismatch",
        "cross-key",
        "nested-directive",
    ],
)
def test_a_stored_config_is_checked_as_the_command_line_is(run, tmp_path, change, message):
    ckpt = crafted(run, tmp_path, change, "best.pt")
    with pytest.raises(UserError, match=rf"^{ckpt}: its stored config .*{message}"):
        trained_config(load_checkpoint(ckpt), ckpt)
    assert not (tmp_path / "made_by_a_checkpoint").exists()


def test_checkpoints_of_older_versions_still_load_and_resume(run, data_root, tmp_path):
    """Before optim.name and sched.name, cnntrain stored its own configs' `_target_` strings:
    those exact strings are read as names (compared, never imported); any other is refused."""

    def old(config):
        config["model"].update(_target_="cnntrain.models.create_model", _partial_=True)
        for group, target in (
            ("optim", "torch.optim.SGD"),
            ("sched", "torch.optim.lr_scheduler.CosineAnnealingLR"),
        ):
            del config[group]["name"]
            config[group].update(_target_=target, _partial_=True)

    crafted(run, tmp_path, old, "best.pt")  # resumed into a new folder: best.pt comes along
    ckpt = crafted(run, tmp_path, old)
    trained = trained_config(load_checkpoint(ckpt), ckpt)
    assert (trained.optim.name, trained.sched.name, "_target_" in trained.model) == (
        "sgd",
        "cosine",
        False,
    )
    assert tools(ckpt, tmp_path, data_root)["resume"]()["epochs_run"] == 2
    other = crafted(
        run, tmp_path, lambda c: (old(c), c["optim"].update(_target_="torch.optim.RMSprop"))
    )
    with pytest.raises(
        UserError, match=r"sets optim\._target_=torch\.optim\.RMSprop, which names code"
    ):
        trained_config(load_checkpoint(other), other)


def test_what_a_run_stores_is_what_the_tools_accept():
    with pytest.raises(
        UserError, match=r"^this run: its stored config has an interpolation at name"
    ):
        refuse_code({"name": "${x}"}, "this run")  # a literal '${' (escaped on the command line)
    with pytest.raises(UserError, match=r"holds a bytes at model\.args\.b"):
        refuse_code({"model": {"args": {"b": b"x"}}}, "this run")


def test_no_config_reaches_hydras_instantiate():
    """instantiate imports and calls whatever a _target_ names: nothing in the package calls it."""
    calls = [
        f"{path.relative_to(PACKAGE)}:{node.lineno}"
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", getattr(node.func, "attr", None)) in ("instantiate", "call")
    ]
    assert calls == []
