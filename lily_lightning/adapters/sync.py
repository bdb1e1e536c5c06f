"""The batch mix averaged over every process's batch: one differentiable all-reduce per block and site."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_reduce


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process (DDP, torchrun, SLURM)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_mean(rows: torch.Tensor, sync: bool) -> torch.Tensor:
    """The mean of ``rows`` (n, E) over dim 0; with ``sync`` under a process group, over all ranks' rows.

    The row count travels in the same all-reduce as the sums, so ranks may hold different counts (even
    zero). ``torch.distributed.nn``'s all-reduce is differentiable (its backward all-reduces the incoming
    gradients), so every rank's router receives the gradient of every rank's loss through the shared mix:
    with DDP's gradient averaging this is exactly the gradient of one process holding the whole batch.
    """
    if not (sync and is_distributed()):
        return rows.mean(0)
    # In float32 whatever the autocast dtype: bfloat16 counts exactly only up to 256 rows (B x tokens).
    count = rows.new_full((1,), rows.shape[0], dtype=torch.float32)
    totals = all_reduce(torch.cat([rows.float().sum(0), count]))
    return (totals[:-1] / totals[-1]).to(rows.dtype)
