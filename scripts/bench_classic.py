#!/usr/bin/env python
"""Training throughput: cnntrain's epoch vs the classic notebook loop, same process, same model.

The classic loop is what the lecture notebooks do: torchvision FashionMNIST with per-sample PIL
transforms Resize(32) / ToTensor / Normalize, DataLoader(batch 64, shuffle=True), plain SGD.
cnntrain's epoch is the code the CLI runs (build_data + train_one_epoch) on the same files, at
the same 32 px input, with the same LeNet-5, batch size and optimizer. Epochs of the two are
interleaved and the median img/s of each is reported, so machine noise hits both alike.

    ../shared/data/fashion_mnist.sh /tmp/fmnist
    python scripts/bench_classic.py --root /tmp/fmnist          # writes bench_classic.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from hydra import compose, initialize_config_module
from torch import nn
from torchvision import datasets, transforms

from cnntrain.data import build_data
from cnntrain.engine import train_one_epoch
from cnntrain.models import create_model
from cnntrain.optim import create_optimizer

MEAN, STD = (0.2860,), (0.3530,)


def lenet(in_channels=1):
    torch.manual_seed(0)
    return create_model("lenet5", in_channels=in_channels, num_classes=10, image_size=32)


def classic_epoch(root: str, batch_size: int, workers: int) -> float:
    tf = transforms.Compose([transforms.Resize(32), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    loader = torch.utils.data.DataLoader(datasets.FashionMNIST(root, train=True, transform=tf),
                                         batch_size=batch_size, shuffle=True, num_workers=workers)
    model = lenet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    model.train()
    start, n = time.perf_counter(), 0
    for x, y in loader:
        opt.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        opt.step()
        n += len(y)
    return n / (time.perf_counter() - start)


def cnntrain_epoch(root: str, batch_size: int, aug: str, image_size: int) -> float:
    with initialize_config_module(config_module="cnntrain.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "data=fashion_mnist", f"data.root={root}", "data.download=false", f"aug={aug}",
            f"data.batch_size={batch_size}", f"data.image_size={image_size}", "device=cpu"])
    device = torch.device("cpu")
    data = build_data(cfg.data, cfg.aug, device=device, seed=cfg.seed, splits=("train",))
    model = create_model("lenet5", in_channels=1, num_classes=10, image_size=image_size)
    opt = create_optimizer(cfg.optim, model)
    loader = data.loaders["train"]
    loader.set_epoch(1)
    start = time.perf_counter()
    train_one_epoch(model, loader, nn.CrossEntropyLoss(), opt, device=device, progress=False)
    return len(loader) * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="folder holding FashionMNIST/raw")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="epochs per variant (median)")
    parser.add_argument("--workers", type=int, default=0, help="classic DataLoader workers")
    parser.add_argument("--json", default="bench_classic.json")
    args = parser.parse_args()

    variants = {
        "classic (PIL + DataLoader)": lambda: classic_epoch(args.root, args.batch_size, args.workers),
        "cnntrain 32 px, aug=none": lambda: cnntrain_epoch(args.root, args.batch_size, "none", 32),
        "cnntrain 32 px, aug=basic": lambda: cnntrain_epoch(args.root, args.batch_size, "basic", 32),
        "cnntrain 28 px, aug=basic (default)": lambda: cnntrain_epoch(args.root, args.batch_size, "basic", 28),
    }
    for fn in variants.values():  # warm-up: file cache, allocator, first-call overheads
        fn()
    samples = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            samples[name].append(fn())
    base = statistics.median(samples["classic (PIL + DataLoader)"])
    rows = []
    print(f"LeNet-5 on Fashion-MNIST, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} epochs")
    print(f"{'variant':<38} {'img/s':>9} {'vs classic':>10}")
    for name, values in samples.items():
        rate = statistics.median(values)
        rows.append({"variant": name, "img_per_s": round(rate, 1), "ratio_vs_classic": round(rate / base, 2),
                     "samples": [round(v, 1) for v in values]})
        print(f"{name:<38} {rate:9.0f} {rate / base:9.2f}x")
    with open(args.json, "w") as f:
        json.dump({"batch_size": args.batch_size, "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "results": rows}, f, indent=2)
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
