"""Augmentation of whole uint8 batches with tensor ops on the batch's device.

torchvision's v2 transforms draw one set of random parameters per call, so applied to a batch
every image would get the same shift/flip/box/op. Here each image gets its own, in one batched
op per transform (the way airbench and other fast trainers do it); the per-image policies
(RandAugment, AutoAugment) run once per group of images that drew the same op.

The pipeline is a list of ops (create_ops builds it from the aug settings, in order, as
torchvision's presets and timm's create_transform do): the geometry first, then the registered
ops (OPS) in their registration order or the order aug.order gives. Each op draws all of its
random numbers on the host, for the whole batch, from a generator seeded by the caller, and
applies them to the batch on the device; all ops draw before any applies, and the batch's
parameters reach the device in one small copy: the output depends only on (images, labels,
seed), on every device type, and nothing waits for the device. A part of a batch (a rank's
share under torchrun) can be transformed alone: its images get the parameters they would get
in the whole batch (BatchTransform.positions).

A new op: a subclass of Op with its `keys`, `create`, `draw` and `apply`, registered with
@register(name); its keys declared in schema.AugConfig and configs/aug/none.yaml."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision  # noqa: F401  (registers torch.ops.torchvision)
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

# Private torchvision helpers, reused so the ops stay torchvision's own (checked against
# torchvision 0.29; the tests compare with its public functionals).
from torchvision.transforms.v2.functional._color import _rgb_to_hsv
from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix

from cnntrain.data.loaders import to_device
from cnntrain.errors import UserError


class Normalize:
    """uint8 or float pixels (B,C,H,W) in 0..255 -> float (x/255 - mean) / std: x * scale into a
    new float batch, then - shift in place (the arithmetic of the float conversion followed by
    two in-place ops, bit for bit, in two passes instead of three). `channels_last`: that batch
    is NHWC, the model's layout, so it is not copied once more to change it (the ops after
    normalization work in place and keep the layout)."""

    def __init__(self, mean, std, device, channels_last: bool = False):
        std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = mean / std
        self.layout = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=self.layout)
        return torch.mul(x, self.scale, out=out).sub_(self.shift)


# ---------------------------------------------------------------------- the op protocol


@dataclass(frozen=True)
class Spec:
    """What every op of a pipeline is built for: the model's input size, the number of classes."""

    size: int
    num_classes: int | None = None


@dataclass(frozen=True)
class Batch:
    """What an op's draw sees: the whole batch's size b, the (upsized) images' c, h, w, the
    seed, and `positions`, the images of the batch transformed (None: all of them)."""

    b: int
    c: int
    h: int
    w: int
    seed: int
    positions: torch.Tensor | None = None

    @property
    def n(self) -> int:
        """How many images are transformed."""
        return self.b if self.positions is None else len(self.positions)

    def rows(self, v: torch.Tensor) -> torch.Tensor:
        """Per-image values drawn for the whole batch (so the generator's sequence is the
        whole batch's), kept for the images transformed."""
        return v if self.positions is None else v[self.positions]


class Op:
    """One augmentation: `draw` its random parameters on the host, for a whole batch; `apply`
    them batched on the device. `keys` are the aug settings it reads, with their defaults."""

    keys: dict = {}
    random = True  # False: the same for every seed (the center crop alone)
    normalized = False  # runs on normalized floats (after Normalize); else on pixels 0..255
    pairs = False  # mixes image i with image i - 1: a part of a batch needs the partner

    @classmethod
    def create(cls, at: Spec, **settings) -> Op | None:
        """The op these settings (its keys) ask for; None: they leave it off."""
        raise NotImplementedError

    def draw(self, gen: torch.Generator, batch: Batch) -> tuple[dict, object]:
        """(host tensors, moved to the device with the batch's others; a plan of host-side
        Python values). Nothing here may read the device."""
        return {}, None

    def apply(self, x: torch.Tensor, p: dict, plan) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x, y, p: dict, plan):
        """(images, targets) -> (images, targets); only the mixes change the targets."""
        return self.apply(x, p, plan), y


OPS: dict[str, type[Op]] = {}  # aug.order's names; registration order is the default order


def register(name: str):
    def add(cls: type[Op]) -> type[Op]:
        OPS[name] = cls
        return cls

    return add


# ---------------------------------------------------------------------- the geometry


class CenterCrop(Op):
    """As CenterCrop (a view, no copy): the geometry when none is asked for."""

    random = False

    def __init__(self, size: int):
        self.size = size

    def apply(self, x, p, plan):
        return _center_crop(x, self.size)


class ShiftFlip(Op):
    """= RandomCrop(padding=shift) + flip of the centre crop. Integer shifts and flips are pure
    re-indexing: two gathers on the uint8 pixels, several times cheaper than grid_sample."""

    def __init__(self, size: int, shift: int, hflip: bool):
        self.size, self.shift, self.hflip = size, shift, hflip

    def draw(self, gen, batch):
        host = {}
        host["dy"], host["dx"] = torch.randint(
            0, 2 * self.shift + 1, (2, batch.b, 1), generator=gen
        )
        if self.hflip:
            host["flip"] = torch.rand(batch.b, 1, generator=gen) < 0.5
        return {k: batch.rows(v) for k, v in host.items()}, None

    def apply(self, x, p, plan):
        x = _center_crop(x, self.size)
        b, c, h, w = x.shape
        dev, pad = x.device, self.shift
        if pad:
            x = F.pad(x, (pad, pad, pad, pad))
        rows = torch.arange(h, device=dev) + p["dy"]
        cols = torch.arange(w, device=dev).expand(b, w)
        if self.hflip:
            cols = torch.where(p["flip"], cols.flip(1), cols)
        cols = cols + p["dx"]
        x = x.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w + 2 * pad))
        return x.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))


class Affine(Op):
    """Shift, rotation, zoom and flip of the centre crop as one bilinear grid_sample, in float
    before normalizing, so the zero fill is black as in RandomCrop."""

    def __init__(self, size: int, shift: int, degrees: float, scale, hflip: bool):
        self.size, self.shift, self.degrees = size, shift, degrees
        self.scale, self.hflip = scale, hflip

    def draw(self, gen, batch):
        theta = _affine_theta(*self.params(gen, batch.b), self.size)
        return {"theta": batch.rows(theta)}, None

    def params(self, gen, b):
        """Per image: the shift (dx, dy) in px, the angle in radians, the zoom factor and the
        flip (-1: mirrored, else 1). The zoom is drawn last, so runs without it keep their draws."""
        shift = torch.randint(-self.shift, self.shift + 1, (2, b), generator=gen).float()
        angle = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(self.degrees)
        flip = torch.ones(b)
        if self.hflip:
            flip = torch.where(torch.rand(b, generator=gen) < 0.5, -flip, flip)
        zoom = torch.ones(b)
        if self.scale is not None:
            lo, hi = self.scale
            zoom = torch.rand(b, generator=gen) * (hi - lo) + lo
        return shift, angle, zoom, flip

    def apply(self, x, p, plan):
        x = _center_crop(x, self.size).float()
        grid = F.affine_grid(p["theta"], list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class ResizedCrop(Op):
    """RandomResizedCrop (+ flip) of the whole stored image, per image, as one roi_align."""

    def __init__(self, size: int, crop_scale, crop_ratio, hflip: bool):
        self.size, self.crop_scale, self.hflip = size, crop_scale, hflip
        self.log_ratio = tuple(math.log(float(r)) for r in crop_ratio)

    def draw(self, gen, batch):
        host = {"box": batch.rows(self.boxes(gen, batch.b, batch.h, batch.w))}
        if batch.positions is not None:  # roi_align's rows name their image: its place in the part
            host["box"][:, 0] = torch.arange(len(batch.positions))
        if self.hflip:
            host["flip"] = batch.rows(torch.rand(batch.b, generator=gen) < 0.5)
        return host, None

    def boxes(self, gen, b, h, w) -> torch.Tensor:
        """RandomResizedCrop.get_params for b images at once: 10 tries of (area, log-ratio) per
        image, the first that fits wins, else the central crop of the ratio range.
        Returns (b, 5) rows (image index, x1, y1, x2, y2) as roi_align takes them."""
        (lo, hi), (rlo, rhi) = self.crop_scale, self.log_ratio
        area = torch.rand(b, 10, generator=gen, dtype=torch.float64) * (hi - lo) + lo
        ratio = torch.exp(torch.rand(b, 10, generator=gen, dtype=torch.float64) * (rhi - rlo) + rlo)
        cw = torch.sqrt(area * h * w * ratio).round()
        ch = torch.sqrt(area * h * w / ratio).round()
        ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
        first = ok.to(torch.uint8).argmax(1, keepdim=True)  # index of the first True
        cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
        in_ratio = w / h
        if in_ratio < math.exp(rlo):
            fw, fh = w, int(round(w / math.exp(rlo)))
        elif in_ratio > math.exp(rhi):
            fw, fh = int(round(h * math.exp(rhi))), h
        else:
            fw, fh = w, h
        found = ok.any(1)
        cw = torch.where(found, cw, float(fw))
        ch = torch.where(found, ch, float(fh))
        top = (torch.rand(b, generator=gen, dtype=torch.float64) * (h - ch + 1)).floor()
        left = (torch.rand(b, generator=gen, dtype=torch.float64) * (w - cw + 1)).floor()
        top = torch.where(found, top, float((h - fh) // 2))
        left = torch.where(found, left, float((w - fw) // 2))
        index = torch.arange(b, dtype=torch.float64)
        return torch.stack([index, left, top, left + cw, top + ch], 1).float()

    def apply(self, x, p, plan):
        # aligned=True puts pixel centres at +0.5, so a box (x1, y1, x2, y2) covers exactly those
        # pixels; sampling_ratio=-1 takes ceil(box/size) bilinear samples per output pixel and
        # dimension, i.e. averages over the footprint when downscaling (an antialias).
        x = crop_resize(x.float(), p["box"], self.size)
        if self.hflip:
            x = torch.where(p["flip"].view(-1, 1, 1, 1), x.flip(3), x)
        return x


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision.ops.roi_align(x, boxes, size, 1.0, sampling_ratio=-1, aligned=True), always
    through its compiled kernel. torchvision's wrapper swaps in a pure-Python version on CUDA
    under deterministic algorithms, because the kernel's *backward* adds with atomics; that
    version with sampling_ratio=-1 samples every input pixel for every output bin, a
    B*C*S*S*H*W tensor (out of memory at once at 224 px). A crop of augmentation has no backward,
    and the forward kernel is deterministic (one thread writes each output from a fixed loop), so
    the kernel is the right call whatever the setting."""
    return torch.ops.torchvision.roi_align(x, boxes, 1.0, size, size, -1, True)


# the keys of an aug.<kind> section, with their defaults; crop_ratio is no aug key (always
# torchvision's default range), given only by the tests
GEOMETRY = dict(
    shift=0, degrees=0.0, scale=None, hflip=False, crop_scale=None, crop_ratio=(3 / 4, 4 / 3)
)


def create_geometry(at: Spec, shift, degrees, scale, hflip, crop_scale, crop_ratio) -> Op:
    """The one geometric op of the pipeline: a random-resized crop, else a resampled affine
    (rotation or zoom), else shifts/flips (re-indexing only), else the centre crop."""
    shift, degrees, hflip = int(shift), float(degrees), bool(hflip)
    scale = None if scale is None else tuple(float(s) for s in scale)
    if scale is not None and not 0 < scale[0] <= scale[1]:
        raise ValueError(f"scale={scale}: want 0 < lo <= hi")
    resampled = degrees > 0 or scale is not None
    if crop_scale is not None:
        crop_scale = tuple(float(s) for s in crop_scale)
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale={crop_scale}: want 0 < lo <= hi <= 1")
        if shift or resampled:
            raise ValueError(
                "crop_scale (random-resized crop) replaces shift/degrees/scale: give one"
            )
        return ResizedCrop(at.size, crop_scale, crop_ratio, hflip)
    if resampled:
        return Affine(at.size, shift, degrees, scale, hflip)
    if shift or hflip:
        return ShiftFlip(at.size, shift, hflip)
    return CenterCrop(at.size)


# ---------------------------------------------------------------------- the registered ops


# The policies' geometric ops, done here as one grid_sample over all images that drew any of
# them, each with its own matrix: torchvision's F.affine/F.rotate take one matrix per call and
# build it with torch.tensor(..., device=...), a blocking copy (a sync on CUDA) per call.
_GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


@register("policy")
class Policy(Op):
    """RandAugment or AutoAugment on uint8 pixels, per image: torchvision's op tables and op
    code, each op run once on the group of images that drew it."""

    keys = {"policy": None}

    @classmethod
    def create(cls, at, policy):
        if policy not in (None, "randaugment", "autoaugment"):
            raise ValueError(f"policy={policy!r}: want randaugment, autoaugment or None")
        return None if policy is None else cls(at.size, policy)

    def __init__(self, size: int, policy: str):
        self.size = size
        # torchvision's transform object, for its op tables and op implementations
        self.policy = v2.RandAugment() if policy == "randaugment" else v2.AutoAugment()
        self._magnitudes, self._thetas = {}, {}  # memos of the policies' tables

    def draw(self, gen, batch):
        host = {}
        plan = self._plan(self.stages(gen, batch.b, batch.positions), batch.n, host)
        return host, plan

    def stages(self, gen, b, positions=None) -> list:
        """Per stage (op slot) and image (those at `positions` of the b), the (op, magnitude)
        that torchvision's policy would draw for it, ("Identity", 0.0) for none."""

        def mine(v):  # drawn for all b images (the generator's sequence), kept for positions
            return (v if positions is None else v[..., positions]).tolist()

        if isinstance(self.policy, v2.RandAugment):
            ra, names = self.policy, list(self.policy._AUGMENTATION_SPACE)
            ops = mine(torch.randint(len(names), (ra.num_ops, b), generator=gen))
            neg = mine(torch.rand(ra.num_ops, b, generator=gen) <= 0.5)
            return [
                [
                    (names[op], self._magnitude(names[op], ra.num_magnitude_bins, ra.magnitude, n))
                    for op, n in zip(ops[k], neg[k])
                ]
                for k in range(ra.num_ops)
            ]
        policies = self.policy._policies
        which = mine(torch.randint(len(policies), (b,), generator=gen))
        u_apply = mine(torch.rand(2, b, generator=gen))
        neg = mine(torch.rand(2, b, generator=gen) <= 0.5)
        stages = [[("Identity", 0.0)] * len(which) for _ in range(2)]
        for k in range(2):
            for i in range(len(which)):
                name, prob, idx = policies[which[i]][k]
                if u_apply[k][i] <= prob:
                    stages[k][i] = (name, self._magnitude(name, 10, idx, neg[k][i]))
        return stages

    def _magnitude(self, name, bins, index, negative) -> float:
        """torchvision's magnitude table and sign rule (tables memoized: a linspace each)"""
        key = name, bins, index
        if key not in self._magnitudes:
            table, signed = self.policy._AUGMENTATION_SPACE[name]
            table = table(bins, self.size, self.size)
            self._magnitudes[key] = (0.0 if table is None else float(table[index])), signed
        m, signed = self._magnitudes[key]
        return -m if signed and negative else m

    def _plan(self, stages, n, host) -> list:
        """Per stage, a permutation of the images that makes those with the same (op,
        magnitude) contiguous, so each op runs once on a slice (no boolean masks, no per-group
        index tensors). Returns per stage a list of (op, magnitude, start, stop); the
        permutations (and the geometric ops' matrices) go into `host`."""
        plan, cur = [], list(range(n))  # cur[k]: the original index of the image at position k
        for k, stage in enumerate(stages):
            groups: dict = {}
            for pos, i in enumerate(cur):
                name, mag = stage[i]
                # all geometric ops of a stage share one grid_sample
                key = ("affine", 0.0) if name in _GEOMETRIC else (name, mag)
                groups.setdefault(key, []).append(pos)
            order = [pos for g in groups.values() for pos in g]
            cur = [cur[pos] for pos in order]
            steps, start = [], 0
            for (name, mag), g in groups.items():
                if name == "affine":
                    host[f"theta{k}"] = torch.stack(
                        [self._theta(*stage[cur[pos]]) for pos in range(start, start + len(g))]
                    )
                if name != "Identity":
                    steps.append((name, mag, start, start + len(g)))
                start += len(g)
            host[f"order{k}"] = torch.tensor(order)
            plan.append(steps)
        host["unorder"] = torch.argsort(torch.tensor(cur))
        return plan

    def _theta(self, name, mag) -> torch.Tensor:
        key = name, mag  # a handful of distinct ones; building one costs ~20 us
        if key not in self._thetas:
            self._thetas[key] = _policy_theta(name, mag, self.size)
        return self._thetas[key]

    def apply(self, x, p, plan):
        if x.is_floating_point():  # after a resampling geometry
            x = x.round_().clamp_(0, 255).to(torch.uint8)
        for k, steps in enumerate(plan):
            x = x[p[f"order{k}"]]
            parts, done = [], 0
            for name, mag, start, stop in steps:
                parts.append(x[done:start])
                parts.append(self.op(x[start:stop], name, mag, p.get(f"theta{k}")))
                done = stop
            parts.append(x[done:])
            x = torch.cat(parts)
        return x[p["unorder"]]

    def op(self, x, name, mag, theta):
        """One policy op on a group of images. The other ops are torchvision's own code; its
        AutoContrast and Sharpness kernels would sync on CUDA (a boolean-mask assignment, a
        kernel tensor made with torch.tensor(..., device=...)), so those two are rewritten."""
        if name == "affine":
            return _grid_nearest(x, theta)
        if name == "AutoContrast":
            return _autocontrast(x)
        if name == "Sharpness":
            return _sharpness(x, 1.0 + mag)
        return self.policy._apply_image_or_video_transform(
            x, name, mag, interpolation=InterpolationMode.NEAREST, fill=self.policy._fill
        )


def _uniform(gen, shape, lo, hi) -> torch.Tensor:
    return torch.rand(shape, generator=gen, dtype=torch.float32) * (hi - lo) + lo


@register("color_jitter")
class ColorJitter(Op):
    """Brightness, contrast and saturation (RGB) factors from [1 - x, 1 + x] per image, in that
    fixed order (torchvision's ColorJitter shuffles it), as batched blends clamped to 0..255
    after each like torchvision."""

    keys = {"color_jitter": 0.0}

    @classmethod
    def create(cls, at, color_jitter):
        return cls(float(color_jitter)) if color_jitter else None

    def __init__(self, jitter: float):
        self.lo, self.hi = max(0.0, 1 - jitter), 1 + jitter

    def draw(self, gen, batch):
        host = {}
        host["brightness"], host["contrast"] = _uniform(gen, (2, batch.b), self.lo, self.hi)
        if batch.c == 3:
            host["saturation"] = _uniform(gen, batch.b, self.lo, self.hi)
        return {k: batch.rows(v) for k, v in host.items()}, None

    def apply(self, x, p, plan):
        x = x.float()  # a copy of uint8 pixels, so the blends below may work in place
        b, c = x.shape[:2]
        x.mul_(p["brightness"].view(b, 1, 1, 1)).clamp_(0, 255)
        f = p["contrast"].view(b, 1, 1, 1)
        mean = (TF.rgb_to_grayscale(x) if c == 3 else x).mean((1, 2, 3), keepdim=True)
        x = x.mul_(f).add_(mean * (1 - f)).clamp_(0, 255)
        if c == 3:
            f = p["saturation"].view(b, 1, 1, 1)
            gray = TF.rgb_to_grayscale(x)  # before x changes in place
            x = x.mul_(f).add_(gray * (1 - f)).clamp_(0, 255)
        return x


@register("hue")
class Hue(Op):
    """A hue shift from [-x, x] per image (RGB; gray images are left as they are)."""

    keys = {"hue": 0.0}

    @classmethod
    def create(cls, at, hue):
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue={hue}: want 0..0.5")
        return cls(float(hue)) if hue else None

    def __init__(self, hue: float):
        self.hue = hue

    def draw(self, gen, batch):
        if batch.c != 3:
            return {}, None
        return {"hue": batch.rows(_uniform(gen, batch.b, -self.hue, self.hue))}, None

    def apply(self, x, p, plan):
        if x.shape[1] != 3:
            return x
        hsv = _rgb_to_hsv(x.float().div_(255))
        hsv[:, 0].add_(p["hue"].view(-1, 1, 1)).remainder_(1.0)
        return _hsv_to_rgb(hsv).mul_(255)


@register("random_erasing")
class RandomErasing(Op):
    """RandomErasing (its defaults): with probability p one random box per image set to 0
    after normalization, i.e. to the mean colour."""

    keys = {"random_erasing": 0.0}
    normalized = True

    @classmethod
    def create(cls, at, random_erasing):
        return cls(at.size, float(random_erasing)) if random_erasing > 0 else None

    def __init__(self, size: int, p: float):
        self.size, self.p = size, p

    def draw(self, gen, batch):
        """RandomErasing.get_params for all images at once; an image whose 10 tries all fail,
        or that loses the p coin, gets an empty box. Rows (top, left, h, w)."""
        b, s = batch.b, self.size
        apply = torch.rand(b, generator=gen) < self.p
        area = (torch.rand(b, 10, generator=gen, dtype=torch.float64) * 0.31 + 0.02) * s * s
        lr = math.log(0.3), math.log(3.3)
        ratio = torch.exp(
            torch.rand(b, 10, generator=gen, dtype=torch.float64) * (lr[1] - lr[0]) + lr[0]
        )
        eh, ew = torch.sqrt(area * ratio).round(), torch.sqrt(area / ratio).round()
        ok = (eh < s) & (ew < s)
        first = ok.to(torch.uint8).argmax(1, keepdim=True)
        eh, ew = eh.gather(1, first)[:, 0], ew.gather(1, first)[:, 0]
        top = (torch.rand(b, generator=gen, dtype=torch.float64) * (s - eh + 1)).floor()
        left = (torch.rand(b, generator=gen, dtype=torch.float64) * (s - ew + 1)).floor()
        eh = torch.where(apply & ok.any(1), eh, 0.0)
        return {"erase": batch.rows(torch.stack([top, left, eh, ew], 1).float())}, None

    def apply(self, x, p, plan):
        b, _, h, w = x.shape
        top, left, eh, ew = (v.view(b, 1, 1) for v in p["erase"].unbind(1))
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        box = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
        return x.masked_fill_(box.unsqueeze(1), 0.0)


@register("mix")
class Mix(Op):
    """MixUp or CutMix (each batch one of the two when both are on) of the batch with itself
    rolled by one, as v2.MixUp/v2.CutMix, with soft targets."""

    keys = {"mixup_alpha": 0.0, "cutmix_alpha": 0.0}
    normalized = pairs = True

    @classmethod
    def create(cls, at, mixup_alpha, cutmix_alpha):
        alphas = [("mixup", float(mixup_alpha))] * (mixup_alpha > 0)
        alphas += [("cutmix", float(cutmix_alpha))] * (cutmix_alpha > 0)
        if alphas and not at.num_classes:
            raise ValueError("mixup/cutmix need num_classes")
        return cls(at, alphas) if alphas else None

    def __init__(self, at: Spec, alphas: list):
        self.size, self.num_classes, self.alphas = at.size, at.num_classes, alphas

    def draw(self, gen, batch):
        """The plan (lambda, CutMix box or None), one per batch."""
        kind, alpha = self.alphas[0]
        if len(self.alphas) == 2 and torch.rand((), generator=gen) >= 0.5:
            kind, alpha = self.alphas[1]
        # torch's Beta has no generator argument
        lam = float(np.random.default_rng(batch.seed).beta(alpha, alpha))
        if kind == "mixup":
            return {}, (lam, None)
        s = self.size  # as v2.CutMix, with lambda corrected for the clipped box
        r_x, r_y = torch.randint(s, (2,), generator=gen).tolist()
        r = 0.5 * math.sqrt(1.0 - lam)
        rw, rh = int(r * s), int(r * s)
        x1, y1 = max(r_x - rw, 0), max(r_y - rh, 0)
        x2, y2 = min(r_x + rw, s), min(r_y + rh, s)
        return {}, (1.0 - (x2 - x1) * (y2 - y1) / (s * s), (x1, y1, x2, y2))

    def __call__(self, x, y, p, plan):
        lam, box = plan
        rolled = x.roll(1, 0)
        if box is None:
            x = x.mul_(lam).add_(rolled, alpha=1.0 - lam)
        else:
            x1, y1, x2, y2 = box
            x[..., y1:y2, x1:x2] = rolled[..., y1:y2, x1:x2]
        target = torch.zeros(len(y), self.num_classes, device=x.device)
        for labels, weight in ((y, lam), (y.roll(1), 1.0 - lam)):
            target.scatter_add_(
                1, labels.view(-1, 1), torch.full((len(y), 1), weight, device=x.device)
            )
        return x, target


# ---------------------------------------------------------------------- the pipeline


def create_ops(settings: dict, *, size: int, num_classes: int | None = None) -> list[Op]:
    """The ops the aug settings (the aug keys, the geometry's those of one aug.<kind>) ask for,
    in the order they run: the geometry, then the registered ops in aug.order's order (None:
    their registration order). Settings not given take each op's default."""
    settings = dict(settings)
    order = settings.pop("order", None)
    known = {*GEOMETRY, *(k for op in OPS.values() for k in op.keys)}
    if set(settings) - known:
        raise TypeError(f"unknown augmentation settings: {sorted(set(settings) - known)}")
    at = Spec(int(size), num_classes)

    def read(keys: dict) -> dict:
        return {k: settings.get(k, default) for k, default in keys.items()}

    made = {name: op.create(at, **read(op.keys)) for name, op in OPS.items()}
    ops = [create_geometry(at, **read(GEOMETRY))]
    ops += [made[name] for name in _ordered(order, made) if made[name] is not None]
    return ops


def _ordered(order, made: dict) -> list[str]:
    """aug.order checked: known names, each once, every op that is on among them, and those on
    normalized images (random erasing, mixes) after those on pixels."""
    if order is None:
        return list(made)
    order = list(order)
    unknown = [name for name in order if name not in made]
    missing = [name for name, op in made.items() if op is not None and name not in order]
    if unknown or missing or len(set(order)) != len(order):
        raise UserError(
            f"aug.order={order}: give each of {', '.join(made)} at most once, and every "
            f"op that is on ({', '.join(n for n, op in made.items() if op is not None)})"
        )
    stages = [made[name].normalized for name in order if made[name] is not None]
    if stages != sorted(stages):  # False (on pixels) sorts before True (on normalized images)
        normalized = [name for name, op in made.items() if op is not None and op.normalized]
        raise UserError(
            f"aug.order={order}: {', '.join(normalized)} run on normalized images, after "
            "the ops on pixels"
        )
    return order


class BatchTransform:
    """uint8 batch (B,C,S,S) on the training device -> normalized float (B,C,size,size), plus
    targets: images smaller than size resized up to it (built-in datasets are stored at their
    native size, so a 32 px set is not held at 224 px on the device), then the ops of
    create_ops(settings) in order, normalized before the first op on normalized images."""

    def __init__(
        self, mean, std, device, *, size: int, num_classes=None, channels_last=False, **settings
    ):
        self.device = torch.device(device)
        self.normalize = Normalize(mean, std, self.device, channels_last)
        self.size, self.num_classes = int(size), num_classes
        self.ops = create_ops(settings, size=self.size, num_classes=num_classes)
        self.random = any(op.random for op in self.ops)
        self.mixes = any(op.pairs for op in self.ops)

    def positions(self, batch: int, part: slice) -> torch.Tensor:
        """Which images of a batch of `batch` the outputs `part` (a contiguous slice) are made
        from: those of `part`, led, with MixUp/CutMix (image i mixed with image i - 1), by the
        partner of its first."""
        pos = torch.arange(batch)[part]
        if self.mixes and len(pos):
            pos = torch.cat([(pos[:1] - 1) % batch, pos])
        return pos

    def __call__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        seed: int,
        positions: torch.Tensor | None = None,
        batch: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`positions` (from self.positions) given: x and y are those images of a batch of `batch`,
        and the result is exactly the outputs `part` of transforming the whole batch."""
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise TypeError(f"want uint8 images (B,C,H,W), got {x.dtype} {tuple(x.shape)}")
        x = self._upsize(x)
        if not self.random or not len(x):  # empty: a rank's share of a short last batch
            if self.mixes:  # (only an empty batch gets here with mixes: they are random)
                y = torch.zeros(0, self.num_classes, device=x.device)
            return self.normalize(_center_crop(x, self.size)), y
        b, c, h, w = x.shape
        gen = torch.Generator().manual_seed(seed)
        whole = Batch(b if positions is None else batch, c, h, w, seed, positions)
        drawn = [op.draw(gen, whole) for op in self.ops]  # all before any op runs on the device
        params = _all_to_device([host for host, _ in drawn], x.device)
        normalized = False
        for op, p, (_, plan) in zip(self.ops, params, drawn):
            if op.normalized and not normalized:
                x, normalized = self.normalize(x), True
            x, y = op(x, y, p, plan)
        if not normalized:
            x = self.normalize(x)
        if positions is not None and self.mixes:  # the leading image was only a partner
            x, y = x[1:], y[1:]
        return x, y

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images (B,C,S,S) as stored -> the uint8 (B,C,size,size) pixels an unaugmented
        pass normalizes (resized up if smaller, center-cropped if larger): what an exported
        model with the normalization inside its graph takes (cnnexport)."""
        return _center_crop(self._upsize(x), self.size)

    def _upsize(self, x):
        """Images smaller than size resized to it, as the whole set once was on the host
        (TF.resize of uint8, antialiased): on the CPU bitwise the same pixels."""
        h, w = x.shape[-2:]
        s = self.size
        return TF.resize(x, [s, s], antialias=True) if h < s or w < s else x


def _center_crop(x, s):
    h, w = x.shape[-2:]
    top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
    return x[..., top : top + s, left : left + s]


def _all_to_device(hosts: list[dict], device: torch.device) -> list[dict]:
    """Every op's parameters in the one copy of _to_device."""
    flat = {(i, k): v for i, host in enumerate(hosts) for k, v in host.items()}
    if not flat:  # nothing per image (a mix alone): nothing to copy
        return hosts
    moved = _to_device(flat, device)
    return [{k: moved[i, k] for k in host} for i, host in enumerate(hosts)]


# ---------------------------------------------------------------------- helpers


def _to_device(host: dict, device: torch.device) -> dict:
    """All of a batch's parameters in one host->device copy (loaders.to_device: pinned on CUDA,
    no wait for the device)."""
    if device.type == "cpu":
        return host
    return _unpack(to_device([_pack(host)], device)[0], host)


def _pack(host: dict) -> torch.Tensor:
    """One float32 vector: integers (indices, pixel offsets) are exact below 2**24."""
    return torch.cat([v.reshape(-1).float() for v in host.values()])


def _unpack(flat: torch.Tensor, host: dict) -> dict:
    pieces = flat.split([v.numel() for v in host.values()])
    return {k: p.view(v.shape).to(v.dtype) for (k, v), p in zip(host.items(), pieces)}


def _affine_theta(shift, angle, zoom, flip, s) -> torch.Tensor:
    """(b, 2, 3) sampling matrices for affine_grid: output coordinates -> input coordinates.
    An image zoomed by z samples its input at coordinates / z, as torchvision's affine(scale=z)."""
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # Normalized coordinates span 2 units over s pixels, so a shift of k pixels is 2k/s.
    # With align_corners=False, integer shifts land on pixel centres: exact copies.
    return torch.stack(
        [
            torch.stack([cos * flip, -sin, 2 * shift[0] / s], 1),
            torch.stack([sin * flip, cos, 2 * shift[1] / s], 1),
        ],
        1,
    )


def _policy_theta(name, mag, s) -> torch.Tensor:
    """The (3, 2) sampling matrix (transposed, rescaled to normalized coordinates) that
    torchvision's F.affine / F.rotate build for this op of _apply_image_or_video_transform."""
    centre = [-s * 0.5, -s * 0.5]  # the shears use center=[0, 0], the top-left corner
    if name == "ShearX":
        m = _get_inverse_affine_matrix(
            centre, 0.0, [0.0, 0.0], 1.0, [math.degrees(math.atan(mag)), 0.0]
        )
    elif name == "ShearY":
        m = _get_inverse_affine_matrix(
            centre, 0.0, [0.0, 0.0], 1.0, [0.0, math.degrees(math.atan(mag))]
        )
    elif name == "TranslateX":
        m = _get_inverse_affine_matrix([0.0, 0.0], 0.0, [float(int(mag)), 0.0], 1.0, [0.0, 0.0])
    elif name == "TranslateY":
        m = _get_inverse_affine_matrix([0.0, 0.0], 0.0, [0.0, float(int(mag))], 1.0, [0.0, 0.0])
    else:  # Rotate; F.rotate negates the angle mod 360
        m = _get_inverse_affine_matrix([0.0, 0.0], -(mag % 360), [0.0, 0.0], 1.0, [0.0, 0.0])
    theta = torch.tensor(m, dtype=torch.float32).view(2, 3)
    return theta.t() / torch.tensor([0.5 * s, 0.5 * s])


def _grid_nearest(x, theta):
    """torchvision's _affine_grid + _apply_grid_transform (nearest, zero fill), one matrix per image."""
    n, _, h, w = x.shape
    base = torch.empty(1, h, w, 3, device=x.device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=x.device))
    base[..., 1].copy_(
        torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=x.device).unsqueeze_(-1)
    )
    base[..., 2].fill_(1)
    grid = base.view(1, h * w, 3).expand(n, -1, -1).bmm(theta).view(n, h, w, 2)
    out = F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round_().to(x.dtype)


def _autocontrast(x):
    """F.autocontrast on uint8, without its boolean-mask assignments."""
    xf = x.float()
    lo = xf.amin((-2, -1), keepdim=True)
    hi = xf.amax((-2, -1), keepdim=True)
    flat = hi == lo
    lo = torch.where(flat, 0.0, lo)
    inv_scale = torch.where(flat, 1.0, (hi - lo) * (1.0 / 255))
    return xf.sub_(lo).div_(inv_scale).clamp_(0, 255).to(x.dtype)


def _sharpness(x, factor):
    """F.adjust_sharpness on uint8, with its 3x3 kernel built on the device."""
    c = x.shape[1]
    if x.shape[-1] <= 2 or x.shape[-2] <= 2:
        return x
    kernel = torch.full((c, 1, 3, 3), 1.0 / 13.0, device=x.device)
    kernel[:, :, 1, 1] = 5.0 / 13.0
    out = x.float()
    blurred = F.conv2d(out, kernel, groups=c).round_()
    view = out[..., 1:-1, 1:-1]
    view.add_(blurred.sub_(view), alpha=1.0 - factor)
    return out.clamp_(0, 255).to(x.dtype)


def _hsv_to_rgb(hsv):
    """HSV (B,3,H,W) in 0..1 -> RGB, batched. torchvision's _hsv_to_rgb copies a lookup table
    from the host on every call; this closed form needs none."""
    h, s, v = hsv.unbind(1)
    out = []
    for n in (5, 3, 1):  # R, G, B
        k = (h * 6 + n).remainder_(6)
        out.append(v - v * s * torch.minimum(k, 4 - k).clamp_(0, 1))
    return torch.stack(out, 1)
