"""What `group=option` can select: the YAML files of the configs that ship in the package
(configs/<group>/<option>.yaml, installed as cnntrain.configs). The one list of every group's
options, for --help, the schema's choices and the tests. Light: no torch, so --help stays fast."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# hydra/ holds Hydra's own settings, not options a run picks
_NOT_GROUPS = ("hydra",)


def config_dir() -> Path:
    """The folder of the installed configs. Found, not imported: importing cnntrain.configs
    declares the schemas, and the schema reads its option names from here."""
    spec = importlib.util.find_spec("cnntrain.configs")
    return Path(next(iter(spec.submodule_search_locations)))


def _selectable(path: Path) -> bool:
    # `_name`: a piece that options share, not one itself; `.name`: an editor's or the OS's file
    return not path.name.startswith(("_", "."))


def config_groups() -> list[str]:
    """The groups of options, sorted (model, data, optim, ...)."""
    return sorted(
        p.name
        for p in config_dir().iterdir()
        if p.is_dir() and _selectable(p) and p.name not in _NOT_GROUPS
    )


def config_options(group: str) -> list[str]:
    """`group`'s options, sorted: model -> [alexnet, ..., wrn28_10]."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml") if _selectable(p))
