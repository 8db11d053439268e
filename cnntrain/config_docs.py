"""The key reference of docs/configuration.md, rendered from the declarations in schema.py: one
table per tool (and per group of cnntrain) with every key, its type and what is allowed, its
default in the composed config, its meaning and, for training keys, what a resume may do with it.

`python scripts/config_docs.py` writes the tables between the markers below; tests/test_docs.py
fails when the committed ones differ from what `render()` gives. Reads only: no behaviour of the
tools depends on this module."""

from __future__ import annotations

import functools
import types
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

from omegaconf import MISSING, OmegaConf

from cnntrain import schema

BEGIN = "<!-- keys:begin -->"
END = "<!-- keys:end -->"
DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"

TOOLS = {
    "train": "cnntrain",
    "eval": "cnneval",
    "predict": "cnnpredict",
    "viz": "cnnviz",
    "export": "cnnexport",
}
# the sections of cnntrain's keys: its groups, then the rest ("run")
TRAIN_GROUPS = ("model", "data", "optim", "sched", "aug")
# how the "on resume" column names each class, and what it means (the legend under the tables)
RESUME_WORDS = {
    schema.FREE: ("free", "may differ: where or how fast the run computes, not what"),
    schema.FIXED: ("never", "defines the network or what it learns from: start a new run"),
    schema.ALLOW: ("on purpose", "refused unless listed in `resume_allow_changes`"),
    schema.REPLAN: (
        "on purpose, re-plans",
        "as *on purpose*, and the learning-rate schedule is re-planned for the new value",
    ),
    schema.EPOCH: (
        "on purpose, re-plans, between epochs",
        "as *on purpose, re-plans*, and only between epochs: it sets the batches of an epoch",
    ),
}
_KIND_WORDS = {
    None: "null",
    str: "string",
    bool: "true/false",
    int: "integer",
    float: "number",
    list: "list",
}
_TYPE_WORDS = {int: "integer", float: "number", str: "string", bool: "true/false"}


def leaves(app: str):
    """(path, field, option) of every leaf key `app` can have; for cnntrain's optim and sched,
    the keys of every option (option: the option's name, or None for a key of every tool)."""

    def walk(node, prefix, option):
        for f in fields(node):
            path = f"{prefix}{f.name}"
            if node is schema.TrainConfig and f.name in schema.GROUP_OPTIONS:
                for name, option_node in schema.GROUP_OPTIONS[f.name].items():
                    yield from walk(option_node, f"{path}.", name)
            elif is_dataclass(f.type) and "resume" not in f.metadata:
                yield from walk(f.type, f"{path}.", option)
            else:
                yield path, f, option

    yield from walk(schema.APPS[app], "", None)


def _type(f) -> str:
    """What the key takes: its type, then its rules (range, choices, pattern, length), or the
    words its declaration gives for them (`what=`)."""
    if "what" in f.metadata:  # "a number > 0, or find": the table's words have no article
        return f.metadata["what"].removeprefix("a ").removeprefix("an ")
    rules = schema._rules(f)
    t, words = f.type, []
    optional = False
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        optional, t = True, args[0]
    origin = typing.get_origin(t)
    if "kinds" in rules:
        words = [_KIND_WORDS[k] for k in rules["kinds"]]
    elif origin in (list, typing.List):
        (item,) = typing.get_args(t)
        words = [f"list of {_TYPE_WORDS.get(item, 'value')}s"]
    elif origin in (dict, typing.Dict):
        words = ["mapping"]
    elif t in _TYPE_WORDS and "choices" not in rules:
        words = [_TYPE_WORDS[t]]
    if optional and "null" not in words and words:
        words.append("null")
    rules = {k: v for k, v in rules.items() if k not in ("kinds", "finite")}
    allowed = schema._allowed(rules)
    if rules.get("choices") and None in rules["choices"] and "null" not in allowed:
        allowed = allowed.replace("one of ", "one of null, ", 1)
    return ", ".join(filter(None, [" or ".join(words), allowed]))


def _value(container, path: str):
    node = container
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _show(value) -> str:
    if value == MISSING:
        return "required"
    return f"`{schema.show(value)}`"


def _cell(text: str) -> str:
    """`text` as one Markdown table cell: no column break, no HTML tag (<model>)."""
    parts = text.replace("|", "\\|").replace("\n", " ").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


@functools.lru_cache(maxsize=None)
def _composed(app: str, overrides: tuple = (), hydra: bool = False) -> dict:
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        cfg = compose(config_name=app, overrides=list(overrides), return_hydra_config=hydra)
    return OmegaConf.to_container(cfg, resolve=False)  # interpolations as written, not as resolved


def _table(rows: list[tuple], resume: bool) -> list[str]:
    head = ["key", "type, allowed", "default", "meaning"] + (["on resume"] if resume else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(c) for c in row[: len(head)]) + " |")
    return lines


def _train_rows(group: str | None) -> list[tuple]:
    """The rows of cnntrain's keys in `group` (None: the keys outside the groups)."""
    base = _composed("train")
    per_option = {
        g: {name: _composed("train", (f"{g}={name}",)) for name in options}
        for g, options in schema.GROUP_OPTIONS.items()
    }
    rows, seen = [], {}
    for path, f, option in leaves("train"):
        top = path.split(".")[0]
        if (top if top in TRAIN_GROUPS else None) != group:
            continue
        if path in seen:  # a key of several options: one row, with their names
            seen[path][1].append(option)
            continue
        seen[path] = (f, [option])
    for path, (f, options) in seen.items():
        top = path.split(".")[0]
        key = f"`{path}`"
        if top in schema.GROUP_OPTIONS:
            values = {o: _value(per_option[top][o], path) for o in options}
            if len(options) < len(schema.GROUP_OPTIONS[top]):
                key += f" ({', '.join(options)})"
            if len({schema.show(v) for v in values.values()}) == 1:
                default = _show(next(iter(values.values())))
            else:
                default = "; ".join(f"{o}: {_show(v)}" for o, v in values.items())
        else:
            default = _show(_value(base, path))
        word = RESUME_WORDS[f.metadata["resume"]][0]
        rows.append((key, _type(f), default, f.metadata.get("help", ""), word))
    return rows


def _tool_rows(app: str) -> list[tuple]:
    base = _composed(app)
    return [
        (f"`{path}`", _type(f), _show(_value(base, path)), f.metadata.get("help", ""))
        for path, f, _ in leaves(app)
    ]


def _group_options() -> list[str]:
    """Each config group of cnntrain's configs/ with its options and the default's."""
    from cnntrain.options import config_groups, config_options

    chosen = _composed("train", (), hydra=True)["hydra"]["runtime"]["choices"]
    lines = ["| group | options (default in bold) |", "|---|---|"]
    for group in config_groups():
        shown = [
            f"**`{n}`**" if n == chosen.get(group) else f"`{n}`" for n in config_options(group)
        ]
        lines.append(f"| `{group}` | {', '.join(shown)} |")
    return lines


def render() -> str:
    """The Markdown between the markers (without them)."""
    out = ["### Groups and their options", ""] + _group_options() + [""]
    titles = {None: "top-level keys", **{g: f"`{g}.*`" for g in TRAIN_GROUPS}}
    for group in (None, *TRAIN_GROUPS):
        out += [f"### cnntrain: {titles[group]}", ""]
        out += _table(_train_rows(group), resume=True) + [""]
    out += [
        "On resume (the `resume=` of each declaration; `cnntrain/resume.py` compares by it):",
        "",
    ]
    for word, meaning in RESUME_WORDS.values():
        out.append(f"- **{word}**: {meaning}")
    out.append("")
    for app, tool in TOOLS.items():
        if app == "train":
            continue
        out += [f"### {tool}", ""]
        out += _table(_tool_rows(app), resume=False) + [""]
    return "\n".join(out)


def update(doc: Path = DOC, check: bool = False) -> bool:
    """Write render() between the markers of `doc`; with check=True only compare. True when the
    file already held exactly these tables."""
    text = doc.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    new = text[:start] + "\n" + render() + "\n" + text[end:]
    if new == text:
        return True
    if not check:
        doc.write_text(new)
    return False
