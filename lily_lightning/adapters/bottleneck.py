"""A bottleneck branch (down-projection, activation, up-projection, both with bias), one per block.

Shared by AdaptFormer (beside the MLP, fed the MLP's input) and the sequential Adapter (after the MLP, fed its
output). The up-projection starts at zero, so the adapted model starts at the pretrained one.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from .kinds import DELTA, USE_UNMERGED, Reads

Activation = Literal["relu", "gelu"]
ACTIVATIONS: tuple[str, ...] = ("relu", "gelu")


class BottleneckAdapter(nn.Module):
    """``scale * up_i(drop(act(down_i(h))))`` for block ``i``; not linear in ``h``, so it never folds."""

    kinds = (DELTA,)

    def __init__(
        self,
        width: int,
        bottleneck: int,
        depth: int,
        activation: Activation,
        dropout: float,
        scale: float,
        reads: Reads,
    ) -> None:
        super().__init__()
        self.reads = reads
        self.scale = scale
        self.down = nn.ModuleList(nn.Linear(width, bottleneck) for _ in range(depth))
        self.up = nn.ModuleList(nn.Linear(bottleneck, width) for _ in range(depth))
        self.act: nn.Module = nn.ReLU() if activation == "relu" else nn.GELU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():  # AdaptFormer's "lora" init: kaiming-uniform down, zero up and biases
            for down, up in zip(self.down, self.up, strict=True):
                nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
                nn.init.zeros_(down.bias)
                nn.init.zeros_(up.weight)
                nn.init.zeros_(up.bias)

    def forward(self, h: torch.Tensor, block: int) -> torch.Tensor:
        return self.up[block](self.dropout(self.act(self.down[block](h)))) * self.scale

    def delta_weight(self, block: int) -> None:
        del block  # a ReLU / GELU sits between the projections
        return None

    def merge_problem(self, site: str) -> str:
        """Always a refusal: the branch is the whole method, and no Linear of the ViT computes it."""
        where = (
            "a sequential bottleneck after each block's MLP, fed its output"
            if self.reads == "output"
            else "a parallel bottleneck beside each block's MLP"
        )
        return (
            f"cannot merge or export {site!r}: the method is {where}, up({self.act.__class__.__name__}("
            "down(h))), non-linear in h, so it cannot be folded into the linear weights and a plain timm "
            f"ViT cannot compute it. {USE_UNMERGED}"
        )

    def extra_repr(self) -> str:
        return f"reads={self.reads!r}, scale={self.scale}"
