"""A run's result file: what `test` prints as its RESULT line, as ``<run dir>/result.json``.

`test` writes it (see ``ViTClassifier._print_results``); `sweep` treats a run with one as finished and
`report` collects them into tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import write_atomically

RESULT_FILE = "result.json"


def write_result(run_dir: Path, result: dict[str, Any]) -> Path:
    """Write ``result`` to ``run_dir/result.json`` (never half a file: a sweep reads it as "finished")."""
    return write_atomically(run_dir / RESULT_FILE, (json.dumps(result, indent=2) + "\n").encode())


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
