"""lily_lightning: Lily (Low-rank Interconnected adaptation across layers) for timm ViTs on Lightning."""

from .adapters import LilyConfig, LoRAConfig
from .data import FGVCDataModule, ImageFolderDataModule, VTAB1kDataModule
from .errors import UsageError
from .training.inference import LoadedClassifier, load_classifier
from .training.module import ViTClassifier
from .vit.inject import inject
from .vit.merge import merge, unmerge
from .vit.state import adapter_state_dict, count_parameters, load_adapter_state_dict

__all__ = [
    "FGVCDataModule",
    "ImageFolderDataModule",
    "LilyConfig",
    "LoRAConfig",
    "LoadedClassifier",
    "UsageError",
    "VTAB1kDataModule",
    "ViTClassifier",
    "adapter_state_dict",
    "count_parameters",
    "inject",
    "load_adapter_state_dict",
    "load_classifier",
    "merge",
    "unmerge",
]
