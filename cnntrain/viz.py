"""`visualize(cfg)`: what a checkpoint's CNN looks at (cnnviz): its first conv filters, the
feature maps of one layer per stage, and Grad-CAM heatmaps, as PNGs in the run folder."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from cnntrain.errors import UserError
from cnntrain.files import save_figure
from cnntrain.inference import Preprocess, find_images, load_trained_model
from cnntrain.rundir import fresh_run, run_dir_from_hydra
from cnntrain.runtime import select_device
from cnntrain.schema import check
from cnntrain.text import plot_text

log = logging.getLogger("cnntrain")
FEATURE_CHANNELS = 16


def _trace(model: nn.Module, x: torch.Tensor) -> list[tuple[str, torch.Size]]:
    """(module name, output shape) in the order the modules finish their forward pass; a
    container finishes after its children."""
    order, hooks = [], []
    for name, module in model.named_modules():
        if name:
            hooks.append(
                module.register_forward_hook(
                    lambda m, i, out, name=name: (
                        order.append((name, out.shape)) if isinstance(out, torch.Tensor) else None
                    )
                )
            )
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return order


def stage_layers(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The default layers: one per stage, a stage being a run of modules whose outputs are maps
    (B, C, H, W) of the same spatial size larger than 1x1; its layer is the last module to finish
    at that size, so the whole stage's output. Resolution rather than module structure finds the
    stages because architectures nest them differently: ResNet gives layer1..layer4 (a container
    finishes after its blocks), VGG the last ReLU before each max-pool, LeNet the first conv's
    ReLU, the first pool, the second conv's ReLU and `features`."""
    layers, last_size = [], None
    for name, shape in _trace(model, x):
        if len(shape) != 4 or shape[-2] * shape[-1] <= 1:
            continue
        if shape[-2:] != last_size:
            layers.append(name)
            last_size = shape[-2:]
        else:
            layers[-1] = name
    return layers


def _capture(model: nn.Module, names: list[str]):
    """Forward hooks keeping each named module's output: ({name: output}, hook handles)."""
    modules = dict(model.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    hooks = [
        modules[name].register_forward_hook(
            lambda m, i, out, name=name: outputs.__setitem__(name, out)
        )
        for name in names
    ]
    return outputs, hooks


def grad_cam(
    model: nn.Module, x: torch.Tensor, layer: nn.Module | str, target: int | None = None
) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., 2017) of one image x ((C, H, W) or (1, C, H, W), normalized)
    at `layer` (a module of `model` or its name) for class `target` (None: the predicted one):
    a (H, W) map in [0, 1] of where the evidence for the class lies.

    A forward hook keeps the layer's activation A (1, K, h, w); torch.autograd.grad gives dy/dA of
    the target logit y. That is the gradient a backward hook would see, but it neither fills the
    parameters' .grad nor breaks on in-place ReLUs as full module backward hooks do. Channel
    weights are the spatially averaged gradients; the map is ReLU(sum_k w_k A_k), upsampled
    bilinearly to (H, W) and scaled to 0..1 (all zeros if no location supports the class)."""
    if isinstance(layer, str):
        layer = dict(model.named_modules())[layer]
    x = x if x.dim() == 4 else x.unsqueeze(0)
    kept = {}
    hook = layer.register_forward_hook(lambda m, i, out: kept.__setitem__("a", out))
    try:
        with torch.enable_grad():
            # the input needs grad so that the activation does even with frozen parameters
            logits = model(x.detach().clone().requires_grad_(True))
            index = int(logits[0].argmax()) if target is None else int(target)
            (grads,) = torch.autograd.grad(logits[0, index], kept["a"])
    finally:
        hook.remove()
    activation = kept["a"].detach()[0]
    weights = grads[0].mean((1, 2))
    cam = F.relu(torch.einsum("k,khw->hw", weights, activation))
    cam = F.interpolate(cam[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[
        0, 0
    ]
    cam = cam - cam.min()
    return cam / cam.max() if cam.max() > 0 else cam


def _display(pixels: torch.Tensor):
    """uint8 (C, H, W) -> what imshow takes: (H, W, 3) or gray (H, W)."""
    return pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()


def filters_figure(model: nn.Module, plt):
    """The first Conv2d's filters in one grid image, drawn with nearest-neighbour upscaling so that
    even 3x3 filters show. Three input channels: RGB, each filter min-max scaled on its own (RGB
    has no colour scale to share). Otherwise the mean over the input channels on one diverging
    scale centred on 0, so that a colour bar can give the weight values."""
    from torchvision.utils import make_grid

    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    w = conv.weight.detach().float().cpu()
    shape = "x".join(map(str, w.shape[1:]))
    rgb = w.shape[1] == 3
    if rgb:
        low, high = w.amin((1, 2, 3), keepdim=True), w.amax((1, 2, 3), keepdim=True)
        w = (w - low) / (high - low).clamp_min(1e-12)
    else:
        w = w.mean(1, keepdim=True)
    # NaN gaps are drawn in the colour map's "bad" colour, outside the value scale
    grid = make_grid(
        w, nrow=math.ceil(math.sqrt(len(w))), padding=1, pad_value=1.0 if rgb else math.nan
    )
    # 5 inches of filters (500 px), plus the colour bar and the title
    fig, ax = plt.subplots(
        figsize=(5 if rgb else 6.3, 0.9 + 5 * grid.shape[1] / grid.shape[2]), layout="constrained"
    )
    title = f"{name}: {len(w)} filters {shape}"
    if rgb:
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(f"{title}\nRGB, each filter min-max scaled to 0..1 on its own", fontsize=10)
    else:
        limit = float(w.abs().max()) or 1.0
        cmap = plt.get_cmap("RdBu_r").with_extremes(bad="white")
        image = ax.imshow(
            grid[0].numpy(), cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest"
        )
        mean = f", mean over the {w.shape[1]} input channels" if conv.weight.shape[1] > 1 else ""
        ax.set_title(title + mean, fontsize=10)
        fig.colorbar(image, ax=ax, shrink=0.8, label="weight")
    ax.axis("off")
    return fig


def layer_maps(
    model: nn.Module, outputs: dict[str, torch.Tensor], k: int
) -> dict[str, torch.Tensor]:
    """The first channels of image k's map at each layer, labelled with what the layer is and the
    size of its whole output, e.g. "features.1 (ReLU) → 6×28×28": names alone are cryptic."""
    modules = dict(model.named_modules())
    return {
        f"{name} ({type(modules[name]).__name__}) → {'×'.join(map(str, out.shape[1:]))}": out[
            k, :FEATURE_CHANNELS
        ]
        .float()
        .cpu()
        for name, out in outputs.items()
    }


def feature_maps_figure(pixels: torch.Tensor, maps: dict[str, torch.Tensor], title: str, plt):
    """The input, then one block per layer (`maps`: row label -> (C, H, W) activations): its
    channels in rows of up to 8, on one colour scale per layer so that they compare."""
    from matplotlib.colors import Normalize

    cols = min(8, max(len(fmap) for fmap in maps.values()))
    lines = [math.ceil(len(fmap) / cols) for fmap in maps.values()]
    fig = plt.figure(
        figsize=(1.1 * cols + 1.2, 1.7 + sum(1.1 * n + 0.35 for n in lines)), layout="constrained"
    )
    top, *blocks = fig.subfigures(
        len(maps) + 1, 1, height_ratios=[1.6, *(1.1 * n + 0.35 for n in lines)]
    )
    ax = top.subplots()
    ax.imshow(_display(pixels), cmap="gray")
    ax.axis("off")
    top.suptitle(title, fontsize=10)
    for block, n, (label, fmap) in zip(blocks, lines, maps.items()):
        axes = block.subplots(n, cols, squeeze=False)
        norm = Normalize(float(fmap.min()), float(fmap.max()))
        for c, ax in enumerate(axes.flat):
            ax.axis("off")
            if c < len(fmap):
                image = ax.imshow(fmap[c].numpy(), cmap="viridis", norm=norm)
        block.suptitle(label, fontsize=9, x=0.02, ha="left")
        block.colorbar(image, ax=axes, shrink=0.9, aspect=8 * n).set_label("activation", fontsize=8)
    return fig


def grad_cam_figure(pixels: torch.Tensor, cam: torch.Tensor, title: str, plt):
    fig, axes = plt.subplots(1, 2, figsize=(6.5, 3.3), layout="constrained")
    for ax in axes:
        ax.imshow(_display(pixels), cmap="gray")
        ax.axis("off")
    heat = axes[1].imshow(cam.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    fig.colorbar(heat, ax=axes[1], label="importance for the class (0..1)")
    fig.suptitle(title, fontsize=9)
    return fig


def _save(fig, path: Path, plt) -> None:
    try:
        save_figure(fig, path, dpi=100)
    finally:
        plt.close(fig)


def visualize(cfg: DictConfig, run_dir: str | Path | None = None) -> list[Path]:
    """filters.png, feature_maps_<k>.png and gradcam_<k>.png (k = 0.. over the first max_images
    inputs) in the run folder; their paths, also printed. `layers` (null: stage_layers) picks the
    feature-map layers; Grad-CAM uses the last of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check(cfg)
    run_dir = Path(run_dir) if run_dir is not None else run_dir_from_hydra()
    files = find_images(cfg.inputs)[: cfg.max_images]  # before anything is claimed or built
    with fresh_run(run_dir, cfg):
        return _visualize(cfg, files, run_dir, plt)


def _visualize(cfg: DictConfig, files: list[Path], run_dir: Path, plt) -> list[Path]:
    device = select_device(cfg.device)
    model, trained, classes = load_trained_model(cfg.ckpt, device)
    if (
        cfg.target_class is not None
        and cfg.target_class not in classes
        and not (isinstance(cfg.target_class, int) and 0 <= cfg.target_class < len(classes))
    ):
        raise UserError(
            f"target_class must be a class name or index 0..{len(classes) - 1}, got "
            f"{cfg.target_class!r}; classes: {', '.join(classes)}"
        )
    target = classes.index(cfg.target_class) if cfg.target_class in classes else cfg.target_class
    prep = Preprocess(trained, device)
    pixels = torch.stack([prep.pixels(path) for path in files])
    x = prep(pixels)
    layers = _choose_layers(model, x[:1], cfg.layers)

    written = [run_dir / "filters.png"]
    _save(filters_figure(model, plt), written[0], plt)
    outputs, hooks = _capture(model, layers)
    try:
        with torch.inference_mode():
            probs = model(x).float().softmax(1).cpu()
    finally:
        for h in hooks:
            h.remove()
    for k, path in enumerate(files):
        maps = layer_maps(model, outputs, k)
        shown = probs[k].argmax().item() if target is None else target
        title = f"{plot_text(path.name)}: {plot_text(classes[shown])} ({probs[k, shown]:.3f})"
        written.append(run_dir / f"feature_maps_{k}.png")
        _save(feature_maps_figure(pixels[k], maps, title, plt), written[-1], plt)
        cam = grad_cam(model, x[k], layers[-1], shown).cpu()
        written.append(run_dir / f"gradcam_{k}.png")
        _save(
            grad_cam_figure(pixels[k], cam, f"Grad-CAM at {layers[-1]} for {title}", plt),
            written[-1],
            plt,
        )
        log.info("%d: %s", k, path)
    print(*written, sep="\n", flush=True)
    return written


def _choose_layers(model: nn.Module, x: torch.Tensor, layers) -> list[str]:
    valid = stage_layers(model, x)
    if layers is None:
        if not valid:
            raise UserError("the model has no layer with a spatial output map to visualize")
        return valid
    names = [layers] if isinstance(layers, str) else [str(name) for name in layers]
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules or not name]
    if unknown or not names:
        raise UserError(
            f"unknown layer(s) {', '.join(unknown) or '[]'}; per-stage layers: "
            f"{', '.join(valid)}; top-level modules: {', '.join(n for n, _ in model.named_children())} "
            "(or a nested name such as the per-stage ones)"
        )
    return names
