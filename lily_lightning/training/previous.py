"""A new `fit` in a run folder sets the earlier run's results aside, into ``<run dir>/previous/<time>/``.

Otherwise ``report`` would show the old model's result.json beside the new checkpoint, and its predictions
and confusion matrix would pass for the new run's. Moving loses nothing (the files keep their names) and
needs no flag. The checkpoint is not moved: the new run overwrites ``checkpoints/last.ckpt`` at its first
epoch's end (the CLI says so).
"""

from __future__ import annotations

import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path

from .confusion import CONFUSION_CSV, CONFUSION_PNG
from .predictions import PREDICTIONS_GLOB
from .results import EVALUATIONS, PREVIOUS, RESULT_FILE, VALIDATION_FILE

log = logging.getLogger(__name__)


def earlier_outputs(run_dir: Path) -> list[Path]:
    """The results, validation, evaluations, confusion matrix and predictions of an earlier run."""
    named = [
        run_dir / name for name in (RESULT_FILE, VALIDATION_FILE, CONFUSION_CSV, CONFUSION_PNG, EVALUATIONS)
    ]
    return [path for path in named if path.exists()] + sorted(run_dir.glob(PREDICTIONS_GLOB))


def set_aside_earlier_outputs(run_dir: Path) -> Path | None:
    """Move :func:`earlier_outputs` into a new ``run_dir/previous/<UTC time>/`` and say so; the folder, or
    None when there was nothing to move."""
    outputs = earlier_outputs(run_dir)
    if not outputs:
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")
    folder = run_dir / PREVIOUS / stamp
    number = 1
    while folder.exists():  # two fits within a second
        number += 1
        folder = run_dir / PREVIOUS / f"{stamp}-{number}"
    folder.mkdir(parents=True)
    for path in outputs:
        shutil.move(path, folder / path.name)
    log.warning(
        "Starting a new run in %s: the earlier run's %s moved to %s (they belong to its model, not this "
        "one).",
        run_dir,
        ", ".join(path.name for path in outputs),
        folder,
    )
    return folder
