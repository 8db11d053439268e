"""fp16 steps of optimizers without fused kernels (amp_step.py), proved on the CPU under
torch.amp.GradScaler("cpu"): the same weights, optimizer state and scale, bit for bit, as
torch's GradScaler.step over a run with inf steps, without the host reading found_inf once the
optimizer has its state. A read of a tensor's value (`.item()`, `bool()`, `.tolist()`:
aten._local_scalar_dense) is a host-device sync on a GPU; the stand-in below makes it raise."""

import importlib
from contextlib import nullcontext

import pytest
import torch
from hydra import compose, initialize_config_module
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from cnntrain.engine import Update
from cnntrain.optim import create_optimizer

INF_STEPS = {0, 1, 4, 5, 8}  # the first two: no optimizer state yet; 4, 5: two in a row
FIRST_APPLIED = 2  # the step that creates the state (momentum buffer, moments), read on purpose


class _NoHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("a tensor's value was read on the host")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def capturable_on_cpu(monkeypatch):
    """Unfused Adam/AdamW as Update sets them up on CUDA: torch keeps a capturable step count
    only on GPUs, so the CPU stands in for one (is_cuda) and is let in as a capturable device."""
    adam = importlib.import_module("torch.optim.adam")  # torch.optim hides the module's name
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(adam, "_get_capturable_supported_devices", lambda **k: ["cpu"])


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    )
    return net.to(memory_format=torch.channels_last)  # as cnntrain trains on the GPU with amp


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(
        p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=False
    ),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05, fused=False),
    # what Update makes of "adamw" on a GPU (capturable_on_cpu)
    "adamw_capturable": lambda p: torch.optim.AdamW(
        p, lr=1e-3, weight_decay=0.05, fused=False, capturable=True
    ),
}


def _loss(model, i):
    g = torch.Generator().manual_seed(i)
    x, y = torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)
    loss = nn.functional.cross_entropy(model(x), y)
    return loss * float("inf") if i in INF_STEPS else loss  # inf (and NaN) gradients


def _torchs_run(name, steps, grad_clip):
    model = _net()
    optimizer, scaler = OPTIMIZERS[name](model.parameters()), torch.amp.GradScaler("cpu")
    for i in range(steps):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(_loss(model, i)).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    return model, optimizer, scaler


def _assert_same(a, b):
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("grad_clip", [None, 1.0])
@pytest.mark.parametrize("name", ["sgd", "adamw", "adamw_capturable"])
def test_an_unfused_fp16_step_is_torchs_skipped_step_bit_for_bit(name, grad_clip, request):
    """Update's unfused step against torch's GradScaler.step, which skips on the host; after
    the step that creates the optimizer's state without a host read (but for AdamW on the CPU,
    which reads its own host-side step count)."""
    if name == "adamw_capturable":
        request.getfixturevalue("capturable_on_cpu")
    steps = 10
    expected_model, expected_optimizer, expected_scaler = _torchs_run(name, steps, grad_clip)
    model = _net()
    optimizer = OPTIMIZERS[name.removesuffix("_capturable")](model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    update = Update(optimizer, scaler=scaler, grad_clip=grad_clip)
    for i in range(steps):
        no_reads = name != "adamw" and i > FIRST_APPLIED
        with _NoHostReads() if no_reads else nullcontext():
            update(model, _loss(model, i))
        if i == FIRST_APPLIED - 1:
            assert not optimizer.state  # skipped steps leave no state, as torch's do
    assert scaler.get_scale() == 2.0**16 / 2 ** len(INF_STEPS)  # every inf step backed off
    _assert_same(dict(model.state_dict()), dict(expected_model.state_dict()))
    _assert_same(optimizer.state_dict(), expected_optimizer.state_dict())
    _assert_same(scaler.state_dict(), expected_scaler.state_dict())
    assert not torch.equal(model[0].weight, _net()[0].weight)  # the applied steps did apply


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_the_unfused_fp16_update_never_reads_the_device(name, request):
    """optim=<name> optim.fused=false as configured: after the step that creates the
    optimizer's state, no step reads a tensor on the host, inf steps included (on main
    GradScaler.step read found_inf every step). AdamW as on a GPU (capturable_on_cpu)."""
    if name == "adamw":
        request.getfixturevalue("capturable_on_cpu")
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"optim={name}", "optim.fused=false"])
    model = _net()
    optimizer, scaler = create_optimizer(cfg.optim, model), torch.amp.GradScaler("cpu")
    update = Update(optimizer, scaler=scaler, grad_clip=1.0)
    for i in range(7):
        with nullcontext() if i <= FIRST_APPLIED else _NoHostReads():
            update(model, _loss(model, i))
    assert optimizer.state and scaler.get_scale() == 2.0**16 / 2**4  # steps 0, 1, 4, 5 skipped
    assert all(g.get("capturable", True) and not g["fused"] for g in optimizer.param_groups)
