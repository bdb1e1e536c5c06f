"""The Lily site: layer-local LPs, one model-wide HP expert bank, a router per block.

Pure torch. For block ``i`` and input ``x``::

    z = act(LP_{i // lp_stride}(x))          # (..., r)
    p = softmax(router_i(z))                 # (..., E)
    delta = s * z @ sum_e w_e HP_e           # w: p averaged as ``routing`` says

``act`` is ReLU for the ``mlp`` site and identity elsewhere, and the ``mlp`` site has rank 2r
(both as ``lily_adapter`` / ``set_lily_kv`` in the official ``visual-adaptation-benchmark/vit/lily.py``).

Mixed precision (``torch.autocast``, Lightning's ``bf16-mixed`` / ``16-mixed``): the matmuls run in the
autocast dtype like the backbone's, while the router's softmax, the expert weights ``w`` and the running
mix stay float32: bfloat16 keeps 8 significant bits, so a weight near 1/E is exact to about 1e-3 - the size
of the differences between experts early in training - and a running average's small steps round away.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from .config import EvalRouting, LilyConfig, Routing
from .kinds import DELTA
from .sync import global_mean, is_distributed


def mixed_bank(weights: torch.Tensor, hp: torch.Tensor) -> torch.Tensor:
    """``sum_e w_e HP_e`` for weights (..., E): (..., r, out).

    The (float32) weights are cast to the bank's dtype: ``tensordot`` refuses mixed dtypes even under
    autocast, which then runs the product in its own dtype. A no-op for a float32 bank.
    """
    return torch.tensordot(weights.to(hp.dtype), hp, dims=1)


def mix_fixed(z: torch.Tensor, weights: torch.Tensor, hp: torch.Tensor) -> torch.Tensor:
    """``z @ sum_e w_e HP_e`` for one mix ``weights`` (E,) shared by every row of ``z``."""
    return z @ mixed_bank(weights, hp)


class _ScaledMix(torch.autograd.Function):
    """``scale * z @ sum_e w_e HP_e`` saving only ``z`` (which the router saves too), ``weights`` and ``hp``.

    Plain autograd would also keep the scaled copy of ``z`` and the mixed (r, out) matrix. Backward
    forms ``G = z^T grad`` (r, out) once: ``d hp_e = s w_e G``, ``d w_e = s <G, HP_e>``,
    ``d z = s grad @ HP_mix^T``.

    Under autocast, forward runs in the autocast region like any op, and backward re-enters the autocast
    state forward saw, so its matmuls run in the dtype plain autograd's would. That is what
    ``torch.amp.custom_fwd`` / ``custom_bwd`` do, but those fix one device type when they decorate; this
    function reads the state of its input's device (CPU, CUDA, ...).
    """

    @staticmethod
    def forward(z: torch.Tensor, weights: torch.Tensor, hp: torch.Tensor, scale: float) -> torch.Tensor:
        return z @ (mixed_bank(weights, hp) * scale)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        z, weights, hp, scale = inputs
        ctx.save_for_backward(z, weights, hp)
        ctx.scale = scale
        # The autocast state forward ran in; None when off (so float32 runs exactly as without autocast,
        # and devices autocast does not know, such as meta, work too).
        device = z.device.type
        autocast_on = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        ctx.autocast = (device, torch.get_autocast_dtype(device)) if autocast_on else None

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, weights, hp = ctx.saved_tensors
        grad_z = grad_weights = grad_hp = None
        with nullcontext() if ctx.autocast is None else torch.autocast(*ctx.autocast):
            if ctx.needs_input_grad[0]:
                grad_z = grad @ (mixed_bank(weights, hp) * ctx.scale).T
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                gram = z.reshape(-1, z.shape[-1]).T @ grad.reshape(-1, grad.shape[-1]) * ctx.scale  # (r, out)
                if ctx.needs_input_grad[1]:
                    grad_weights = torch.tensordot(hp.to(gram.dtype), gram, dims=([1, 2], [0, 1]))
                if ctx.needs_input_grad[2]:
                    grad_hp = weights[:, None, None] * gram
        return grad_z, grad_weights, grad_hp, None


def scaled_mix(z: torch.Tensor, weights: torch.Tensor, hp: torch.Tensor, scale: float) -> torch.Tensor:
    """``mix_fixed(z * scale, weights, hp)`` that keeps fewer tensors for backward (see ``_ScaledMix``)."""
    return _ScaledMix.apply(z, weights, hp, scale)


def mix_experts(z: torch.Tensor, probs: torch.Tensor, hp: torch.Tensor, routing: Routing) -> torch.Tensor:
    """``z @ HP_mix`` for each routing; ``z``: (B, ..., r), ``probs``: (B, ..., E), ``hp``: (E, r, out)."""
    num_experts, rank, out_features = hp.shape
    if routing == "batch":
        # The paper: one mix for the whole batch, from the router's softmax averaged over batch and tokens.
        return mix_fixed(z, probs.reshape(-1, num_experts).mean(0), hp)
    if routing == "sample":
        tokens = math.prod(z.shape[1:-1])  # not -1 in reshape: a zero-size batch (DDP's ragged end) is valid
        weights = probs.reshape(probs.shape[0], tokens, num_experts).mean(1)  # (B, E)
        hp_mix = mixed_bank(weights, hp)  # (B, r, out)
        flat = z.reshape(z.shape[0], tokens, rank)
        return torch.bmm(flat, hp_mix).reshape(*z.shape[:-1], out_features)
    # token: sum_e p_e (z @ HP_e) == (p outer z) @ [HP_1; ...; HP_E], one matmul over the concatenated
    # bank, so no (B, N, E, out) tensor is ever built; the largest intermediate is (B, N, E * r), in z's
    # dtype (per-token probabilities are no average: the autocast dtype holds them as it holds z).
    gated = (probs.to(z.dtype).unsqueeze(-1) * z.unsqueeze(-2)).flatten(-2)
    return gated @ hp.reshape(num_experts * rank, out_features)


class LilyAdapter(nn.Module):
    """One Lily site across all ``depth`` blocks; ``forward(x, block)`` returns that block's delta.

    The HP bank is one ``nn.Parameter`` owned here, so optimisers, DDP and checkpoints see it once.
    With batch routing, the buffer ``running_mix`` (depth, E) keeps each block's running average of its
    training mixes (like BatchNorm's running mean): saved with the adapter, never trained, and used at
    eval when ``eval_routing="running"``. Uniform routing has no routers at all.
    """

    kinds = (DELTA,)
    reads = "input"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        depth: int,
        rank: int,
        num_experts: int,
        lp_stride: int,
        scale: float,
        routing: Routing,
        nonlinear: bool,
        eval_routing: EvalRouting = "batch",
        sync_routing: bool = True,
        running_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.lp_stride = lp_stride
        self.scale = scale
        self.routing = routing
        self.eval_routing = eval_routing
        self.sync_routing = sync_routing
        self.running_momentum = running_momentum
        # LP and router keep nn.Linear's default init and HP starts at zero, as the official code does,
        # so the adapted model starts exactly at the pretrained one.
        self.lp = nn.ModuleList(
            nn.Linear(in_features, rank, bias=False) for _ in range(math.ceil(depth / lp_stride))
        )
        routers = 0 if routing == "uniform" else depth
        self.router = nn.ModuleList(nn.Linear(rank, num_experts, bias=False) for _ in range(routers))
        self.hp = nn.Parameter(torch.zeros(num_experts, rank, out_features))
        self.act: nn.Module = nn.ReLU() if nonlinear else nn.Identity()
        if routing == "batch":
            self.register_buffer("running_mix", torch.full((depth, num_experts), 1.0 / num_experts))

    def fixed_mix(self, block: int) -> torch.Tensor | None:
        """The expert weights (E,) ``block`` uses now when they do not depend on the input, else None.

        Uniform routing always; batch routing in eval mode with ``eval_routing="running"``.
        """
        if self.training and self.routing != "uniform":
            return None
        return self.eval_mix(block)

    def eval_mix(self, block: int) -> torch.Tensor | None:
        """The expert weights (E,) ``block`` uses in eval mode if they are input-independent, else None."""
        if self.routing == "uniform":
            return self.hp.new_full((self.hp.shape[0],), 1.0 / self.hp.shape[0])
        if self.routing == "batch" and self.eval_routing == "running":
            return self.running_mix[block]
        return None

    def forward(self, x: torch.Tensor, block: int) -> torch.Tensor:
        z = self.act(self.lp[block // self.lp_stride](x))
        # The mix is linear in z, so scale the rank-r z (or the (r, out) mixed bank), not the wide delta.
        fixed = self.fixed_mix(block)
        if fixed is not None:
            return scaled_mix(z, fixed, self.hp, self.scale)
        # float32 whatever the autocast dtype (CUDA's autocast does this for softmax, CPU's does not).
        probs = F.softmax(self.router[block](z), dim=-1, dtype=torch.float32)
        if self.routing == "batch":
            return scaled_mix(z, self._batch_mix(probs, block), self.hp, self.scale)
        return mix_experts(z * self.scale, probs, self.hp, self.routing)

    def _batch_mix(self, probs: torch.Tensor, block: int) -> torch.Tensor:
        """The paper's mix: the softmax averaged over batch and tokens (over every rank's with sync)."""
        mix = global_mean(probs.reshape(-1, probs.shape[-1]), self.sync_routing)
        # An empty local batch (a ragged DDP end) has a NaN mix unless it was averaged over the ranks.
        if self.training and (probs.numel() > 0 or (self.sync_routing and is_distributed())):
            with torch.no_grad():
                # mix is float32; the buffer too unless the whole model was cast (model.to(torch.bfloat16)).
                self.running_mix[block].lerp_(mix.to(self.running_mix.dtype), self.running_momentum)
        return mix

    def delta_weight(self, block: int) -> torch.Tensor | None:
        """``s * HP_mix^T @ W_LP``: the (out, in) matrix of a linear site with a fixed mix; else None."""
        mix = self.eval_mix(block)
        if mix is None or not isinstance(self.act, nn.Identity):
            return None
        return self.scale * mixed_bank(mix, self.hp).T @ self.lp[block // self.lp_stride].weight

    def merge_problem(self, site: str) -> str | None:
        """Why input-dependent expert weights cannot be folded, and what to use instead; None if they can."""
        if self.eval_mix(0) is not None:
            return None
        if self.routing == "batch":
            return (
                f"cannot merge Lily site {site!r}: with eval_routing='batch' its expert mix is recomputed "
                "from each eval batch, so no fixed weight exists. Evaluate with the running mix of training "
                "(eval_routing: running; CLI: --model.lily.eval_routing running; library: "
                "LilyConfig(eval_routing='running')), or train with routing: uniform"
            )
        return (
            f"cannot merge Lily site {site!r}: routing={self.routing!r} mixes the experts per "
            f"{'image' if self.routing == 'sample' else 'token'}, so no fixed weight exists. Train with "
            "routing: uniform, or with routing: batch and evaluate with eval_routing: running"
        )

    def extra_repr(self) -> str:
        return (
            f"lp_stride={self.lp_stride}, scale={self.scale}, routing={self.routing!r}, "
            f"eval_routing={self.eval_routing!r}, sync_routing={self.sync_routing}"
        )


def build_lily(config: LilyConfig, site: str, in_features: int, out_features: int, depth: int) -> LilyAdapter:
    """The adapter for one site; the ``mlp`` site gets rank 2r and a ReLU, as in the official code."""
    wide = site == "mlp"
    return LilyAdapter(
        in_features,
        out_features,
        depth,
        rank=2 * config.rank if wide else config.rank,
        num_experts=config.num_experts,
        lp_stride=config.resolve_lp_stride(depth),
        scale=config.scale,
        routing=config.routing,
        nonlinear=wide,
        eval_routing=config.eval_routing,
        sync_routing=config.sync_routing,
        running_momentum=config.running_momentum,
    )
