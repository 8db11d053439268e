"""What cnnpredict and cnnviz share: a checkpoint's model rebuilt for inference, the image files
an `inputs=` names, and any image turned into the input the checkpoint's model was trained on."""

from __future__ import annotations

import fnmatch
import glob
import os
from collections import OrderedDict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cnntrain.checkpoint import load_checkpoint
from cnntrain.errors import UserError
from cnntrain.files import irregular

IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)


def load_trained_model(ckpt_path, device: torch.device) -> tuple[nn.Module, DictConfig, list[str]]:
    """(model in eval mode on `device` with the checkpoint's weights, the training config, the
    class names)."""
    path = Path(str(ckpt_path)).expanduser()
    ckpt = load_checkpoint(path)
    trained = trained_config(ckpt, path)
    return model_from_checkpoint(ckpt, trained, path, device), trained, list(ckpt["classes"])


def trained_config(ckpt: dict, path: Path) -> DictConfig:
    """The training config stored in a checkpoint, validated as data (stored.validated), ready
    to rebuild its model: the data settings the model needs (image_size, mean/std, whose length
    is the number of input channels) are checked, and pretrained weights are not fetched again
    (they come from the checkpoint)."""
    from cnntrain.stored import validated

    trained = validated(ckpt["config"], path)
    data = trained.data
    if not isinstance(data.image_size, int) or not data.mean or not data.std:
        raise UserError(
            f"{path}: its config lacks data.image_size/mean/std; it was not written by "
            "this version of cnntrain"
        )
    classes = ckpt["classes"]
    if (
        not isinstance(classes, list)
        or not classes
        or len(set(map(str, classes))) != len(classes)
        or not all(isinstance(c, str) and c for c in classes)
    ):
        raise UserError(
            f"{path}: its classes are not a list of distinct names ({str(classes)[:80]}); "
            "it was not written by cnntrain, or it was altered"
        )
    # a derived config, read-only like a run's: what the tools rebuild the model from
    trained = OmegaConf.merge(trained, {"model": {"pretrained": None}})
    OmegaConf.set_readonly(trained, True)
    return trained


def checkpoint_split(
    trained: DictConfig,
    classes: list[str],
    overrides: DictConfig,
    split: str,
    device: torch.device,
    fix: str,
):
    """(Data, loader) of `split` of a checkpoint's dataset, built as its training run built it
    (its aug decides how image folders were stored), with the non-null `overrides` (the tool's
    data.* keys: where the data is now, batch size, ...) applied. Data without that split, or
    whose classes differ from the checkpoint's, is a UserError; `fix` says what to do instead."""
    from cnntrain.data import build_data

    data_cfg = OmegaConf.merge(
        trained.data, {key: value for key, value in overrides.items() if value is not None}
    )
    data = build_data(
        data_cfg,
        trained.get("aug"),
        device=device,
        seed=trained.seed,
        splits=(split,),
        evaluation=True,
    )
    loader = data.loaders.get(split)
    if loader is None or loader.num_samples == 0:
        raise UserError(f"{data_cfg.name} at {data_cfg.root} has no {split} split ({fix})")
    if data.classes != classes:
        raise UserError(
            f"the data's classes differ from the checkpoint's: checkpoint {classes} "
            f"({len(classes)}), data {data.classes} ({len(data.classes)}); point "
            "data.root= at the dataset it was trained on"
        )
    return data, loader


def model_from_checkpoint(
    ckpt: dict, trained: DictConfig, path: Path, device: torch.device
) -> nn.Module:
    """The model of `trained` with the checkpoint's weights, in eval mode on `device`."""
    from cnntrain.models import build_model  # imports the model zoo: only when a model is needed

    data = trained.data
    model, _ = build_model(
        trained.model, len(data.mean), len(ckpt["classes"]), int(data.image_size), device
    )
    weights = ckpt["model"]
    if not hasattr(weights, "_metadata"):
        # written before checkpoints kept module versions: the layout is this very architecture's
        # (MNASNet refuses weights without a version)
        weights = OrderedDict(weights)
        weights._metadata = model.state_dict()._metadata
    try:
        model.load_state_dict(weights)
    except (RuntimeError, ValueError) as e:
        raise UserError(
            f"{path}: weights do not fit model {trained.model.name} ({str(e).splitlines()[0]})"
        ) from None
    return model.eval()


def _is_image(path: Path) -> bool:
    """An image file by its name; one named as an image that is a FIFO or a device is refused,
    since decoding it would wait for a writer, or read forever."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return False
    kind = irregular(path)
    if kind and kind != "a folder":
        raise _not_regular(path, kind)
    return path.is_file()


def _not_regular(path: Path, kind: str) -> UserError:
    return UserError(
        f"inputs: {path} is not a regular file ({kind}); give image files (remove it, "
        "or leave it out of inputs=)"
    )


def _match(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """glob's rules on path parts: '**' any number of folders, fnmatch within one name."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return (
        bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match(pattern[1:], parts[1:])
    )


def _walk_images(top: Path, pattern: tuple[str, ...] | None = None) -> list[Path]:
    """The images below top (matching `pattern` relative to it, if given), each real file once,
    with symbolic links followed but not around a loop (data.folder.walk_files: the rules of
    training folders). Path.rglob does not follow links to folders, and glob's '**' follows
    them around loops, exponentially in the number of such links."""
    from cnntrain.data.folder import walk_files

    files, seen, loops = [], set(), []
    for path, real, _ in walk_files(
        str(top), lambda name: name.lower().endswith(IMAGE_EXTENSIONS), loops
    ):
        p = Path(path)
        if (
            real not in seen
            and _is_image(p)
            and (pattern is None or _match(pattern, p.relative_to(top).parts))
        ):
            seen.add(real)
            files.append(p)
    return sorted(files)


def _glob(item: str) -> list[Path]:
    parts = Path(item).parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    if "**" in parts[fixed:]:
        return _walk_images(Path(*parts[:fixed]) if fixed else Path("."), parts[fixed:])
    return sorted(p for p in map(Path, glob.glob(item)) if _is_image(p))


def find_images(inputs) -> list[Path]:
    """`inputs`: an image file, a folder (its images, recursively), a glob (`**` recursive), or a
    list of those. A file named explicitly is taken whatever its extension: the user chose it."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    files: list[Path] = []
    for item in items:
        path = Path(str(item)).expanduser()
        if path.is_dir():
            files += _walk_images(path)
        elif path.is_file():
            files.append(path)
        elif kind := irregular(path):
            raise _not_regular(path, kind)
        else:
            files += _glob(os.path.expanduser(str(item)))
    if not files:
        raise UserError(
            f"no images found for inputs={', '.join(map(str, items))} (give an image "
            "file, a folder or a quoted glob like 'dir/**/*.png'; "
            f"extensions {' '.join(IMAGE_EXTENSIONS)})"
        )
    return files


class Decode:
    """Any image file (any size, any mode) -> uint8 pixels (C, size, size): gray (channels 1) or
    RGB, shorter side resized to `stored` and the central size x size square, as evaluation saw
    its images (folders stored for crop-based training: stored = 1.14 x size). What an exported
    model, which normalizes inside its graph, takes (cnnpredict model=)."""

    def __init__(self, channels: int, size: int, stored: int):
        self.mode = "L" if channels == 1 else "RGB"
        self.size, self.stored = int(size), int(stored)

    def _center(self, pixels: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        return (
            pixels if self.stored == self.size else TF.center_crop(pixels, [self.size, self.size])
        )

    def pixels(self, path: Path) -> torch.Tensor:
        """uint8 (C, S, S) pixels of one file, decoded as image folders are (data.cache.decode);
        an unreadable file is a UserError naming it."""
        from cnntrain.data.cache import decode
        from cnntrain.data.folder import BadImage

        pixels = decode(str(path), self.mode, self.stored)
        if isinstance(pixels, BadImage):
            raise pixels.error("remove it from inputs=")
        return self._center(torch.from_numpy(pixels))

    def decoded(self, files: list[Path]) -> torch.Tensor:
        """uint8 (N, C, size, size) pixels of `files`, as pixels() gives them, decoded in parallel
        through the cache of image folders (data/cache.py): a later call on the same files (an
        unchanged folder) decodes nothing. The tensor maps the cache file: index it in batches."""
        from cnntrain.data.cache import FolderSplit, default_cache_dir, load_split

        paths = [os.path.abspath(f) for f in files]
        root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
        root = root if os.path.isdir(root) else os.path.dirname(root)
        split = FolderSplit(root, ["inputs"], paths, [0] * len(paths))
        cached = load_split(
            split,
            size=self.stored,
            channels=1 if self.mode == "L" else 3,
            cache_dir=default_cache_dir(),
            fix="remove it from inputs=",
            prune=False,
        )
        return self._center(cached.pixels())


class Preprocess(Decode):
    """Any image file (any size, any mode) -> the input the checkpoint's model was trained on:
    decoded as Decode does with the checkpoint's channels and sizes, then normalized with its
    mean/std."""

    def __init__(self, trained: DictConfig, device: torch.device):
        from cnntrain.data import storage_size
        from cnntrain.data.augment import Normalize

        data, size = trained.data, int(trained.data.image_size)
        # as evaluation saw them: stored at storage_size, then the central size x size
        super().__init__(len(data.mean), size, storage_size(data, size, trained.get("aug")))
        self.normalize = Normalize(list(data.mean), list(data.std), device)
        self.device = device

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, S, S) -> normalized float on the device."""
        return self.normalize(pixels.to(self.device))
