"""Transfer learning (pretrained weights, new head, freezing), models by torchvision/timm name,
and the model summary."""

import json

import pytest
import torch
from conftest import run_cli
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from cnntrain.errors import UserError
from cnntrain.models import create_model
from cnntrain.summary import format_summary, summarize


@pytest.fixture()
def pretrained_file(tmp_path):
    """A 'pretrained' ResNet-18 (small stem, 10 classes): random init, one step of training so
    that BN statistics are not the defaults."""
    torch.manual_seed(1)
    model = create_model("resnet18", in_channels=3, num_classes=10, image_size=32)
    loss = model(torch.randn(4, 3, 32, 32)).sum()
    loss.backward()
    path = tmp_path / "pretrained.pt"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def step(model, classes=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = nn.functional.cross_entropy(
        model(torch.randn(8, 3, 32, 32)), torch.randint(0, classes, (8,))
    )
    loss.backward()
    opt.step()


def test_state_dict_file_is_loaded_head_replaced_backbone_frozen(pretrained_file):
    path, saved = pretrained_file
    model = create_model(
        "resnet18",
        in_channels=3,
        num_classes=3,
        image_size=32,
        pretrained=str(path),
        freeze="backbone",
    )
    assert torch.equal(model.conv1.weight, saved["conv1.weight"])
    assert model.fc.out_features == 3
    assert isinstance(model.bn1, FrozenBatchNorm2d)
    assert torch.equal(model.bn1.running_mean, saved["bn1.running_mean"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step(model)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}


def test_freeze_all_but_head_and_prefixes():
    model = create_model(
        "alexnet", in_channels=3, num_classes=5, image_size=32, freeze="all_but_head"
    )
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "classifier.6.weight",
        "classifier.6.bias",
    }
    model = create_model("alexnet", in_channels=3, num_classes=5, image_size=32, freeze="backbone")
    assert all(n.startswith("classifier.") for n, p in model.named_parameters() if p.requires_grad)
    assert sum(p.requires_grad for p in model.parameters()) == 6  # the 3 Linear layers of the MLP
    model = create_model(
        "resnet18", in_channels=3, num_classes=5, image_size=32, freeze=["conv1", "layer1"]
    )
    frozen = {n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "layer1"}
    with pytest.raises(UserError, match="no parameters under"):
        create_model("resnet18", in_channels=3, num_classes=5, image_size=32, freeze=["trunk"])
    with pytest.raises(UserError, match="model.freeze"):
        create_model("resnet18", in_channels=3, num_classes=5, image_size=32, freeze="everything")


def test_pretrained_file_for_another_model_is_refused(pretrained_file):
    path, _ = pretrained_file
    with pytest.raises(UserError, match="does not fit"):
        create_model("vgg11", in_channels=3, num_classes=3, image_size=32, pretrained=str(path))
    with pytest.raises(UserError, match="not found"):
        create_model(
            "resnet18", in_channels=3, num_classes=3, image_size=32, pretrained="/no/such.pt"
        )


@pytest.fixture()
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def test_named_weights_offline_without_cache_is_one_line(torch_home):
    with pytest.raises(UserError) as info:
        create_model(
            "resnet18", in_channels=3, num_classes=3, image_size=224, pretrained="IMAGENET1K_V1"
        )
    msg = str(info.value)
    assert "\n" not in msg and "resnet18-f37072fd.pth" in msg and str(torch_home) in msg


def test_named_weights_from_the_torchvision_cache(torch_home):
    """What a download leaves in the cache is used offline: ImageNet stem and 1000-class weights
    loaded, head replaced, first conv adapted to one channel."""
    from torchvision.models import resnet18

    cached = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.manual_seed(0)
    reference = resnet18().state_dict()
    torch.save(reference, cached)
    model = create_model(
        "resnet18", in_channels=1, num_classes=4, image_size=28, pretrained="IMAGENET1K_V1"
    )
    assert model.conv1.kernel_size == (7, 7) and model.fc.out_features == 4
    torch.testing.assert_close(model.conv1.weight, reference["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(model.layer4[1].conv2.weight, reference["layer4.1.conv2.weight"])
    with pytest.raises(UserError, match="unknown weights"):
        create_model(
            "resnet18", in_channels=3, num_classes=4, image_size=28, pretrained="IMAGENET9K"
        )
    with pytest.raises(UserError, match="no pretrained weights"):
        create_model(
            "lenet5", in_channels=3, num_classes=4, image_size=28, pretrained="IMAGENET1K_V1"
        )


def test_torchvision_and_timm_models_by_name():
    model = create_model(
        "regnet_y_400mf", source="torchvision", in_channels=1, num_classes=7, image_size=64
    )
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 7)
    model = create_model(
        "googlenet", source="torchvision", in_channels=3, num_classes=7, image_size=64
    )
    assert model.train()(torch.randn(2, 3, 64, 64)).shape == (2, 7)  # no aux outputs
    with pytest.raises(UserError, match="did you mean resnet18"):
        create_model("resnet81", source="torchvision", in_channels=3, num_classes=7, image_size=64)
    pytest.importorskip("timm")
    model = create_model("resnet10t", source="timm", in_channels=1, num_classes=7, image_size=64)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 7)
    with pytest.raises(UserError, match="did you mean"):
        create_model("resnet10tt", source="timm", in_channels=3, num_classes=7, image_size=64)


def test_timm_pretrained_offline_is_one_line(monkeypatch, tmp_path):
    pytest.importorskip("timm")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # the hub reads HF_HUB_OFFLINE at import; without it this machine retries DNS for ~45 s first
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as info:
        create_model(
            "resnet10t", source="timm", in_channels=3, num_classes=7, image_size=64, pretrained=True
        )
    assert "\n" not in str(info.value) and "resnet10t" in str(info.value)


def test_summary_counts_params_macs_and_stage_shapes():
    model = create_model("resnet18", in_channels=3, num_classes=1000, image_size=224)
    info = summarize(model, (3, 224, 224))
    assert info["params"] == 11_689_512 and info["trainable"] == info["params"]
    assert 1.80e9 < info["macs"] < 1.83e9  # the published 1.8 GMACs
    shapes = {r["name"]: r["output"] for r in info["stages"]}
    assert (
        shapes["maxpool"] == (64, 56, 56)
        and shapes["layer4.1"] == (512, 7, 7)
        and shapes["fc"] == (1000,)
    )
    text = format_summary(info)
    assert "512x7x7" in text and "11,689,512" in text


@pytest.mark.e2e
def test_summary_cli_prints_and_does_not_train(tmp_path):
    proc = run_cli(
        "cnntrain",
        "model=vgg16",
        "data=cifar10",
        "summary=true",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert "vgg16 on cifar10: 10 classes, input 3x32x32" in proc.stdout
    assert "512x1x1" in proc.stdout and "MACs per image" in proc.stdout
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.e2e
def test_fine_tune_from_a_checkpoint_on_other_classes(data_root, folder_root, tmp_path):
    """Train on CIFAR-10-format data, then fine-tune that checkpoint on a 3-class image folder
    with a frozen backbone: the backbone weights in the result equal the source checkpoint's."""
    src = tmp_path / "src"
    run_cli(
        "cnntrain",
        "data=cifar10",
        f"data.root={data_root}",
        "data.download=false",
        "epochs=1",
        "max_steps_per_epoch=2",  # a source checkpoint is all it needs to be
        "max_eval_steps=1",
        "model=resnet18",
        f"hydra.run.dir={src}",
        cwd=tmp_path,
    )
    dst = tmp_path / "dst"
    run_cli(
        "cnntrain",
        "data=imagefolder",
        f"data.root={folder_root}",
        "data.image_size=32",
        "epochs=1",
        "data.num_workers=0",
        "model=resnet18",
        f"model.pretrained={src}/checkpoints/best.pt",
        "model.freeze=all_but_head",
        f"hydra.run.dir={dst}",
        cwd=tmp_path,
    )
    a = torch.load(src / "checkpoints/best.pt", weights_only=True)["model"]
    b = torch.load(dst / "checkpoints/last.pt", weights_only=True)
    assert torch.equal(a["layer3.0.conv1.weight"], b["model"]["layer3.0.conv1.weight"])
    assert b["model"]["fc.weight"].shape == (3, 512)
    results = json.loads((dst / "results.json").read_text())
    assert results["trainable_params"] == 512 * 3 + 3
    run_cli(
        "cnneval",
        f"ckpt={dst}/checkpoints/best.pt",
        f"hydra.run.dir={tmp_path / 'ev'}",
        cwd=tmp_path,
    )
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["top1"] == results["test_acc"]


def test_input_too_small_for_the_model_fails_before_training():
    from omegaconf import OmegaConf

    from cnntrain.models import build_model

    cfg = OmegaConf.create(
        {"name": "alexnet", "source": "torchvision"}
    )  # 11x11/4 stem, 3 max-pools
    with pytest.raises(UserError, match="cannot take 1x28x28 input.*data.image_size="):
        build_model(cfg, 1, 10, 28, torch.device("cpu"))
    model, info = build_model(cfg, 1, 10, 96, torch.device("cpu"))
    assert info["output"] == [10]
