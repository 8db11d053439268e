#!/usr/bin/env python
"""Throughput of cnntrain's training and evaluation loops against the two loops users would
otherwise write, measured in one process: same threads, same model and initial weights, same
batch size and optimizer settings; the variants' epochs are interleaved (every other round in
reverse order) and each reports the median of several epochs after a warm-up, so machine noise
hits all of them alike.

  (1)  cnntrain   the code the CLI runs: build_data -> build_model -> create_optimizer /
                  create_scheduler -> train_one_epoch (evaluate_loader for evaluation), with its
                  defaults (fused optimizer, channels_last=auto) and aug=none, so that it does the
                  same work as (2) and (3)
  (1') cnntrain   the same in the NCHW layout of (2) and (3): (1')/(2) is the loop's own overhead
  (2)  bare       the whole dataset as normalized tensors on the device, sliced into batches,
                  forward/backward/step and nothing else: the floor of Python overhead
  (3)  classic    torchvision dataset + per-sample PIL transforms (ToTensor, Normalize) +
                  DataLoader(shuffle=True): what the lecture notebooks do

Cases: LeNet-5 on Fashion-MNIST at batch 64 and 256, ResNet-20 on 32 px RGB synthetic data
(CIFAR pickle batches written to a temp folder), evaluation (cnneval's loop vs a bare no-grad
loop) and `cnntrain --help` start-up time. On CUDA, cnntrain also runs with amp fp16/bf16.
Without real Fashion-MNIST (--root), synthetic IDX files of the same size are used: the speed
does not depend on the pixels.

Image folders (exported from the same Fashion-MNIST images into a temp folder):
  - 10,000 training images (1,000 per class) as 28 px gray PNGs vs the very same images as IDX
    files through the built-in path: LeNet-5 at batch 64, throughput and test accuracy;
  - 3,000 images as 96 px RGB JPEGs: LeNet-5 and ResNet-20, cnntrain vs the bare loop over the
    same decoded tensors (and the classic ImageFolder + DataLoader loop);
  - the decode cache: first build (images/s), a second build_data (reused) and its first batch;
  - streaming (data.memory_budget_gb=0: batches gathered from the memory-mapped cache) vs the
    same data in memory.

    ../shared/data/fashion_mnist.sh /tmp/fmnist
    python scripts/bench.py --root /tmp/fmnist            # table on stdout, bench.json
    python scripts/bench.py --root /tmp/fmnist --profile  # + where a cnntrain epoch's time goes
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from torch import nn
from torchvision import datasets, transforms

from cnntrain.data import build_data
from cnntrain.data.builtin import BUILTIN
from cnntrain.engine import Placement, Update, evaluate_loader, train_one_epoch
from cnntrain.models import build_model
from cnntrain.optim import create_optimizer, create_scheduler
from cnntrain.runtime import amp_dtype, channels_last, seed_everything, select_device

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import fakedata  # noqa: E402  (the tests' writers of the real on-disk formats)

TARGETS = {
    "train_vs_bare_b64": 0.90,
    "train_vs_bare_b256": 0.95,
    "train_vs_classic_b64": 2.5,
    "eval_vs_bare": 0.90,
    "help_seconds": 2.0,
    "folder_vs_builtin_png28": 0.90,
    "folder_vs_bare_jpg96_lenet5": 0.90,
    "folder_vs_bare_jpg96_resnet20": 0.90,
    "streamed_vs_memory": 0.80,
}


def config(overrides: list[str]):
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Case:
    """One model + dataset + batch size; builds each variant's model from the same seed."""

    def __init__(
        self, name: str, overrides: list[str], device: torch.device, steps: int | None, workers: int
    ):
        self.name, self.device, self.workers = name, device, workers
        self.overrides = [
            *overrides,
            "aug=none",
            "data.val_split=0",
            "data.download=false",
            f"device={device}",
        ]
        self.cfg = config(self.overrides)
        self.data = build_data(
            self.cfg.data, self.cfg.aug, device=device, seed=0, splits=("train", "test")
        )
        loader = self.data.loaders["train"]
        self.steps = min(steps or len(loader), len(loader))
        self.batch = self.cfg.data.batch_size
        # The bare loop's input: every image already normalized, in memory, in the same order.
        self.images = torch.cat([x for x, _ in _unshuffled(loader)])
        self.labels = loader.labels

    def model(self):
        torch.manual_seed(0)
        d = self.data
        model, _ = build_model(
            self.cfg.model, d.in_channels, len(d.classes), d.image_size, self.device
        )
        return model

    def optimizer(self, model):
        """What a hand-written loop would build: the same optimizer and settings, no parameter
        groups, fused exactly when cnntrain's is, so that (1)/(2) measures overhead only."""
        reference = create_optimizer(self.cfg.optim, model)
        kwargs = {
            k: v
            for k, v in reference.defaults.items()
            if k in ("lr", "momentum", "nesterov", "weight_decay", "fused")
        }
        return type(reference)(model.parameters(), **kwargs)

    # -- training variants: each returns a function running one epoch -> (images, seconds) --
    def cnntrain(self, extra: list[str] = ()):
        cfg = config([*self.overrides, *extra]) if extra else self.cfg
        data = (
            build_data(cfg.data, cfg.aug, device=self.device, seed=0, splits=("train",))
            if extra
            else self.data
        )
        loader = data.loaders["train"]
        dtype = amp_dtype(cfg.amp, self.device, cfg.amp_dtype)
        nhwc = channels_last(cfg.channels_last, self.device, dtype)
        model = self.model()
        if nhwc:
            model = model.to(memory_format=torch.channels_last)
        optimizer = create_optimizer(cfg.optim, model)
        scheduler, _ = create_scheduler(
            cfg.sched, optimizer, epochs=100, steps_per_epoch=self.steps
        )
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        criterion, epoch = nn.CrossEntropyLoss(), iter(range(1, 10**6))

        def run(steps=self.steps):
            loader.set_epoch(next(epoch))
            start = time.perf_counter()
            train_one_epoch(
                model,
                loader,
                criterion,
                Update(optimizer, scheduler, scaler),
                Placement(self.device, dtype, nhwc),
                max_steps=steps,
                progress=True,
            )
            return steps * self.batch, time.perf_counter() - start

        return run

    def bare(self):
        model = self.model()
        optimizer = self.optimizer(model)
        x, y, b = self.images, self.labels, self.batch

        def run(steps=self.steps):
            model.train()
            start = time.perf_counter()
            for i in range(steps):
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(
                    model(x[i * b : (i + 1) * b]), y[i * b : (i + 1) * b]
                )
                loss.backward()
                optimizer.step()
            sync(self.device)
            return steps * b, time.perf_counter() - start

        return run

    def classic(self):
        d = self.data
        tf = [transforms.ToTensor(), transforms.Normalize(d.mean, d.std)]
        if self.cfg.data.name == "imagefolder":  # what users wrote before: decode every epoch
            tf = [
                transforms.Resize(d.image_size),
                transforms.CenterCrop(d.image_size),
                *([transforms.Grayscale()] if d.in_channels == 1 else []),
                *tf,
            ]
            dataset = datasets.ImageFolder(
                f"{self.cfg.data.root}/train", transform=transforms.Compose(tf)
            )
        else:
            # spec.cls subclasses torchvision's class, replacing only how the files are read and
            # checked (CIFAR: without the per-file md5 the synthetic batches would fail); its
            # __getitem__ is torchvision's: PIL image, then the transform, one sample at a time
            dataset = BUILTIN[self.cfg.data.name].cls(str(self.cfg.data.root), train=True)
            dataset.transform = transforms.Compose(tf)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=self.batch,
            shuffle=True,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
        )
        model = self.model()
        optimizer = self.optimizer(model)

        def run(steps=self.steps):
            model.train()
            start, n = time.perf_counter(), 0
            for i, (x, y) in enumerate(loader):
                if i == steps:
                    break
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
                n += len(y)
            sync(self.device)
            return n, time.perf_counter() - start

        return run

    # -- evaluation variants --
    def eval_cnntrain(self, model, nhwc: bool):
        """cnneval's call; nhwc: the layout it picks (channels_last=auto), or NCHW like (2)."""
        loader, classes = self.data.loaders["test"], len(self.data.classes)
        if nhwc:
            model = copy.deepcopy(model).to(memory_format=torch.channels_last)

        def run():
            start = time.perf_counter()
            r = evaluate_loader(
                model,
                loader,
                Placement(self.device, channels_last=nhwc),
                num_classes=classes,
                keep_predictions=True,
                progress=True,
            )
            return r["num_samples"], time.perf_counter() - start

        return run

    def eval_bare(self, model):
        x, y = (
            torch.cat([x for x, _ in _unshuffled(self.data.loaders["test"])]),
            self.data.loaders["test"].labels,
        )
        b = self.data.loaders["test"].batch_size

        @torch.no_grad()
        def run():
            model.eval()
            start = time.perf_counter()
            correct = torch.zeros((), dtype=torch.long, device=self.device)
            for i in range(0, len(y), b):
                correct += (model(x[i : i + b]).argmax(1) == y[i : i + b]).sum()
            correct.item()
            return len(y), time.perf_counter() - start

        return run


def _unshuffled(loader):
    shuffle, loader.shuffle = loader.shuffle, False
    try:
        yield from loader
    finally:
        loader.shuffle = shuffle


def measure(variants: dict, repeats: int, warmup_steps: int | None) -> dict:
    """img/s of each variant: one warm-up epoch (or warmup_steps), then `repeats` interleaved
    epochs, every other round in reverse order (so no variant always follows the same one);
    the median and the samples."""
    for run in variants.values():
        run(warmup_steps) if warmup_steps else run()
    samples = {name: [] for name in variants}
    for i in range(repeats):
        for name, run in reversed(variants.items()) if i % 2 else variants.items():
            n, seconds = run()
            samples[name].append(n / seconds)
    return {
        name: {"img_per_s": round(statistics.median(v), 1), "samples": [round(s, 1) for s in v]}
        for name, v in samples.items()
    }


def help_time(repeats: int = 5) -> float:
    script = Path(sys.executable).with_name("cnntrain")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([str(script), "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 3)


def fashion_mnist_root(root: str | None, scratch: Path) -> tuple[str, str]:
    if root and (Path(root) / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists():
        return root, "real Fashion-MNIST"
    fakedata.write_mnist(scratch, "FashionMNIST", n_train=60000, n_test=10000)
    return str(scratch), "synthetic Fashion-MNIST (no --root with FashionMNIST/raw given)"


def export_folders(fmnist: str, scratch: Path, scale: float = 1.0) -> dict:
    """The folder cases' data, from the same Fashion-MNIST images: 10k train (1,000 per class) +
    2k test as 28 px gray PNG folders and as IDX files; 3k + 600 as 96 px RGB JPEG folders
    (`scale` times as many: --quick)."""
    train = datasets.FashionMNIST(fmnist, train=True)
    test = datasets.FashionMNIST(fmnist, train=False)

    def first(ds, per_class):
        idx = (
            torch.cat([(ds.targets == c).nonzero().flatten()[:per_class] for c in range(10)])
            .sort()
            .values
        )
        return ds.data[idx].numpy(), ds.targets[idx].numpy()

    out = {"png28": scratch / "png28", "idx": scratch / "idx", "jpg96": scratch / "jpg96"}
    for split, ds, n in (("train", train, 1000), ("test", test, 200)):
        images, labels = first(ds, round(n * scale))
        fakedata.export_folder(images, labels, train.classes, out["png28"], split, fmt="png")
        if split == "train":
            idx_train = (images, labels)
        else:
            fakedata.write_idx_dataset(out["idx"], "FashionMNIST", idx_train, (images, labels))
    for split, ds, n in (("train", train, 300), ("test", test, 60)):
        images, labels = first(ds, round(n * scale))
        fakedata.export_folder(
            images, labels, train.classes, out["jpg96"], split, fmt="jpg", size=96, rgb=True
        )
    return {k: str(v) for k, v in out.items()}


def cache_timings(folders: dict, device: torch.device) -> dict:
    """Decoding: the first build_data of each folder (every image decoded into the cache), then
    a second one (the cache reused) up to its first training batch, as every later run and
    sweep job starts."""
    out = {}
    for name in ("png28", "jpg96"):
        cfg = config(
            ["data=imagefolder", f"data.root={folders[name]}", "aug=none", f"device={device}"]
        )
        n = sum(len(files) for _, _, files in os.walk(folders[name]))
        start = time.perf_counter()
        build_data(cfg.data, cfg.aug, device=device, seed=0)
        first = time.perf_counter() - start
        start = time.perf_counter()
        data = build_data(cfg.data, cfg.aug, device=device, seed=0)
        next(iter(data.loaders["train"]))
        sync(device)
        again = time.perf_counter() - start
        out[name] = {
            "images": n,
            "first_build_s": round(first, 2),
            "decode_img_per_s": round(n / first),
            "reused_to_first_batch_s": round(again, 3),
        }
        print(
            f"  {name}: {n} images decoded in {first:.2f} s ({n / first:.0f} img/s, mean/std "
            f"included); next run: cache reused, first batch after {again:.3f} s"
        )
    return out


def same_images_accuracy(
    folders: dict, device: torch.device, seeds=(0, 1), epochs: int = 5
) -> dict:
    """Test accuracy of LeNet-5 trained on the same 10k images as a PNG folder and as IDX files
    (same normalization, same augmentation, same seeds): the two paths must agree within noise."""
    from cnntrain.train import train

    out = {}
    for name, data in (
        ("idx", ["data=fashion_mnist", f"data.root={folders['idx']}"]),
        (
            "png28",
            [
                "data=imagefolder",
                f"data.root={folders['png28']}",
                "data.mean=[0.286]",
                "data.std=[0.353]",
                "data.batch_size=64",
            ],
        ),
    ):
        accs = []
        for seed in seeds:
            cfg = config(
                [
                    *data,
                    "model=lenet5",
                    f"epochs={epochs}",
                    f"seed={seed}",
                    f"device={device}",
                    "data.download=false",
                ]
            )
            with tempfile.TemporaryDirectory() as run_dir:
                accs.append(train(cfg, run_dir=run_dir)["test_acc"])
        out[name] = accs
        print(f"  LeNet-5 {epochs} epochs on the 10k images as {name}: test acc {accs}")
    return out


def print_table(title: str, rows: dict, base: str, classic: str | None) -> None:
    print(f"\n{title}")
    print(f"  {'variant':<34} {'img/s':>9} {'vs bare':>8} {'vs classic':>10}")
    for name, r in rows.items():
        vs_classic = f"{r['img_per_s'] / rows[classic]['img_per_s']:9.2f}x" if classic else ""
        print(
            f"  {name:<34} {r['img_per_s']:9.0f} {r['img_per_s'] / rows[base]['img_per_s']:7.2f}x {vs_classic}"
        )


def profile(case: Case, steps: int, out: Path) -> dict:
    """Where a cnntrain epoch's time goes: the batch pipeline alone (index, convert, normalize),
    the bare loop (the model), cnntrain's loop in the same NCHW layout (the rest is the loop's
    own overhead), its default layout, and torch.profiler's operator table of the default."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    loader = case.data.loaders["train"]
    start = time.perf_counter()
    for _, _ in zip(range(steps), loader):
        pass
    sync(case.device)
    pipeline = (time.perf_counter() - start) / steps
    runs = {
        "bare_ms": case.bare(),
        "cnntrain_nchw_ms": case.cnntrain(["channels_last=false"]),
        "cnntrain_ms": case.cnntrain(),
    }
    per_step = {"batch_pipeline_ms": 1e3 * pipeline}
    for key, run in runs.items():
        run(20)
        per_step[key] = 1e3 * run(steps)[1] / steps
    per_step["loop_rest_ms"] = (
        per_step["cnntrain_nchw_ms"] - per_step["bare_ms"] - per_step["batch_pipeline_ms"]
    )
    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if case.device.type == "cuda" else []
    )
    with torch_profile(activities=activities) as prof:
        runs["cnntrain_ms"](steps)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    out.write_text(table)
    print(f"\nprofile of {case.name}, {steps} steps (ms per step):")
    for key, value in per_step.items():
        print(f"  {key:<18} {value:7.3f}")
    print(f"  torch.profiler operator table of cnntrain's default loop: {out}")
    print("\n".join(table.splitlines()[:18]))
    return {k: round(v, 4) for k, v in per_step.items()}


def folder_cases(result: dict, fmnist: str, scratch: Path, device, steps, repeats, args) -> None:
    folders = export_folders(fmnist, scratch / "folders", 0.1 if args.quick else 1.0)
    os.environ["CNNTRAIN_CACHE"] = str(scratch / "cache")  # a cold cache: the first build decodes
    print("\nimage folders, decode cache:")
    result["cache"] = cache_timings(folders, device)
    png = Case(
        "lenet5_png28_b64",
        [
            "model=lenet5",
            "data=imagefolder",
            f"data.root={folders['png28']}",
            "data.batch_size=64",
            "data.mean=[0.286]",
            "data.std=[0.353]",
        ],
        device,
        steps,
        args.workers,
    )
    idx = Case(
        "lenet5_idx10k_b64",
        ["model=lenet5", "data=fashion_mnist", f"data.root={folders['idx']}", "data.batch_size=64"],
        device,
        steps,
        args.workers,
    )
    variants = {
        "built-in (the IDX files)": idx.cnntrain(),
        "folder (PNG, decoded cache)": png.cnntrain(),
        "folder, streamed from the cache": png.cnntrain(["data.memory_budget_gb=0"]),
        "(2) bare": idx.bare(),
        "(3) classic ImageFolder": png.classic(),
    }
    rows = measure(variants, repeats, warmup_steps=min(png.steps, 20))
    result["cases"]["folder_png28_b64"] = {"steps": png.steps, "batch_size": 64, "rows": rows}
    print_table(
        f"training: LeNet-5, the same 10k Fashion-MNIST images as IDX and as a 28 px PNG "
        f"folder ({png.steps} steps of 64)",
        rows,
        "(2) bare",
        "(3) classic ImageFolder",
    )
    r = result["ratios"]
    r["folder_vs_builtin_png28"] = round(
        rows["folder (PNG, decoded cache)"]["img_per_s"]
        / rows["built-in (the IDX files)"]["img_per_s"],
        3,
    )
    streamed = [
        rows["folder, streamed from the cache"]["img_per_s"]
        / rows["folder (PNG, decoded cache)"]["img_per_s"]
    ]
    for model, case_steps in (("lenet5", steps), ("resnet20", steps or args.resnet_steps // 4)):
        case = Case(
            f"{model}_jpg96_b64",
            [
                f"model={model}",
                "data=imagefolder",
                f"data.root={folders['jpg96']}",
                "data.batch_size=64",
            ],
            device,
            case_steps,
            args.workers,
        )
        variants = {
            "(1) cnntrain": case.cnntrain(),
            "cnntrain streamed": case.cnntrain(["data.memory_budget_gb=0"]),
            "(2) bare": case.bare(),
            "(3) classic ImageFolder": case.classic(),
        }
        rows = measure(
            variants,
            repeats if model == "lenet5" else max(1, repeats // 2),
            warmup_steps=min(case.steps, 10),
        )
        result["cases"][case.name] = {"steps": case.steps, "batch_size": 64, "rows": rows}
        print_table(
            f"training: {case.name}, 3k 96 px RGB JPEGs ({case.steps} steps of 64)",
            rows,
            "(2) bare",
            "(3) classic ImageFolder",
        )
        r[f"folder_vs_bare_jpg96_{model}"] = round(
            rows["(1) cnntrain"]["img_per_s"] / rows["(2) bare"]["img_per_s"], 3
        )
        streamed.append(rows["cnntrain streamed"]["img_per_s"] / rows["(1) cnntrain"]["img_per_s"])
    r["streamed_vs_memory"] = round(min(streamed), 3)
    print("\naccuracy on the same images:")
    result["accuracy_same_images"] = same_images_accuracy(
        folders, device, seeds=(0,) if args.quick else (0, 1, 2, 3), epochs=1 if args.quick else 5
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root",
        default=os.environ.get("CNNTRAIN_FASHION_MNIST"),
        help="folder holding FashionMNIST/raw (default: $CNNTRAIN_FASHION_MNIST)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed LeNet-5 epochs per variant (median)"
    )
    parser.add_argument("--resnet-steps", type=int, default=200, help="ResNet-20 steps per epoch")
    parser.add_argument(
        "--resnet-repeats", type=int, default=3, help="timed ResNet-20 epochs per variant"
    )
    parser.add_argument("--workers", type=int, default=0, help="classic DataLoader workers")
    parser.add_argument(
        "--quick", action="store_true", help="a few steps per case: checks the script runs"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also profile a cnntrain LeNet-5 epoch"
    )
    parser.add_argument("--folders-only", action="store_true", help="only the image-folder cases")
    parser.add_argument("--json", default="bench.json")
    args = parser.parse_args()

    device = select_device(args.device)
    seed_everything(0, deterministic=False)  # as training does: cudnn.benchmark on
    steps = 8 if args.quick else None
    repeats = 1 if args.quick else args.repeats
    scratch = Path(tempfile.mkdtemp(prefix="cnntrain-bench-"))
    fmnist, fmnist_kind = fashion_mnist_root(args.root, scratch / "fmnist")
    fakedata.write_cifar(scratch / "cifar", n_train=max(64 * args.resnet_steps, 1024), n_test=2000)
    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads; {fmnist_kind}; "
        f"median of {repeats} epochs after a warm-up"
    )
    result = {
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "fashion_mnist": fmnist_kind,
        "repeats": repeats,
        "cases": {},
        "ratios": {},
    }

    # (1) runs cnntrain's defaults, channels_last=auto included (on for the CPU and for CUDA with
    # amp); (1') is the same loop in the bare loop's NCHW layout: (1')/(2) is the loop's overhead.
    same_layout = "(1') cnntrain, NCHW like (2)"
    extra = {same_layout: ["channels_last=false"]}
    if device.type == "cuda":
        extra.update(
            {
                "cnntrain amp fp16": ["amp=true", "amp_dtype=fp16"],
                "cnntrain amp fp16 NCHW": ["amp=true", "amp_dtype=fp16", "channels_last=false"],
            }
        )
        if torch.cuda.is_bf16_supported(including_emulation=False):
            extra["cnntrain amp bf16"] = ["amp=true", "amp_dtype=bf16"]
    cases = [
        (
            "lenet5_fmnist_b64",
            ["model=lenet5", "data=fashion_mnist", f"data.root={fmnist}", "data.batch_size=64"],
            steps,
            repeats,
        ),
        (
            "lenet5_fmnist_b256",
            ["model=lenet5", "data=fashion_mnist", f"data.root={fmnist}", "data.batch_size=256"],
            steps,
            repeats,
        ),
        (
            "resnet20_synthetic32_b64",
            [
                "model=resnet20",
                "data=cifar10",
                f"data.root={scratch / 'cifar'}",
                "data.batch_size=64",
            ],
            steps or args.resnet_steps,
            1 if args.quick else args.resnet_repeats,
        ),
    ]
    built = {}
    for name, overrides, case_steps, case_repeats in [] if args.folders_only else cases:
        case = built[name] = Case(name, overrides, device, case_steps, args.workers)
        variants = {
            "(1) cnntrain": case.cnntrain(),
            "(2) bare": case.bare(),
            "(3) classic": case.classic(),
        }
        variants.update({k: case.cnntrain(v) for k, v in extra.items()})
        if name == "lenet5_fmnist_b64":  # the default augmentation's cost, for information
            variants["cnntrain aug=basic (default)"] = case.cnntrain(["aug=basic"])
        rows = measure(variants, case_repeats, warmup_steps=min(case.steps, 20))
        result["cases"][name] = {"steps": case.steps, "batch_size": case.batch, "rows": rows}
        print_table(
            f"training: {name} ({case.steps} steps of {case.batch})",
            rows,
            "(2) bare",
            "(3) classic",
        )

    folder_cases(result, fmnist, scratch, device, steps, repeats, args)

    nhwc = channels_last("auto", device, None)
    for name in [] if args.folders_only else ("lenet5_fmnist_b64", "resnet20_synthetic32_b64"):
        case = built[name]
        model = case.model()
        variants = {
            "(1) cnneval loop": case.eval_cnntrain(model, nhwc),
            "(1') cnneval loop, NCHW": case.eval_cnntrain(model, False),
            "(2) bare no-grad": case.eval_bare(model),
        }
        rows = measure(variants, max(repeats, 5 if not args.quick else 1), warmup_steps=None)
        result["cases"][f"eval_{name}"] = {"rows": rows}
        print_table(f"evaluation: {name} test split", rows, "(2) bare no-grad", None)

    result["help_seconds"] = help_time(2 if args.quick else 5)
    print(f"\n`cnntrain --help`: {result['help_seconds']:.2f} s (median)")

    def ratio(case, a, b):
        rows = result["cases"][case]["rows"]
        return round(rows[a]["img_per_s"] / rows[b]["img_per_s"], 3)

    r = result["ratios"]
    for tag, case in (
        []
        if args.folders_only
        else (
            ("b64", "lenet5_fmnist_b64"),
            ("b256", "lenet5_fmnist_b256"),
            ("resnet20", "resnet20_synthetic32_b64"),
        )
    ):
        r[f"train_vs_bare_{tag}"] = ratio(case, "(1) cnntrain", "(2) bare")
        r[f"overhead_vs_bare_{tag}"] = ratio(case, same_layout, "(2) bare")
        r[f"train_vs_classic_{tag}"] = ratio(case, "(1) cnntrain", "(3) classic")
    for tag, key in (
        []
        if args.folders_only
        else (("", "(1) cnneval loop"), ("overhead_", "(1') cnneval loop, NCHW"))
    ):
        r[f"eval_{tag}vs_bare"] = min(
            ratio(f"eval_{n}", key, "(2) bare no-grad")
            for n in ("lenet5_fmnist_b64", "resnet20_synthetic32_b64")
        )
    print("\nratios (targets on a 2-core CPU; overhead_*: the same loops in the same layout):")
    for key, value in r.items():
        target = TARGETS.get(
            key.replace("overhead_", "train_")
            if "eval" not in key
            else key.replace("overhead_", "")
        )
        mark = (
            ""
            if target is None
            else f"  target >= {target}: {'met' if value >= target else 'NOT met'}"
        )
        print(f"  {key:<30} {value:6.3f}{mark}")
    print(
        f"  {'help_seconds':<30} {result['help_seconds']:6.3f}  target < 2: "
        f"{'met' if result['help_seconds'] < TARGETS['help_seconds'] else 'NOT met'}"
    )

    if args.profile:
        result["profile_ms_per_step"] = profile(
            built["lenet5_fmnist_b64"],
            8 if args.quick else 300,
            Path(args.json).with_suffix(".profile.txt"),
        )
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
