"""The ``peft`` method: HuggingFace PEFT's own layers (LoRA, DoRA, VeRA, LoHa, LoKr, OFT, BOFT, FourierFT,
HRA, PEFT's Lily, ...) on a timm ViT, built on the instance.

PEFT's tuner for the config's ``peft_type`` (``peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING``, what
``peft.inject_adapter_in_model`` runs) replaces the ViT's ``target_modules`` in place by its layers
(``blocks.0.attn.qkv`` becomes a ``peft.tuners.lora.Linear`` whose ``base_layer`` is timm's Linear), so the
model stays a timm ``VisionTransformer`` and runs timm's forward; PEFT marks only its adapter tensors
trainable. The tuner object is dropped: the layers hold everything they compute with. (VeRA's random
projections, shared by every layer, are referenced by each layer and rebuilt from ``projection_prng_key`` at
every injection; ``inject_adapter_in_model`` refuses VeRA only because a ``PeftModel`` would keep that
state on the tuner.)

A :class:`PeftLayers` module of kind ``LAYERS`` (``adapters.kinds``) names the trained tensors and the
replaced modules, so adapter state, parameter counts, merge and export ask the kind, not the method.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..adapters import LAYERS, HFPeftConfig
from ..adapters.budget import PEFT_SIZE_FIELDS
from ..adapters.hf_peft import EXAMPLE
from ..errors import UsageError

MIN_PEFT = (0, 19)  # the first release with LilyConfig
INSTALL = "pip install 'lily_lightning[peft]'"
ADAPTER_NAME = "default"  # PEFT's name for the one adapter of a model
# The method types whose configs put no layers into a model (prompts, prefixes) or need a PeftModel.
_NOT_LAYERS = ("ADAPTION_PROMPT", "SHADOW", "XLORA")


def import_peft() -> Any:
    """The ``peft`` package, or one message saying how to install it."""
    try:
        import peft
    except ImportError as error:
        raise UsageError(f"model.method peft needs HuggingFace PEFT, an optional extra: {INSTALL}") from error
    version = tuple(int(part) for part in re.findall(r"\d+", peft.__version__)[:2])
    if version < MIN_PEFT:
        needed = ".".join(map(str, MIN_PEFT))
        raise UsageError(f"model.method peft needs peft>={needed}, found {peft.__version__}: {INSTALL}")
    return peft


class PeftLayers(nn.Module):
    """Owns no tensor: the PEFT layers that replaced timm modules (referenced, they are the ViT's own
    modules), the names of the tensors they train and their merge.

    ``fold`` merges every layer with PEFT's own ``merge()`` (the update PEFT's forward adds, folded into
    timm's weight) and ``unfold`` restores the weights bit for bit from copies (PEFT's ``unmerge`` subtracts
    the update again, which rounds).
    """

    kinds = (LAYERS,)

    def __init__(self, peft_type: str, layers: Mapping[str, nn.Module], names: tuple[str, ...]) -> None:
        super().__init__()
        self.peft_type = peft_type
        self._layers = (dict(layers),)  # a plain tuple: the ViT registers these modules already
        self.names = names
        # Each replaced module's path -> the attribute of PEFT's layer that holds timm's module.
        self.wrapped = dict.fromkeys(layers, "base_layer")
        self._originals: list[list[torch.Tensor]] | None = None

    @property
    def layers(self) -> dict[str, nn.Module]:
        return self._layers[0]

    @property
    def folded(self) -> bool:
        return self._originals is not None

    @torch.no_grad()
    def fold(self) -> None:
        """Merge every layer into timm's weights; a type PEFT cannot merge is refused, nothing changed."""
        bases = [layer.get_base_layer() for layer in self.layers.values()]
        self._originals = [[t.detach().clone() for t in base.parameters()] for base in bases]
        try:
            for layer in self.layers.values():
                layer.merge()
        except NotImplementedError as error:
            self.unfold()
            raise UsageError(
                f"cannot merge PEFT's {self.peft_type}: PEFT has no merge for its layers ({error}). Evaluate "
                "the adapted model as it is (test / predict / load_classifier); merge and export to plain "
                "timm are for the PEFT types that merge (LORA with or without use_dora, VERA, LOHA, LOKR, "
                "OFT, BOFT, FOURIERFT, HRA)."
            ) from error

    @torch.no_grad()
    def unfold(self) -> None:
        """Undo :meth:`fold`: PEFT's layers run their update again on the original weights."""
        for layer, originals in zip(self.layers.values(), self._originals or [], strict=True):
            if layer.merged:
                layer.unmerge()  # PEFT's own bookkeeping (which adapters are merged, DoRA's cached norms)
            for tensor, original in zip(layer.get_base_layer().parameters(), originals, strict=True):
                tensor.copy_(original)
        self._originals = None

    def extra_repr(self) -> str:
        return f"peft_type={self.peft_type!r}, layers={len(self.layers)}, tensors={len(self.names)}"


def _layer_types(peft: Any) -> list[str]:
    """The PEFT types that put layers into a model (prompt learning adds tokens to a transformers model)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    return sorted(
        str(peft_type.value)
        for peft_type in PEFT_TYPE_TO_TUNER_MAPPING
        if not issubclass(PEFT_TYPE_TO_CONFIG_MAPPING[peft_type], peft.PromptLearningConfig)
        and peft_type.value not in _NOT_LAYERS
    )


def _peft_config(peft: Any, config: HFPeftConfig) -> Any:
    """PEFT's config object for ``config``, or one message naming the unknown type or field."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    types = _layer_types(peft)
    if config.peft_type not in types:
        raise UsageError(
            f"unknown peft_type {config.settings['peft_type']!r} for model.method peft; peft "
            f"{peft.__version__} puts these into a ViT's layers: {', '.join(types)} (DoRA is LORA with "
            '"use_dora": true)'
        )
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[peft.PeftType(config.peft_type)]
    valid = sorted(f.name for f in dataclasses.fields(config_class) if f.init and f.name != "peft_type")
    unknown = [name for name in config.fields if name not in valid]
    if unknown:
        close = {name: difflib.get_close_matches(name, valid, n=1) for name in unknown}
        hints = "; ".join(f"{name!r}: did you mean {match[0]!r}?" for name, match in close.items() if match)
        raise UsageError(
            f"peft.{config_class.__name__} has no field {', '.join(map(repr, unknown))}"
            f"{f' ({hints})' if hints else ''}; its fields are {', '.join(valid)}"
        )
    try:
        return config_class(**config.fields)
    except (TypeError, ValueError) as error:
        raise UsageError(f"peft.{config_class.__name__} refused {config.fields}: {error}") from error


def _module_choices(model: nn.Module) -> str:
    """The modules of a ViT block a PEFT config can target, by name (``qkv``) and path (``attn.qkv``)."""
    block = model.blocks[0]
    paths = [
        name
        for name, module in block.named_modules()
        if name and next(module.parameters(False), None) is not None
    ]
    return ", ".join(f"{path} ({type(block.get_submodule(path)).__name__})" for path in paths)


def _matches(target: str, name: str, regex: bool) -> bool:
    """PEFT's rule: a list entry matches a module by its full name or a dotted suffix; a string is a regular
    expression over the full name (``peft.tuners.tuners_utils.check_target_module_exists``)."""
    return re.fullmatch(target, name) is not None if regex else name == target or name.endswith(f".{target}")


def _check_targets(model: nn.Module, peft_config: Any) -> None:
    """Refuse target_modules that are missing, match no module, or reach the head (which trains whole)."""
    targets = getattr(peft_config, "target_modules", None)
    choices = _module_choices(model)
    if not targets:
        raise UsageError(
            f"model.peft needs target_modules: the names of the timm modules to adapt, e.g. {EXAMPLE}. The "
            f"modules of each ViT block: {choices}"
        )
    regex = isinstance(targets, str)
    names = [name for name, _ in model.named_modules() if name]
    for target in [targets] if regex else targets:
        try:
            found = any(_matches(target, name, regex) for name in names)
        except re.error as error:
            raise UsageError(
                f"model.peft target_modules {target!r} is no regular expression: {error}"
            ) from error
        if not found:
            raise UsageError(
                f"model.peft target_modules {target!r} matches no module of this ViT; the modules of each "
                f"block are {choices} (a name matches that module in every block; a string instead of a "
                "list is a regular expression over full names such as blocks.0.attn.qkv)"
            )
    head = next(name for name, module in model.named_modules() if module is model.get_classifier())
    if any(_matches(target, head, regex) for target in ([targets] if regex else targets)):
        raise UsageError(
            f"model.peft target_modules {targets!r} reach the classification head {head!r}, which every "
            "method trains whole: target the blocks' modules"
        )


def planned_peft_parameters(model: nn.Module, config: HFPeftConfig) -> int:
    """The trainable count :func:`inject_peft` would give ``model``, without changing it or using memory:
    PEFT's layers built into a copy of ``model`` whose tensors are on the meta device."""
    meta = {
        id(tensor): (
            nn.Parameter(torch.empty_like(tensor, device="meta"), tensor.requires_grad)
            if isinstance(tensor, nn.Parameter)
            else torch.empty_like(tensor, device="meta")
        )
        for tensor in [*model.parameters(), *model.buffers()]
    }
    skeleton = copy.deepcopy(model, meta)  # the module tree, every tensor replaced by its meta twin
    with torch.device("meta"):
        inject_peft(skeleton, HFPeftConfig(config.settings))  # a copy: injection writes its size field
    return sum(p.numel() for p in skeleton.parameters() if p.requires_grad)


def inject_peft(model: nn.Module, config: HFPeftConfig) -> PeftLayers:
    """Freeze ``model`` (a timm ViT) and replace its ``target_modules`` by PEFT's layers, in place; the
    returned module names what they train. ``vit/inject.inject`` calls it and records it as the adapters."""
    peft = import_peft()
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners.tuners_utils import BaseTunerLayer

    peft_config = _peft_config(peft, config)
    _check_targets(model, peft_config)
    if (field := PEFT_SIZE_FIELDS.get(config.peft_type)) is not None:
        # The size explicit (PEFT's default where the mapping leaves it out), so records name it.
        config.settings.setdefault(field, getattr(peft_config, field))
    model.requires_grad_(False)
    try:
        PEFT_TYPE_TO_TUNER_MAPPING[peft_config.peft_type](model, peft_config, adapter_name=ADAPTER_NAME)
    except (ValueError, TypeError, NotImplementedError) as error:
        raise UsageError(f"PEFT could not apply {config.peft_type} to this ViT: {error}") from error
    layers = {name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
    names = tuple(name for name, parameter in model.named_parameters() if parameter.requires_grad)
    return PeftLayers(config.peft_type, layers, names)
