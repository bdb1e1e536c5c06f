"""SSF (Lian et al., NeurIPS 2022): a learnable scale and shift after every Linear and LayerNorm."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError
from .kinds import AFFINE, MODEL_PLACES

SSF_PLACES: tuple[str, ...] = ("patch_embed", "norm1", "qkv", "proj", "norm2", "fc1", "fc2", "norm")


@dataclass
class SSFConfig:
    """Scaling & Shifting your Features (arXiv 2210.08823, Sec. 3.2, Eq. 3: ``y = gamma * x + beta``).

    As the official code (github.com/dongzelian/SSF, ``models/vision_transformer.py``): one (gamma, beta)
    pair after the patch embedding, after each block's norm1, qkv, proj, norm2, fc1 and fc2, and after the
    final norm. Each folds into the Linear, LayerNorm or patch-embedding weights before it (Sec. 3.3).

    Args:
        init_std: the official ``init_ssf_scale_shift`` draws gamma ~ N(1, 0.02) and beta ~ N(0, 0.02);
            the default 0 starts at gamma = 1, beta = 0, exactly the pretrained model.
    """

    init_std: float = 0.0

    def __post_init__(self) -> None:
        if self.init_std < 0:
            raise UsageError(f"init_std must be >= 0, got {self.init_std}")

    @property
    def places(self) -> tuple[str, ...]:
        return SSF_PLACES


class ScaleShift(nn.Module):
    """Per-channel ``out * scale[i] + shift[i]`` for each of ``blocks`` places of width ``width``."""

    kinds = (AFFINE,)

    def __init__(self, width: int, blocks: int, init_std: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(blocks, width))
        self.shift = nn.Parameter(torch.zeros(blocks, width))
        if init_std > 0:
            with torch.no_grad():
                self.scale.normal_(1.0, init_std)
                self.shift.normal_(0.0, init_std)

    def affine(
        self, block: int, weight: torch.Tensor | None, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        del weight, bias  # SSF's pair does not depend on the frozen tensors
        return self.scale[block], self.shift[block]


def build_ssf(config: SSFConfig, features: dict[str, tuple[int, int]], depth: int) -> dict[str, nn.Module]:
    return {
        place: ScaleShift(features[place][1], 1 if place in MODEL_PLACES else depth, config.init_std)
        for place in SSF_PLACES
    }
