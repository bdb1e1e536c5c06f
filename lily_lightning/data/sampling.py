"""Training-set order keyed by (seed, epoch), so a resumed run sees the data order of an uninterrupted one."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler

from lily_lightning.seeding import epoch_seed, run_seed


class EpochShuffleSampler(Sampler[int]):
    """A random permutation per epoch drawn from ``(seed, epoch)`` alone, never from the global RNG.

    ``epoch`` is asked for the current epoch each time iteration starts (the DataModule passes the trainer's).
    ``seed`` defaults to the one ``seed_everything`` set (``PL_GLOBAL_SEED``), else 0 - never a per-process
    draw, since under DDP every rank must walk the same permutation (as ``DistributedSampler``'s seed 0).
    """

    def __init__(self, size: int, epoch: Callable[[], int], seed: int | None = None):
        self.size = size
        self.epoch = epoch
        self.seed = run_seed() if seed is None else seed

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch()))
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size
