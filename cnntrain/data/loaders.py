"""The one batch source of training, validation and cnneval, for every dataset.

Images are stored as uint8 (N, C, S, S); a batch is gathered from that storage and turned into
the model's input by one batched transform (augment.BatchTransform) on the training device.
The storage lives on the device when it fits the memory budget (airbench's CifarLoader: a batch
is then a handful of tensor ops, no per-sample Python, no host-device copy); otherwise it stays
in host memory (an image folder's memory-mapped cache file) and a background thread gathers
each batch into pinned memory ahead of the step, copied to the device without blocking."""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Protocol

import numpy as np
import torch


class Loader(Protocol):
    """What the engine, the reports and training use of a loader."""

    @property
    def num_samples(self) -> int:
        """Images in the split (this rank's share is len(self) batches)."""

    labels: torch.Tensor  # the class index of every sample (unshuffled order), on the device

    def __len__(self) -> int:
        """Batches per pass."""

    def set_epoch(self, epoch: int) -> None:
        """Shuffle and augmentation of the next passes: those of `epoch`, a function of
        (seed, epoch) alone, so that a resumed run sees the batches it would have seen."""

    def iter_from(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, targets) on the device from batch `start` of the pass on; images are the
        model's normalized float input, targets class indices (or soft targets, mixed batches)."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """iter_from(0)."""

    def sample(self, index: int) -> np.ndarray:
        """uint8 H x W x C pixels of sample `index` (unshuffled order), as stored, for reports."""

    def sample_name(self, index: int) -> str:
        """How reports name sample `index`: its file, or its index in the split."""


SAMPLERS = ("random", "balanced")


class ClassDraw:
    """data.sampler=balanced: an epoch's order drawn class first, each class equally likely,
    then an image of that class uniformly, both with replacement. That is torch's
    WeightedRandomSampler with weights 1 / (images of the class), without its limit of 2**24
    images and without a weight per image. A class without images is never drawn."""

    def __init__(self, labels: torch.Tensor):
        labels = labels.cpu()
        _, grouped, counts = labels.unique(return_inverse=True, return_counts=True)
        self.by_class = grouped.argsort(stable=True)  # the split's positions, class by class
        self.counts, self.starts = counts, counts.cumsum(0) - counts

    def order(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """`n` positions in the split, drawn with `gen`."""
        weights = torch.ones(len(self.counts), dtype=torch.float64)
        drawn = torch.multinomial(weights, n, replacement=True, generator=gen)
        size = self.counts[drawn]
        within = (torch.rand(n, generator=gen, dtype=torch.float64) * size).long()
        return self.by_class[self.starts[drawn] + torch.minimum(within, size - 1)]


def to_device(
    parts: list[torch.Tensor], device: torch.device, *, pin: bool | None = None
) -> list[torch.Tensor]:
    """Host tensors of one dtype (a pass's indices, a batch's augmentation parameters) on
    `device`, in one copy. Why one, and pinned: a `non_blocking` copy from pageable memory is
    synchronous with the host all the same (CUDA stages it through a pinned buffer and waits),
    and sync-debug mode does not report it. Concatenated, pinned (`pin`, by default on CUDA) and
    copied once, then split on the device, the copy is asynchronous and runs once."""
    if not parts or all(p.device == device for p in parts):
        return parts
    pin = device.type == "cuda" if pin is None else pin
    flat = torch.cat([p.reshape(-1) for p in parts])
    if pin:
        flat = flat.pin_memory()
    moved = flat.to(device, non_blocking=pin).split([p.numel() for p in parts])
    return [m.view(p.shape) for m, p in zip(moved, parts)]


def batch_seed(seed: int, epoch: int, step: int) -> int:
    """The augmentation seed of one batch. Derived, not drawn from a running generator, so a
    resumed epoch starts at its batch without replaying (or reading) the batches before it."""
    return ((seed * 1_000_003 + epoch) * 1_000_033 + step) % 2**63


class BatchLoader:
    """Batches of `images[index]` (uint8 N,C,S,S; `index` None = all rows) with `labels`.

    `images` on the training device: batches are indexed there. `streamed`: `images` are in host
    memory (a memory map, say) and batches are gathered by a background thread, `prefetch` at a time.

    Under torchrun (`world` > 1) a shuffled (training) loader draws the global batch of
    batch_size * world images that one process would and yields this rank's slice of it, as
    transformed with the whole batch's random parameters, so N ranks see exactly one process's
    batches; it gathers and transforms only the images of its slice (transform.positions), not
    world times the work. An evaluation loader covers this rank's consecutive chunk of the
    split, every sample once."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        transform,
        *,
        device: torch.device,
        index: torch.Tensor | None = None,
        names: list[str] | None = None,
        streamed: bool = False,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        prefetch: int = 8,
        sampler: str = "random",
    ):
        self.images, self.index, self.names = images, index, names
        self.labels = labels.to(device)
        self.batch_size, self.transform, self.device = batch_size, transform, device
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.rank, self.world, self.prefetch = rank, world, prefetch
        self.resident = not streamed
        n = len(labels)
        self.part = (0, n) if shuffle else (n * rank // world, n * (rank + 1) // world)
        self.step = batch_size * world if shuffle else batch_size  # images drawn per batch
        # A last batch of one image breaks BatchNorm in training; drop the remainder there.
        self.drop_last = drop_last and n > self.step
        self._pin = device.type == "cuda" and not self.resident
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r}: one of {SAMPLERS}")
        # balanced draws replace the shuffle: a loader that does not shuffle (evaluation)
        # covers its split in order whatever the sampler
        self.draw = ClassDraw(labels) if shuffle and sampler == "balanced" else None

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _row(self, index: int) -> int:
        return index if self.index is None else int(self.index[index])

    def sample_name(self, index: int) -> str:
        return self.names[index] if self.names is not None else str(index)

    def sample(self, index: int) -> np.ndarray:
        return self.images[self._row(index)].permute(1, 2, 0).cpu().numpy()

    def pixels(self, indices: torch.Tensor) -> torch.Tensor:
        """uint8 (k, C, size, size) pixels of samples `indices` (unshuffled order) on the host,
        before normalization, as an unaugmented pass gives them to it."""
        rows = indices if self.index is None else self.index[indices]
        return self.transform.pixels(self.images[rows.to(self.images.device)]).cpu()

    def __len__(self) -> int:
        lo, hi = self.part
        return (hi - lo) // self.step if self.drop_last else -(-(hi - lo) // self.step)

    def __iter__(self):
        return self.iter_from(0)

    def _batch_indices(self) -> list[torch.Tensor]:
        """Each batch's positions in the split. The order is drawn on the CPU whatever the
        device, so the in-memory and streaming paths (and any device) see the same batches:
        a permutation, or with the balanced sampler as many class-balanced draws (ClassDraw)."""
        lo, hi = self.part
        if self.shuffle:
            gen = torch.Generator().manual_seed(batch_seed(self.seed, self.epoch, -1))
            order = (
                torch.randperm(hi, generator=gen) if self.draw is None else self.draw.order(hi, gen)
            )
            return [order[i * self.step : (i + 1) * self.step] for i in range(len(self))]
        return [
            torch.arange(lo + i * self.step, min(lo + (i + 1) * self.step, hi))
            for i in range(len(self))
        ]

    def iter_from(self, start: int):
        batches = self._batch_indices()[start:]
        parts = [{}] * len(batches)  # the transform's arguments beyond (x, y, seed)
        if self.shuffle and self.world > 1:
            mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
            parts = [
                dict(positions=self.transform.positions(len(b), mine), batch=len(b))
                for b in batches
            ]
            batches = [b[part["positions"]] for b, part in zip(batches, parts)]
        rows = batches if self.index is None else [self.index[b] for b in batches]
        positions = to_device(batches, self.device)  # one copy a pass, not two a batch
        if self.resident:
            rows = positions if self.index is None else to_device(rows, self.device)
            pixels: Iterator[torch.Tensor] = (self.images[r] for r in rows)
        else:
            pixels = self._streamed(rows)
        for i, (b, x, part) in enumerate(zip(positions, pixels, parts), start):
            yield self.transform(x, self.labels[b], batch_seed(self.seed, self.epoch, i), **part)

    def _streamed(self, rows: list[torch.Tensor]):
        """The batches gathered from host storage by a background thread, `prefetch` batches per
        gather: the gather releases the GIL, so it overlaps the step, and gathering several
        batches at once keeps the two threads from trading the GIL at every batch (each trade can
        cost the training thread a whole switch interval). A consumer that stops early
        (max_steps, a signal) stops the thread too."""
        ready: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def gather():
            try:
                for i in range(0, len(rows), self.prefetch):
                    group = rows[i : i + self.prefetch]
                    wanted = torch.cat(group)
                    out = torch.empty(
                        (len(wanted), *self.images.shape[1:]),
                        dtype=self.images.dtype,
                        pin_memory=self._pin,
                    )
                    # numpy's take: one thread, GIL released; torch's index_select here would
                    # start a second OpenMP team beside the training step's, on the same cores
                    np.take(self.images.numpy(), wanted.numpy(), axis=0, out=out.numpy())
                    if not put(out.split([len(r) for r in group])):
                        return
                put(None)
            except BaseException as e:  # handed to the consumer, raised in its thread
                put(e)

        worker = threading.Thread(target=gather, name="cnntrain-prefetch", daemon=True)
        worker.start()
        try:
            while (group := ready.get()) is not None:
                if isinstance(group, BaseException):
                    raise group
                for x in group:
                    yield x.to(self.device, non_blocking=True)
        finally:
            stop.set()
            worker.join()
