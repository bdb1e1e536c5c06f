"""DoRA (Liu et al., ICML 2024): a weight's magnitude and a LoRA-updated direction, trained apart."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError
from .config import check_positive
from .kinds import AFFINE, DELTA
from .lora import LoRAAdapter

LINEAR_SITES: tuple[str, ...] = ("q", "k", "v", "proj", "fc1", "fc2")


@dataclass
class DoRAConfig:
    """DoRA, Weight-Decomposed Low-Rank Adaptation (arXiv 2402.09353, Sec. 4.1, Eq. 5):
    ``W' = m * (W0 + s B A) / ||W0 + s B A||_c`` with ``m`` initialised to ``||W0||_c``, the norm of each
    output channel's weight row, so training starts at the pretrained weights. As in Sec. 4.3 (official
    code: github.com/NVlabs/DoRA; HF PEFT's ``tuners/lora/dora.py`` does the same), the norm is a constant
    for backpropagation: its value is the same, its gradient is not taken.

    Args:
        rank: r of the direction's LoRA update (A: kaiming-uniform, B: zeros).
        alpha: s = alpha / r.
        targets: the Linear sites (``q``, ``k``, ``v``, ``proj``, ``fc1``, ``fc2``); q and v by default,
            as the VTAB-1k LoRA baseline.
    """

    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        check_positive(rank=self.rank, alpha=self.alpha)
        unknown = [t for t in self.targets if t not in LINEAR_SITES]
        if not self.targets or unknown or len(set(self.targets)) != len(self.targets):
            raise UsageError(f"dora targets {self.targets} must be distinct sites among {LINEAR_SITES}")

    @property
    def places(self) -> tuple[str, ...]:
        return self.targets


class DoRAAdapter(LoRAAdapter):
    """LoRA's direction update (a delta on the input) plus the magnitude as an affine on the output.

    With the frozen rows ``W0`` and bias ``b``: ``y = g * (W0 x + s B A x) + b`` where
    ``g = m / ||W0 + s B A||_c``, so the affine is ``scale = g``, ``shift = (1 - g) * b``.
    """

    kinds = (DELTA, AFFINE)

    def __init__(self, in_features: int, out_features: int, depth: int, rank: int, scaling: float) -> None:
        super().__init__(in_features, out_features, depth, rank, scaling, dropout=0.0)
        # ||W0||_c per block; vit/inject sets it from the frozen weights (init_from_base).
        self.magnitude = nn.Parameter(torch.ones(depth, out_features))

    @torch.no_grad()
    def init_from_base(self, block: int, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        del bias
        self.magnitude[block].copy_(torch.linalg.vector_norm(weight, dim=1))

    def affine(
        self, block: int, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        direction = weight + self.delta_weight(block).to(weight.dtype)
        gain = self.magnitude[block] / torch.linalg.vector_norm(direction, dim=1).detach()
        shift = (1 - gain) * bias if bias is not None else torch.zeros_like(gain)
        return gain, shift


def build_dora(config: DoRAConfig, features: dict[str, tuple[int, int]], depth: int) -> dict[str, nn.Module]:
    return {
        site: DoRAAdapter(*features[site], depth, config.rank, config.alpha / config.rank)
        for site in config.targets
    }
