"""Config -> adapter module dispatch, the one place that knows every method."""

from __future__ import annotations

from torch import nn

from .config import AdapterConfig, LilyConfig, LoRAConfig
from .lily import build_lily
from .lora import build_lora


def build_adapter(
    config: AdapterConfig, site: str, in_features: int, out_features: int, depth: int
) -> nn.Module:
    """The module that produces ``site``'s delta for every block: ``adapter(x, block) -> delta``."""
    if isinstance(config, LilyConfig):
        return build_lily(config, site, in_features, out_features, depth)
    if isinstance(config, LoRAConfig):
        return build_lora(config, site, in_features, out_features, depth)
    raise TypeError(f"unknown adapter config {type(config).__name__}; use LilyConfig or LoRAConfig")
