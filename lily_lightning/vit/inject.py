"""Adapter injection into timm Vision Transformers: the one file that knows timm's ViT internals.

Each adapted timm module is wrapped on the model *instance* by an :class:`AdaptedSite` (timm's classes
are never patched), so the injected model still runs timm's own attention and MLP code. The adapter
parameters live in one place, ``model.adapters`` (a ``ModuleDict`` keyed by place), and the wrappers
only hold references to them - so a Lily HP bank shared by every block is one tensor in
``named_parameters()``, in optimisers, under DDP and in checkpoints.

A method names its places (``config.places``: ``q``, ``qkv``, ``norm1``, ``mlp``, ``tokens``,
``patch_embed``, ...; the tables below map them to timm's modules) and its modules say their kinds
(``adapters.kinds``); this file wires each kind the one way it is wired, whatever the method. The ``peft``
method is HuggingFace PEFT's layers instead of sites (``peft_bridge``), recorded in ``model.adapters`` too.
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..adapters import (
    AFFINE,
    DELTA,
    LAYERS,
    SITES,
    TOKENS,
    UNFROZEN,
    AdapterConfig,
    HFPeftConfig,
    build_adapters,
    kinds_of,
)
from ..errors import UsageError
from .peft_bridge import inject_peft

ADAPTERS_ATTR = "adapters"
# The key of the ``peft`` method's one adapter module (peft_bridge.PeftLayers) in ``model.adapters``.
PEFT_KEY = "peft"
# The key a merged model adds to its state_dict() (see _mark_merged_state).
MERGED_KEY = "lily_lightning_merged"

# Block place -> (module path inside a block, which third of the fused qkv output, if any). The path ""
# is the block itself (extra tokens at its input).
_BLOCK_PLACES: dict[str, tuple[str, int | None]] = {
    "q": ("attn.qkv", 0),
    "k": ("attn.qkv", 1),
    "v": ("attn.qkv", 2),
    "qkv": ("attn.qkv", None),
    "proj": ("attn.proj", None),
    "fc1": ("mlp.fc1", None),
    "fc2": ("mlp.fc2", None),
    "mlp": ("mlp", None),
    "norm1": ("norm1", None),
    "norm2": ("norm2", None),
    "tokens": ("", None),
}
# Model place (once per model, ``adapters.MODEL_PLACES``) -> module path in the ViT. The patch embedding's
# own norm (an Identity in most ViTs) is wrapped, not the PatchEmbed, whose attributes timm reads.
_MODEL_PLACES: dict[str, str] = {"patch_embed": "patch_embed.norm", "norm": "norm"}
# Inner modules are wrapped before the modules that contain them (fc1/fc2 before mlp, all before the block).
_WRAP_ORDER = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "mlp", "norm1", "norm2", "")
# The branch kind that removes a TOKENS adapter's tokens again (on the final norm, before the head).
_DROP_TOKENS = "drop_tokens"


@dataclass(frozen=True)
class _Branch:
    site: str  # the key of its adapter in ``model.adapters``
    block: int
    third: int | None  # which third of the fused qkv output the branch covers; None: the whole output
    kind: str = DELTA  # adapters.kinds: DELTA, AFFINE, TOKENS, or _DROP_TOKENS


class AdaptedSite(nn.Module):
    """Runs the wrapped timm module unchanged and applies the adapters' branches around it.

    In order: TOKENS branches splice prompt tokens into the input (after the ``prefix_tokens`` class and
    register tokens); the module runs; DELTA branches add their deltas (fed the module's input, or its
    output); AFFINE branches scale and shift the result; a drop-tokens branch removes the prompts again.
    The adapters are referenced, not registered, here: ``model.adapters`` owns them. ``fold_target`` is the
    module whose weight and bias absorb a merged branch (the wrapped Linear or LayerNorm itself, the patch
    embedding's projection), or None.
    """

    def __init__(
        self,
        base: nn.Module,
        adapters: nn.ModuleDict,
        branches: list[_Branch],
        fold_target: nn.Module | None = None,
        prefix_tokens: int = 0,
    ) -> None:
        super().__init__()
        self.base = base
        # A plain tuple keeps the shared adapters (and the fold target, part of ``base``) out of this
        # module's parameters and state_dict.
        self._adapters = (adapters,)
        self._fold_target = (fold_target,)
        self.prefix_tokens = prefix_tokens
        self.branches = tuple(branches)
        # The branches whose update lily_lightning.merge folded into ``fold_target`` (they no longer run).
        self.folded: tuple[_Branch, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.folded:
            # A folded delta is a constant in a frozen weight: training would leave it as it is, and train
            # mode would route per batch where the merged weight holds the eval-mode mix.
            raise UsageError(
                "this model is merged (lily_lightning.merge) and cannot train or run in train mode: the "
                "adapters' update is folded into frozen backbone weights. Call lily_lightning.unmerge(model) "
                "before training, or model.eval() to run the merged model."
            )
        adapters = self._adapters[0]
        for branch in self.branches:
            if branch.kind == TOKENS:
                x = self._with_prompts(x, adapters[branch.site], branch.block)
        out = self.base(x)
        source = out
        thirds: dict[int, torch.Tensor] = {}
        affines: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = {}
        for branch in self.branches:
            adapter = adapters[branch.site]
            if branch.kind == DELTA:
                delta = adapter(source if adapter.reads == "output" else x, branch.block)
                if branch.third is None:
                    out = out + delta
                else:
                    thirds[branch.third] = delta
            elif branch.kind == AFFINE:
                affines[branch.third] = adapter.affine(branch.block, *self.frozen_rows(branch.third))
        if thirds:
            # One concatenated delta (zeros for unadapted thirds) and one add. Writing each third in place
            # instead looks cheaper but is not: autograd's backward of an in-place write into a slice
            # (CopySlices) copies the whole (B, N, 3 * dim) gradient for every adapted third.
            zeros = out.new_zeros(()).expand(*out.shape[:-1], out.shape[-1] // 3)
            out = out + torch.cat([thirds.get(i, zeros) for i in range(3)], dim=-1)
        if affines:
            scale, shift = _per_channel(affines, out.shape[-1])
            out = out * scale + shift
        for branch in self.branches:
            if branch.kind == _DROP_TOKENS:
                length = adapters[branch.site].length
                out = torch.cat([out[:, : self.prefix_tokens], out[:, self.prefix_tokens + length :]], dim=1)
        return out

    def _with_prompts(self, x: torch.Tensor, adapter: nn.Module, block: int) -> torch.Tensor:
        """``x`` with ``adapter``'s prompts after the prefix tokens: inserted at block 0, replacing the
        previous block's prompt outputs at later blocks (VPT-deep)."""
        prompts = adapter.tokens(block, x.shape[0]).to(x.dtype)
        rest = x[:, self.prefix_tokens + (adapter.length if block > 0 else 0) :]
        return torch.cat([x[:, : self.prefix_tokens], prompts, rest], dim=1)

    def frozen_rows(self, third: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The fold target's (weight, bias) rows a branch on ``third`` acts on (None, None: no target)."""
        target = self.fold_target
        if target is None:
            return None, None
        weight, bias = target.weight, target.bias
        if third is None:
            return weight, bias
        rows = slice(third * weight.shape[0] // 3, (third + 1) * weight.shape[0] // 3)
        return weight[rows], None if bias is None else bias[rows]

    @property
    def fold_target(self) -> nn.Module | None:
        return self._fold_target[0]

    def adapter(self, branch: _Branch) -> nn.Module:
        """The (shared) adapter that computes ``branch``."""
        return self._adapters[0][branch.site]

    def extra_repr(self) -> str:
        return "sites=" + ",".join(f"{b.site}@{b.block}" for b in self.branches)


def _per_channel(
    affines: dict[int | None, tuple[torch.Tensor, torch.Tensor]], width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One (scale, shift) pair over the whole output from a whole-output pair or pairs on qkv thirds."""
    if None in affines:
        return affines[None]
    ones = next(iter(affines.values()))[0].new_ones(width // 3)
    parts = [affines.get(i, (ones, torch.zeros_like(ones))) for i in range(3)]
    return torch.cat([scale for scale, _ in parts]), torch.cat([shift for _, shift in parts])


def adapted_vit(model: nn.Module) -> nn.Module:
    """The injected ViT inside ``model`` (``model`` itself, or e.g. a ViTClassifier's ``.model``)."""
    for module in model.modules():
        if isinstance(getattr(module, ADAPTERS_ATTR, None), nn.ModuleDict):
            return module
    raise UsageError("this model has no injected adapters; call lily_lightning.inject(model, config) first")


def adapted_sites(model: nn.Module) -> list[AdaptedSite]:
    """Every wrapped timm module in ``model``."""
    return [m for m in model.modules() if isinstance(m, AdaptedSite)]


def layer_adapters(model: nn.Module) -> list[nn.Module]:
    """The adapters of kind ``LAYERS`` (another library's layers, e.g. PEFT's) injected into ``model``."""
    adapters = getattr(model, ADAPTERS_ATTR, None)
    return [a for a in (adapters or {}).values() if LAYERS in kinds_of(a)]


def is_merged(model: nn.Module) -> bool:
    """Whether a backbone weight in ``model`` holds a folded adapter delta (lily_lightning.merge)."""
    return any(site.folded for site in adapted_sites(model)) or any(a.folded for a in layer_adapters(model))


# A merged model's state_dict() holds what its tensors are (the backbone weights with the deltas added, and
# the adapters), so `load_state_dict(state_dict())` and `export` see the merged model as it is. Under the
# names of an unmerged model, though, such a state would load into a fresh injected model and apply each
# delta twice (once in the weight, once by the branch). So the state is marked (one extra key) and every
# injected model refuses a marked state. Loading anything into a merged model is refused too: the folded
# deltas would stay in the weights while the adapters changed. Saving merged weights as unmerged ones
# instead would make state_dict() disagree with the tensors the model computes with.
def _mark_merged_state(module: nn.Module, state: dict[str, Any], prefix: str, _: Any) -> None:
    if is_merged(module):
        state[prefix + MERGED_KEY] = torch.tensor(True)


def _refuse_merged_loads(module: nn.Module, state: Mapping[str, Any], prefix: str, *_: Any) -> None:
    if is_merged(module):
        raise UsageError(
            "cannot load tensors into a merged model: the backbone weights hold the deltas of the adapters "
            "it has now. Call lily_lightning.unmerge(model), load, then merge(model) again."
        )
    if prefix + MERGED_KEY in state:
        raise UsageError(
            "this state_dict was saved from a merged model (lily_lightning.merge): its backbone weights "
            "already hold the adapters' deltas, so loading it with the adapters would apply them twice. "
            "Save state_dict() after lily_lightning.unmerge(model), or only the adapters with "
            "adapter_state_dict(model) (merging does not change them)."
        )


def timm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The injected ViT's own tensors under timm's names: adapters left out, the wrappers' ``.base`` undone.

    ``blocks.0.mlp.base.fc1.base.weight`` (fc1 wrapped inside the wrapped MLP) -> ``blocks.0.mlp.fc1.weight``;
    a PEFT layer's ``blocks.0.attn.qkv.base_layer.weight`` -> ``blocks.0.attn.qkv.weight``, its adapter
    tensors (``blocks.0.attn.qkv.lora_A.default.weight``) left out.
    """
    # Each wrapper's path -> the attribute holding the wrapped module; everything else under it is adapter.
    wrappers = {name: "base" for name, m in model.named_modules() if isinstance(m, AdaptedSite)}
    for adapter in layer_adapters(model):
        wrappers |= adapter.wrapped
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith(f"{ADAPTERS_ATTR}.") or key == MERGED_KEY:
            continue
        # Innermost wrappers first: their names contain the outer wrappers' ``.base``.
        for name in sorted(wrappers, key=len, reverse=True):
            if key.startswith(f"{name}."):
                inner = f"{name}.{wrappers[name]}."
                key = f"{name}.{key[len(inner) :]}" if key.startswith(inner) else ""
        if key:
            state[key] = tensor
    return state


def _place_features(model: nn.Module, block: nn.Module, place: str) -> tuple[int, int]:
    """(in, out) of a place, read off the model's own modules: a delta's input and output widths, an
    affine's (its width twice), a prompt's (patch pixels, embedding width)."""
    if place in ("tokens", "patch_embed"):
        proj = model.patch_embed.proj
        return proj.in_channels * math.prod(proj.kernel_size), proj.out_channels
    if place in ("norm", "norm1", "norm2"):
        width = (model if place == "norm" else block).get_submodule(place).normalized_shape[0]
        return width, width
    if place == "mlp":  # parallel to (or after) the whole MLP
        return block.mlp.fc1.in_features, block.mlp.fc2.out_features
    linear = block.get_submodule(_BLOCK_PLACES[place][0])
    thirds = 3 if place in ("q", "k", "v") else 1
    return linear.in_features, linear.out_features // thirds


def adapter_features(model: nn.Module, places: tuple[str, ...]) -> tuple[dict[str, tuple[int, int]], int]:
    """What a method's builder sizes its adapters by: (in, out) of each of ``places`` in ``model``, and the
    number of blocks. Raises ``ValueError`` for a model ``inject`` cannot adapt at those places."""
    blocks = _check_model(model, places)
    return {place: _place_features(model, blocks[0], place) for place in places}, len(blocks)


def _check_model(model: nn.Module, places: tuple[str, ...]) -> list[nn.Module]:
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"inject() needs a timm VisionTransformer (ViT, DeiT, DINOv2, CLIP ViT, ...), got "
            f"{type(model).__name__}; create one with timm.create_model('vit_base_patch16_224', ...)"
        )
    if hasattr(model, ADAPTERS_ATTR):
        raise ValueError("this model already has adapters injected; inject into a fresh backbone")
    blocks = list(model.blocks)
    for i, block in enumerate(blocks):
        for place in places:
            if place in _MODEL_PLACES:
                continue
            path = _BLOCK_PLACES[place][0]
            if not _is_adaptable(_submodule(block, path), path):
                raise ValueError(
                    f"block {i} ({type(block).__name__}) has no plain `{path}` for site {place!r}; the sites "
                    f"{SITES} need timm's standard Block (a fused attn.qkv Linear, an Mlp with fc1/fc2)"
                )
    for place in places:
        if place in _MODEL_PLACES and _model_fold_target(model, place) is None:
            raise ValueError(f"this ViT's `{_MODEL_PLACES[place]}` is no LayerNorm or patch embedding")
    return blocks


def _submodule(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def _is_adaptable(module: nn.Module | None, path: str) -> bool:
    if path == "":  # the block itself
        return True
    if path == "mlp":  # adapted as a whole, but its width is read off fc1/fc2
        return all(isinstance(getattr(module, fc, None), nn.Linear) for fc in ("fc1", "fc2"))
    if path in ("norm1", "norm2"):
        return _fold_target(module) is not None
    return isinstance(module, nn.Linear)


def _fold_target(module: nn.Module) -> nn.Module | None:
    """The module whose weight and bias a merge folds a branch on ``module``'s output into: a Linear, a
    patch projection or an affine LayerNorm itself."""
    if isinstance(module, (nn.Linear, nn.Conv2d)) or (
        isinstance(module, nn.LayerNorm) and module.weight is not None
    ):
        return module
    return None


def _model_fold_target(model: nn.Module, place: str) -> nn.Module | None:
    """A model place's fold target: after the patch embedding, its norm if it has one, else its projection
    (the flatten between them only moves channels last)."""
    if place == "patch_embed":
        patch_embed = model.patch_embed
        if not isinstance(patch_embed, PatchEmbed):
            return None
        return _fold_target(patch_embed.norm) or _fold_target(patch_embed.proj)
    return _fold_target(model.get_submodule(_MODEL_PLACES[place]))


def _unfreeze(model: nn.Module, select: str) -> tuple[str, ...]:
    """Make the backbone parameters ``select`` names trainable (``"bias"``: every bias but the head's)."""
    head = {id(p) for p in model.get_classifier().parameters()}
    names = []
    for name, parameter in model.named_parameters():
        if name.rpartition(".")[2] == select and id(parameter) not in head:
            parameter.requires_grad_(True)
            names.append(name)
    return tuple(names)


def _wrap(
    parent: nn.Module,
    path: str,
    adapters: nn.ModuleDict,
    branches: list[_Branch],
    prefix_tokens: int,
    fold_target: nn.Module | None = None,
) -> None:
    """Replace the module at ``path`` under ``parent`` by an AdaptedSite running ``branches``; its fold
    target is ``fold_target``, or else the module itself when it can be one."""
    parent_path, _, name = path.rpartition(".")
    owner = parent.get_submodule(parent_path) if parent_path else parent
    base = getattr(owner, name)
    site = AdaptedSite(base, adapters, branches, fold_target or _fold_target(base), prefix_tokens)
    setattr(owner, name, site)
    for branch in branches:  # DoRA's magnitude starts at the frozen weight's norm
        init = getattr(adapters[branch.site], "init_from_base", None)
        if branch.kind == AFFINE and init is not None:
            init(branch.block, *site.frozen_rows(branch.third))


def _attach(model: nn.Module, adapters: nn.ModuleDict) -> None:
    """Record ``adapters`` as the model's (``model.adapters``), with the guards of a merged model's state."""
    model.add_module(ADAPTERS_ATTR, adapters)
    model.register_state_dict_post_hook(_mark_merged_state)
    model.register_load_state_dict_pre_hook(_refuse_merged_loads)


def _pos_embed_any_batch(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``_pos_embed``, which with ``dynamic_img_size`` reshapes by ``view(B, -1, C)``: a batch of no
    image cannot take that (-1 is ambiguous), so it gets the positions of one zero image, cut to none."""
    position = type(self)._pos_embed
    if x.shape[0] == 0:
        return position(self, x.new_zeros(1, *x.shape[1:]))[:0]
    return position(self, x)


def accept_empty_batches(model: nn.Module) -> nn.Module:
    """Let ``model`` (a timm ViT) run a batch of no image, as DDP evaluation hands a process whose share of a
    ragged last global batch is empty (``data.sampling.GlobalBatchSampler``): it still runs the forward, so
    every Lily site joins the routing all-reduce. Only a ViT with ``dynamic_img_size`` needs it (timm's
    ``test_vit``; ViT-B/16, DINOv2 and CLIP ViTs are built without); its ``_pos_embed`` is wrapped on the
    instance (no collective runs there). Returns ``model``."""
    if getattr(model, "dynamic_img_size", False) and hasattr(type(model), "_pos_embed"):
        model._pos_embed = types.MethodType(_pos_embed_any_batch, model)  # a copy binds to its own model
    return model


def inject(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Freeze every parameter of ``model`` and add ``config``'s adapters at its places, in place.

    Returns the same model. Load backbone weights *before* injecting: wrapping renames the adapted
    timm modules' parameters (``attn.qkv.weight`` -> ``attn.qkv.base.weight``). A ``HFPeftConfig`` puts
    HuggingFace PEFT's layers where its ``target_modules`` say instead (``peft_bridge``).
    """
    places = config.places
    if isinstance(config, HFPeftConfig):
        _check_model(model, places)
        _attach(model, nn.ModuleDict({PEFT_KEY: inject_peft(model, config)}))
        return model
    features, depth = adapter_features(model, places)
    blocks = list(model.blocks)
    adapters = nn.ModuleDict(build_adapters(config, features, depth))
    for p in model.parameters():
        p.requires_grad_(False)
    for adapter in adapters.values():
        if UNFROZEN in kinds_of(adapter):
            adapter.names = _unfreeze(model, adapter.select)
    reference = next(model.parameters())
    adapters.to(device=reference.device, dtype=reference.dtype)
    _attach(model, adapters)

    prefix = model.num_prefix_tokens
    for i, block in enumerate(blocks):
        by_module: dict[str, list[_Branch]] = {}
        for place in places:
            if place in _MODEL_PLACES:
                continue
            path, third = _BLOCK_PLACES[place]
            adapter = adapters[place]
            for kind in kinds_of(adapter):
                if kind != TOKENS or i < adapter.blocks:  # VPT-shallow prompts only the first block
                    by_module.setdefault(path, []).append(_Branch(place, i, third, kind))
        for path in _WRAP_ORDER:
            if path in by_module:
                if path:
                    _wrap(block, path, adapters, by_module[path], prefix)
                else:
                    _wrap(model.blocks, str(i), adapters, by_module[path], prefix)
    at_model: dict[str, list[_Branch]] = {}
    for key, adapter in adapters.items():
        if key in _MODEL_PLACES:
            branches = (_Branch(key, 0, None, kind) for kind in kinds_of(adapter))
            at_model.setdefault(key, []).extend(branches)
        if TOKENS in kinds_of(adapter):  # the prompts leave before the final norm's output reaches the head
            at_model.setdefault("norm", []).append(_Branch(key, 0, None, _DROP_TOKENS))
    for place, branches in at_model.items():
        _wrap(model, _MODEL_PLACES[place], adapters, branches, prefix, _model_fold_target(model, place))
    return model
