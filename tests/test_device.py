"""The rules of the GPU path, proved on the CPU: which CUDA device a process makes current and
when, bf16 only where the GPU has it, the configured fused flag under a GradScaler after a
resume, and an EMA that never reads the device. torch.cuda is stood in for where needed."""

import copy
import os
import sys

import pytest
import torch
from hydra import compose, initialize_config_module
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from cnntrain import distributed, runtime
from cnntrain.ema import ModelEma
from cnntrain.errors import UserError
from cnntrain.optim import create_optimizer, create_scheduler
from cnntrain.runtime import amp_dtype, select_device


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as on a machine with 4 GPUs; returns the devices made current, in order."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    return current


def test_an_explicit_cuda_device_is_made_current(fake_cuda, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert select_device("cuda:2") == torch.device("cuda", 2)
    assert select_device("cuda") == torch.device("cuda", 0)
    assert fake_cuda == [torch.device("cuda", 2), torch.device("cuda", 0)]
    assert select_device("cpu") == torch.device("cpu") and len(fake_cuda) == 2


def test_under_torchrun_cuda_is_the_ranks_own_gpu(fake_cuda, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert select_device("auto") == torch.device("cuda", 3) and fake_cuda == [
        torch.device("cuda", 3)
    ]


def test_joining_the_process_group_touches_no_gpu(fake_cuda, monkeypatch):
    """A device=cpu job under torchrun on a machine with GPUs: neither joining nor the barriers
    may make a GPU current or run an NCCL collective."""
    import torch.distributed as dist

    joined = []
    monkeypatch.setenv(
        "CNNTRAIN_RUN_TIME", ""
    )  # init() shares rank 0's start time: undone after the test
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(joined))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: joined.append(backend))
    monkeypatch.setattr(dist, "broadcast_object_list", lambda objects, src: None)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(
        dist, "barrier", lambda *a, **k: pytest.fail("dist.barrier runs on the current GPU")
    )
    reduced = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, **k: reduced.append(t.device))
    distributed.init()
    distributed.barrier()
    assert joined == ["cpu:gloo,cuda:nccl"] and fake_cuda == [] and reduced == [torch.device("cpu")]


def test_amp_picks_bf16_only_where_the_gpu_has_it(monkeypatch):
    cuda = torch.device("cuda")
    # a V100 / T4: torch 2.14 says bf16 is "supported" when emulation is counted
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation
    )
    assert amp_dtype(True, cuda) == torch.float16
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: True
    )  # A100, H100
    assert amp_dtype(True, cuda) == torch.bfloat16
    assert amp_dtype(True, cuda, "fp16") == torch.float16 and amp_dtype(False, cuda) is None


def test_a_resume_under_a_grad_scaler_uses_the_configured_fused_flag():
    """Saved with optim.fused=false, resumed with fused=auto (fused SGD exists on the CPU): the
    optimizer's state loads with the saved flag, which GradScaler would not match."""
    from cnntrain.resume import restore_optimizer, restore_schedule

    def cfg(fused):
        with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
            return compose(
                config_name="train", overrides=["optim=sgd", f"optim.fused={fused}", "sched=none"]
            )

    torch.manual_seed(0)
    model, x = nn.Linear(4, 3), torch.randn(8, 4)

    def step(optimizer, scaler=None):
        loss = model(x).square().mean()
        optimizer.zero_grad()
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    saved_with = create_optimizer(cfg("false").optim, model)
    step(saved_with)
    resumed = {"optimizer": saved_with.state_dict()}
    expected, reference = copy.deepcopy((model, saved_with))  # the unscaled, unfused step

    new = cfg("auto")
    optimizer = create_optimizer(new.optim, model)
    assert optimizer.param_groups[0]["fused"]
    scheduler, interval = create_scheduler(new.sched, optimizer, epochs=1, steps_per_epoch=1)
    restore_optimizer(optimizer, resumed["optimizer"])
    restore_schedule(
        new, {**resumed, "scheduler": scheduler.state_dict()}, [], optimizer, scheduler, 1, interval
    )
    step(optimizer, torch.amp.GradScaler("cpu"))  # with the saved fused=False: RuntimeError
    assert all(group["fused"] for group in optimizer.param_groups)
    loss = expected(x).square().mean()
    loss.backward()
    reference.step()
    for a, b in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(a, b)


def _bn_net():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    )


class _OpCount(TorchDispatchMode):
    """Counts the ops that compute (a kernel each on a GPU), not views such as detach."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        return func(*args, **(kwargs or {}))


def _bn_stack(layers: int) -> nn.Module:
    net = nn.Sequential(*(nn.BatchNorm2d(2) for _ in range(layers)))
    # integer buffers of other shapes and dtypes, which the average must handle as well
    net.register_buffer("steps", torch.tensor([[7, 9, 100]]))
    net.register_buffer("count32", torch.tensor([5, 1_000_003], dtype=torch.int32))
    return net


@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_the_ema_of_integer_buffers_costs_the_same_ops_for_any_number_of_them(decay):
    def update_ops(layers):
        model = _bn_stack(layers)
        ema = ModelEma(model, decay, n_averaged=1)
        with _OpCount() as count:
            ema.update(model)
        return count.ops

    # on main: 4 ops (mul, mul, add, copy) per integer buffer per step
    assert update_ops(2) == update_ops(24)

    torch.manual_seed(1)
    model = _bn_stack(5)
    ema = ModelEma(model, decay, n_averaged=1)
    expected = {}
    for name, e in ema.module.named_buffers():
        c = dict(model.named_buffers())[name]
        if not e.is_floating_point():
            c.copy_(torch.randint_like(c, 0, 10_000))
            expected[name] = e.clone().copy_(e * decay + c * (1.0 - decay))  # the loop's formula
    ema.update(model)
    got = dict(ema.module.named_buffers())
    assert len(expected) == 7
    for name, want in expected.items():
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name


def test_the_ema_is_torchs_averaged_model_without_reading_the_device(monkeypatch):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = _bn_net()
    ours = ModelEma(model, 0.9)
    torchs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(12):
        loss = model(torch.randn(6, 3, 8, 8)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ours.update(model)
        torchs.update_parameters(model)
    assert ours.n_averaged == int(torchs.n_averaged) == 12
    for (name, a), b in zip(ours.module.state_dict().items(), torchs.module.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)

    # a read of a tensor's value on the host is a host-device sync on a GPU
    def read(*args):
        raise AssertionError("a tensor's value was read on the host")

    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, read)
    ours.update(model)
    with pytest.raises(AssertionError, match="read on the host"):
        torchs.update_parameters(model)  # its `n_averaged == 0`, on the device, every step


def test_the_console_scripts_set_the_cublas_workspace_before_any_job(monkeypatch):
    from cnntrain import cli

    seen = []
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(sys, "argv", ["cnntrain"])
    run = cli._console_script(lambda: seen.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG")), "t")
    with pytest.raises(SystemExit) as stop:
        run()
    assert stop.value.code == 0 and seen == [":4096:8"]


@pytest.mark.parametrize("before", [None, ":16:8", ":4096:8", ":0:0"])
def test_a_deterministic_run_refuses_a_cublas_set_up_too_late(monkeypatch, before):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # CUDA used before the run
    if before is None:
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    else:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", before)
    if before in runtime.CUBLAS_DETERMINISTIC:
        runtime.deterministic_cublas()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == before
        return
    with pytest.raises(UserError, match="CUBLAS_WORKSPACE_CONFIG must be :4096:8"):
        runtime.deterministic_cublas()


def test_a_process_new_to_cuda_gets_the_cublas_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    runtime.deterministic_cublas()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
