"""Config -> adapter modules dispatch, the one place that knows every method."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .adapter import SequentialAdapterConfig, build_sequential_adapter
from .adaptformer import AdaptFormerConfig, build_adaptformer
from .bitfit import BitFitConfig, build_bitfit
from .config import LilyConfig, LoRAConfig
from .dora import DoRAConfig, build_dora
from .fact import FacTTTConfig, build_fact_tt
from .hf_peft import HFPeftConfig
from .lily import build_lily
from .lora import build_lora
from .ssf import SSFConfig, build_ssf
from .vpt import VPTConfig, build_vpt

AdapterConfig = (
    LilyConfig
    | LoRAConfig
    | BitFitConfig
    | VPTConfig
    | SequentialAdapterConfig
    | AdaptFormerConfig
    | SSFConfig
    | FacTTTConfig
    | DoRAConfig
    | HFPeftConfig
)

# method name -> the model setting holding its config (``--model.<setting>.<field>``); None: no settings.
METHOD_SETTINGS: dict[str, str | None] = {
    "lily": "lily",
    "lora": "lora",
    "bitfit": None,
    "vpt_shallow": "vpt",
    "vpt_deep": "vpt",
    "adapter": "adapter",
    "adaptformer": "adaptformer",
    "ssf": "ssf",
    "fact_tt": "fact_tt",
    "dora": "dora",
    "peft": "peft",  # any HuggingFace PEFT config, as a mapping (vit/peft_bridge builds PEFT's own layers)
}

Features = dict[str, tuple[int, int]]


def _per_site(build_site: Callable) -> Callable:
    """A builder for methods with one independent module per target site (Lily, LoRA)."""

    def build(config: LilyConfig | LoRAConfig, features: Features, depth: int) -> dict[str, nn.Module]:
        return {site: build_site(config, site, *features[site], depth) for site in config.targets}

    return build


_BUILDERS: dict[type, Callable[..., dict[str, nn.Module]]] = {
    LilyConfig: _per_site(build_lily),
    LoRAConfig: _per_site(build_lora),
    BitFitConfig: build_bitfit,
    VPTConfig: build_vpt,
    SequentialAdapterConfig: build_sequential_adapter,
    AdaptFormerConfig: build_adaptformer,
    SSFConfig: build_ssf,
    FacTTTConfig: build_fact_tt,
    DoRAConfig: build_dora,
}


def build_adapters(config: AdapterConfig, features: Features, depth: int) -> dict[str, nn.Module]:
    """The modules of ``config``'s method, keyed by place (``config.places``) or, for a tensor shared by
    several places (FacT's factors), by its own name. ``features[place]`` is (in, out) of that place."""
    builder = _BUILDERS.get(type(config))
    if builder is None:
        raise TypeError(f"unknown adapter config {type(config).__name__}; use one of {list(_BUILDERS)}")
    return builder(config, features, depth)
