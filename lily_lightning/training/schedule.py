"""The paper's learning-rate curve, evaluated per optimiser step.

The official ViT code steps timm's ``CosineLRScheduler(t_initial=100, warmup_t=10, warmup_lr_init=1e-6,
lr_min=1e-5)`` once per epoch: a linear warm-up from ``warmup_lr`` to ``lr`` over the first
``warmup_epochs``, then ``lr_min + (lr - lr_min) * (1 + cos(pi * t / total)) / 2`` with ``t`` counted from
the start of training (timm's default, ``warmup_prefix=False``). Here ``t`` is the fractional epoch, so
the same curve is followed smoothly and agrees with timm's at every epoch boundary.
"""

from __future__ import annotations

import math


def warmup_cosine_lr(
    epoch: float, lr: float, total_epochs: float, warmup_epochs: float, warmup_lr: float, min_lr: float
) -> float:
    """Learning rate at fractional ``epoch``."""
    if epoch < warmup_epochs:
        return warmup_lr + epoch * (lr - warmup_lr) / warmup_epochs
    progress = min(epoch / total_epochs, 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
