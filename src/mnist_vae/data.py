"""The data as tensors: verified splits read from data/, and fast in-memory batches.

Training reads whole uint8 tensors into memory and serves shuffled batches by index, converted to
float per batch: the tutorial's per-sample PIL/ToTensor DataLoader halves training speed on a 2-core
CPU (benchmarks/train_throughput.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .idx import FILES, SOURCE_FILE, DataError, DataSource, parse_idx, read_maybe_gz


def load_split(split: str, data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 784) uint8 images and (N,) int64 labels, checked against the sha256 download recorded."""
    expected = DataSource.read(data_dir).sha256_decompressed
    arrays = []
    for name in FILES[split]:
        path = Path(data_dir) / name
        raw = read_maybe_gz(path)
        if hashlib.sha256(raw).hexdigest() != expected.get(name):
            raise DataError(f"{path}: sha256 differs from {Path(data_dir) / SOURCE_FILE} (truncated "
                            "or altered); run `dvc repro -f download` to fetch it again")
        arrays.append(parse_idx(raw, str(path)))
    images, labels = arrays
    if len(images) != len(labels):
        raise DataError(f"{data_dir}: {len(images)} {split} images but {len(labels)} labels; "
                        "run `dvc repro -f download` to fetch the data again")
    return torch.from_numpy(images.reshape(len(images), -1).copy()), torch.from_numpy(labels.astype(np.int64))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> [0, 1] floats: the Bernoulli decoder's targets (the tutorial's grayscale)."""
    return images.float().div_(255)


def binarize(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Stochastic binarization (each pixel 255 with probability pixel / 255, else 0), seeded:
    the binarized-MNIST setting of the IWAE paper. Same shape, dtype and order; labels untouched."""
    return (torch.rand(images.shape, generator=generator) * 255 < images).to(torch.uint8) * 255


class ShuffledBatches(Sampler[torch.Tensor]):
    """Yields whole index tensors, one per batch, so the dataset gathers a batch in one op.

    Under DDP each rank holds one of these with its own `rank`: every rank draws the same seeded
    permutation for the epoch (`set_epoch`, which Lightning calls) and takes every
    `world_size`-th index of it, as `DistributedSampler` does, but without its padding, so the
    ranks' shares are disjoint and cover the images exactly once per epoch. Every rank yields
    the same number of batches (DDP's gradient all-reduce hangs otherwise): the smallest share's
    count, the last batch taking what is left (at most batch_size + 1 images)."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if not 0 <= rank < world_size <= n:
            raise DataError(f"rank {rank} of {world_size} ranks over {n} images: each rank needs "
                             "at least one image; lower train.devices or use more data")
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        # A generator: the order is drawn at the first batch, after Lightning's set_epoch, even
        # where Lightning made the iterator before it (the first epoch of a resumed fit).
        if self.shuffle:  # seed + epoch, as DistributedSampler: the same order on every rank
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.arange(self.n)
        share = order[self.rank::self.world_size]
        cut = (len(self) - 1) * self.batch_size
        head = share[:cut].split(self.batch_size) if cut else ()  # split of nothing is [empty]
        yield from [*head, share[cut:]]

    def __len__(self) -> int:
        return -(-(self.n // self.world_size) // self.batch_size)


class TensorBatches(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, binarize: bool = False) -> None:
        self.images, self.labels = images, labels  # (N, 784) uint8, (N,) int64
        self.binarize = binarize

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_float(self.images[index])
        # Dynamic binarization: a fresh draw each time an image is seen (Burda et al. 2016).
        return (torch.bernoulli(x) if self.binarize else x), self.labels[index]


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool,
            binarize: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1) -> DataLoader:
    # batch_size=None: the sampler already yields batches, so no per-sample collate runs.
    sampler = ShuffledBatches(len(images), batch_size, shuffle, seed, rank, world_size)
    return DataLoader(TensorBatches(images, labels, binarize), batch_size=None, sampler=sampler)


def split_train_val(images: torch.Tensor, labels: torch.Tensor, val_fraction: float, seed: int,
                    binarize_val: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The training split divided into train and validation with a seed."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_val = round(len(images) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    val_images = images[val]
    if binarize_val:  # validation binarized once, so epochs compare on the same targets
        val_images = binarize(val_images, torch.Generator().manual_seed(seed))
    return {"train": (images[train], labels[train]), "val": (val_images, labels[val])}
