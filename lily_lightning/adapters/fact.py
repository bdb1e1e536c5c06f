"""FacT-TT (Jie & Deng, AAAI 2023): every weight update of the ViT as one tensor-train factorisation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import check_dropout, check_positive
from .kinds import DELTA

FACT_PLACES: tuple[str, ...] = ("q", "k", "v", "proj", "fc1", "fc2")


@dataclass
class FacTTTConfig:
    """FacT-TT (arXiv 2212.03145, Sec. 3.3, Eq. 8): ``dW = s * U C_site,block V``, with ``U`` (dim -> r) and
    ``V`` (r -> dim) shared by every weight of every block and a small core ``C`` per weight.

    As the official VTAB code (github.com/JieShibo/PETL-ViT, ``FacT/fact_tt.py``, ``set_FacT``): cores on
    q, k, v, the attention projection and both MLP Linears; the MLP's 4*dim side is split into 4 chunks of
    dim, each through the shared factor, so fc1's core is r -> 4r and fc2's 4r -> r; ``V`` starts at zero,
    the cores keep nn.Linear's init; dropout 0.1 after each core.

    Args:
        rank: r (the official VTAB configs use 8 on most tasks).
        scale: s (the official configs ``FacT/configs/tt/<task>.yaml`` set it per task, 0.01 to 10).
        dropout: after each core (training only).
    """

    rank: int = 8
    scale: float = 1.0
    dropout: float = 0.1

    def __post_init__(self) -> None:
        check_positive(rank=self.rank)
        check_dropout(self.dropout)

    @property
    def places(self) -> tuple[str, ...]:
        return FACT_PLACES


class FacTFactors(nn.Module):
    """The shared factors: ``u`` (dim -> r) and ``v`` (r -> dim, zero at start)."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.u = nn.Linear(dim, rank, bias=False)
        self.v = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.v.weight)


class FacTSite(nn.Module):
    """One weight's cores across blocks; ``forward(h, block) = s * V(drop(C_block(U(h))))`` chunk-wise.

    A site of ``chunks_in * dim`` inputs and ``chunks_out * dim`` outputs reads each dim-wide input chunk
    through ``U`` and writes each output chunk through ``V``; the core maps the ``chunks_in * r`` values to
    ``chunks_out * r``. The factors are referenced, not owned: ``model.adapters["factors"]`` owns them.
    """

    kinds = (DELTA,)
    reads = "input"

    def __init__(
        self, factors: FacTFactors, depth: int, chunks_in: int, chunks_out: int, scale: float, dropout: float
    ) -> None:
        super().__init__()
        self._factors = (factors,)  # a tuple keeps the shared factors out of this module's parameters
        rank = factors.u.out_features
        self.chunks_in, self.chunks_out, self.scale = chunks_in, chunks_out, scale
        self.core = nn.ModuleList(
            nn.Linear(chunks_in * rank, chunks_out * rank, bias=False) for _ in range(depth)
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, h: torch.Tensor, block: int) -> torch.Tensor:
        factors = self._factors[0]
        z = factors.u(h.unflatten(-1, (self.chunks_in, -1))).flatten(-2)
        z = self.dropout(self.core[block](z))
        return factors.v(z.unflatten(-1, (self.chunks_out, -1))).flatten(-2) * self.scale

    def delta_weight(self, block: int) -> torch.Tensor:
        """``s * diag(V, ..., V) @ C @ diag(U, ..., U)``: (chunks_out * dim, chunks_in * dim)."""
        factors = self._factors[0]
        v = torch.block_diag(*[factors.v.weight] * self.chunks_out)
        u = torch.block_diag(*[factors.u.weight] * self.chunks_in)
        return self.scale * v @ self.core[block].weight @ u

    def extra_repr(self) -> str:
        return f"chunks_in={self.chunks_in}, chunks_out={self.chunks_out}, scale={self.scale}"


def build_fact_tt(
    config: FacTTTConfig, features: dict[str, tuple[int, int]], depth: int
) -> dict[str, nn.Module]:
    dim = features["proj"][1]
    factors = FacTFactors(dim, config.rank)
    sites: dict[str, nn.Module] = {"factors": factors}
    for place in FACT_PLACES:
        in_features, out_features = features[place]
        if in_features % dim or out_features % dim:
            raise ValueError(
                f"FacT needs {place}'s widths ({in_features}, {out_features}) in multiples of {dim}"
            )
        sites[place] = FacTSite(
            factors, depth, in_features // dim, out_features // dim, config.scale, config.dropout
        )
    return sites
