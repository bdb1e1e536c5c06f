"""A run's result file: what `test` prints as its RESULT line, as ``<run dir>/result.json``.

`test` writes it (see ``ViTClassifier._print_results``) into the run folder that trained the checkpoint
(:func:`result_folder`); `sweep` treats a run with one as finished and `report` collects them into tables.
A test of fewer images than the test set holds says ``"partial": true``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import write_atomically
from .checkpointing import CHECKPOINTS

RESULT_FILE = "result.json"


def write_result(run_dir: Path, result: dict[str, Any]) -> Path:
    """Write ``result`` to ``run_dir/result.json`` (never half a file: a sweep reads it as "finished")."""
    return write_atomically(run_dir / RESULT_FILE, (json.dumps(result, indent=2) + "\n").encode())


def result_folder(
    run_dir: Path, checkpoint: str | Path | None, trained_task: str | None, task: str
) -> tuple[Path | None, str]:
    """The run folder a test's result belongs to, or None and why there is none.

    A result describes the run that trained the checkpoint, on that run's own task: it goes to the folder
    holding ``checkpoints/<file>`` (``run_dir`` itself for ``--ckpt_path last``), never to the folder of the
    config that happened to test it. A checkpoint outside a run's ``checkpoints/`` folder, or tested on
    another task than it was trained on, has no run folder: nothing is written. (A checkpoint that does not
    record its task, from before it was recorded, counts only for this config's own run folder.)
    """
    if checkpoint is None:  # the model this process trained
        return run_dir, ""
    checkpoint = Path(checkpoint)
    if checkpoint.parent.name != CHECKPOINTS:
        return None, f"the checkpoint {checkpoint} is not inside a run folder's {CHECKPOINTS}/ folder"
    owner = checkpoint.parent.parent
    if trained_task is None:  # written before checkpoints recorded their task
        if owner.resolve() == run_dir.resolve():
            return run_dir, ""  # this config's own run, as before
        return None, (
            f"the checkpoint {checkpoint} does not record the task it was trained on (an older checkpoint), "
            f"so whether this is a result of its run {owner} is unknown"
        )
    if trained_task != task:
        return None, (
            f"the checkpoint {checkpoint} was trained on task {trained_task}, not on {task}, so this is no "
            f"result of its run {owner}"
        )
    return owner, ""


@dataclass(frozen=True)
class RunResult:
    """One finished run: ``runs/<task>/<label>/result.json``; ``label`` is the run folder's name."""

    task: str
    label: str
    top1: float
    params_without_head: int
    run_dir: Path
    record: dict[str, Any]


def read_result(run_dir: Path) -> RunResult | None:
    """The result of the run in ``run_dir``, or None when it has not finished `test`."""
    path = Path(run_dir) / RESULT_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return RunResult(
        task=record["task"],
        label=path.parent.name,
        top1=float(record["top1"]),
        params_without_head=int(record["trainable_params"]) - int(record["head_params"]),
        run_dir=path.parent,
        record=record,
    )


def collect_results(runs_dir: Path) -> list[RunResult]:
    """Every run's result under ``runs_dir`` (any depth), in path order."""
    found = (read_result(path.parent) for path in sorted(Path(runs_dir).rglob(RESULT_FILE)))
    return [result for result in found if result is not None]
