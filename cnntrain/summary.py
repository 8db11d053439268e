"""The model summary shown at the start of every run (and alone with `summary=true`): parameter
counts, MACs for the actual input size, and the output size of each stage, like the structural
tables of the lectures."""

from __future__ import annotations

import torch
from torch import nn


def _stages(model: nn.Module):
    """Top-level children, with plain Sequential containers opened one level (VGG's `features`,
    ResNet's `layer1`...), so each row is a layer or a block."""
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential) and len(child) > 1:
            for sub, grandchild in child.named_children():
                yield f"{name}.{sub}", grandchild
        else:
            yield name, child


@torch.no_grad()
def summarize(model: nn.Module, input_shape: tuple[int, int, int]) -> dict:
    """input_shape: (channels, height, width). Runs one image through a copy-free eval pass on
    the model's device, counting FLOPs with torch's FlopCounterMode (MACs = FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters())
    x = torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype)
    rows, hooks = [], []
    for name, module in _stages(model):

        def record(mod, inputs, output, name=name):
            shape = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None
            rows.append(
                {
                    "name": name,
                    "type": type(mod).__name__,
                    "output": shape,
                    "params": sum(p.numel() for p in mod.parameters()),
                }
            )

        hooks.append(module.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {
        "input": list(input_shape),
        "output": list(out.shape[1:]),
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "macs": counter.get_total_flops() // 2,
        "stages": rows,
    }


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def format_summary(info: dict, title: str = "") -> str:
    width = max([12, *(len(r["name"]) for r in info["stages"])])
    lines = [title] if title else []
    lines.append(f"{'layer / block':<{width}}  {'type':<22} {'output':>16} {'params':>10}")
    lines.append(f"{'input':<{width}}  {'':<22} {'x'.join(map(str, info['input'])):>16} {'':>10}")
    for r in info["stages"]:
        shape = "x".join(map(str, r["output"])) if r["output"] else "-"
        lines.append(
            f"{r['name']:<{width}}  {r['type'][:22]:<22} {shape:>16} {_count(r['params']):>10}"
        )
    lines.append(
        f"params {info['params']:,} ({info['trainable']:,} trainable), "
        f"{_count(info['macs'])}MACs per image"
    )
    return "\n".join(lines)
