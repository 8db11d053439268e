"""The two batch sources the training loop consumes. Both yield (images, labels) already on the
training device, have len() = batches per epoch, and take set_epoch(e) so that the shuffle and
augmentation of epoch e depend only on (seed, e): a resumed run sees the same batches."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset


class DeviceLoader:
    """Batches a whole uint8 image tensor that lives on the training device (airbench's CifarLoader):
    indexing, augmentation and normalization are a handful of batched tensor ops per batch, with
    no per-sample Python, no PIL and no host-to-device copy."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, transform,
                 shuffle: bool = False, drop_last: bool = False, seed: int = 0):
        self.images, self.labels = images, labels
        self.batch_size, self.transform = batch_size, transform
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        # A last batch of one image breaks BatchNorm in training; drop the remainder there.
        self.drop_last = drop_last and len(labels) > batch_size

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
        n, b = len(self.labels), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self):
        device = self.images.device
        gen = torch.Generator(device=device).manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.labels)
        order = torch.randperm(n, generator=gen, device=device) if self.shuffle else None
        for i in range(len(self)):
            if order is None:
                sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
                x, y = self.images[sl], self.labels[sl]
            else:
                idx = order[i * self.batch_size:(i + 1) * self.batch_size]
                x, y = self.images[idx], self.labels[idx]
            yield self.transform(x, gen), y


class FolderLoader:
    """A DataLoader over decoded files (ImageFolder) whose batches are moved to the device with
    pinned memory and non_blocking copies."""

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int, device: torch.device,
                 shuffle: bool = False, drop_last: bool = False, seed: int = 0):
        self.device, self.seed = device, seed
        self.generator = torch.Generator()
        self.loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
            drop_last=drop_last and len(dataset) > batch_size, generator=self.generator,
            pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)
        self.set_epoch(0)

    @property
    def num_samples(self) -> int:
        return len(self.loader.dataset)

    def sample_name(self, index: int) -> str:
        """How reports name sample `index` (of the unshuffled order): its file."""
        ds = self.loader.dataset
        if hasattr(ds, "indices"):  # a Subset of an ImageFolder
            ds, index = ds.dataset, ds.indices[index]
        return ds.samples[index][0]

    def sample(self, index: int):
        """uint8 HxWxC pixels of sample `index` (unshuffled order), for reports."""
        import numpy as np
        from PIL import Image

        with Image.open(self.sample_name(index)) as img:
            return np.asarray(img.convert("RGB"))

    def set_epoch(self, epoch: int) -> None:
        # The shuffle order and the workers' seeds are drawn from this generator.
        self.generator.manual_seed(self.seed * 100_003 + epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
