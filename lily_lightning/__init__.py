"""lily_lightning: Lily (Low-rank Interconnected adaptation across layers) for timm ViTs on Lightning."""

from .adapters import LilyConfig, LoRAConfig
from .errors import UsageError
from .inject import inject
from .state import adapter_state_dict, count_parameters, load_adapter_state_dict

__all__ = [
    "LilyConfig",
    "LoRAConfig",
    "UsageError",
    "adapter_state_dict",
    "count_parameters",
    "inject",
    "load_adapter_state_dict",
]
