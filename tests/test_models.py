import pytest
import torch
from conftest import BY_NAME, model_yaml, refusal
from omegaconf import OmegaConf

from cnntrain.errors import UserError
from cnntrain.models import create_model, list_models
from cnntrain.options import config_options

MODEL_CONFIGS = [model_yaml(o) for o in config_options("model") if o not in BY_NAME]


# 1x28 and 3x32 with 10 classes: every model= option through the training loop, best.pt and back
# (tests/test_zoo.py), with these same checks; here for the networks that sweep only with -m slow
from test_zoo import HEAVY  # noqa: E402


@pytest.mark.parametrize(
    ("name", "in_channels", "image_size", "num_classes"),
    [(n, 3, 64, 7) for n in list_models()]
    + [(n, c, s, 10) for n in HEAVY for c, s in ((1, 28), (3, 32))],
    ids=lambda v: str(v),
)
def test_forward_backward_step(name, in_channels, image_size, num_classes):
    torch.manual_seed(0)
    model = create_model(
        name, in_channels=in_channels, num_classes=num_classes, image_size=image_size
    )
    model.train()
    x = torch.randn(2, in_channels, image_size, image_size)
    out = model(x)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, num_classes)

    torch.nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in params)
    before = [p.detach().clone() for p in params]
    torch.optim.SGD(params, lr=0.1).step()
    assert any(not torch.equal(b, p) for b, p in zip(before, params))


def test_unknown_model_suggests_close_match():
    with pytest.raises(UserError, match=r"unknown model 'resnet81'; did you mean resnet18\b"):
        create_model("resnet81", in_channels=3, num_classes=10, image_size=32)


def test_unknown_stem():
    assert refusal("model.stem=tiny").startswith(
        "model.stem=tiny is not allowed: it must be one of auto, small"
    )


def test_unsupported_option_is_user_error():
    with pytest.raises(UserError, match="resnet18"):
        create_model("resnet18", in_channels=3, num_classes=10, image_size=32, dropout=0.3)
    model = create_model("alexnet", in_channels=3, num_classes=10, image_size=32, dropout=0.3)
    assert model.classifier[0].p == 0.3


def test_every_registered_model_has_a_config():
    assert {p.stem for p in MODEL_CONFIGS} == set(list_models())


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_config_names_its_model(path):  # and builds it: every option composed in tests/test_zoo.py
    cfg = OmegaConf.load(path)
    assert cfg.name == path.stem and set(cfg) <= {
        "name",
        "stem",
        "dropout",
        "stochastic_depth_prob",
    }


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_config_is_its_name_and_at_most_one_more_key(path):
    """What every model shares is in train.yaml's `model:` and what tells it apart in its
    module's docstring: the YAML only makes it a `model=` option."""
    lines = path.read_text().splitlines()
    assert lines[0] == f"name: {path.stem}" and len(lines) <= 2, lines
    assert not any(line.lstrip().startswith("#") for line in lines)


def test_every_registered_model_builds_from_model_name_alone():
    """`model.name=<registered name>` over the default model= option composes what
    `model=<name>` does: a registered model needs no YAML to be trained."""
    from hydra import compose, initialize_config_module

    from cnntrain.schema import check

    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        for name in list_models():
            by_name = compose(config_name="train", overrides=[f"model.name={name}"])
            check(by_name)
            option = compose(config_name="train", overrides=[f"model={name}"])
            assert by_name.model == option.model, name


@pytest.mark.parametrize(
    ("name", "millions"),
    [
        ("alexnet", 61.10),
        ("vgg16", 138.36),
        ("resnet18", 11.69),
        ("resnet50", 25.56),
        ("googlenet", 6.62),
        ("resnext50", 25.03),
        ("se_resnet18", 11.78),
        ("se_resnet50", 28.09),
        ("densenet121", 7.98),
        ("mobilenet_v2", 3.50),
        ("mobilenet_v3_small", 2.54),
        ("mobilenet_v3_large", 5.48),
        ("shufflenet_v2", 2.28),
        ("squeezenet", 1.24),
        ("efficientnet_b0", 5.29),
        ("convnext_tiny", 28.59),
        ("mnasnet", 4.38),
    ],
)
def test_imagenet_param_count(name, millions):
    model = create_model(name, in_channels=3, num_classes=1000, image_size=224, stem="auto")
    n = sum(p.numel() for p in model.parameters())
    assert n / 1e6 == pytest.approx(millions, rel=0.01)


@pytest.mark.parametrize(
    "depth, millions", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)]
)
def test_cifar_resnet_param_counts_match_the_paper(depth, millions):
    model = create_model(f"resnet{depth}", in_channels=3, num_classes=10, image_size=32)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, rel=0.02)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_wrn28_10_param_count_at_cifar10():
    model = create_model("wrn28_10", in_channels=3, num_classes=10, image_size=32)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(36.48, rel=0.001)


@pytest.mark.parametrize("name", list_models())
def test_imagenet_size_forward(name):
    torch.manual_seed(0)
    model = create_model(name, in_channels=3, num_classes=10, image_size=224).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_se_gates_scale_the_residual_branch():
    torch.manual_seed(0)
    model = create_model("se_resnet50", in_channels=3, num_classes=10, image_size=32).eval()
    block = model.layer2[0]  # has a projection shortcut and a stride
    x = torch.randn(2, 256, 8, 8)
    with torch.no_grad():
        branch = torch.rand(2, 512, 4, 4) + 0.5  # away from 0, to divide by it
        gates = block.se(branch) / branch
        # One gate in (0, 1) per sample and channel, the same at every position...
        assert torch.allclose(gates, gates[:, :, :1, :1].expand_as(gates), atol=1e-4)
        assert ((gates > 0) & (gates < 1)).all()
        # ...that depends on the input, not just on the channel.
        assert not torch.allclose(gates[0, :, 0, 0], gates[1, :, 0, 0])

        for fc in (block.se.fc1, block.se.fc2):
            torch.nn.init.zeros_(fc.weight)
            torch.nn.init.zeros_(fc.bias)
        expected = torch.relu(0.5 * block.residual(x) + block.downsample(x))
        assert torch.allclose(block(x), expected, atol=1e-6)


def test_imagenet_stem_forward():
    model = create_model("resnet18", in_channels=1, num_classes=5, image_size=96).eval()
    assert model.conv1.kernel_size == (7, 7)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 96, 96)).shape == (1, 5)


def test_auto_stem_is_small_up_to_64px():
    def stem_kernel(**kw):
        return create_model("resnet18", in_channels=3, num_classes=10, **kw).conv1.kernel_size

    assert stem_kernel(image_size=64) == (3, 3)
    assert stem_kernel(image_size=65) == (7, 7)
    assert stem_kernel(image_size=32, stem="imagenet") == (7, 7)
    assert stem_kernel(image_size=224, stem="small") == (3, 3)


@pytest.mark.parametrize(
    "name, eps",
    [
        ("mobilenet_v3_small", 1e-3),
        ("mobilenet_v3_large", 1e-3),
        ("mnasnet", 1e-5),
        ("mobilenet_v2", 1e-5),
        ("efficientnet_b0", 1e-5),
    ],
)
def test_mobile_families_use_pytorchs_bn_momentum(name, eps, monkeypatch):
    """torchvision's MobileNetV3 (0.01) and MnasNet (0.0003) BatchNorm momenta leave eval mode at
    chance for hundreds of steps: cnntrain builds them with 0.1, torchvision's eps kept, from
    scratch and with pretrained weights (a fresh ImageNet model's state stands in for them)."""
    from torchvision.models import get_model

    from cnntrain.models import transfer

    def bns(model):
        return {(m.momentum, m.eps) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}

    assert bns(create_model(name, in_channels=1, num_classes=10, image_size=32)) == {(0.1, eps)}
    tv_name = transfer.TORCHVISION_NAMES.get(name, name)
    monkeypatch.setattr(
        transfer, "download_state_dict", lambda weights: get_model(tv_name).state_dict()
    )
    model = create_model(
        name, in_channels=3, num_classes=10, image_size=32, pretrained="IMAGENET1K_V1"
    )
    assert bns(model) == {(0.1, eps)}
