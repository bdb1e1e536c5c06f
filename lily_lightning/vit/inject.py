"""Adapter injection into timm Vision Transformers: the one file that knows timm's ViT internals.

Each adapted timm module is wrapped on the model *instance* by an :class:`AdaptedSite` (timm's classes
are never patched), so the injected model still runs timm's own attention and MLP code. The adapter
parameters live in one place, ``model.adapters`` (a ``ModuleDict`` keyed by site), and the wrappers
only hold references to them - so a Lily HP bank shared by every block is one tensor in
``named_parameters()``, in optimisers, under DDP and in checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..adapters import SITES, AdapterConfig, build_adapter
from ..errors import UsageError

ADAPTERS_ATTR = "adapters"
# The key a merged model adds to its state_dict() (see _mark_merged_state).
MERGED_KEY = "lily_lightning_merged"

# site -> (module path inside a block, which third of the fused qkv output, if any).
_SITE_MODULES: dict[str, tuple[str, int | None]] = {
    "q": ("attn.qkv", 0),
    "k": ("attn.qkv", 1),
    "v": ("attn.qkv", 2),
    "proj": ("attn.proj", None),
    "fc1": ("mlp.fc1", None),
    "fc2": ("mlp.fc2", None),
    "mlp": ("mlp", None),
}
# Inner modules are wrapped before the modules that contain them (fc1/fc2 before mlp).
_WRAP_ORDER = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "mlp")


@dataclass(frozen=True)
class _Branch:
    site: str
    block: int
    third: int | None  # which third of the fused qkv output the delta covers; None: the whole output


class AdaptedSite(nn.Module):
    """Runs the wrapped timm module unchanged and adds the adapters' deltas to its output.

    The adapters are referenced, not registered, here: ``model.adapters`` owns them.
    """

    def __init__(self, base: nn.Module, adapters: nn.ModuleDict, branches: list[_Branch]) -> None:
        super().__init__()
        self.base = base
        # A plain tuple keeps the shared adapters out of this module's parameters and state_dict.
        self._adapters = (adapters,)
        self.branches = tuple(branches)
        # The branches whose delta lily_lightning.merge added to ``base``'s weight (they no longer run).
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
        out = self.base(x)
        adapters = self._adapters[0]
        thirds: dict[int, torch.Tensor] = {}
        for branch in self.branches:
            delta = adapters[branch.site](x, branch.block)
            if branch.third is None:
                out = out + delta
            else:
                thirds[branch.third] = delta
        if thirds:
            # One concatenated delta (zeros for unadapted thirds) and one add. Writing each third in place
            # instead looks cheaper but is not: autograd's backward of an in-place write into a slice
            # (CopySlices) copies the whole (B, N, 3 * dim) gradient for every adapted third.
            zeros = out.new_zeros(()).expand(*out.shape[:-1], out.shape[-1] // 3)
            out = out + torch.cat([thirds.get(i, zeros) for i in range(3)], dim=-1)
        return out

    @property
    def linear(self) -> nn.Linear | None:
        """The wrapped timm Linear a linear delta can be folded into; None for the whole-MLP site."""
        return self.base if isinstance(self.base, nn.Linear) else None

    def adapter(self, branch: _Branch) -> nn.Module:
        """The (shared) adapter that computes ``branch``'s delta."""
        return self._adapters[0][branch.site]

    def extra_repr(self) -> str:
        return "sites=" + ",".join(f"{b.site}@{b.block}" for b in self.branches)


def adapted_vit(model: nn.Module) -> nn.Module:
    """The injected ViT inside ``model`` (``model`` itself, or e.g. a ViTClassifier's ``.model``)."""
    for module in model.modules():
        if isinstance(getattr(module, ADAPTERS_ATTR, None), nn.ModuleDict):
            return module
    raise UsageError("this model has no injected adapters; call lily_lightning.inject(model, config) first")


def adapted_sites(model: nn.Module) -> list[AdaptedSite]:
    """Every wrapped timm module in ``model``."""
    return [m for m in model.modules() if isinstance(m, AdaptedSite)]


def is_merged(model: nn.Module) -> bool:
    """Whether a backbone weight in ``model`` holds a folded adapter delta (lily_lightning.merge)."""
    return any(site.folded for site in adapted_sites(model))


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

    ``blocks.0.mlp.base.fc1.base.weight`` (fc1 wrapped inside the wrapped MLP) -> ``blocks.0.mlp.fc1.weight``.
    """
    # Innermost wrappers first: their names contain the outer wrappers' ``.base``.
    wrappers = sorted(
        (name for name, m in model.named_modules() if isinstance(m, AdaptedSite)), key=len, reverse=True
    )
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith(f"{ADAPTERS_ATTR}.") or key == MERGED_KEY:
            continue
        for name in wrappers:
            wrapped = f"{name}.base."
            if key.startswith(wrapped):
                key = f"{name}.{key[len(wrapped) :]}"
        state[key] = tensor
    return state


def _site_features(block: nn.Module, site: str) -> tuple[int, int]:
    """(in_features, out_features) of the delta a site adds, read off the block's own modules."""
    attn, mlp = block.attn, block.mlp
    if site in ("q", "k", "v"):
        return attn.qkv.in_features, attn.qkv.out_features // 3
    if site == "proj":
        return attn.proj.in_features, attn.proj.out_features
    if site == "fc1":
        return mlp.fc1.in_features, mlp.fc1.out_features
    if site == "fc2":
        return mlp.fc2.in_features, mlp.fc2.out_features
    return mlp.fc1.in_features, mlp.fc2.out_features  # "mlp": parallel to the whole MLP


def _check_model(model: nn.Module, targets: tuple[str, ...]) -> list[nn.Module]:
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"inject() needs a timm VisionTransformer (ViT, DeiT, DINOv2, CLIP ViT, ...), got "
            f"{type(model).__name__}; create one with timm.create_model('vit_base_patch16_224', ...)"
        )
    if hasattr(model, ADAPTERS_ATTR):
        raise ValueError("this model already has adapters injected; inject into a fresh backbone")
    blocks = list(model.blocks)
    for i, block in enumerate(blocks):
        for site in targets:
            path = _SITE_MODULES[site][0]
            if not _is_adaptable(_submodule(block, path), path):
                raise ValueError(
                    f"block {i} ({type(block).__name__}) has no plain `{path}` for site {site!r}; the sites "
                    f"{SITES} need timm's standard Block (a fused attn.qkv Linear, an Mlp with fc1/fc2)"
                )
    return blocks


def _submodule(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def _is_adaptable(module: nn.Module | None, path: str) -> bool:
    if path == "mlp":  # adapted as a whole, but its width is read off fc1/fc2
        return all(isinstance(getattr(module, fc, None), nn.Linear) for fc in ("fc1", "fc2"))
    return isinstance(module, nn.Linear)


def inject(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Freeze every parameter of ``model`` and add ``config``'s adapters at its sites, in place.

    Returns the same model. Load backbone weights *before* injecting: wrapping renames the adapted
    timm modules' parameters (``attn.qkv.weight`` -> ``attn.qkv.base.weight``).
    """
    blocks = _check_model(model, config.targets)
    depth = len(blocks)
    adapters = nn.ModuleDict(
        {
            site: build_adapter(config, site, *_site_features(blocks[0], site), depth)
            for site in config.targets
        }
    )
    for p in model.parameters():
        p.requires_grad_(False)
    reference = next(model.parameters())
    adapters.to(device=reference.device, dtype=reference.dtype)
    model.add_module(ADAPTERS_ATTR, adapters)
    model.register_state_dict_post_hook(_mark_merged_state)
    model.register_load_state_dict_pre_hook(_refuse_merged_loads)

    for i, block in enumerate(blocks):
        by_module: dict[str, list[_Branch]] = {}
        for site in config.targets:
            path, third = _SITE_MODULES[site]
            by_module.setdefault(path, []).append(_Branch(site, i, third))
        for path in _WRAP_ORDER:
            if path in by_module:
                parent_path, _, name = path.rpartition(".")
                parent = block.get_submodule(parent_path) if parent_path else block
                setattr(parent, name, AdaptedSite(getattr(parent, name), adapters, by_module[path]))
    return model
