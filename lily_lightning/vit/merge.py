"""Merged inference: fold the updates linear in the weights into the frozen timm weights, and take them out.

With expert weights that do not depend on the input (``routing: uniform``, or batch routing with
``eval_routing: running``), a linear Lily site is one fixed low-rank matrix per block ``i`` (LP group ``g``):

    delta(x) = s * LP_g(x) @ HP_mix_i = x @ (s * HP_mix_i^T @ W_LP_g)^T,   HP_mix_i = sum_e w_ie HP_e

and a LoRA site is ``alpha / r * W_B @ W_A``. Either adds to the weight of the timm Linear it sits on (for
q / k / v, the matching third of the fused ``qkv`` rows), so the merged model runs at the frozen
backbone's cost. The ``mlp`` site is parallel to the whole MLP (and has a ReLU inside for Lily): it stays a
side branch, with its fixed mix. HF PEFT's layers (the ``peft`` method) merge with PEFT's own ``merge()``;
PEFT's Lily has none (its mix depends on the batch), so merging it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import AFFINE, DELTA, TOKENS, USE_UNMERGED, kinds_of
from ..errors import UsageError
from .inject import (
    ADAPTERS_ATTR,
    AdaptedSite,
    _Branch,
    adapted_sites,
    adapted_vit,
    layer_adapters,
)

# Attribute of the injected ViT that records a merge (and is absent when it is not merged).
MERGED_ATTR = "_merged_adapters"


@dataclass
class _MergedSite:
    site: AdaptedSite
    branches: tuple  # the wrapper's branches before the merge
    original_weight: (
        torch.Tensor
    )  # copies of the fold target's tensors before the merge, restored bit for bit
    original_bias: torch.Tensor | None


def _check_mergeable(adapters: nn.ModuleDict) -> None:
    """Refuse, before any tensor is touched, what has no fixed weight to fold, saying what to do instead."""
    for site, adapter in adapters.items():
        if TOKENS in kinds_of(adapter):
            raise UsageError(
                f"cannot merge or export {site!r}: prompt tokens are extra tokens that lengthen the token "
                "sequence every block attends over, so they cannot be folded into the linear weights and no "
                f"weight of the plain ViT computes the same. {USE_UNMERGED}"
            )
        problem = getattr(adapter, "merge_problem", None)
        if problem is not None and problem(site) is not None:
            raise UsageError(problem(site))


def delta_weight(adapter: nn.Module, block: int) -> torch.Tensor | None:
    """The (out, in) matrix ``D`` with ``adapter(x, block) == x @ D^T`` in eval mode, or None (not linear).

    In the adapter's own dtype, also inside an autocast region (which would round a float32 ``D`` to
    bfloat16 before it is added to float32 weights).
    """
    if getattr(adapter, "reads", "input") != "input":
        return None
    with torch.autocast(next(adapter.parameters()).device.type, enabled=False):
        return adapter.delta_weight(block)


def _foldable(site: AdaptedSite) -> list[tuple[_Branch, torch.Tensor]]:
    """The branches of ``site`` a merge folds, each with its update computed from the unmerged weights:
    a delta's (out, in) matrix, an affine's stacked (scale, shift). Linear deltas fold into a Linear;
    affines fold only when no delta stays a branch (they scale what the deltas added)."""
    target = site.fold_target
    if target is None:
        return []
    folds: list[tuple[_Branch, torch.Tensor]] = []
    kept_delta = False
    with torch.autocast(target.weight.device.type, enabled=False):
        for branch in site.branches:
            if branch.kind == DELTA:
                delta = (
                    delta_weight(site.adapter(branch), branch.block)
                    if isinstance(target, nn.Linear)
                    else None
                )
                if delta is None:
                    kept_delta = True
                else:
                    folds.append((branch, delta))
        for branch in site.branches:
            if branch.kind == AFFINE and not kept_delta:
                weight, bias = site.frozen_rows(branch.third)
                if bias is not None:
                    folds.append(
                        (branch, torch.stack(site.adapter(branch).affine(branch.block, weight, bias)))
                    )
    return folds


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every update that is linear in the frozen weights into them, in place.

    Linear deltas (LoRA, Lily with a fixed mix, FacT, DoRA's direction on q, k, v, proj, fc1, fc2) add to
    the Linear's weight; affines (SSF, DoRA's magnitude) scale and shift the weight and bias they follow;
    BitFit's biases are the backbone's already. Lily's non-linear ``mlp`` site stays a side branch. Methods
    whose whole update no weight of the plain ViT computes are refused: AdaptFormer's and the Adapter's
    bottlenecks (their ``merge_problem``) and prompt tokens (VPT). Another library's layers (kind ``LAYERS``:
    HF PEFT's) merge themselves; a type that cannot (PEFT's Lily) is refused.

    The merged model computes what the unmerged one computes in eval mode. It is for inference: it refuses
    train mode and loading tensors, and its ``state_dict()`` loads into no unmerged model (see
    ``inject.MERGED_KEY``); :func:`unmerge` first. Raises ``UsageError`` for input-dependent routing, prompt
    tokens, bottleneck adapters, a model in train mode and a model that is already merged.
    """
    vit = adapted_vit(model)
    if hasattr(vit, MERGED_ATTR):
        raise UsageError("this model is already merged; call lily_lightning.unmerge(model) first")
    if any(module.training for module in vit.modules()):
        # The folded deltas are the eval-mode ones (running or uniform mix, no dropout), and train mode
        # computes another function: call eval() first, so what runs merged is what ran before.
        raise UsageError("merge is for inference: call model.eval() before lily_lightning.merge(model)")
    _check_mergeable(getattr(vit, ADAPTERS_ATTR))
    layers = layer_adapters(vit)
    for adapter in layers:  # refuses, with nothing changed, a type its library cannot merge
        adapter.fold()
    if layers:  # the layers run the library's forward, which does not refuse train mode; this does
        vit._merged_training_guard = vit.register_forward_pre_hook(_refuse_training)
    merged = []
    for site in adapted_sites(vit):
        folds = _foldable(site)
        if not folds:
            continue
        target = site.fold_target
        bias = None if target.bias is None else target.bias.detach().clone()
        merged.append(_MergedSite(site, site.branches, target.weight.detach().clone(), bias))
        # Every update was computed from the unmerged weights above; deltas first, then the affines on them.
        for branch, update in folds:
            weight, bias = site.frozen_rows(branch.third)
            if branch.kind == DELTA:
                weight.add_(update.to(weight.dtype))
            else:
                scale, shift = update.to(weight.dtype)
                weight.mul_(scale.view(-1, *[1] * (weight.dim() - 1)))
                bias.mul_(scale).add_(shift)
        folded = [branch for branch, _ in folds]
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
        target = record.site.fold_target
        target.weight.copy_(record.original_weight)
        if record.original_bias is not None:
            target.bias.copy_(record.original_bias)
        record.site.branches = record.branches
        record.site.folded = ()
    for adapter in layer_adapters(vit):
        adapter.unfold()
    if hasattr(vit, "_merged_training_guard"):
        vit._merged_training_guard.remove()
        del vit._merged_training_guard
    delattr(vit, MERGED_ATTR)
    return model


def _refuse_training(module: nn.Module, _: tuple) -> None:
    if module.training:
        raise UsageError(
            "this model is merged (lily_lightning.merge) and cannot run in train mode: its PEFT layers' "
            "update is folded into frozen weights. Call lily_lightning.unmerge(model) before training, or "
            "model.eval() to run the merged model."
        )
