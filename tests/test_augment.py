"""BatchTransform: per-image random parameters, seeded on the host, against torchvision."""

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from cnntrain.data import augment
from cnntrain.data.augment import BatchTransform, _grid_nearest, _policy_theta
from cnntrain.errors import UserError

RGB = dict(mean=[0.0] * 3, std=[1.0] * 3, device="cpu")  # normalized = pixels / 255


def images(b=8, c=3, s=32, seed=0):
    return torch.randint(
        0, 256, (b, c, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def copies(b=32, c=3, s=32):
    return images(1, c, s).expand(b, -1, -1, -1).contiguous()


def op(t, kind):
    """The op of this kind in the transform's pipeline."""
    return next(o for o in t.ops if isinstance(o, kind))


def pixels(out):
    """Back from a mean 0 / std 1 normalization to uint8."""
    return (out * 255).round().clamp(0, 255).to(torch.uint8)


# every random op alone; mixup/cutmix draw per batch (as torchvision's), not per image
OPS = {
    "shift": dict(shift=4),
    "flip": dict(hflip=True),
    "rotation": dict(degrees=20),
    "scale": dict(scale=(0.7, 1.3)),
    "rrc": dict(crop_scale=(0.08, 1.0)),
    "brightness_contrast_saturation": dict(color_jitter=0.4),
    "hue": dict(hue=0.2),
    "randaugment": dict(policy="randaugment"),
    "autoaugment": dict(policy="autoaugment"),
    "erasing": dict(random_erasing=0.5),
}
MIXES = {"mixup": dict(mixup_alpha=1.0), "cutmix": dict(cutmix_alpha=1.0)}


@pytest.mark.parametrize("op", OPS)
def test_each_image_of_a_batch_gets_its_own_parameters(op):
    t = BatchTransform(**RGB, size=32, **OPS[op])
    assert t.random
    x, y = copies(), torch.zeros(32, dtype=torch.long)
    out, target = t(x, y, seed=1)
    assert len({o.numpy().tobytes() for o in out}) > 1  # not all the same
    assert torch.equal(out, t(x, y, seed=1)[0])  # same seed: bitwise the same
    assert not torch.equal(out, t(x, y, seed=2)[0])
    assert target is y


@pytest.mark.parametrize("op", MIXES)
def test_mixes_are_seeded(op):
    t = BatchTransform(**RGB, size=32, num_classes=10, **MIXES[op])
    x, y = images(16), torch.arange(16) % 10
    out, target = t(x, y, seed=1)
    out2, target2 = t(x, y, seed=1)
    assert torch.equal(out, out2) and torch.equal(target, target2)
    assert not torch.equal(target, t(x, y, seed=2)[1])


def test_eval_is_normalized_center_crop():
    x = images(4, s=36)
    t = BatchTransform([0.5, 0.4, 0.3], [0.2, 0.25, 0.3], "cpu", size=32)
    assert not t.random
    out, y = t(x, torch.arange(4), seed=1)
    crop = TF.center_crop(x, [32, 32]).float() / 255
    want = (crop - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.3]
    ).view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 32, 32)
    torch.testing.assert_close(out, want)
    assert torch.equal(out, t(x, y, seed=2)[0])  # the seed is ignored
    assert torch.equal(y, torch.arange(4))


@pytest.mark.parametrize("c", [1, 3])
def test_dtype_shape_and_normalization_gray_and_rgb(c):
    mean, std = [0.5] * c, [0.25] * c
    x = images(6, c, 40)
    out, _ = BatchTransform(mean, std, "cpu", size=32)(x, torch.zeros(6, dtype=torch.long), 0)
    torch.testing.assert_close(out, (x[..., 4:36, 4:36].float() / 255 - 0.5) / 0.25)
    everything = dict(
        crop_scale=(0.35, 1),
        hflip=True,
        color_jitter=0.4,
        hue=0.1,
        policy="randaugment",
        random_erasing=0.5,
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
        num_classes=5,
    )
    out, target = BatchTransform(mean, std, "cpu", size=24, **everything)(x, torch.arange(6) % 5, 3)
    assert out.dtype == torch.float32 and out.shape == (6, c, 24, 24)
    assert out.min() >= -2 and out.max() <= 2  # within the normalized range of 0..255
    assert target.shape == (6, 5) and target.dtype == torch.float32


def test_shift_and_flip_are_pixel_exact():
    """Every output is one of the (2*shift+1)**2 * 2 shifted (zero fill) / flipped copies of the
    centre crop, exactly, and the batch uses many of them."""
    p, s = 2, 16
    x = copies(64, 3, 20)
    t = BatchTransform(**RGB, size=s, shift=p, hflip=True)
    out, _ = t(x, torch.zeros(64, dtype=torch.long), seed=5)
    padded = F.pad(x[0, :, 2:18, 2:18], (p, p, p, p))
    candidates = {}
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            crop = padded[:, dy : dy + s, dx : dx + s]
            for flip in (False, True):
                img = crop.flip(-1) if flip else crop
                candidates[t.normalize(img[None])[0].numpy().tobytes()] = (dy, dx, flip)
    seen = [candidates.get(o.numpy().tobytes()) for o in out]
    assert None not in seen
    assert len(set(seen)) > 10 and {f for *_, f in seen} == {False, True}


def test_rotation_keeps_the_centre_and_zero_fills():
    t = BatchTransform([0.0], [1.0], "cpu", size=32, degrees=30)
    x = torch.full((16, 1, 32, 32), 200, dtype=torch.uint8)
    out = pixels(t(x, torch.zeros(16, dtype=torch.long), seed=0)[0])
    assert (out[:, :, 12:20, 12:20] == 200).all()
    assert (out[:, :, 0, 0] == 0).sum() > 0  # some corners rotated out


@pytest.mark.parametrize(
    "kw",
    [dict(scale=(0.5, 0.8)), dict(scale=(1.2, 1.6)), dict(degrees=30, scale=(0.6, 1.4))],
    ids=["shrink", "enlarge", "rotation_and_scale"],
)
def test_affine_per_image_equals_functional_affine(kw):
    """Each image gets what torchvision's affine gives it alone with the angle and zoom drawn
    for it (ranges on one side of 1: zooming by z and by 1/z must not pass for each other)."""
    b, seed = 12, 3
    x = TF.resize(images(b, s=8), [24, 24], interpolation=InterpolationMode.BICUBIC)  # smooth
    t = BatchTransform(**RGB, size=24, **kw)
    out = t(x, torch.zeros(b, dtype=torch.long), seed)[0] * 255
    _, angle, zoom, _ = op(t, augment.Affine).params(torch.Generator().manual_seed(seed), b)
    lo, hi = kw["scale"]
    assert lo <= zoom.min() and zoom.max() <= hi and zoom.std() > 0
    for i in range(b):
        # torchvision turns counter-clockwise for a positive angle, our matrices clockwise; the
        # angles are drawn symmetric around 0
        want = TF.affine(
            x[i].float(),
            angle=-math.degrees(angle[i]),
            translate=[0, 0],
            scale=float(zoom[i]),
            shear=[0.0, 0.0],
            interpolation=InterpolationMode.BILINEAR,
        )
        torch.testing.assert_close(out[i], want, atol=2e-3, rtol=0)


def test_rrc_whole_image_is_a_resize():
    # a smooth image: on noise any two resamplers differ a lot
    x = TF.resize(images(4, s=8), [48, 48], interpolation=InterpolationMode.BICUBIC)
    t = BatchTransform(**RGB, size=32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    out, _ = t(x, torch.zeros(4, dtype=torch.long), seed=0)
    want = TF.resize(x.float(), [32, 32], antialias=True) / 255
    assert (out - want).abs().mean() < 0.005 and (out - want).abs().max() < 0.05
    same = BatchTransform(**RGB, size=48, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    torch.testing.assert_close(
        same(x, torch.zeros(4, dtype=torch.long), seed=0)[0], x.float() / 255
    )


def test_rrc_box_of_output_size_is_an_exact_crop():
    """A box as large as the output samples every pixel at its centre: an exact crop."""
    x = images(1, s=48).expand(16, -1, -1, -1)
    t = BatchTransform(**RGB, size=24, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0), hflip=True)
    out = pixels(t(x, torch.zeros(16, dtype=torch.long), seed=0)[0])
    crops = {}
    for i in range(25):
        for j in range(25):
            crop = x[0, :, i : i + 24, j : j + 24]
            crops[crop.numpy().tobytes()] = (i, j, False)
            crops[crop.flip(-1).numpy().tobytes()] = (i, j, True)
    seen = [crops.get(o.numpy().tobytes()) for o in out]
    assert None not in seen and len(set(seen)) > 8


def test_rrc_boxes_stay_inside_the_image():
    h, w = 40, 30
    t = BatchTransform(**RGB, size=16, crop_scale=(0.08, 1.0))
    box = op(t, augment.ResizedCrop).boxes(torch.Generator().manual_seed(0), 2000, h, w)
    _, x1, y1, x2, y2 = box.T
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= w).all() and (y2 <= h).all()
    assert (x2 > x1).all() and (y2 > y1).all()
    area = (x2 - x1) * (y2 - y1) / (h * w)
    ratio = (x2 - x1) / (y2 - y1)
    assert area.min() > 0.06 and area.max() <= 1
    assert ratio.min() > 0.6 and ratio.max() < 1.5 and ratio.std() > 0.1
    assert (x1 + x2 != w).any() and (y1 + y2 != h).any()  # not all central


@pytest.mark.parametrize("policy", ["randaugment", "autoaugment"])
def test_policy_batched_equals_torchvision_per_image(policy):
    """The grouped, permuted batch gives each image exactly what torchvision's own op code
    gives it alone, for the ops the policy drew for it."""
    b, seed = 48, 7
    x = images(b, s=32)
    t = BatchTransform(**RGB, size=32, policy=policy)
    out = pixels(t(x, torch.zeros(b, dtype=torch.long), seed)[0])
    # the policy draws first
    stages = op(t, augment.Policy).stages(torch.Generator().manual_seed(seed), b)
    ref = v2.RandAugment() if policy == "randaugment" else v2.AutoAugment()
    drawn = set()
    for i in range(b):
        img = x[i]
        for stage in stages:
            name, mag = stage[i]
            drawn.add(name)
            img = ref._apply_image_or_video_transform(
                img, name, mag, interpolation=InterpolationMode.NEAREST, fill=ref._fill
            )
        assert torch.equal(out[i], img), (i, [stage[i] for stage in stages])
    assert len(drawn) >= 6


@pytest.mark.parametrize("angle", [9.0, -9.0, 26.7])
def test_batched_rotate_equals_functional(angle):
    x = images(5, s=20)
    theta = torch.stack([_policy_theta("Rotate", angle, 20)] * 5)
    want = torch.stack(
        [TF.rotate(img, angle, interpolation=InterpolationMode.NEAREST) for img in x]
    )
    assert torch.equal(_grid_nearest(x, theta), want)


@pytest.mark.parametrize(
    "name,mag",
    [
        ("Posterize", 5.0),
        ("Equalize", 0.0),
        ("Sharpness", 0.3),
        ("AutoContrast", 0.0),
        ("Solarize", 0.5),
    ],
)
def test_group_op_equals_functional_per_image(name, mag):
    x = images(6, s=20)
    x[0] = 7  # a flat image: autocontrast/equalize leave it
    t = BatchTransform(**RGB, size=20, policy="randaugment")
    fn = {
        "Posterize": lambda img: TF.posterize(img, 5),
        "Equalize": TF.equalize,
        "Sharpness": lambda img: TF.adjust_sharpness(img, 1.3),
        "AutoContrast": TF.autocontrast,
        "Solarize": lambda img: TF.solarize(img, 127.5),
    }[name]
    assert torch.equal(
        op(t, augment.Policy).op(x, name, mag, None), torch.stack([fn(img) for img in x])
    )


@pytest.mark.parametrize("component", ["brightness", "contrast", "saturation", "hue"])
def test_jitter_component_per_image_equals_functional(component):
    b = 6
    x = images(b, s=8).float() / 255
    t = BatchTransform(**RGB, size=8, color_jitter=0.5, hue=0.3)
    factors = torch.linspace(0.6, 1.4, b) if component != "hue" else torch.linspace(-0.3, 0.3, b)
    p = {
        "brightness": torch.ones(b),
        "contrast": torch.ones(b),
        "saturation": torch.ones(b),
        "hue": torch.zeros(b),
        component: factors,
    }
    jitter, hue = op(t, augment.ColorJitter), op(t, augment.Hue)
    out = hue.apply(jitter.apply(x * 255, p, None), p, None) / 255
    fn = {
        "brightness": TF.adjust_brightness,
        "contrast": TF.adjust_contrast,
        "saturation": TF.adjust_saturation,
        "hue": TF.adjust_hue,
    }[component]
    want = torch.stack([fn(img, float(f)) for img, f in zip(x, factors)])
    torch.testing.assert_close(out, want, atol=2e-5, rtol=0)


def test_gray_jitter_is_brightness_and_contrast_only():
    x = copies(16, 1, 16)
    t = BatchTransform([0.0], [1.0], "cpu", size=16, color_jitter=0.4, hue=0.3)
    out = t(x, torch.zeros(16, dtype=torch.long), seed=0)[0]
    assert out.shape == (16, 1, 16, 16) and len({o.numpy().tobytes() for o in out}) == 16


def test_erasing_zeroes_one_box_per_image():
    x = torch.full((32, 3, 16, 16), 255, dtype=torch.uint8)
    t = BatchTransform(**RGB, size=16, random_erasing=1.0)
    out = t(x, torch.zeros(32, dtype=torch.long), seed=0)[0]
    zero = out[:, 0] == 0
    assert (zero == (out == 0).all(1)).all()  # all channels together
    for z in zero:
        rows, cols = z.any(1).nonzero()[:, 0], z.any(0).nonzero()[:, 0]
        assert len(rows) > 0
        assert (
            z.sum()
            == len(rows) * len(cols)
            == z[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].sum()
        )
    assert len({z.numpy().tobytes() for z in zero}) > 16


def constant_batch(b=8):
    """Image i is flat at value 20 + 25 i and has label i."""
    x = (
        (20 + 25 * torch.arange(b, dtype=torch.uint8))
        .view(b, 1, 1, 1)
        .expand(b, 3, 16, 16)
        .contiguous()
    )
    return x, torch.arange(b)


def test_mixup_lambda_matches_pixels_and_targets():
    x, y = constant_batch()
    t = BatchTransform(**RGB, size=16, mixup_alpha=0.4, num_classes=10)
    for seed in range(5):
        out, target = t(x, y, seed)
        torch.testing.assert_close(target.sum(1), torch.ones(8))
        lam = target[torch.arange(8), y]
        want = (lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x.roll(1, 0)) / 255
        torch.testing.assert_close(out, want.float())
        assert lam.unique().numel() == 1  # one lambda per batch, as torchvision's MixUp
        torch.testing.assert_close(target[torch.arange(8), y.roll(1)], 1 - lam)


def test_cutmix_lambda_is_the_area_kept():
    x, y = constant_batch()
    t = BatchTransform(**RGB, size=16, cutmix_alpha=1.0, num_classes=10)
    lams = set()
    for seed in range(8):
        out, target = t(x, y, seed)
        torch.testing.assert_close(target.sum(1), torch.ones(8))
        kept = (pixels(out) == x).all(1).float().mean((1, 2))
        pasted = (pixels(out) == x.roll(1, 0)).all(1).float().mean((1, 2))
        torch.testing.assert_close(kept + pasted, torch.ones(8))
        torch.testing.assert_close(target[torch.arange(8), y], kept)
        lams.add(round(float(kept[0]), 4))
    assert len(lams) > 3


def test_mixup_or_cutmix_per_batch():
    x, y = constant_batch()
    t = BatchTransform(**RGB, size=16, mixup_alpha=1.0, cutmix_alpha=1.0, num_classes=10)
    kinds = set()
    for seed in range(12):
        out = pixels(t(x, y, seed)[0])
        cut = ((out == x) | (out == x.roll(1, 0))).all()
        kinds.add(bool(cut))
    assert kinds == {True, False}


def test_no_global_rng_and_everything_on():
    torch.manual_seed(0)
    np.random.seed(0)
    state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    for kw in (dict(crop_scale=(0.08, 1)), dict(shift=3, degrees=10, scale=(0.9, 1.1))):
        t = BatchTransform(
            **RGB,
            size=24,
            hflip=True,
            color_jitter=0.4,
            hue=0.1,
            policy="autoaugment",
            random_erasing=0.5,
            mixup_alpha=0.2,
            cutmix_alpha=1.0,
            num_classes=4,
            **kw,
        )
        t(images(8, s=28), torch.arange(8) % 4, seed=11)
    t = BatchTransform(**RGB, size=24, policy="randaugment")
    t(images(8, s=28), torch.zeros(8, dtype=torch.long), seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    assert (np.random.get_state()[1] == np_state).all()


def test_parameters_survive_the_packed_copy(monkeypatch):
    """Off the CPU the parameters travel as one float32 vector: same output as unpacked."""
    kw = dict(
        size=24,
        hflip=True,
        color_jitter=0.4,
        hue=0.1,
        random_erasing=0.5,
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
        num_classes=4,
    )
    x, y = images(32, s=28), torch.arange(32) % 4
    configs = (
        dict(crop_scale=(0.08, 1), policy="randaugment"),
        dict(shift=3, policy="autoaugment"),
        dict(shift=3, degrees=10, scale=(0.9, 1.1)),
    )
    want = [BatchTransform(**RGB, **kw, **extra)(x, y, 4) for extra in configs]
    monkeypatch.setattr(
        augment, "_to_device", lambda host, device: augment._unpack(augment._pack(host), host)
    )
    for extra, (out, target) in zip(configs, want):
        got = BatchTransform(**RGB, **kw, **extra)(x, y, 4)
        assert torch.equal(got[0], out) and torch.equal(got[1], target)


def test_refuses_inconsistent_settings():
    with pytest.raises(ValueError, match="num_classes"):
        BatchTransform(**RGB, size=8, mixup_alpha=1.0)
    with pytest.raises(ValueError, match="crop_scale"):
        BatchTransform(**RGB, size=8, crop_scale=(0.5, 1), shift=2)
    with pytest.raises(ValueError, match="crop_scale"):
        BatchTransform(**RGB, size=8, crop_scale=(0.5, 1), scale=(0.9, 1.1))
    with pytest.raises(ValueError, match="scale"):
        BatchTransform(**RGB, size=8, scale=(1.1, 0.9))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(shift=4, hflip=True),
        dict(degrees=10),
        dict(scale=(0.9, 1.1)),
        dict(crop_scale=(0.3, 1.0)),
        dict(policy="randaugment", cutmix_alpha=1.0, num_classes=4),
    ],
    ids=["eval", "shift_flip", "rotation", "scale", "rrc", "policy_cutmix"],
)
def test_smaller_images_are_resized_up_first_as_the_host_once_did(kw):
    """Built-in datasets are stored at their native size: the batch resized on the device is
    bitwise the set resized on the host (TF.resize of uint8, antialiased), then transformed."""
    x, y = images(16, s=20), torch.arange(16) % 4
    t = BatchTransform(**RGB, size=36, **kw)
    stored = TF.resize(x, [36, 36], antialias=True)
    for seed in range(3):
        out, target = t(x, y, seed)
        want, want_target = t(stored, y, seed)
        assert out.shape == (16, 3, 36, 36)
        assert torch.equal(out, want) and torch.equal(target, want_target)


# settings whose parts must be bitwise the whole batch's: each op and mix alone, and everything
EVERYTHING = dict(
    hflip=True, color_jitter=0.4, hue=0.1, random_erasing=0.5, mixup_alpha=0.2, cutmix_alpha=1.0
)
PARTS = {
    **OPS,
    **MIXES,
    "everything_rrc_randaugment": dict(crop_scale=(0.08, 1), policy="randaugment", **EVERYTHING),
    "everything_affine_autoaugment": dict(
        shift=3, degrees=10, scale=(0.9, 1.1), policy="autoaugment", **EVERYTHING
    ),
    "everything_shift_autoaugment": dict(shift=3, policy="autoaugment", **EVERYTHING),
    "everything_upsized": dict(shift=3, policy="randaugment", **EVERYTHING, size=36),
}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("setting", PARTS)
def test_a_part_of_a_batch_is_that_part_of_the_batch_transformed_whole(setting, world):
    """A rank transforms only the images of its share of the global batch (and a mix partner):
    the outputs are exactly its share of the whole batch's outputs, parameters and all."""
    kw = {"size": 24, "num_classes": 10, **PARTS[setting]}
    t = BatchTransform(**RGB, **kw)
    b = 24
    x, y = images(b, s=28), torch.arange(b) % 10
    for seed in range(3):
        whole, target = t(x, y, seed)
        for rank in range(world):
            part = slice(rank * b // world, (rank + 1) * b // world)
            pos = t.positions(b, part)
            assert len(pos) == b // world + t.mixes
            out, out_target = t(x[pos], y[pos], seed, positions=pos, batch=b)
            assert torch.equal(out, whole[part]), (seed, rank)
            assert torch.equal(out_target, target[part])


@pytest.mark.cuda
def test_cuda_matches_cpu_and_never_syncs():
    kw = dict(
        size=24,
        hflip=True,
        color_jitter=0.4,
        hue=0.1,
        random_erasing=0.5,
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
        num_classes=4,
    )
    x, y = images(32, s=28), torch.arange(32) % 4
    for extra in (
        dict(crop_scale=(0.08, 1), policy="randaugment"),
        dict(shift=3, policy="autoaugment"),
        dict(shift=3, degrees=10, scale=(0.9, 1.1)),
    ):
        cpu = BatchTransform(**RGB, **kw, **extra)
        gpu = BatchTransform([0.0] * 3, [1.0] * 3, "cuda", **kw, **extra)
        xc, yc = x.cuda(), y.cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for seed in range(4):
                out, target = gpu(xc, yc, seed)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        want, want_target = cpu(x, y, 3)
        diff = (out.cpu() - want).abs()
        if "policy" in extra:  # a pixel rounded the other way before a policy op can move further
            assert diff.mean() < 1e-2 and (diff > 2 / 255).float().mean() < 0.01
        else:
            assert diff.max() < 1e-3
        torch.testing.assert_close(target.cpu(), want_target)


def test_ops_run_in_the_order_given():
    """aug.order: the default order spelled out is the default; another order is another
    pipeline (here the policy after the jitter), drawing in that order too."""
    kw = dict(size=24, policy="randaugment", color_jitter=0.4, hue=0.1, random_erasing=0.5)
    x, y = images(16, s=28), torch.zeros(16, dtype=torch.long)
    default = BatchTransform(**RGB, **kw)(x, y, 3)[0]
    spelled = BatchTransform(**RGB, **kw, order=list(augment.OPS))
    assert torch.equal(spelled(x, y, 3)[0], default)
    swapped = BatchTransform(**RGB, **kw, order=["color_jitter", "policy", "hue", "random_erasing"])
    assert [type(o) for o in swapped.ops] == [
        augment.CenterCrop,
        augment.ColorJitter,
        augment.Policy,
        augment.Hue,
        augment.RandomErasing,
    ]
    assert not torch.equal(swapped(x, y, 3)[0], default)


@pytest.mark.parametrize(
    "order",
    [["policy", "hue", "brightness"], ["hue"], ["random_erasing", "color_jitter"]],
    ids=["unknown", "an_op_on_left_out", "pixels_after_normalized"],
)
def test_refuses_a_bad_order(order):
    with pytest.raises(UserError, match="aug.order"):
        BatchTransform(**RGB, size=8, color_jitter=0.4, random_erasing=0.5, order=order)


@pytest.mark.parametrize(
    "boxes",
    [
        [[0, 0, 0, 32, 32]],  # the whole image: a resize
        [[0, 3, 5, 20, 30], [1, 0, 0, 7, 9], [1, 10.5, 2.25, 31, 18]],  # down- and upscaled
        [[2, 12, 12, 14, 14]],  # a 2 px box to 24 px
    ],
)
def test_the_crop_is_torchvisions_roi_align(boxes):
    x = images(3).float()
    rois = torch.tensor(boxes, dtype=torch.float32)
    from torchvision.ops import roi_align

    for size in (24, 32, 7):
        want = roi_align(x, rois, size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        assert torch.equal(augment.crop_resize(x, rois, size), want)


def test_deterministic_crops_never_take_the_pure_python_roi_align(monkeypatch):
    """On CUDA under deterministic algorithms torchvision's roi_align runs its Python version,
    which samples every pixel per output bin: B*C*S*S*H*W floats, out of memory at 224 px. That
    version is made to fail here, and the wrapper is made to want it (its other condition for
    it, no compiled ops, stands in for the CUDA input a CPU cannot give)."""
    tv = sys.modules["torchvision.ops.roi_align"]  # the module; the package's name is the function

    def fallback(*args, **kwargs):
        raise AssertionError("the pure-Python roi_align ran")

    monkeypatch.setattr(tv, "_roi_align", fallback)
    monkeypatch.setattr(tv, "_has_ops", lambda: False)
    t = BatchTransform(**RGB, size=24, crop_scale=(0.08, 1.0), hflip=True)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out, _ = t(images(4), torch.zeros(4, dtype=torch.long), 3)
    finally:
        torch.use_deterministic_algorithms(before)
    assert out.shape == (4, 3, 24, 24)


class _Copies(TorchDispatchMode):
    """Counts full copies of a tensor: to another dtype/layout, clones, copies into."""

    COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.clone.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.COPIES or func is torch.ops.aten.copy_.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "kw",
    [
        {},  # evaluation: the centre crop
        dict(shift=3, hflip=True),  # aug=basic
        dict(crop_scale=(0.08, 1.0), hflip=True),  # the crop recipes (float out of roi_align)
        dict(shift=2, policy="randaugment", random_erasing=0.5, mixup_alpha=0.2, num_classes=4),
        dict(shift=2, color_jitter=0.3, cutmix_alpha=1.0, num_classes=4),
    ],
)
def test_channels_last_batches_are_normalized_straight_into_nhwc(kw):
    """The engine makes every batch NHWC for a channels_last model (a no-op when it is); a
    transform built for that layout writes its float output there, one full copy fewer."""
    x, y = images(16, s=28), torch.arange(16) % 4

    def batch(channels_last):
        t = BatchTransform(**RGB, size=24, channels_last=channels_last, **kw)
        with _Copies() as copies:
            out, target = t(x, y, 5)
            out = out.contiguous(memory_format=torch.channels_last)  # engine.Batches
        return out, target, copies.count

    plain, target, before = batch(False)
    nhwc, target_nhwc, after = batch(True)
    assert torch.equal(nhwc, plain) and torch.equal(target_nhwc, target)
    assert nhwc.is_contiguous(memory_format=torch.channels_last)
    assert after == before - 1
    t = BatchTransform(**RGB, size=24, **kw)  # off: NCHW, as before
    assert t(x, y, 5)[0].is_contiguous()
