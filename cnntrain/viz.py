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
from cnntrain.files import atomic_write, save_figure
from cnntrain.inference import Preprocess, find_images, load_trained_model
from cnntrain.runtime import select_device
from cnntrain.rundir import fresh_run
from cnntrain.schema import check
from cnntrain.train import run_dir_from_hydra

log = logging.getLogger("cnntrain")
FEATURE_CHANNELS = 16


def _trace(model: nn.Module, x: torch.Tensor) -> list[tuple[str, torch.Size]]:
    """(module name, output shape) in the order the modules finish their forward pass; a
    container finishes after its children."""
    order, hooks = [], []
    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_hook(
                lambda m, i, out, name=name: order.append((name, out.shape)) if isinstance(out, torch.Tensor) else None))
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
    hooks = [modules[name].register_forward_hook(
        lambda m, i, out, name=name: outputs.__setitem__(name, out)) for name in names]
    return outputs, hooks


def grad_cam(model: nn.Module, x: torch.Tensor, layer: nn.Module | str, target: int | None = None) -> torch.Tensor:
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
            grads, = torch.autograd.grad(logits[0, index], kept["a"])
    finally:
        hook.remove()
    activation = kept["a"].detach()[0]
    weights = grads[0].mean((1, 2))
    cam = F.relu(torch.einsum("k,khw->hw", weights, activation))
    cam = F.interpolate(cam[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    return cam / cam.max() if cam.max() > 0 else cam


def _normalized(t: torch.Tensor, dims) -> torch.Tensor:
    low, high = t.amin(dims, keepdim=True), t.amax(dims, keepdim=True)
    return (t - low) / (high - low).clamp_min(1e-12)


def _display(pixels: torch.Tensor):
    """uint8 (C, H, W) -> what imshow takes: (H, W, 3) or gray (H, W)."""
    return pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()


def write_filters(model: nn.Module, path: Path) -> None:
    """The first Conv2d's filters in a grid, each min-max normalized on its own: RGB for 3 input
    channels, else the mean over the input channels in gray. Upscaled so that 3x3 filters show."""
    from matplotlib import image as mpimg
    from torchvision.utils import make_grid

    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    w = conv.weight.detach().float().cpu()
    w = w if w.shape[1] == 3 else w.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    w = _normalized(w, (1, 2, 3))
    scale = max(1, 32 // max(w.shape[-2:]))
    w = w.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    grid = make_grid(w, nrow=math.ceil(math.sqrt(len(w))), padding=2, pad_value=1.0)
    with atomic_write(path, "wb") as f:
        mpimg.imsave(f, grid.permute(1, 2, 0).numpy(), format="png")


def write_feature_maps(pixels: torch.Tensor, maps: dict[str, torch.Tensor], title: str, path: Path, plt) -> None:
    """One row per layer: the input, then the first channels of the layer's activation map."""
    cols = 1 + max(fmap.shape[0] for fmap in maps.values())
    fig, axes = plt.subplots(len(maps), cols, figsize=(1.1 * cols, 1.3 * len(maps)), squeeze=False)
    for row, (name, fmap) in zip(axes, maps.items()):
        row[0].imshow(_display(pixels), cmap="gray")
        row[0].set_title(name, fontsize=7, loc="left")
        for c, ax in enumerate(row[1:]):
            if c < fmap.shape[0]:
                ax.imshow(fmap[c].numpy(), cmap="viridis")
        for ax in row:
            ax.axis("off")
    fig.suptitle(title, fontsize=8)
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def write_grad_cam(pixels: torch.Tensor, cam: torch.Tensor, title: str, path: Path, plt) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(6, 3.3))
    for ax in axes:
        ax.imshow(_display(pixels), cmap="gray")
        ax.axis("off")
    axes[1].imshow(cam.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    fig.suptitle(title, fontsize=8)
    save_figure(fig, path, dpi=100)
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
    files = find_images(cfg.inputs)[:cfg.max_images]  # before anything is claimed or built
    with fresh_run(run_dir, cfg):
        return _visualize(cfg, files, run_dir, plt)


def _visualize(cfg: DictConfig, files: list[Path], run_dir: Path, plt) -> list[Path]:
    device = select_device(cfg.device)
    model, trained, classes = load_trained_model(cfg.ckpt, device)
    if cfg.target_class is not None and cfg.target_class not in classes and not (
            isinstance(cfg.target_class, int) and 0 <= cfg.target_class < len(classes)):
        raise UserError(f"target_class must be a class name or index 0..{len(classes) - 1}, got "
                        f"{cfg.target_class!r}; classes: {', '.join(classes)}")
    target = classes.index(cfg.target_class) if cfg.target_class in classes else cfg.target_class
    prep = Preprocess(trained, device)
    pixels = torch.stack([prep.pixels(path) for path in files])
    x = prep(pixels)
    layers = _choose_layers(model, x[:1], cfg.layers)

    written = [run_dir / "filters.png"]
    write_filters(model, written[0])
    outputs, hooks = _capture(model, layers)
    try:
        with torch.inference_mode():
            probs = model(x).float().softmax(1).cpu()
    finally:
        for h in hooks:
            h.remove()
    for k, path in enumerate(files):
        maps = {name: out[k, :FEATURE_CHANNELS].float().cpu() for name, out in outputs.items()}
        shown = probs[k].argmax().item() if target is None else target
        title = f"{path.name}: {classes[shown]} ({probs[k, shown]:.3f})"
        written.append(run_dir / f"feature_maps_{k}.png")
        write_feature_maps(pixels[k], maps, title, written[-1], plt)
        cam = grad_cam(model, x[k], layers[-1], shown).cpu()
        written.append(run_dir / f"gradcam_{k}.png")
        write_grad_cam(pixels[k], cam, f"Grad-CAM at {layers[-1]} for {title}", written[-1], plt)
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
        raise UserError(f"unknown layer(s) {', '.join(unknown) or '[]'}; per-stage layers: "
                        f"{', '.join(valid)}; top-level modules: {', '.join(n for n, _ in model.named_children())} "
                        "(or a nested name such as the per-stage ones)")
    return names
