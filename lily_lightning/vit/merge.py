"""Merged inference: fold the linear adapter sites into the frozen timm weights, and take them out again.

With expert weights that do not depend on the input (``routing: uniform``, or batch routing with
``eval_routing: running``), a linear Lily site is one fixed low-rank matrix per block ``i`` (LP group ``g``):

    delta(x) = s * LP_g(x) @ HP_mix_i = x @ (s * HP_mix_i^T @ W_LP_g)^T,   HP_mix_i = sum_e w_ie HP_e

and a LoRA site is ``alpha / r * W_B @ W_A``. Either adds to the weight of the timm Linear it sits on (for
q / k / v, the matching third of the fused ``qkv`` rows), so the merged model runs at the frozen
backbone's cost. The ``mlp`` site is parallel to the whole MLP (and has a ReLU inside for Lily): it stays a
side branch, with its fixed mix. HF PEFT's Lily refuses to merge at all (its mix depends on the batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import LilyAdapter, LoRAAdapter, mixed_bank
from ..errors import UsageError
from .inject import ADAPTERS_ATTR, AdaptedSite, adapted_sites, adapted_vit

# Attribute of the injected ViT that records a merge (and is absent when it is not merged).
MERGED_ATTR = "_merged_adapters"


@dataclass
class _MergedSite:
    site: AdaptedSite
    branches: tuple  # the wrapper's branches before the merge
    original_weight: torch.Tensor  # a copy of the Linear's weight before the merge, restored bit for bit


def _check_mergeable(adapters: nn.ModuleDict) -> None:
    """Refuse input-dependent expert weights, before any tensor is touched, saying what to use instead."""
    for site, adapter in adapters.items():
        if not isinstance(adapter, LilyAdapter) or adapter.eval_mix(0) is not None:
            continue
        if adapter.routing == "batch":
            raise UsageError(
                f"cannot merge Lily site {site!r}: with eval_routing='batch' its expert mix is recomputed "
                "from each eval batch, so no fixed weight exists. Evaluate with the running mix of training "
                "(eval_routing: running; CLI: --model.lily.eval_routing running; library: "
                "LilyConfig(eval_routing='running')), or train with routing: uniform"
            )
        raise UsageError(
            f"cannot merge Lily site {site!r}: routing={adapter.routing!r} mixes the experts per "
            f"{'image' if adapter.routing == 'sample' else 'token'}, so no fixed weight exists. Train with "
            "routing: uniform, or with routing: batch and evaluate with eval_routing: running"
        )


def _is_linear(adapter: nn.Module) -> bool:
    return isinstance(adapter, LoRAAdapter) or (
        isinstance(adapter, LilyAdapter) and isinstance(adapter.act, nn.Identity)
    )


def delta_weight(adapter: nn.Module, block: int) -> torch.Tensor:
    """The (out, in) matrix ``D`` with ``adapter(x, block) == x @ D^T`` in eval mode (a linear site).

    In the adapter's own dtype, also inside an autocast region (which would round a float32 ``D`` to
    bfloat16 before it is added to float32 weights).
    """
    with torch.autocast(next(adapter.parameters()).device.type, enabled=False):
        if isinstance(adapter, LilyAdapter):
            hp_mix = mixed_bank(adapter.eval_mix(block), adapter.hp)  # (r, out)
            return adapter.scale * hp_mix.T @ adapter.lp[block // adapter.lp_stride].weight
        if isinstance(adapter, LoRAAdapter):  # dropout is the identity at eval
            return adapter.scaling * adapter.lora_b[block].weight @ adapter.lora_a[block].weight
    raise TypeError(f"cannot merge a {type(adapter).__name__}")


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every linear adapter site (q, k, v, proj, fc1, fc2) into the frozen weights, in place.

    The merged model computes what the unmerged one computes in eval mode; the ``mlp`` site stays a side
    branch with its fixed mix. It is for inference: it refuses train mode and loading tensors, and its
    ``state_dict()`` loads into no unmerged model (see ``inject.MERGED_KEY``); :func:`unmerge` first. Raises
    ``UsageError`` for input-dependent routing, a model in train mode and a model that is already merged.
    """
    vit = adapted_vit(model)
    if hasattr(vit, MERGED_ATTR):
        raise UsageError("this model is already merged; call lily_lightning.unmerge(model) first")
    if any(module.training for module in vit.modules()):
        # The folded deltas are the eval-mode ones (running or uniform mix, no dropout), and train mode
        # computes another function: call eval() first, so what runs merged is what ran before.
        raise UsageError("merge is for inference: call model.eval() before lily_lightning.merge(model)")
    adapters = getattr(vit, ADAPTERS_ATTR)
    _check_mergeable(adapters)
    merged = []
    for site in adapted_sites(vit):
        linear = site.linear
        folded = [b for b in site.branches if linear is not None and _is_linear(site.adapter(b))]
        if not folded:
            continue
        merged.append(_MergedSite(site, site.branches, linear.weight.detach().clone()))
        for branch in folded:
            delta = delta_weight(site.adapter(branch), branch.block).to(linear.weight.dtype)
            rows = linear.weight
            if branch.third is not None:  # q, k or v: one third of the fused qkv output rows
                width = rows.shape[0] // 3
                rows = rows[branch.third * width : (branch.third + 1) * width]
            rows.add_(delta)
        site.branches = tuple(b for b in site.branches if b not in folded)
        site.folded = tuple(folded)
    setattr(vit, MERGED_ATTR, merged)
    return model


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`, in place: the original weights come back bit for bit, the branches run again."""
    vit = adapted_vit(model)
    if not hasattr(vit, MERGED_ATTR):
        raise UsageError("this model is not merged; nothing to unmerge")
    for record in getattr(vit, MERGED_ATTR):
        record.site.linear.weight.copy_(record.original_weight)
        record.site.branches = record.branches
        record.site.folded = ()
    delattr(vit, MERGED_ATTR)
    return model
