"""The methods, free of timm and Lightning: configs, the Lily site, LoRA and the visual-PEFT baselines, and
the config of the HuggingFace PEFT bridge (whose layers ``vit/peft_bridge`` builds)."""

from .adapter import SequentialAdapterConfig
from .adaptformer import AdaptFormerConfig
from .bitfit import BitFitConfig
from .budget import SIZE_KNOBS, SizeKnob, fit_budget, knob_setting
from .build import METHOD_SETTINGS, AdapterConfig, build_adapters
from .config import EVAL_ROUTINGS, ROUTINGS, SITES, LilyConfig, LoRAConfig
from .dora import DoRAConfig
from .fact import FacTTTConfig
from .hf_peft import HFPeftConfig
from .kinds import (
    AFFINE,
    DELTA,
    LAYERS,
    MODEL_PLACES,
    NAMED_IN_MODEL,
    TOKENS,
    UNFROZEN,
    USE_UNMERGED,
    kinds_of,
)
from .lily import LilyAdapter, mix_experts, mix_fixed, mixed_bank, scaled_mix
from .lora import LoRAAdapter
from .ssf import SSFConfig
from .vpt import VPTConfig

__all__ = [
    "AFFINE",
    "DELTA",
    "EVAL_ROUTINGS",
    "LAYERS",
    "METHOD_SETTINGS",
    "MODEL_PLACES",
    "NAMED_IN_MODEL",
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
    "HFPeftConfig",
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
    "knob_setting",
    "mix_experts",
    "mix_fixed",
    "mixed_bank",
    "scaled_mix",
]
