"""The ``peft`` method's config: any HuggingFace PEFT config, as the mapping a user wrote.

The layers are HF PEFT's own (``vit/peft_bridge`` builds them on the timm ViT); this file only holds and
checks the mapping, so it needs neither timm nor the optional ``peft`` package.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError

EXAMPLE = '--model.peft \'{"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["qkv"]}\''


@dataclass
class HFPeftConfig:
    """A HuggingFace PEFT config (``peft.<Type>Config``) as a mapping: ``peft_type`` (``LORA``, ``LILY``,
    ``VERA``, ...) plus that config's own fields, e.g. ``{"peft_type": "LORA", "r": 8, "target_modules":
    ["qkv"]}``. ``target_modules`` name timm's modules (``qkv``, ``proj``, ``fc1``, ``fc2``).
    """

    settings: Mapping[str, Any]

    def __post_init__(self) -> None:
        if not isinstance(self.settings, Mapping) or not isinstance(self.settings.get("peft_type"), str):
            raise UsageError(
                f"model.peft must be a mapping with a peft_type (a HuggingFace PEFT config), got "
                f"{self.settings!r}; e.g. {EXAMPLE}"
            )
        self.settings = dict(self.settings)

    @property
    def peft_type(self) -> str:
        """PEFT's name of the method (``peft.PeftType``'s values are upper case)."""
        return self.settings["peft_type"].upper()

    @property
    def label(self) -> str:
        """The method's name in RESULT lines, results, reports and run folders: ``peft_lora``, ``peft_dora``
        (LORA with ``use_dora``), ``peft_lily``, ... so PEFT's methods keep apart from each other and from
        this project's (``lily``, ``lora``, ``dora``)."""
        name = "DORA" if self.peft_type == "LORA" and self.settings.get("use_dora") else self.peft_type
        return f"peft_{name.lower()}"

    @property
    def fields(self) -> dict[str, Any]:
        """The fields of the PEFT config class, ``peft_type`` aside."""
        return {key: value for key, value in self.settings.items() if key != "peft_type"}

    @property
    def places(self) -> tuple[str, ...]:
        """None of ``vit/inject``'s places: PEFT puts its layers where ``target_modules`` says."""
        return ()
