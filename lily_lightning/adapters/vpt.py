"""Visual Prompt Tuning (Jia et al., ECCV 2022): learnable tokens at the input (shallow) or every block."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import check_dropout, check_positive
from .kinds import TOKENS


@dataclass
class VPTConfig:
    """VPT (arXiv 2203.12119, Sec. 3.2, Eq. 4-7): ``length`` prompt tokens put after the class token.
    VPT-shallow inserts them at the first block's input; VPT-deep gives every block its own, replacing the
    previous block's prompt outputs. They are dropped before the head (the paper classifies the class token;
    dropping them also keeps average pooling over the image tokens).

    As the official code (github.com/KMnP/vpt, ``src/models/vit_prompt/vit.py``): prompts drawn
    uniformly in +-sqrt(6 / (3 * patch * patch + dim)), dropout on them (0.1). VPT does *not* start at the
    pretrained model: the random prompts take part in attention from the first step.

    Args:
        length: prompt tokens per block (the paper searches 1..200 per task; 10 is the NOAH / V-PETL default).
        dropout: on the prompt tokens (training only).
        deep: one set per block (``method: vpt_deep``) instead of one at the input (``vpt_shallow``); the
            model's ``method`` sets it.
    """

    length: int = 10
    dropout: float = 0.1
    deep: bool = False

    def __post_init__(self) -> None:
        check_positive(length=self.length)
        check_dropout(self.dropout)

    @property
    def places(self) -> tuple[str, ...]:
        return ("tokens",)


class PromptTokens(nn.Module):
    """``blocks`` sets of ``length`` prompt tokens; ``tokens(block, batch)`` gives block ``block``'s set."""

    kinds = (TOKENS,)

    def __init__(self, patch_pixels: int, dim: int, blocks: int, length: int, dropout: float) -> None:
        super().__init__()
        self.length = length
        bound = math.sqrt(6.0 / (patch_pixels + dim))  # xavier-uniform over (patch pixels, dim)
        self.prompts = nn.Parameter(torch.empty(blocks, length, dim).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def blocks(self) -> int:
        """How many blocks (from the first) receive prompts."""
        return self.prompts.shape[0]

    def tokens(self, block: int, batch: int) -> torch.Tensor:
        return self.dropout(self.prompts[block].expand(batch, -1, -1))

    def extra_repr(self) -> str:
        return f"blocks={self.blocks}, length={self.length}"


def build_vpt(config: VPTConfig, features: dict[str, tuple[int, int]], depth: int) -> dict[str, nn.Module]:
    patch_pixels, dim = features["tokens"]
    blocks = depth if config.deep else 1
    return {"tokens": PromptTokens(patch_pixels, dim, blocks, config.length, config.dropout)}
