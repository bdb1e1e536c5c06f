"""Per-epoch seeds derived from the run's seed, so randomness depends on (seed, epoch) and not on history."""

from __future__ import annotations

import os


def run_seed() -> int:
    """The seed ``seed_everything`` exported (``PL_GLOBAL_SEED``), else 0 - the same in every DDP rank."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def epoch_seed(seed: int, epoch: int) -> int:
    """A distinct seed for each (seed, epoch) pair."""
    return seed * 1_000_003 + epoch
