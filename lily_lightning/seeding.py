"""Per-epoch seeds derived from the run's seed, so randomness depends on (seed, epoch) and not on history."""

from __future__ import annotations

import os


def run_seed() -> int:
    """The seed ``seed_everything`` exported (``PL_GLOBAL_SEED``), else 0 - the same in every DDP rank."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def configured_seed() -> int | None:
    """The seed ``seed_everything`` exported, or None when the run set none (for result files)."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return None if seed is None else int(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """A distinct seed for each (seed, epoch) pair."""
    return seed * 1_000_003 + epoch
