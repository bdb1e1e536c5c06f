"""AdaptFormer (Chen et al., NeurIPS 2022): a scaled bottleneck branch beside every block's MLP."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .bottleneck import BottleneckAdapter
from .config import check_dropout, check_positive


@dataclass
class AdaptFormerConfig:
    """AdaptFormer's parallel adapter (Sec. 3.2, Eq. 2 and Fig. 2b of arXiv 2205.13535):
    ``x + MLP(LN(x)) + s * up(ReLU(down(LN(x))))`` in each block.

    As the official code (github.com/ShoufaChen/AdaptFormer, ``models/adapter.py`` with
    ``init_option="lora"``, built in ``models/vit_image.py`` with ``dropout=0.1``): both projections have a
    bias, the down-projection keeps kaiming-uniform init, the up-projection and both biases start at zero.
    Bottleneck 8 is the VTAB-1k setting of NOAH / V-PETL Bench (the paper's image runs use 64).

    Args:
        bottleneck: the branch's hidden width.
        scale: s, the branch's fixed scale.
        dropout: on the bottleneck activation (training only).
    """

    bottleneck: int = 8
    scale: float = 0.1
    dropout: float = 0.1

    def __post_init__(self) -> None:
        check_positive(bottleneck=self.bottleneck)
        check_dropout(self.dropout)

    @property
    def places(self) -> tuple[str, ...]:
        return ("mlp",)


def build_adaptformer(
    config: AdaptFormerConfig, features: dict[str, tuple[int, int]], depth: int
) -> dict[str, nn.Module]:
    width = features["mlp"][0]
    return {
        "mlp": BottleneckAdapter(
            width, config.bottleneck, depth, "relu", config.dropout, config.scale, reads="input"
        )
    }
