"""Training-set order keyed by (seed, epoch), so a resumed run sees the data order of an uninterrupted one;
global batches shared out across processes, so N processes see the batches of one."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DistributedSampler, Sampler

from lily_lightning.errors import UsageError
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


def process_group() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` outside an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GlobalBatchSampler(BatchSampler):
    """Cuts ``sampler``'s order into global batches of ``batch_size`` x world size; yields this rank's share.

    So N processes with per-process ``batch_size`` b see, at every step, together exactly the images one
    process with batch N x b sees (batch routing with ``sync_routing`` then mixes the experts over the
    same set). Each global batch is split in N contiguous parts, as equal as the batch allows: the last,
    ragged one may leave a rank an EMPTY batch, which the collate turns into a zero-size batch, so every
    rank runs the same number of steps (each joins every routing all-reduce) and no image is padded or
    repeated (Lightning's ``DistributedSampler`` pads with duplicates). Outside a process group this is
    ``BatchSampler``.

    Lightning's own distributed sampler must stay off (``Trainer(use_distributed_sampler=False)``, the CLI's
    default): given one, this refuses, since both would shard the data.
    """

    def __init__(self, sampler: Sampler[int] | Sized, batch_size: int, drop_last: bool):
        if isinstance(sampler, DistributedSampler):
            raise UsageError(
                "the data module shards each global batch across processes itself; turn Lightning's "
                "distributed sampler off: Trainer(use_distributed_sampler=False) "
                "(--trainer.use_distributed_sampler false; the lily_lightning CLI's default)"
            )
        super().__init__(sampler, batch_size, drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        rank, world = process_group()
        size = self.batch_size * world
        order = list(self.sampler)
        for start in range(0, len(self) * size, size):
            batch = order[start : start + size]
            yield batch[rank * len(batch) // world : (rank + 1) * len(batch) // world]

    def __len__(self) -> int:
        size = self.batch_size * process_group()[1]
        count = len(self.sampler)  # type: ignore[arg-type]
        return count // size if self.drop_last else -(-count // size)
