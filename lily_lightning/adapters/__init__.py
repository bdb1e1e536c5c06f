"""The methods, free of timm and Lightning: configs, the Lily site, LoRA and the visual-PEFT baselines."""

from .adapter import SequentialAdapterConfig
from .adaptformer import AdaptFormerConfig
from .bitfit import BitFitConfig
from .budget import SIZE_KNOBS, SizeKnob, fit_budget
from .build import METHOD_SETTINGS, AdapterConfig, build_adapters
from .config import EVAL_ROUTINGS, ROUTINGS, SITES, LilyConfig, LoRAConfig
from .dora import DoRAConfig
from .fact import FacTTTConfig
from .kinds import AFFINE, DELTA, MODEL_PLACES, TOKENS, UNFROZEN, USE_UNMERGED, kinds_of
from .lily import LilyAdapter, mix_experts, mix_fixed, mixed_bank, scaled_mix
from .lora import LoRAAdapter
from .ssf import SSFConfig
from .vpt import VPTConfig

__all__ = [
    "AFFINE",
    "DELTA",
    "EVAL_ROUTINGS",
    "METHOD_SETTINGS",
    "MODEL_PLACES",
    "ROUTINGS",
    "SITES",
    "SIZE_KNOBS",
    "TOKENS",
    "UNFROZEN",
    "USE_UNMERGED",
    "AdaptFormerConfig",
    "AdapterConfig",
    "BitFitConfig",
    "DoRAConfig",
    "FacTTTConfig",
    "LilyAdapter",
    "LilyConfig",
    "LoRAAdapter",
    "LoRAConfig",
    "SSFConfig",
    "SequentialAdapterConfig",
    "SizeKnob",
    "VPTConfig",
    "build_adapters",
    "fit_budget",
    "kinds_of",
    "mix_experts",
    "mix_fixed",
    "mixed_bank",
    "scaled_mix",
]
