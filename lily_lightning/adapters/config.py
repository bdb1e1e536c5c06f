"""Adapter configs: plain dataclasses, validated on construction, no timm or Lightning import.

Invalid values raise ``UsageError`` (a ``ValueError``), which the CLI shows as one message.

The sites are named after the timm ViT block they touch:
``q``/``k``/``v`` - added to the query/key/value slice of the fused ``qkv`` projection,
``proj`` - the attention output projection, ``fc1``/``fc2`` - the MLP's two linears,
``mlp`` - one adapter parallel to the whole MLP (input: the MLP input, output added to the MLP output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import UsageError

SITES: tuple[str, ...] = ("q", "k", "v", "proj", "fc1", "fc2", "mlp")
ROUTINGS: tuple[str, ...] = ("batch", "sample", "token", "uniform")
EVAL_ROUTINGS: tuple[str, ...] = ("batch", "running")

Routing = Literal["batch", "sample", "token", "uniform"]
EvalRouting = Literal["batch", "running"]


def _check_targets(targets: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    targets = tuple(targets)
    if not targets:
        raise UsageError(f"targets is empty; choose one or more of {SITES}")
    unknown = [t for t in targets if t not in SITES]
    if unknown:
        raise UsageError(f"unknown target site(s) {unknown}; valid sites are {SITES}")
    if len(set(targets)) != len(targets):
        raise UsageError(f"targets {targets} name a site twice")
    return targets


def check_positive(**values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise UsageError(f"{name} must be > 0, got {value}")


def check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"dropout must be in [0, 1), got {dropout}")


@dataclass
class LilyConfig:
    """Lily (Zhong et al., arXiv 2407.09946) as the paper's ViT experiment runs it.

    Defaults are those of the official ViT code (``visual-adaptation-benchmark/vit/main.py`` and
    ``lily.py`` of github.com/yibozhong/lily): rank 32, 4 HP experts, scale 1, one LP per
    ``depth // num_experts`` consecutive blocks, sites k, v and the whole MLP.

    Args:
        rank: r, the LP output width (the ``mlp`` site uses 2r, as the official code does).
        num_experts: E, the number of HP experts in each site's model-wide bank.
        lp_stride: blocks that share one LP; ``None`` means ``depth // num_experts``.
        scale: s in ``delta = s * HP_mix(LP(x))``.
        targets: sites to adapt (see module docstring).
        routing: how the router's softmax mixes the experts: ``batch`` averages it over the batch and
            tokens (the paper), ``sample`` per image, ``token`` per token; ``uniform`` has no router and
            weighs every expert 1/E (the official ``--monoscale`` ablation, ``lily_adapter_monoscale``).
        eval_routing: with ``routing="batch"``, the mix used in eval mode: ``batch`` (the paper: the
            evaluated batch's own mix, so a prediction depends on its batch) or ``running`` (the running
            average of the training mixes, so predictions do not depend on the batch, and the model can
            be merged).
        sync_routing: under ``torch.distributed``, average the batch mix over every rank's batch
            (differentiably), so N processes with batch B/N train exactly like one process with batch B.
            Off, each rank routes on its own batch (no collective per block, but another model).
        running_momentum: weight of the newest training batch's mix in the running average (BatchNorm's
            convention: ``running = (1 - m) * running + m * batch_mix``).
    """

    rank: int = 32
    num_experts: int = 4
    lp_stride: int | None = None
    scale: float = 1.0
    targets: tuple[str, ...] = ("k", "v", "mlp")
    routing: Routing = "batch"
    eval_routing: EvalRouting = "batch"
    sync_routing: bool = True
    running_momentum: float = 0.1

    def __post_init__(self) -> None:
        self.targets = _check_targets(self.targets)
        check_positive(rank=self.rank, num_experts=self.num_experts)
        if self.lp_stride is not None:
            check_positive(lp_stride=self.lp_stride)
        if self.routing not in ROUTINGS:
            raise UsageError(f"unknown routing {self.routing!r}; choose one of {ROUTINGS}")
        if self.eval_routing not in EVAL_ROUTINGS:
            raise UsageError(f"unknown eval_routing {self.eval_routing!r}; choose one of {EVAL_ROUTINGS}")
        if self.eval_routing == "running" and self.routing != "batch":
            raise UsageError(
                f"eval_routing='running' replaces the batch mix at eval; routing={self.routing!r} does not "
                "depend on the batch already. Use eval_routing='batch' with it, or routing='batch'."
            )
        if not 0.0 < self.running_momentum <= 1.0:
            raise UsageError(f"running_momentum must be in (0, 1], got {self.running_momentum}")

    @property
    def places(self) -> tuple[str, ...]:
        """Where the adapters go (``vit/inject``'s place names): the target sites."""
        return self.targets

    def resolve_lp_stride(self, depth: int) -> int:
        """The LP sharing stride for a model of ``depth`` blocks (official: ``12 // ne``)."""
        stride = self.lp_stride if self.lp_stride is not None else max(1, depth // self.num_experts)
        if stride > depth:
            raise UsageError(
                f"lp_stride={stride} is larger than the model's depth {depth}; "
                f"choose lp_stride in [1, {depth}] (or None for depth // num_experts)"
            )
        return stride


@dataclass
class LoRAConfig:
    """LoRA (Hu et al., 2021) as the standard VTAB-1k baseline: r=8, alpha=8 on q and v.

    Built through the same site machinery as Lily, so both are compared on one footing.

    Args:
        rank: r, the width of each site's own down (dim -> r) and up (r -> dim) projection, per block.
        alpha: the update is scaled by ``alpha / rank``.
        targets: sites to adapt (see module docstring).
        dropout: dropout on the adapter's input (0 turns it off).
    """

    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = ("q", "v")
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.targets = _check_targets(self.targets)
        check_positive(rank=self.rank, alpha=self.alpha)
        check_dropout(self.dropout)

    @property
    def places(self) -> tuple[str, ...]:
        return self.targets

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank
