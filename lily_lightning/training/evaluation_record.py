"""What produced an evaluation (`test`, `validate`), and whether it is its run's result.

Every evaluation record names its checkpoint (path, sha256, epoch, global step), the split it read, and the
settings that change its numbers without changing the model: precision, Lily's eval routing and the eval
batch size (batch routing mixes experts per batch). `fit` records the run's own values of these in its
checkpoint (``ViTClassifier.trained_on``); an evaluation is the run's result only when it is complete and
ran under the same ones (a key the checkpoint does not record, from before it was recorded, is not compared).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .results import checkpoint_digest

# The settings an evaluation shares with the fit that trained its checkpoint, in ``trained_on`` too.
OWN_SETTINGS = ("precision", "eval_routing", "eval_batch_size")
# Which recorded split of ``trained_on`` an evaluation of each kind must have read.
SPLIT_OF = {"test": "test_splits", "validate": "validation_splits"}


def eval_routing(lily: Any) -> str | None:
    """``lily.eval_routing`` of a LilyConfig as built (a dataclass) or as saved in a checkpoint (a dict)."""
    if isinstance(lily, Mapping):
        return lily.get("eval_routing")
    return getattr(lily, "eval_routing", None)


def evaluation_key(
    checkpoint: str | Path | None,
    trained: Mapping[str, Any],
    split: list[str] | None,
    settings: Mapping[str, Any],
    partial: bool,
) -> dict[str, Any]:
    """The record's fields that say what produced it; ``trained``: the checkpoint's epoch and global step
    (those of the model in memory when it was not loaded from a file)."""
    return {
        "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
        "checkpoint_sha256": None if checkpoint is None else checkpoint_digest(checkpoint),
        "epoch": trained.get("epoch"),
        "global_step": trained.get("global_step"),
        "split": split,
        **{name: settings[name] for name in OWN_SETTINGS},
        "partial": partial,
    }


def other_settings(kind: str, key: Mapping[str, Any], trained_on: Mapping[str, Any] | None) -> list[str]:
    """``"precision 32-true (its run's: bf16-mixed)"`` for each setting or split of ``key`` that differs
    from what the fit recorded in ``trained_on``."""
    own = dict(trained_on or {})
    pairs = [(name, name) for name in OWN_SETTINGS] + [("split", SPLIT_OF[kind])]
    return [
        f"{name} {key[name]} (its run's: {own[recorded]})"
        for name, recorded in pairs
        if recorded in own and own[recorded] != key[name]
    ]
