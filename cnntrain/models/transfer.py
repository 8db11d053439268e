"""Transfer learning, as the lectures teach it: start from pretrained weights, replace the head
for this dataset's classes, freeze part of the network, fine-tune the rest.

`pretrained` is a torchvision weights name (e.g. IMAGENET1K_V1, downloaded and cached the usual
torchvision way) or the path of a state_dict / cnntrain checkpoint file."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from cnntrain.errors import UserError

log = logging.getLogger("cnntrain")

# cnntrain option -> torchvision builder name, where they differ
TORCHVISION_NAMES = {
    "shufflenet_v2": "shufflenet_v2_x1_0",
    "squeezenet": "squeezenet1_1",
    "mnasnet": "mnasnet1_0",
    "resnext50": "resnext50_32x4d",
}


def is_file_spec(pretrained) -> bool:
    text = str(pretrained)
    return (
        os.sep in text
        or text.endswith((".pt", ".pth", ".bin", ".safetensors"))
        or Path(text).exists()
    )


def torchvision_weights(tv_name: str, weights: str):
    """The torchvision weights enum member `weights` of model `tv_name` (no download)."""
    from torchvision.models import get_model_weights

    weights = "DEFAULT" if weights is True else weights
    try:
        enum = get_model_weights(tv_name)
    except (ValueError, KeyError):
        raise UserError(
            f"torchvision has no pretrained weights for {tv_name}; give "
            "model.pretrained=/path/to/state_dict.pt instead"
        ) from None
    names = [w.name for w in enum] + ["DEFAULT"]
    if str(weights) not in names:
        raise UserError(
            f"unknown weights {weights!r} for {tv_name} (choose one of: {', '.join(names)})"
        )
    return enum[str(weights)]


def pretrained_input_spec(model_cfg) -> dict | None:
    """{"image_size", "mean", "std"} the named pretrained weights of a model config were trained
    with (None without named weights). Reads metadata only: nothing is downloaded."""
    pretrained = model_cfg.get("pretrained")
    if not pretrained or is_file_spec(pretrained):
        return None
    source = model_cfg.get("source", "cnntrain")
    if source == "timm":
        return timm_input_spec(model_cfg.name)
    name = (
        model_cfg.name
        if source == "torchvision"
        else TORCHVISION_NAMES.get(model_cfg.name, model_cfg.name)
    )
    tf = torchvision_weights(name, pretrained).transforms()
    return {"image_size": int(tf.crop_size[0]), "mean": list(tf.mean), "std": list(tf.std)}


def timm_input_spec(name: str) -> dict:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise UserError(f"timm has no pretrained weights for {name}")
    return {"image_size": int(cfg.input_size[-1]), "mean": list(cfg.mean), "std": list(cfg.std)}


def download_state_dict(weights) -> dict:
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # offline, proxy, corrupt cache...
        from torch.hub import get_dir

        raise UserError(
            f"could not get the pretrained weights {weights} ({type(e).__name__}): "
            f"put {Path(weights.url).name} into {Path(get_dir()) / 'checkpoints'} "
            "or use model.pretrained=/path/to/state_dict.pt"
        ) from None


def load_state_dict_file(path: str) -> dict:
    from cnntrain.checkpoint import load_checkpoint

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"pretrained weights file {p} not found")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"pretrained weights file {p} is not a weights-only state_dict ({type(e).__name__})"
        ) from None
    if isinstance(state, dict) and "model" in state and "config" in state:  # a cnntrain checkpoint
        state = load_checkpoint(p)["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{p} is not a state_dict (a dict of parameter name -> tensor)")
    return state


def load_matching(model: nn.Module, state: dict, source: str) -> None:
    """Load every tensor whose name and shape match; the rest (normally the old head) keeps its
    fresh init. Fails when nothing but the head would be loaded: the file is for another model."""
    from cnntrain.checkpoint import nonfinite

    bad = nonfinite(state)
    if bad:
        raise UserError(f"{source} holds non-finite weights ({bad}); use other weights")
    own = model.state_dict()
    usable = OrderedDict((k, v) for k, v in state.items() if k in own and own[k].shape == v.shape)
    if hasattr(state, "_metadata"):  # module versions: MNASNet refuses weights without them
        usable._metadata = state._metadata
    skipped = sorted(set(state) - set(usable))
    missing = sorted(set(own) - set(usable))
    if not usable or len(usable) < len(own) // 2:
        raise UserError(
            f"{source} does not fit this model: only {len(usable)} of {len(own)} tensors "
            f"match (e.g. missing {missing[:3]})"
        )
    model.load_state_dict(usable, strict=False)
    log.info(
        "pretrained: loaded %d tensors from %s%s",
        len(usable),
        source,
        f"; kept fresh: {', '.join(missing)}" if missing else "",
    )
    if skipped:
        log.info("pretrained: not used from the file: %s", ", ".join(skipped[:10]))


def head_name(model: nn.Module) -> str:
    """The classifier: the last Linear (or, as in SqueezeNet, the last 1x1 conv) of the model."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (
            isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
        ):
            last = name
    if last is None:
        raise UserError(f"cannot find the classifier layer of {type(model).__name__}")
    return last


def replace_head(model: nn.Module, num_classes: int) -> None:
    name = head_name(model)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    old = model.get_submodule(name)
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, 1, bias=old.bias is not None)
    setattr(parent, name.rpartition(".")[2], new)


def adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Pretrained RGB filters for another channel count (timm's adapt_input_conv): summed for one
    channel, tiled and rescaled for more."""
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    if conv.in_channels == in_channels:
        return
    weight = conv.weight.detach()
    if in_channels == 1:
        weight = weight.sum(1, keepdim=True)
    else:
        repeats = -(-in_channels // weight.shape[1])
        weight = weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], new)


def freeze(model: nn.Module, spec) -> None:
    """`none`, `backbone` (all but the top-level block holding the head, e.g. VGG's whole
    classifier MLP stays trainable), `all_but_head` (only the final layer trains), or a list of
    parameter-name prefixes to freeze. Frozen BatchNorm layers also stop updating their running
    statistics (torchvision's FrozenBatchNorm2d), or "frozen" features would still drift."""
    if spec in (None, "none") or spec == []:
        return
    if spec in ("backbone", "all_but_head"):
        head = head_name(model)
        keep = head.split(".")[0] if spec == "backbone" else head

        def frozen(name):
            return not (name == keep or name.startswith(keep + "."))
    elif isinstance(spec, (list, tuple)) or hasattr(spec, "__iter__") and not isinstance(spec, str):
        prefixes = [str(p) for p in spec]
        names = [n for n, _ in model.named_parameters()]
        unknown = [p for p in prefixes if not any(n == p or n.startswith(p + ".") for n in names)]
        if unknown:
            tops = sorted({n.split(".")[0] for n in names})
            raise UserError(
                f"model.freeze: no parameters under {unknown} (top-level names: {tops})"
            )

        def frozen(name):
            return any(name == p or name.startswith(p + ".") for p in prefixes)
    else:
        raise UserError(
            f"model.freeze must be none, backbone, all_but_head or a list of "
            f"parameter-name prefixes, got {spec!r}"
        )
    for name, param in model.named_parameters():
        if frozen(name):
            param.requires_grad_(False)
    _freeze_batchnorm(model)


def _freeze_batchnorm(module: nn.Module) -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in module.named_children():
        if (
            isinstance(child, nn.BatchNorm2d)
            and child.affine
            and not any(p.requires_grad for p in child.parameters())
        ):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)
