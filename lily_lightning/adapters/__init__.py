"""The methods, free of timm and Lightning: configs, the Lily site, the LoRA site."""

from .build import build_adapter
from .config import EVAL_ROUTINGS, ROUTINGS, SITES, AdapterConfig, LilyConfig, LoRAConfig
from .lily import LilyAdapter, mix_experts, mix_fixed, mixed_bank, scaled_mix
from .lora import LoRAAdapter

__all__ = [
    "EVAL_ROUTINGS",
    "ROUTINGS",
    "SITES",
    "AdapterConfig",
    "LilyAdapter",
    "LilyConfig",
    "LoRAAdapter",
    "LoRAConfig",
    "build_adapter",
    "mix_experts",
    "mix_fixed",
    "mixed_bank",
    "scaled_mix",
]
