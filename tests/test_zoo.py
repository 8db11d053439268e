"""The zoo sweep: every `model=` option, composed as the command line composes it, trains one
epoch (capped at one batch) through the training loop's own functions on 28 px gray and on
32 px RGB images, is validated, saved as best.pt and rebuilt from that file as cnneval, cnnexport,
cnnpredict and cnnviz rebuild it. Forward passes alone did not catch MNASNet failing to read its
own checkpoint (module versions lost on the way to the file)."""

import pytest
import torch
from conftest import BY_NAME
from hydra import compose, initialize_config_module
from torch import nn

from cnntrain.checkpoint import load_checkpoint, save_checkpoint
from cnntrain.data import build_data
from cnntrain.engine import Update, evaluate_loader, train_one_epoch
from cnntrain.inference import model_from_checkpoint, trained_config
from cnntrain.models import build_model
from cnntrain.optim import create_optimizer
from cnntrain.options import config_options
from cnntrain.plan import input_config, make_plan

CPU = torch.device("cpu")
MODELS = [o for o in config_options("model") if o not in BY_NAME]
# the largest networks (20-140 M parameters: seconds per case on 2 cores) sweep with -m slow; the
# default run still takes each through a training step at these sizes (test_models.py)
HEAVY = (
    "convnext_tiny",
    "densenet121",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50",
    "se_resnet50",
    "wrn28_10",
    "vgg11",
    "vgg11_bn",
    "vgg13",
    "vgg13_bn",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
)
SWEEP = [pytest.param(m, marks=pytest.mark.slow) if m in HEAVY else m for m in MODELS]


def compose_train(*overrides):
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.fixture(scope="module", params=["mnist", "cifar10"], ids=["gray28", "rgb32"])
def dataset(request, data_root):
    data_args = (
        f"data={request.param}",
        f"data.root={data_root}",
        "data.download=false",
        "data.batch_size=2",
        "device=cpu",
    )
    cfg = compose_train(*data_args)
    return data_args, build_data(cfg.data, cfg.aug, device=CPU, seed=0)


@pytest.mark.parametrize("model", SWEEP)
def test_one_epoch_then_rebuilt_from_its_checkpoint(model, dataset, tmp_path):
    data_args, data = dataset
    cfg = compose_train(f"model={model}", *data_args)
    torch.manual_seed(0)
    net, _ = build_model(cfg.model, data.in_channels, len(data.classes), data.image_size, CPU)
    optimizer = create_optimizer(cfg.optim, net)
    params = [p for p in net.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    trained = train_one_epoch(
        net,
        data.loaders["train"],
        nn.CrossEntropyLoss(),
        Update(optimizer),
        max_steps=1,
        progress=False,
    )
    assert trained["n"] == 2 and all(p.grad is not None for p in params)
    assert any(not torch.equal(b, p) for b, p in zip(before, params))
    val = evaluate_loader(net, data.loaders["val"], num_classes=10, max_steps=1, progress=False)
    assert val["num_samples"] == 2

    best = tmp_path / "best.pt"
    save_checkpoint(
        {
            "model": net.state_dict(),
            "config": make_plan(cfg, input_config(cfg), data).config,
            "classes": data.classes,
            "epoch": 1,
            "metrics": {"val_acc": val["acc"]},
        },
        best,
    )
    ckpt = load_checkpoint(best)
    rebuilt = model_from_checkpoint(ckpt, trained_config(ckpt, best), best, CPU)
    # as checkpoints were written before they kept module versions (MNASNet's loader needs one)
    unversioned = model_from_checkpoint(
        {**ckpt, "model": dict(ckpt["model"])}, trained_config(ckpt, best), best, CPU
    )
    x, _ = next(iter(data.loaders["test"]))
    with torch.no_grad():
        out = net.eval()(x)
        assert (
            out.shape == (len(x), 10)
            and torch.equal(rebuilt(x), out)
            and torch.equal(unversioned(x), out)
        )
