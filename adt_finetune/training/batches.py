"""What the loop trains on: the training set, its per-epoch batch order, seeded augmentation,
and the fixed probe batch on which methods report their epoch diagnostics.

The data order of epoch e is a permutation drawn from a generator seeded by
(seed, e), and random augmentation is seeded per (seed, epoch, image): neither
depends on the global RNG, which number of workers loads an image, or when, so a
run resumed mid-epoch sees exactly the batches an uninterrupted one sees.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset

from ..config import TrainConfig
from ..data import as_tensors, load_dataset
from ..errors import UserError
from ..workspace import Workspace

PROBE_SIZE = 64  # images in the diagnostics probe batch


class _SeededAugmentation(Dataset):
    """Seeds torch's RNG per (seed, epoch, index) around each item.

    Random crops and flips then do not depend on which process loads an image or
    when, so a run resumed mid-epoch (with any number of workers) sees the same
    augmented images as an uninterrupted one, and training's own RNG stream is
    untouched by data loading.
    """

    def __init__(self, inner: Dataset, seed: int):
        self.inner = inner
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % (2**63))
            return self.inner[index]


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world: int = 1) -> list[list[int]]:
    """The batches of epoch `epoch` (0-based) that process `rank` of `world` trains on, as lists
    of indices into the training set.

    The epoch's order is one permutation of the set drawn from (seed, epoch), cut into global
    batches of batch_size × world images; process r takes the r-th of `world` equal parts of
    each. A world of one trains on exactly the single-process batches, and the global batches do
    not depend on the world size. A last global batch that does not split evenly is topped up
    from the start of the permutation (as torch's DistributedSampler pads), so every process
    takes the same number of steps with the same batch size.
    """
    # Its own generator per epoch: the data order never depends on how much of the
    # global RNG the method consumed, and epoch e's order is known without replaying e-1.
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    size = batch_size * world
    batches = []
    for i in range(0, n, size):
        chunk = perm[i:i + size]
        part = batch_size
        if len(chunk) < size:
            part = -(-len(chunk) // world)
            missing = part * world - len(chunk)
            chunk += (perm * (missing // n + 1))[:missing]
        batches.append(chunk[rank * part:(rank + 1) * part])
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()  # BatchNorm cannot train on a batch of one image
    return batches


def _subset(ds: Dataset, cfg: TrainConfig) -> Dataset:
    if cfg.train_subset is None:
        return ds
    if cfg.train_subset > len(ds):  # type: ignore[arg-type]
        raise UserError(f"`train_subset` {cfg.train_subset} is larger than the training set ({len(ds)} images)")
    return Subset(ds, range(cfg.train_subset))


def train_set(cfg: TrainConfig, ws: Workspace, download: bool = True) -> Dataset:
    """The (augmented) training images of cfg.dataset, cut to --train-subset; `download` False: only
    what is on disk (a data_dir read from a run.json is a place to read, never to write)."""
    ds = load_dataset(cfg.dataset or "", "train", data_dir=cfg.data_dir, workspace=ws.root, augment=True,
                      download=download)
    return _subset(ds, cfg)


def first_images(cfg: TrainConfig, ws: Workspace, n: int, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The first min(n, set size) training images (within --train-subset), never augmented."""
    ds = load_dataset(cfg.dataset or "", "train", data_dir=cfg.data_dir, workspace=ws.root, augment=False,
                      download=download)
    with torch.random.fork_rng(devices=[]):  # a DataLoader draws its base seed from the global RNG
        return as_tensors(_subset(ds, cfg), n)


def probe_batch(cfg: TrainConfig, ws: Workspace) -> tuple[torch.Tensor, torch.Tensor]:
    """The first min(64, n) training images, never augmented: the same batch every epoch."""
    return first_images(cfg, ws, PROBE_SIZE)
