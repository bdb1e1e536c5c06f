"""The sequential bottleneck Adapter baseline of the visual-PEFT tables: after every block's MLP."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import UsageError
from .bottleneck import ACTIVATIONS, Activation, BottleneckAdapter
from .config import check_dropout, check_positive


@dataclass
class SequentialAdapterConfig:
    """A bottleneck adapter after each block's MLP, fed the MLP's output, with a residual:
    ``x + (m + up(act(down(m))))`` with ``m = MLP(LN(x))``.

    The "Adapter" row of VPT (Jia et al., ECCV 2022, Sec. 4 and App. A: Pfeiffer et al.'s placement after
    the FFN) and NOAH / V-PETL Bench, which train it with bottleneck 8 on VTAB-1k. The up-projection and its
    bias start at zero (so the model starts at the pretrained one), as in Houlsby et al. 2019, Sec. 2.1.
    The adapter has no official ViT file of its own; NOAH's and VPT's configs name only its width.

    Args:
        bottleneck: the adapter's hidden width.
        activation: ``relu`` (Pfeiffer et al.) or ``gelu`` (Houlsby et al.).
        dropout: on the bottleneck activation (training only).
    """

    bottleneck: int = 8
    activation: Activation = "relu"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_positive(bottleneck=self.bottleneck)
        check_dropout(self.dropout)
        if self.activation not in ACTIVATIONS:
            raise UsageError(f"unknown activation {self.activation!r}; choose one of {ACTIVATIONS}")

    @property
    def places(self) -> tuple[str, ...]:
        return ("mlp",)


def build_sequential_adapter(
    config: SequentialAdapterConfig, features: dict[str, tuple[int, int]], depth: int
) -> dict[str, nn.Module]:
    width = features["mlp"][1]
    return {
        "mlp": BottleneckAdapter(
            width, config.bottleneck, depth, config.activation, config.dropout, 1.0, reads="output"
        )
    }
