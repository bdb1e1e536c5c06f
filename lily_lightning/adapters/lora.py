"""The LoRA baseline site: an independent (A, B) pair per block, ``delta = alpha / r * B(A(drop(x)))``."""

from __future__ import annotations

import torch
from torch import nn

from .config import LoRAConfig
from .kinds import DELTA


class LoRAAdapter(nn.Module):
    """One LoRA site across all ``depth`` blocks; ``forward(x, block)`` returns that block's delta."""

    kinds = (DELTA,)
    reads = "input"

    def __init__(
        self, in_features: int, out_features: int, depth: int, rank: int, scaling: float, dropout: float
    ) -> None:
        super().__init__()
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # A keeps nn.Linear's kaiming-uniform init and B starts at zero (Hu et al.; PEFT does the same).
        self.lora_a = nn.ModuleList(nn.Linear(in_features, rank, bias=False) for _ in range(depth))
        self.lora_b = nn.ModuleList(nn.Linear(rank, out_features, bias=False) for _ in range(depth))
        for b in self.lora_b:
            nn.init.zeros_(b.weight)

    def forward(self, x: torch.Tensor, block: int) -> torch.Tensor:
        # Scaling the rank-r activation, not the output, is the same map at 1/r-th of an output-wide multiply.
        return self.lora_b[block](self.lora_a[block](self.dropout(x)) * self.scaling)

    def delta_weight(self, block: int) -> torch.Tensor:
        """``alpha / r * W_B @ W_A`` (dropout is the identity at eval)."""
        return self.scaling * self.lora_b[block].weight @ self.lora_a[block].weight

    def extra_repr(self) -> str:
        return f"scaling={self.scaling}"


def build_lora(config: LoRAConfig, site: str, in_features: int, out_features: int, depth: int) -> LoRAAdapter:
    """The adapter for one site; every site is treated alike."""
    del site  # LoRA has no per-site special case
    return LoRAAdapter(in_features, out_features, depth, config.rank, config.scaling, config.dropout)
