"""Make a stratified sample of the real Fashion-MNIST in its own IDX format.

    # the bundled default dataset (data=fashion_mnist_mini), from ../shared/data/fashion_mnist.sh's files
    ../shared/data/fashion_mnist.sh /tmp/fm
    python scripts/make_fashion_mnist_mini.py --src /tmp/fm
    # a data-limited set in torchvision's layout (8,000 training images, the whole test set),
    # usable as `data=fashion_mnist data.root=/tmp/fm8k data.download=false`
    python scripts/make_fashion_mnist_mini.py --src /tmp/fm --train 8000 --test all --out /tmp/fm8k --layout torchvision

The sample takes the same number of images of every class, drawn with --seed, and keeps them in
the order of the original files. `--layout bundled` (the default) writes gzipped files (gzip's
CRC catches a damaged copy; the header's time stamp is zeroed, so the same input gives the same
bytes) plus the dataset's MIT license; `--layout torchvision` writes the uncompressed files where
`torchvision.datasets.FashionMNIST(root)` expects them.
"""

from __future__ import annotations

import argparse
import gzip
import os
import struct
from pathlib import Path

import torch
from torchvision import datasets

BUNDLED = Path(__file__).resolve().parent.parent / "cnntrain" / "data" / "fashion_mnist_mini"
LICENSE = """The MIT License (MIT) Copyright © [2017] Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT
NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT
OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""

README = """# fashion_mnist_mini

A stratified sample of the real Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017,
https://github.com/zalandoresearch/fashion-mnist; MIT license, see LICENSE): {train} training
images drawn from its 60,000 and {test} test images from its 10,000, the same number of every
class (seed {seed}), in the files' original order and their IDX format, gzipped. cnntrain's
default dataset (`data=fashion_mnist_mini`): it ships inside the package, so the first run needs
no network. Made by `python scripts/make_fashion_mnist_mini.py --src DEST` from the files that
`shared/data/fashion_mnist.sh DEST` lays out (Debian's package dataset-fashion-mnist).
"""


def stratified(labels: torch.Tensor, count: int | None, seed: int) -> torch.Tensor:
    """Indices of `count` images, the same number per class (all of them for None), in file order."""
    if count is None:
        return torch.arange(len(labels))
    classes = labels.unique()
    if count % len(classes):
        raise SystemExit(f"error: {count} is not a multiple of the {len(classes)} classes")
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        if len(idx) < count // len(classes):
            raise SystemExit(f"error: class {int(c)} has only {len(idx)} images")
        picked.append(idx[torch.randperm(len(idx), generator=gen)[: count // len(classes)]])
    return torch.cat(picked).sort().values


def idx_bytes(t: torch.Tensor) -> bytes:
    """The IDX format of LeCun's MNIST page: magic (0, 0, type 0x08 = ubyte, ndim), each dimension
    as a big-endian int32, then the data. torchvision reads it but has no writer."""
    t = t.to(torch.uint8).contiguous()
    return (
        struct.pack(">BBBB", 0, 0, 0x08, t.ndim)
        + struct.pack(f">{t.ndim}I", *t.shape)
        + t.numpy().tobytes()
    )


def write(path: Path, data: bytes, compress: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        if compress:
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
                gz.write(data)
        else:
            f.write(data)
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--src", required=True, help="folder holding FashionMNIST/raw (fashion_mnist.sh's DEST)"
    )
    p.add_argument("--out", type=Path, default=BUNDLED)
    p.add_argument("--train", default="6000", help="training images, a multiple of 10, or all")
    p.add_argument("--test", default="1000", help="test images, a multiple of 10, or all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=("bundled", "torchvision"), default="bundled")
    args = p.parse_args()
    bundled = args.layout == "bundled"
    out = args.out if bundled else args.out / "FashionMNIST" / "raw"
    out.mkdir(parents=True, exist_ok=True)
    for split, count, prefix in (("train", args.train, "train"), ("test", args.test, "t10k")):
        ds = datasets.FashionMNIST(args.src, train=split == "train", download=False)
        rows = stratified(ds.targets, None if count == "all" else int(count), args.seed)
        for kind, tensor in (("images-idx3", ds.data[rows]), ("labels-idx1", ds.targets[rows])):
            name = f"{prefix}-{kind}-ubyte" + (".gz" if bundled else "")
            write(out / name, idx_bytes(tensor), compress=bundled)
        print(
            f"{split}: {len(rows)} images ({torch.bincount(ds.targets[rows]).tolist()} per class) -> {out}"
        )
    if bundled:
        (out / "LICENSE").write_text(LICENSE)
        (out / "README.md").write_text(
            README.format(train=args.train, test=args.test, seed=args.seed)
        )


if __name__ == "__main__":
    main()
