"""A run's result files: what `test` prints as its RESULT line, as ``<run dir>/result.json``, and what
`validate` scores, as ``<run dir>/validation.json``.

`test` writes result.json (see ``ViTClassifier._print_results``) into the run folder that trained the
checkpoint (:func:`result_folder`); `sweep` treats a run with a complete one as
finished and `report` collects them into tables. A result with ``"partial": true`` covers only part of the
test split (``--trainer.limit_test_batches``): it is never a finished run nor a table entry; a file without
the key (written before it existed) is complete.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..files import write_atomically
from .checkpointing import CHECKPOINTS

RESULT_FILE = "result.json"
VALIDATION_FILE = "validation.json"
# The fields every reader needs, with the JSON types they must have (bool is not a number here).
_RESULT_FIELDS: dict[str, tuple[type, ...]] = {
    "task": (str,),
    "top1": (int, float),
    "trainable_params": (int,),
    "head_params": (int,),
}
_VALIDATION_FIELDS: dict[str, tuple[type, ...]] = {"task": (str,), "val_top1": (int, float)}


class UnreadableResult(UsageError):
    """A result file that is empty, damaged, or not one that `test` / `validate` wrote."""


def write_result(run_dir: Path, result: dict[str, Any], name: str = RESULT_FILE) -> Path:
    """Write ``result`` to ``run_dir/name`` (never half a file: a sweep reads it as "finished")."""
    return write_atomically(run_dir / name, (json.dumps(result, indent=2) + "\n").encode())


def read_record(path: Path, fields: Mapping[str, tuple[type, ...]]) -> dict[str, Any] | None:
    """The JSON object in ``path`` (None when there is no such file); an UnreadableResult names the file
    and says what is wrong with it when it is empty, not JSON, or lacks one of ``fields``."""
    if not path.is_file():
        return None
    writer = "`validate`" if path.name == VALIDATION_FILE else "`test`"
    try:
        text = path.read_text()
        record = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        what = "empty" if not path.stat().st_size else f"not readable JSON ({type(e).__name__}: {e})"
        raise UnreadableResult(f"{path} is {what}; {writer} rewrites it when the run is run again") from e
    wrong = [
        name
        for name, types in fields.items()
        if not isinstance(record, dict)
        or not isinstance(record.get(name), types)
        or isinstance(record.get(name), bool)
    ]
    if wrong:
        raise UnreadableResult(
            f"{path} is not a result {writer} wrote (missing or wrong: {', '.join(wrong)}); "
            "move it away or run the run again"
        )
    return record


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
    """One tested run: ``runs/<task>/<label>/result.json``; ``label`` is the run folder's name."""

    task: str
    label: str
    top1: float
    params_without_head: int
    run_dir: Path
    record: dict[str, Any]

    @property
    def partial(self) -> bool:
        """Whether the test covered only part of the test split (absent in older files: complete)."""
        return bool(self.record.get("partial", False))

    @property
    def path(self) -> Path:
        return self.run_dir / RESULT_FILE


def read_result(run_dir: Path) -> RunResult | None:
    """The result of the run in ``run_dir``, or None when it has not finished `test`; an
    UnreadableResult when its result.json is empty, damaged or foreign."""
    run_dir = Path(run_dir)
    record = read_record(run_dir / RESULT_FILE, _RESULT_FIELDS)
    if record is None:
        return None
    return RunResult(
        task=record["task"],
        label=run_dir.name,
        top1=float(record["top1"]),
        params_without_head=int(record["trainable_params"]) - int(record["head_params"]),
        run_dir=run_dir,
        record=record,
    )


def read_validation(run_dir: Path) -> dict[str, Any] | None:
    """What `validate` wrote in ``run_dir`` (``val_top1``, ``images``, ``partial``), or None."""
    return read_record(Path(run_dir) / VALIDATION_FILE, _VALIDATION_FIELDS)


def collect_results(runs_dir: Path, warn: Callable[[str], None]) -> list[RunResult]:
    """Every run's result under ``runs_dir`` (any depth), in path order; an unreadable file is named through
    ``warn`` and left out."""
    results = []
    for path in sorted(Path(runs_dir).rglob(RESULT_FILE)):
        try:
            result = read_result(path.parent)
        except UnreadableResult as e:
            warn(f"skipped: {e}")
            continue
        if result is not None:
            results.append(result)
    return results
