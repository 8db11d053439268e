"""The documentation holds: README.md stays a short entry page whose set-up commands are the ones
.ci/run runs, the key tables of docs/configuration.md are those the schema gives, every command
in a ```bash block composes (its overrides, its config, the schema check), and every relative
link leads to a file and heading that exist."""

import itertools
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# the console scripts of pyproject.toml and the config each composes (cnntrain/cli.py)
TOOLS = {
    "cnntrain": "train",
    "cnneval": "eval",
    "cnnpredict": "predict",
    "cnnviz": "viz",
    "cnnexport": "export",
}
# command-line keys a tool renames before Hydra sees them (cli.py: predict_cli's aliases)
ALIASES = {"predict": {"model": "exported"}}
# Hydra's own flags a documented command may give: (flag, how many values follow it)
HYDRA_FLAGS = {"--cfg": 1, "--help": 0, "--hydra-help": 0, "--info": 0}
# Commands that are not a cnntrain tool and are not composed, by their program (and module):
# each is run as written by .ci/run or is another tool's own command line.
NOT_COMPOSED = {
    ("python3", "venv"): ".ci/run creates the environment",
    ("python", "venv"): ".ci/run creates the environment",
    ("pip", None): ".ci/run installs the package",
    (".venv/bin/pip", None): ".ci/run installs the package",
    ("python", "pytest"): ".ci/run runs the tests",
    (".venv/bin/python", "pytest"): ".ci/run runs the tests",
    (".venv/bin/ruff", None): ".ci/run lints",
    (".venv/bin/mypy", None): ".ci/run type-checks",
    ("tensorboard", None): "TensorBoard's own command line",
}
SETUP_INSTALL = 'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/cnntrain'
SETUP_TESTS = ".venv/bin/python -m pytest"


# --------------------------------------------------------------------------- README and tables
def test_readme_is_an_entry_page_with_the_two_setup_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"
    # .ci/run runs these two, as written (its comments say "README step 1/2")
    assert SETUP_INSTALL in lines and SETUP_TESTS in lines
    ci = (ROOT / ".ci/run").read_text()
    assert '.venv/bin/pip install -q -e ".[test]" && .venv/bin/cnntrain' in ci
    assert "\n.venv/bin/python -m pytest\n" in ci


def test_readme_links_every_docs_page():
    text = README.read_text()
    for page in PAGES[1:]:
        assert f"(docs/{page.name}" in text, f"README.md does not link docs/{page.name}"


def test_key_tables_are_those_the_schema_gives():
    from cnntrain.config_docs import DOC, render, update

    assert update(DOC, check=True), (
        "the key tables in docs/configuration.md differ from the schema's: run "
        "`python scripts/config_docs.py` and commit docs/configuration.md"
    )
    tables = render()
    # every declared key of every tool has its row
    from cnntrain.config_docs import leaves

    for app in ("train", "eval", "predict", "viz", "export"):
        for path, _, _ in leaves(app):
            assert f"| `{path}`" in tables, path


# --------------------------------------------------------------------------- commands
def _bash_blocks(page: Path):
    """(line number, logical line) of every line in a ```bash (sh, shell) block, continuations
    joined."""
    lines, inside, pending, start = page.read_text().splitlines(), False, "", 0
    for n, line in enumerate(lines, 1):
        if line.startswith("```"):
            inside = line.strip() in ("```bash", "```sh", "```shell") if not inside else False
            continue
        if not inside:
            continue
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def _commands():
    """(id, argv) of every command of every ```bash block: each part of a line split at
    && || ; |, with leading VAR=value assignments removed."""
    for page in PAGES:
        for n, line in _bash_blocks(page):
            words = shlex.split(line, comments=True)
            part = []
            for word in [*words, "&&"]:
                if word in ("&&", "||", ";", "|"):
                    while part and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", part[0]):
                        part.pop(0)
                    if part:
                        yield f"{page.relative_to(ROOT)}:{n}:{part[0]}", part
                    part = []
                else:
                    part.append(word)


def _tool_and_args(argv):
    """(config name, its arguments) when `argv` runs a cnntrain tool (also `python -m cnntrain`
    and `torchrun ... -m cnntrain`), else None."""
    program = Path(argv[0]).name
    if program in TOOLS:
        return TOOLS[program], argv[1:]
    if program in ("python", "python3", "torchrun") and "-m" in argv:
        at = argv.index("-m")
        if argv[at + 1 : at + 2] == ["cnntrain"]:
            return "train", argv[at + 2 :]
    return None


def _not_composed(argv):
    module = argv[argv.index("-m") + 1] if "-m" in argv[1:2] else None
    return NOT_COMPOSED.get((argv[0], module))


def _jobs(app, args):
    """The override lists of the jobs a command runs: one, or with -m one per combination of
    its comma lists."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides, multirun, rest = [], False, list(args)
    while rest:
        word = rest.pop(0)
        if word in ("-m", "--multirun"):
            multirun = True
        elif word in HYDRA_FLAGS:
            del rest[: HYDRA_FLAGS[word]]
        elif word.startswith("-"):
            raise AssertionError(f"{word}: not a flag this test knows; add it to HYDRA_FLAGS")
        else:
            assert "=" in word or word.startswith("~"), f"{word!r} is not a key=value override"
            key, eq, value = word.partition("=")
            overrides.append(f"{ALIASES.get(app, {}).get(key, key)}{eq}{value}")
    if not multirun:
        return [overrides]
    choices = []
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.get_key_element()
        if o.is_sweep_override():
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    return [list(c) for c in itertools.product(*choices)]


def _compose_and_check(app, overrides):
    """Compose `app`'s config with `overrides`, as the console script would, and run the
    schema check its job runs first (cli._job); the error line the tool would print, or None."""
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    from cnntrain.cli import one_line
    from cnntrain.schema import check

    try:
        with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
            # with Hydra's own config: a hydra.launcher.* key must exist for the launcher chosen
            cfg = compose(config_name=app, overrides=overrides, return_hydra_config=True)
        with open_dict(cfg):
            del cfg["hydra"]
        check(cfg)
    except Exception as e:
        return one_line(e, app)
    return None


COMMANDS = list(_commands())


def test_the_docs_have_commands_to_check():
    tools = [argv for _, argv in COMMANDS if _tool_and_args(argv)]
    assert len(tools) >= 30, len(tools)
    assert {TOOLS[Path(argv[0]).name] for argv in tools if Path(argv[0]).name in TOOLS} == set(
        TOOLS.values()
    )


@pytest.mark.parametrize("argv", [argv for _, argv in COMMANDS], ids=[i for i, _ in COMMANDS])
def test_every_documented_command_composes(argv):
    """A command of a cnntrain tool composes and passes the schema check, each job of a sweep
    too (a typo'd key or option in the docs fails here). A `python scripts/X.py` command names
    a script that exists and flags it defines. Anything else is one of NOT_COMPOSED."""
    tool = _tool_and_args(argv)
    if tool is not None:
        app, args = tool
        jobs = _jobs(app, args)
        for overrides in jobs:
            error = _compose_and_check(app, overrides)
            assert error is None, f"{shlex.join(argv)}\n  job {overrides}: error: {error}"
        return
    if Path(argv[0]).name in ("python", "python3") and argv[1:2] and argv[1].endswith(".py"):
        script = ROOT / argv[1]
        assert script.is_file(), f"{argv[1]} does not exist"
        source = script.read_text()
        for flag in (w.split("=")[0] for w in argv[2:] if w.startswith("--")):
            assert f'"{flag}"' in source, f"{argv[1]} defines no {flag}"
        return
    assert _not_composed(argv), (
        f"{shlex.join(argv)}: not a cnntrain tool; compose it, or add its program to "
        "NOT_COMPOSED with the reason"
    )


def test_a_typo_in_a_documented_command_would_fail():
    """The check is real: a misspelled key, a bad value, a wrong option and a launcher key
    without its launcher are all reported."""
    assert "optim.lr" in _compose_and_check("train", ["optim.learning_rate=0.1"])
    assert "grad_clip" in _compose_and_check("train", ["grad_clip=-1"])
    assert "resnet81" in _compose_and_check("train", ["model=resnet81"])
    assert "hydra.launcher.n_jobs" in _compose_and_check("train", ["hydra.launcher.n_jobs=4"])
    assert "topk" in _compose_and_check("predict", ["inputs=x", "topk=0"])
    assert _jobs("train", ["-m", "model=lenet5,resnet18", "optim=sgd,adam", "epochs=2"]) == [
        ["model=lenet5", "optim=sgd", "epochs=2"],
        ["model=lenet5", "optim=adam", "epochs=2"],
        ["model=resnet18", "optim=sgd", "epochs=2"],
        ["model=resnet18", "optim=adam", "epochs=2"],
    ]
    assert _jobs("predict", ["model=m.onnx", "inputs=x"]) == [["exported=m.onnx", "inputs=x"]]


# --------------------------------------------------------------------------- links
def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set:
    seen, anchors, inside = {}, set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            inside = not inside
        elif not inside and re.match(r"#{1,6} ", line):
            slug = _slug(line.lstrip("#"))
            anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\[[^\]\n]*\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page):
    links = _links(page)
    for link in links:
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: link {link} leads to nothing"
        assert ROOT in target.parents, f"{page.name}: link {link} leaves the repository"
        if anchor and target.suffix == ".md":
            assert anchor in _anchors(target), f"{page.name}: {link}: no such heading"
