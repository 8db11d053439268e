"""Augmentation of whole uint8 batches with tensor ops on the batch's device.

torchvision's v2 transforms draw one set of random parameters per call, so applied to a batch
every image would get the same shift/flip/box/op. Here each image gets its own, in one batched
op per transform (the way airbench and other fast trainers do it); the per-image policies
(RandAugment, AutoAugment) run once per group of images that drew the same op.

Every random number is drawn on the host from a generator seeded by the caller, and the batch's
parameters reach the device in one small copy: the output depends only on (images, labels,
seed), on every device type, and nothing waits for the device. A part of a batch (a rank's
share under torchrun) can be transformed alone: its images get the parameters they would get
in the whole batch (BatchTransform.positions)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

# Private torchvision helpers, reused so the ops stay torchvision's own (checked against
# torchvision 0.29; the tests compare with its public functionals).
from torchvision.transforms.v2.functional._color import _rgb_to_hsv
from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix


class Normalize:
    """uint8 or float pixels (B,C,H,W) in 0..255 -> float (x/255 - mean) / std, in two in-place ops."""

    def __init__(self, mean, std, device):
        std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = mean / std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mul_(self.scale).sub_(self.shift)


# The policies' geometric ops, done here as one grid_sample over all images that drew any of
# them, each with its own matrix: torchvision's F.affine/F.rotate take one matrix per call and
# build it with torch.tensor(..., device=...), a blocking copy (a sync on CUDA) per call.
_GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


class BatchTransform:
    """uint8 batch (B,C,S,S) on the training device -> normalized float (B,C,size,size), plus targets.

    In order: images smaller than size resized up to it (built-in datasets are stored at their
    native size, so a 32 px set is not held at 224 px on the device), geometry (random-resized
    crop, or center crop + shift/flip/rotation/zoom), the policy (randaugment | autoaugment) on uint8
    pixels, colour jitter (brightness, contrast, saturation, hue, in that fixed order;
    torchvision's ColorJitter shuffles it), normalization, random erasing, then MixUp/CutMix
    with soft targets."""

    def __init__(
        self,
        mean,
        std,
        device,
        *,
        size: int,
        shift: int = 0,
        degrees: float = 0.0,
        scale=None,
        hflip: bool = False,
        crop_scale=None,
        crop_ratio=(3 / 4, 4 / 3),
        color_jitter: float = 0.0,
        hue: float = 0.0,
        policy: str | None = None,
        random_erasing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        num_classes: int | None = None,
    ):
        self.device = torch.device(device)
        self.normalize = Normalize(mean, std, self.device)
        self.size = int(size)
        self.shift, self.degrees, self.hflip = int(shift), float(degrees), bool(hflip)
        self.scale = None if scale is None else tuple(float(s) for s in scale)
        if self.scale is not None and not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale={scale}: want 0 < lo <= hi")
        # rotation and zoom resample the image (grid_sample); shifts and flips alone only re-index it
        self.affine = self.degrees > 0 or self.scale is not None
        self.crop_scale = None if crop_scale is None else tuple(float(s) for s in crop_scale)
        self.log_ratio = tuple(math.log(float(r)) for r in crop_ratio)
        if self.crop_scale is not None:
            lo, hi = self.crop_scale
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"crop_scale={crop_scale}: want 0 < lo <= hi <= 1")
            if self.shift or self.affine:
                raise ValueError(
                    "crop_scale (random-resized crop) replaces shift/degrees/scale: give one"
                )
        self.jitter = float(color_jitter)
        self.hue = float(hue)
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue={hue}: want 0..0.5")
        if policy not in (None, "randaugment", "autoaugment"):
            raise ValueError(f"policy={policy!r}: want randaugment, autoaugment or None")
        # torchvision's transform objects, for their op tables and op implementations
        self.policy = {None: None, "randaugment": v2.RandAugment, "autoaugment": v2.AutoAugment}[
            policy
        ]
        self.policy = self.policy() if self.policy else None
        self._magnitudes, self._thetas = {}, {}  # memos of the policies' tables
        self.erase_p = float(random_erasing)
        self.mix_alphas = [("mixup", float(mixup_alpha))] * (mixup_alpha > 0)
        self.mix_alphas += [("cutmix", float(cutmix_alpha))] * (cutmix_alpha > 0)
        if self.mix_alphas and not num_classes:
            raise ValueError("mixup/cutmix need num_classes")
        self.num_classes = num_classes
        self.random = bool(
            self.crop_scale
            or self.shift
            or self.affine
            or self.hflip
            or self.jitter
            or self.hue
            or self.policy
            or self.erase_p
            or self.mix_alphas
        )

    # ------------------------------------------------------------------ call

    def positions(self, batch: int, part: slice) -> torch.Tensor:
        """Which images of a batch of `batch` the outputs `part` (a contiguous slice) are made
        from: those of `part`, led, with MixUp/CutMix (image i mixed with image i - 1), by the
        partner of its first."""
        pos = torch.arange(batch)[part]
        if self.mix_alphas and len(pos):
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
        if not self.random:
            return self.normalize(self._center_crop(x)), y
        if not len(x):  # a rank's empty share of a short last batch; grid ops refuse no images
            target = torch.zeros(0, self.num_classes, device=x.device) if self.mix_alphas else y
            return self.normalize(self._center_crop(x)), target
        b, c, h, w = x.shape
        gen = torch.Generator().manual_seed(seed)
        host, plan = self._draw(gen, seed, b if positions is None else batch, c, h, w, positions)
        p = _to_device(host, x.device)

        if self.crop_scale is not None:
            x = self._resized_crop(x, p)
        elif self.affine:  # before normalizing, so the zero fill is black as in RandomCrop
            x = self._affine(self._center_crop(x).float(), p)
        elif self.shift or self.hflip:
            x = self._shift_flip(self._center_crop(x), p)
        else:
            x = self._center_crop(x)
        if self.policy is not None:
            if x.is_floating_point():
                x = x.round_().clamp_(0, 255).to(torch.uint8)
            x = self._policy(x, plan["policy"], p)
        if self.jitter or self.hue:
            x = self._color(x.float(), p)
        x = self.normalize(x)
        if self.erase_p > 0:
            x = self._erase(x, p)
        if self.mix_alphas:
            x, y = self._mix(x, y, plan["mix"])
            if positions is not None:  # the leading image was only a partner
                x, y = x[1:], y[1:]
        return x, y

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images (B,C,S,S) as stored -> the uint8 (B,C,size,size) pixels an unaugmented
        pass normalizes (resized up if smaller, center-cropped if larger): what an exported
        model with the normalization inside its graph takes (cnnexport)."""
        return self._center_crop(self._upsize(x))

    # ------------------------------------------------------------------ host-side draws

    def _draw(
        self,
        gen: torch.Generator,
        seed: int,
        b: int,
        c: int,
        h: int,
        w: int,
        positions: torch.Tensor | None = None,
    ):
        """Every random parameter of a batch of b images, as host tensors (moved to the device
        together) and a plan of host-side Python values (groups, mix box): nothing here reads the
        device. With `positions`, the per-image ones are those images' rows: each is drawn for
        the whole batch, so that the generator's sequence is the whole batch's."""

        def uniform(shape, lo, hi, dtype=torch.float32):
            return torch.rand(shape, generator=gen, dtype=dtype) * (hi - lo) + lo

        host, plan, grouped = {}, {}, {}  # host: per image, batch-first; grouped: the policy's
        s = self.size
        if self.crop_scale is not None:
            host["box"] = self._draw_boxes(gen, b, h, w)
            if self.hflip:
                host["flip"] = torch.rand(b, generator=gen) < 0.5
        elif self.affine:
            host["theta"] = _affine_theta(*self._draw_affine(gen, b), s)
        elif self.shift or self.hflip:
            host["dy"], host["dx"] = torch.randint(0, 2 * self.shift + 1, (2, b, 1), generator=gen)
            if self.hflip:
                host["flip"] = torch.rand(b, 1, generator=gen) < 0.5
        if self.policy is not None:
            plan["policy"] = self._plan_policy(gen, b, grouped, positions)
        if self.jitter:
            lo, hi = max(0.0, 1 - self.jitter), 1 + self.jitter
            host["brightness"], host["contrast"] = uniform((2, b), lo, hi)
            if c == 3:
                host["saturation"] = uniform(b, lo, hi)
        if self.hue and c == 3:
            host["hue"] = uniform(b, -self.hue, self.hue)
        if self.erase_p > 0:
            host["erase"] = self._draw_erase(gen, b, s)
        if self.mix_alphas:
            kind, alpha = self.mix_alphas[0]
            if len(self.mix_alphas) == 2 and torch.rand((), generator=gen) >= 0.5:
                kind, alpha = self.mix_alphas[1]
            # torch's Beta has no generator argument
            lam = float(np.random.default_rng(seed).beta(alpha, alpha))
            box = None
            if kind == "cutmix":  # as v2.CutMix, with lambda corrected for the clipped box
                r_x, r_y = torch.randint(s, (2,), generator=gen).tolist()
                r = 0.5 * math.sqrt(1.0 - lam)
                rw, rh = int(r * s), int(r * s)
                x1, y1 = max(r_x - rw, 0), max(r_y - rh, 0)
                x2, y2 = min(r_x + rw, s), min(r_y + rh, s)
                box = (x1, y1, x2, y2)
                lam = 1.0 - (x2 - x1) * (y2 - y1) / (s * s)
            plan["mix"] = (lam, box)
        if positions is not None:
            host = {k: v[positions] for k, v in host.items()}
            if "box" in host:  # roi_align's rows name their image: now its place in the part
                host["box"][:, 0] = torch.arange(len(positions))
        return {**host, **grouped}, plan

    def _draw_affine(self, gen, b):
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

    def _draw_boxes(self, gen, b, h, w) -> torch.Tensor:
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

    def _draw_erase(self, gen, b, s) -> torch.Tensor:
        """RandomErasing.get_params (its defaults) for b images at once; an image whose 10
        tries all fail, or that loses the p coin, gets an empty box. Rows (top, left, h, w)."""
        apply = torch.rand(b, generator=gen) < self.erase_p
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
        return torch.stack([top, left, eh, ew], 1).float()

    def _draw_policy(self, gen, b, positions=None) -> list:
        """Per stage (op slot) and image (those at `positions` of the b), the (op, magnitude)
        that torchvision's policy would draw for it, ("Identity", 0.0) for none."""
        space, cache = self.policy._AUGMENTATION_SPACE, self._magnitudes

        def mag(name, bins, index, negative) -> float:
            """torchvision's magnitude table and sign rule (tables memoized: a linspace each)"""
            key = name, bins, index
            if key not in cache:
                table, signed = space[name]
                table = table(bins, self.size, self.size)
                cache[key] = (0.0 if table is None else float(table[index])), signed
            m, signed = cache[key]
            return -m if signed and negative else m

        def mine(v):  # drawn for all b images (the generator's sequence), kept for positions
            return (v if positions is None else v[..., positions]).tolist()

        stages = []
        if isinstance(self.policy, v2.RandAugment):
            ra = self.policy
            names = list(space)
            ops = mine(torch.randint(len(names), (ra.num_ops, b), generator=gen))
            neg = mine(torch.rand(ra.num_ops, b, generator=gen) <= 0.5)
            for k in range(ra.num_ops):
                stages.append(
                    [
                        (names[op], mag(names[op], ra.num_magnitude_bins, ra.magnitude, n))
                        for op, n in zip(ops[k], neg[k])
                    ]
                )
        else:
            policies = self.policy._policies
            which = mine(torch.randint(len(policies), (b,), generator=gen))
            u_apply = mine(torch.rand(2, b, generator=gen))
            neg = mine(torch.rand(2, b, generator=gen) <= 0.5)
            for k in range(2):
                stage = []
                for i in range(len(which)):
                    name, prob, idx = policies[which[i]][k]
                    if u_apply[k][i] <= prob:
                        stage.append((name, mag(name, 10, idx, neg[k][i])))
                    else:
                        stage.append(("Identity", 0.0))
                stages.append(stage)
        return stages

    def _plan_policy(self, gen, b, host, positions=None) -> list:
        """Per stage, a permutation of the batch (of its images at `positions`) that makes the
        images with the same (op, magnitude) contiguous, so each op runs once on a slice (no
        boolean masks, no per-group index tensors). Returns per stage a list of (op, magnitude,
        start, stop); the permutations (and the geometric ops' matrices) go into `host`."""
        stages = self._draw_policy(gen, b, positions)
        n = b if positions is None else len(positions)
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

    # ------------------------------------------------------------------ device-side ops

    def _upsize(self, x):
        """Images smaller than size resized to it, as the whole set once was on the host
        (TF.resize of uint8, antialiased): on the CPU bitwise the same pixels."""
        h, w = x.shape[-2:]
        s = self.size
        return TF.resize(x, [s, s], antialias=True) if h < s or w < s else x

    def _center_crop(self, x):
        """As CenterCrop (a view, no copy)."""
        h, w = x.shape[-2:]
        s = self.size
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        return x[..., top : top + s, left : left + s]

    def _shift_flip(self, x, p):
        """Integer shifts and flips are pure re-indexing: two gathers on the uint8 pixels, several
        times cheaper than resampling with grid_sample. = RandomCrop(padding=shift) + flip."""
        b, c, h, w = x.shape
        dev, pad = x.device, self.shift
        if pad:
            x = F.pad(x, (pad, pad, pad, pad))
        dy, dx = p["dy"], p["dx"]
        rows = torch.arange(h, device=dev) + dy
        cols = torch.arange(w, device=dev).expand(b, w)
        if self.hflip:
            cols = torch.where(p["flip"], cols.flip(1), cols)
        cols = cols + dx
        x = x.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w + 2 * pad))
        return x.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))

    def _affine(self, x, p):
        grid = F.affine_grid(p["theta"], list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _resized_crop(self, x, p):
        # aligned=True puts pixel centres at +0.5, so a box (x1, y1, x2, y2) covers exactly those
        # pixels; sampling_ratio=-1 takes ceil(box/size) bilinear samples per output pixel and
        # dimension, i.e. averages over the footprint when downscaling (an antialias).
        x = roi_align(
            x.float(),
            p["box"],
            output_size=self.size,
            spatial_scale=1.0,
            sampling_ratio=-1,
            aligned=True,
        )
        if self.hflip:
            x = torch.where(p["flip"].view(-1, 1, 1, 1), x.flip(3), x)
        return x

    def _policy(self, x, plan, p):
        for k, steps in enumerate(plan):
            x = x[p[f"order{k}"]]
            parts, done = [], 0
            for name, mag, start, stop in steps:
                parts.append(x[done:start])
                parts.append(self._op(x[start:stop], name, mag, p.get(f"theta{k}")))
                done = stop
            parts.append(x[done:])
            x = torch.cat(parts)
        return x[p["unorder"]]

    def _op(self, x, name, mag, theta):
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

    def _color(self, x, p):
        """Per-image factors as batched blends, clamped to 0..255 after each like torchvision."""
        b, c = x.shape[:2]
        if self.jitter:
            x.mul_(p["brightness"].view(b, 1, 1, 1)).clamp_(0, 255)
            f = p["contrast"].view(b, 1, 1, 1)
            mean = (TF.rgb_to_grayscale(x) if c == 3 else x).mean((1, 2, 3), keepdim=True)
            x = x.mul_(f).add_(mean * (1 - f)).clamp_(0, 255)
            if c == 3:
                f = p["saturation"].view(b, 1, 1, 1)
                gray = TF.rgb_to_grayscale(x)  # before x changes in place
                x = x.mul_(f).add_(gray * (1 - f)).clamp_(0, 255)
        if self.hue and c == 3:
            hsv = _rgb_to_hsv(x.div_(255))
            hsv[:, 0].add_(p["hue"].view(b, 1, 1)).remainder_(1.0)
            x = _hsv_to_rgb(hsv).mul_(255)
        return x

    def _erase(self, x, p):
        b, _, h, w = x.shape
        top, left, eh, ew = (v.view(b, 1, 1) for v in p["erase"].unbind(1))
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        box = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
        return x.masked_fill_(box.unsqueeze(1), 0.0)

    def _mix(self, x, y, mix):
        """The batch mixed with itself rolled by one, as v2.MixUp/v2.CutMix; soft targets."""
        lam, box = mix
        rolled = x.roll(1, 0)
        if box is None:
            x = x.mul_(lam).add_(rolled, alpha=1.0 - lam)
        else:
            x1, y1, x2, y2 = box
            x[..., y1:y2, x1:x2] = rolled[..., y1:y2, x1:x2]
        target = torch.zeros(len(y), self.num_classes, device=x.device)
        target.scatter_add_(1, y.view(-1, 1), torch.full((len(y), 1), lam, device=x.device))
        target.scatter_add_(
            1, y.roll(1).view(-1, 1), torch.full((len(y), 1), 1.0 - lam, device=x.device)
        )
        return x, target


# ---------------------------------------------------------------------- helpers


def _to_device(host: dict, device: torch.device) -> dict:
    """All of a batch's parameters in one host->device copy, non-blocking from pinned memory
    on CUDA (no wait for the device)."""
    if device.type == "cpu":
        return host
    flat = _pack(host)
    if device.type == "cuda":
        flat = flat.pin_memory()
    return _unpack(flat.to(device, non_blocking=True), host)


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
