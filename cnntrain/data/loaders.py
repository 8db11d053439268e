"""The two batch sources the training loop consumes. Both yield (images, labels) already on the
training device, have len() = batches per epoch, and take set_epoch(e) so that the shuffle and
augmentation of epoch e depend only on (seed, e): a resumed run sees the same batches."""
from __future__ import annotations

import itertools
import logging

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

log = logging.getLogger("cnntrain")


class DeviceLoader:
    """Batches a whole uint8 image tensor that lives on the training device (airbench's CifarLoader):
    indexing, augmentation and normalization are a handful of batched tensor ops per batch, with
    no per-sample Python, no PIL and no host-to-device copy.

    Under torchrun (`world` > 1) a shuffled (training) loader draws the global batch of
    batch_size * world images that one process would, augments it with the same random
    parameters and yields this rank's slice, so N ranks see exactly one process's batches; an
    evaluation loader covers this rank's consecutive chunk of the split, every sample once."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, transform,
                 shuffle: bool = False, drop_last: bool = False, seed: int = 0,
                 rank: int = 0, world: int = 1):
        self.images, self.labels = images, labels
        self.batch_size, self.transform = batch_size, transform
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.rank, self.world = rank, world
        n = len(labels)
        self.part = (0, n) if shuffle else (n * rank // world, n * (rank + 1) // world)
        self.step = batch_size * world if shuffle else batch_size  # images drawn per batch
        # A last batch of one image breaks BatchNorm in training; drop the remainder there.
        self.drop_last = drop_last and n > self.step

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def sample_name(self, index: int) -> str:
        """How reports name sample `index` (of the unshuffled order): its index in the split."""
        return str(index)

    def sample(self, index: int):
        """uint8 HxWxC pixels of sample `index` (unshuffled order), for reports."""
        return self.images[index].permute(1, 2, 0).cpu().numpy()

    def __len__(self) -> int:
        lo, hi = self.part
        return (hi - lo) // self.step if self.drop_last else -(-(hi - lo) // self.step)

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, start: int):
        """The batches of this epoch from batch `start` on (a resumed epoch). The batches before
        it are still augmented and dropped: that advances the random generator exactly as the
        uninterrupted epoch did, for a few milliseconds of tensor ops per batch."""
        device = self.images.device
        gen = torch.Generator(device=device).manual_seed(self.seed * 100_003 + self.epoch)
        lo, hi = self.part
        order = torch.randperm(hi, generator=gen, device=device) if self.shuffle else None
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for i in range(len(self)):
            if order is None:
                sl = slice(lo + i * self.step, min(lo + (i + 1) * self.step, hi))
                x, y = self.images[sl], self.labels[sl]
            else:
                idx = order[i * self.step:(i + 1) * self.step]
                x, y = self.images[idx], self.labels[idx]
            x = self.transform(x, gen, replay=i < start)
            if i >= start:
                yield (x[mine], y[mine]) if order is not None and self.world > 1 else (x, y)


class FolderLoader:
    """A DataLoader over decoded files (ImageFolder) whose batches are moved to the device with
    pinned memory and non_blocking copies.

    An undecodable image stops the pass with a UserError naming the file, or, with
    skip_bad_images, is left out of its batch and counted: one warning per pass lists them.
    Sample indices (sample_name, sample) then count the images that were read, so the i-th
    prediction of an unshuffled pass still belongs to the i-th index."""

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int, device: torch.device,
                 shuffle: bool = False, drop_last: bool = False, seed: int = 0,
                 skip_bad_images: bool = False, rank: int = 0, world: int = 1):
        from cnntrain.data.folder import collate_images

        self.device, self.seed, self.skip_bad_images = device, seed, skip_bad_images
        # Two generators: DataLoader draws the workers' base seed from its own when it starts
        # workers, with persistent workers on the first pass only; sharing it would give the
        # first pass of an epoch (a resumed one) another shuffle order than later passes.
        self.generator, self.order = torch.Generator(), torch.Generator()
        # the sampler and batch sampler DataLoader(shuffle=, drop_last=) would build, resumable
        # and under torchrun (world > 1) sharded as DeviceLoader is: each rank's slice of the
        # global batch in training, its consecutive chunk of the split in evaluation
        n = len(dataset)
        if shuffle:
            sampler, step = RandomSampler(dataset, generator=self.order), batch_size * world
        else:
            sampler, step = range(n * rank // world, n * (rank + 1) // world), batch_size
        self.batches = _ResumableBatches(sampler, step, drop_last and n > step)
        if shuffle and world > 1:
            self.batches.mine = slice(rank * batch_size, (rank + 1) * batch_size)
        self.loader = DataLoader(
            dataset, batch_sampler=self.batches, num_workers=num_workers, generator=self.generator,
            pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
            collate_fn=collate_images)
        # what skipping leaves of a training batch must still be a batch for BatchNorm
        self.min_batch = 2 if drop_last else 1
        self.bad_files: set[str] = set()  # every unreadable file met so far (skip_bad_images)
        self._kept: list[int] | None = None  # positions of the readable samples, once some are bad
        self.set_epoch(0)

    @property
    def num_samples(self) -> int:
        return len(self.loader.dataset)

    def _file(self, position: int) -> str:
        ds = self.loader.dataset
        if hasattr(ds, "indices"):  # a Subset of an ImageFolder
            ds, position = ds.dataset, ds.indices[position]
        return ds.samples[position][0]

    def _position(self, index: int) -> int:
        if not self.bad_files:
            return index
        if self._kept is None:
            self._kept = [p for p in range(self.num_samples) if self._file(p) not in self.bad_files]
        return self._kept[index]

    def sample_name(self, index: int) -> str:
        """How reports name sample `index` (of the unshuffled order, readable images only): its file."""
        return self._file(self._position(index))

    def sample(self, index: int):
        """uint8 HxWxC pixels of sample `index` (unshuffled order), for reports."""
        import numpy as np
        from PIL import Image

        from cnntrain.data.folder import to_mode

        with Image.open(self.sample_name(index)) as img:
            return np.asarray(to_mode(img))

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed * 100_003 + epoch)
        self.order.manual_seed(self.seed * 100_003 + epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, start: int):
        """The batches of this epoch from batch `start` on (a resumed epoch): the same order as
        the whole epoch, and the batches before `start` are not read at all."""
        skipped: list[str] = []
        last = len(self.loader) - 1
        self.batches.start = start
        try:
            for i, (x, y, bad) in enumerate(self.loader, start):
                if bad:
                    if not self.skip_bad_images:
                        raise bad[0].error()
                    skipped += [b.path for b in bad]
                if i == last:  # the pass's count is complete: report it before the last batch is used
                    self._report(skipped)
                    skipped = []
                if x is None or len(y) < self.min_batch:
                    continue
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        finally:
            self._report(skipped)  # a pass cut short (max_steps): what it met

    def _report(self, skipped: list[str]) -> None:
        if not skipped:
            return
        if not set(skipped) <= self.bad_files:
            self.bad_files.update(skipped)
            self._kept = None
        log.warning("skipped %d unreadable image(s) of %d (data.skip_bad_images=true): %s%s",
                    len(skipped), self.num_samples, ", ".join(skipped[:5]),
                    ", ..." if len(skipped) > 5 else "")


class _ResumableBatches(BatchSampler):
    """A BatchSampler that leaves out its first `start` batches of indices; its sampler still
    draws the whole epoch's order, so the batches after them are the uninterrupted epoch's.
    `mine`: the part of each (global) batch this rank takes."""
    start = 0
    mine = slice(None)

    def __iter__(self):
        return (batch[self.mine] for batch in itertools.islice(super().__iter__(), self.start, None))
