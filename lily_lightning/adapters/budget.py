"""Parameter budgets: each method's one size knob, and the knob value whose trainable count is closest to a
target, so methods can be compared at equal budgets rather than at their default sizes (issue 25, item 6).

A knob is the one config field that sizes a method; every other field keeps its value (LoRA's ``alpha`` too,
so its ``alpha / rank`` scaling follows the rank). Every count here grows strictly with its knob: linearly for
Lily, LoRA, DoRA, the bottleneck adapters and VPT, quadratically for FacT-TT (its cores are r x r), and with
the sizing field of a HuggingFace PEFT type (:data:`PEFT_SIZE_FIELDS`), so
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
from .hf_peft import HFPeftConfig


@dataclass(frozen=True)
class SizeKnob:
    """The config field that sizes a method (``rank``, ``bottleneck``, ``length``)."""

    field: str

    def sizes(self, config: Any) -> bool:
        """Whether this knob sizes ``config`` (always, PEFT's types aside)."""
        return True

    def field_in(self, config: Any) -> str:
        """The field that sizes ``config`` (the same for every config of a method, PEFT's aside)."""
        return self.field

    def value(self, config: Any) -> int:
        """The knob's value in ``config`` (a config, or its saved form: a mapping, as the CLI saves a model's
        hyper-parameters)."""
        field = self.field_in(config)
        return config[field] if isinstance(config, Mapping) else getattr(config, field)

    def sized(self, config: Any, value: int) -> Any:
        """``config`` (or its saved form) with the knob at ``value``, every other field as it was."""
        if isinstance(config, Mapping):
            return {**config, self.field_in(config): value}
        return replace(config, **{self.field_in(config): value})


# PEFT type -> the field of its config that sizes it; each count grows in proportion to it. No knob: OFT's
# and BOFT's block counts shrink the count as they grow; LoKr's count stops growing, then falls, once its
# second factor is full rank (DINOv2-S qkv: 17,664 at r 16, 16,512 at r 32); VeRA trains d_out + r scales per
# layer, so its r (the shared frozen projections' rank) barely moves the count (400,000 on ViT-B/16's qkv
# would take r = 31,029); HRA starts at the pretrained weights only at an even r (its reflections pair up),
# which a budget's pick need not be; the other types have no one size.
PEFT_SIZE_FIELDS = {
    "LORA": "r",  # DoRA too (use_dora)
    "LOHA": "r",
    "LILY": "r",
    "FOURIERFT": "n_frequency",  # spectral coefficients per layer
}


def _peft_settings(config: Any) -> Mapping[str, Any]:
    """A PEFT config's mapping: ``HFPeftConfig.settings``, or the saved mapping itself."""
    return config.settings if isinstance(config, HFPeftConfig) else config


def _peft_type(config: Any) -> str:
    return str(_peft_settings(config).get("peft_type")).upper()


def sized_methods() -> str:
    """The methods a budget sizes, as messages list them."""
    peft = ", ".join(f"{name} ({field})" for name, field in PEFT_SIZE_FIELDS.items())
    return f"{', '.join(SIZE_KNOBS)} (peft: its types {peft})"


@dataclass(frozen=True)
class PeftSizeKnob(SizeKnob):
    """The ``peft`` method's knob: the field of PEFT's config that sizes its ``peft_type``
    (:data:`PEFT_SIZE_FIELDS`), read and set in the mapping (``HFPeftConfig.settings``, or the saved one)."""

    def sizes(self, config: Any) -> bool:
        return _peft_type(config) in PEFT_SIZE_FIELDS

    def field_in(self, config: Any) -> str:
        return PEFT_SIZE_FIELDS[_peft_type(config)]

    def value(self, config: Any) -> int:
        return _peft_settings(config)[self.field_in(config)]

    def sized(self, config: Any, value: int) -> Any:
        if isinstance(config, HFPeftConfig):
            return HFPeftConfig({**config.settings, self.field_in(config): value})
        return super().sized(config, value)


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
    "peft": PeftSizeKnob("r"),  # per peft_type (PEFT_SIZE_FIELDS); "r" names it where no config is at hand
}


def knob_setting(method: str, config: Any = None) -> str | None:
    """The setting ``method``'s size knob is, as results and checkpoints name it (``"lora.rank"``,
    ``"peft.n_frequency"`` for a FourierFT ``config``); None for a method without one."""
    knob = SIZE_KNOBS.get(method)
    if knob is None:
        return None
    return f"{METHOD_SETTINGS[method]}.{knob.field if config is None else knob.field_in(config)}"


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
            raise ValueError(
                f"budget {budget:,}: the parameter count does not grow with the size knob beyond "
                f"{counted(high // 2):,} (at {high // 2}, and {counted(high):,} at {high}); ask for less"
            )
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
