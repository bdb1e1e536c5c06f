"""``--grid`` values read as the runs will read them: each value is parsed with the type its key has in the
CLI (``trainer.max_epochs``: ``Optional[int]``, ``model.lr``: ``float``, ``model.lily.scale``: ``float``, a
data module's arguments from the ``class_path`` the configs name), so ``1e-3`` and ``0.001`` are one grid
point, trained once, and ``x`` for an int is refused before any run starts. A key whose type is not known
here is read as YAML, numbers as numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from jsonargparse import ArgumentParser
from lightning.pytorch import Trainer

from lily_lightning.errors import UsageError
from lily_lightning.studies.grid import GridAxis
from lily_lightning.studies.settings import plain, read_value
from lily_lightning.training.module import ViTClassifier

SECTIONS: dict[str, type] = {"trainer": Trainer, "model": ViTClassifier}


def section_class(section: str, settings: Mapping[str, Any]) -> type | None:
    """The class a config section sets up: the Trainer, the model, or the ``class_path`` the configs give."""
    if section in SECTIONS:
        return SECTIONS[section]
    class_path = settings.get(f"{section}.class_path")
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None  # the run itself says what is wrong with it
    return found if isinstance(found, type) else None


def key_type(key: str, settings: Mapping[str, Any]) -> Any | None:
    """The type the CLI gives ``key`` (an ``__init__`` argument, then dataclass fields), else None."""
    section, *names = key.replace(".init_args.", ".").split(".")
    owner = section_class(section, settings)
    scope: Any = owner.__init__ if owner is not None else None
    hint = None
    for name in names:
        if scope is None:
            return None
        try:
            hint = typing.get_type_hints(scope).get(name)
        except (NameError, TypeError):
            return None
        scope = hint if dataclasses.is_dataclass(hint) else None
    return hint


def type_text(hint: Any) -> str:
    """``int``, ``Optional[int]``, ``Literal['final', 'best_of_evals']``."""
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def typed_value(key: str, text: str, hint: Any) -> Any:
    """``text`` as the CLI reads a value of type ``hint``; a UsageError when it is not one."""
    parser = ArgumentParser(exit_on_error=False)
    try:
        parser.add_argument("--value", type=hint)
    except (ValueError, TypeError):  # a type jsonargparse takes only inside its class
        return read_value(text)
    try:
        return plain(parser.parse_args(["--value", text]).value)
    except argparse.ArgumentError as e:
        raise UsageError(
            f"--grid {key}: {text!r} is not a valid value: {key} takes {type_text(hint)}. "
            "Give every value of the grid in that type (e.g. 1e-3 for a float, 4 for an int)."
        ) from e


def typed_axes(axes: Sequence[GridAxis], settings: Mapping[str, Any]) -> tuple[list[GridAxis], list[str]]:
    """Each axis with each value checked against its key's type (``settings``: a run's resolved settings,
    where a data module's ``class_path`` is found) and the values that read as an earlier one dropped; one
    line per dropped value."""
    typed: list[GridAxis] = []
    notes: list[str] = []
    for axis in axes:
        hint = key_type(axis.key, settings)
        kept: dict[str, Any] = {}
        for text in axis.values:
            value = typed_value(axis.key, text, hint) if hint is not None else read_value(text)
            same = next((first for first, seen in kept.items() if seen == value), None)
            if same is None:
                kept[text] = value
            else:
                notes.append(
                    f"sweep: --grid {axis.key}: {text} is the value {same} again (both read as {value!r}): "
                    "one grid point, trained once"
                )
        typed.append(GridAxis(axis.key, tuple(kept)))
    return typed, notes
