"""A method sized to a parameter budget on a given ViT: the value of its size knob (``adapters.SIZE_KNOBS``)
whose trainable count on that ViT, head excluded, is closest to the budget."""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import SIZE_KNOBS, AdapterConfig, HFPeftConfig, build_adapters, fit_budget
from .inject import adapter_features
from .peft_bridge import planned_peft_parameters


def planned_parameters(model: nn.Module, config: AdapterConfig) -> int:
    """The count ``count_parameters`` gives after ``inject(model, config)``, without changing ``model``: the
    config's adapters built on the meta device (no memory) for ``model``'s widths and depth, or PEFT's layers
    in a meta copy of ``model``. For the methods with a size knob, which train no backbone tensor in place
    (BitFit's biases are counted by the model)."""
    if isinstance(config, HFPeftConfig):
        return planned_peft_parameters(model, config)
    features, depth = adapter_features(model, config.places)
    with torch.device("meta"):
        adapters = nn.ModuleDict(build_adapters(config, features, depth))
    return sum(p.numel() for p in adapters.parameters() if p.requires_grad)


def sized_to_budget(
    model: nn.Module, method: str, config: AdapterConfig, budget: int
) -> tuple[AdapterConfig, int, int]:
    """``config`` with ``method``'s knob at the value whose count on ``model`` is closest to ``budget`` (ties:
    the smaller), that value, and its count."""
    knob = SIZE_KNOBS[method]
    value, count = fit_budget(budget, lambda v: planned_parameters(model, knob.sized(config, v)))
    return knob.sized(config, value), value, count
