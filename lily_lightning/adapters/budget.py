"""Parameter budgets: each method's one size knob, and the knob value whose trainable count is closest to a
target, so methods can be compared at equal budgets rather than at their default sizes (issue 25, item 6).

A knob is the one config field that sizes a method; every other field keeps its value (LoRA's ``alpha`` too,
so its ``alpha / rank`` scaling follows the rank). Every count here grows strictly with its knob: linearly for
Lily, LoRA, DoRA, the bottleneck adapters and VPT, quadratically for FacT-TT (its cores are r x r), so
:func:`fit_budget` doubles the knob until the count reaches the budget, then bisects: about 2 log2(value)
counts, each made by the caller for the backbone in use (``vit.budget`` builds the adapters on the meta
device).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..errors import UsageError
from .build import METHOD_SETTINGS


@dataclass(frozen=True)
class SizeKnob:
    """The config field that sizes a method (``rank``, ``bottleneck``, ``length``)."""

    field: str

    def value(self, config: Any) -> int:
        """The knob's value in ``config`` (a config, or its saved form: a mapping, as the CLI saves a model's
        hyper-parameters)."""
        return config[self.field] if isinstance(config, Mapping) else getattr(config, self.field)

    def sized(self, config: Any, value: int) -> Any:
        """``config`` (or its saved form) with the knob at ``value``, every other field as it was."""
        if isinstance(config, Mapping):
            return {**config, self.field: value}
        return replace(config, **{self.field: value})


# method -> its size knob. Methods that are not here train a fixed count and refuse a budget.
SIZE_KNOBS: dict[str, SizeKnob] = {
    # Lily's r sizes its LPs (d -> r; 2r at the mlp site), routers (r -> E) and HP experts (E x r x d) alike;
    # the number of experts E and the LP sharing keep the official ViT code's values (Zhong et al., Sec. 3).
    "lily": SizeKnob("rank"),
    "lora": SizeKnob("rank"),
    "dora": SizeKnob("rank"),
    "fact_tt": SizeKnob("rank"),  # the width of the shared U, V and of every core
    "adapter": SizeKnob("bottleneck"),
    "adaptformer": SizeKnob("bottleneck"),
    "vpt_shallow": SizeKnob("length"),  # prompt tokens per prompted block
    "vpt_deep": SizeKnob("length"),
    # "peft" (the HF PEFT bridge) joins here with a knob on its PEFT config's ``r``: a SizeKnob whose
    # ``value`` / ``sized`` read and set ``r`` inside that config.
}


def knob_setting(method: str) -> str | None:
    """The setting ``method``'s size knob is, as results and checkpoints name it (``"lora.rank"``); None for a
    method without one."""
    knob = SIZE_KNOBS.get(method)
    return f"{METHOD_SETTINGS[method]}.{knob.field}" if knob else None


def fit_budget(budget: int, count: Callable[[int], int]) -> tuple[int, int]:
    """The knob value (>= 1) whose ``count(value)`` is closest to ``budget``, ties to the smaller, and its
    count. ``count`` must grow strictly with the value."""
    if budget < 1:
        raise UsageError(f"model.budget must be a positive parameter count, got {budget}")
    counts: dict[int, int] = {}

    def counted(value: int) -> int:
        if value not in counts:
            counts[value] = count(value)
        return counts[value]

    low, high = 0, 1  # count(low) < budget <= count(high), with value 0 standing for "no adapter"
    while counted(high) < budget:
        if high > 1 and counted(high) <= counted(high // 2):
            raise ValueError(f"the parameter count does not grow with the size knob ({counted(high)})")
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        if counted(middle) >= budget:
            high = middle
        else:
            low = middle
    if low == 0 or budget - counted(low) > counted(high) - budget:
        return high, counted(high)
    return low, counted(low)
