"""BitFit (Ben Zaken et al., ACL 2022): every bias of the backbone trains, nothing else."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .kinds import UnfrozenTensors


@dataclass
class BitFitConfig:
    """BitFit (arXiv 2106.10199, Sec. 2: train the bias terms only; official code
    github.com/benzakenelad/BitFit, ``utils.py`` ``_deactivate_relevant_gradients``): the biases of every
    Linear, LayerNorm and the patch embedding (the head trains anyway). The VTAB-1k "BitFit" row of VPT,
    NOAH and SSF. It starts at the pretrained model and adds no tensor; merging has nothing to fold.
    """

    @property
    def places(self) -> tuple[str, ...]:
        return ()


def build_bitfit(
    config: BitFitConfig, features: dict[str, tuple[int, int]], depth: int
) -> dict[str, nn.Module]:
    del config, features, depth
    return {"bias": UnfrozenTensors("bias")}
