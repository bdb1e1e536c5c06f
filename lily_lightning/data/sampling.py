"""Training-set order keyed by (seed, epoch), so a resumed run sees the data order of an uninterrupted one."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """A random permutation per epoch drawn from ``(seed, epoch)`` alone, never from the global RNG.

    ``epoch`` is asked for the current epoch each time iteration starts (the DataModule passes the trainer's).
    ``seed`` defaults to the one ``seed_everything`` set (``PL_GLOBAL_SEED``), else 0 - never a per-process
    draw, since under DDP every rank must walk the same permutation (as ``DistributedSampler``'s seed 0).
    """

    def __init__(self, size: int, epoch: Callable[[], int], seed: int | None = None):
        self.size = size
        self.epoch = epoch
        if seed is None:
            env_seed = os.environ.get("PL_GLOBAL_SEED")
            seed = int(env_seed) if env_seed is not None else 0
        self.seed = seed

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch())
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size
