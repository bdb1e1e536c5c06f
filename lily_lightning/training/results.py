"""A run's result files: what `test` prints as its RESULT line, as ``<run dir>/result.json``, and what
`validate` scores, as ``<run dir>/validation.json``.

Every evaluation is recorded with what produced it (``training.evaluation_record``): the checkpoint's
sha256, epoch and step, task and split, precision, eval routing, eval batch size, partial or not. The run's
``result.json`` / ``validation.json`` is only ever the complete evaluation of that run's own checkpoint
under the run's own settings (see ``ViTClassifier._print_results``), in the run folder that trained the
checkpoint (:func:`result_folder`); any other (partial, other settings, another task, a loose checkpoint)
goes to a new ``evaluations/<test|validate>-<n>.json`` that replaces nothing. `sweep` treats a run with a
complete, current result as finished and `report` collects them into tables: a result whose checkpoint
digest is not that of the checkpoint now in the run's ``checkpoints/`` is stale (:class:`StaleResult`). A
file without ``"partial"`` (written before it existed) is complete; one without a digest (written before
digests) or whose checkpoint file is gone counts, as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..files import write_atomically
from .checkpointing import CHECKPOINTS

RESULT_FILE = "result.json"
VALIDATION_FILE = "validation.json"
PREVIOUS = "previous"  # <run dir>/previous/<time>/: what a new `fit` set aside (training.previous)
EVALUATIONS = "evaluations"  # <run dir>/evaluations/test-1.json ...: the evaluations that are no run result
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


class StaleResult(UnreadableResult):
    """A result of another checkpoint than the one now in its run folder (e.g. before the run was resumed)."""


_digests: dict[tuple[str, int, int], str] = {}


def checkpoint_digest(path: str | Path) -> str:
    """The sha256 of checkpoint file ``path``, computed once per file version (path, size, mtime)."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        _digests[key] = digest.hexdigest()
    return _digests[key]


def write_evaluation(folder: Path, record: dict[str, Any], kind: str) -> Path:
    """Write ``record`` to a new ``folder/evaluations/<kind>-<n>.json`` (the first free n; never replaces)."""
    evaluations = folder / EVALUATIONS
    evaluations.mkdir(parents=True, exist_ok=True)
    for number in range(1, 1_000_000):
        path = evaluations / f"{kind}-{number}.json"
        try:
            with path.open("x") as f:  # exclusive: two evaluations never share a name
                f.write(json.dumps(record, indent=2) + "\n")
            return path
        except FileExistsError:
            continue
    raise UsageError(f"{evaluations} holds a million {kind} records; move some away")


def check_current(path: Path, record: dict[str, Any]) -> None:
    """Raise :class:`StaleResult` when ``record`` (read from ``path`` in a run folder) tests another
    checkpoint than the one of the same name now in the run's ``checkpoints/`` folder."""
    digest, name = record.get("checkpoint_sha256"), record.get("checkpoint")
    if not isinstance(digest, str) or not isinstance(name, str):
        return  # written before digests were recorded, or by an in-process test: as before
    current = path.parent / CHECKPOINTS / Path(name).name
    if current.is_file() and checkpoint_digest(current) != digest:
        raise StaleResult(
            f"{path} is the result of an earlier version of {current} (another sha256): the run was trained "
            "on since; `test --ckpt_path last` (or the sweep) evaluates the current one"
        )


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
    UnreadableResult when its result.json is empty, damaged or foreign, a StaleResult when it tested an
    earlier version of the run's checkpoint."""
    run_dir = Path(run_dir)
    record = read_record(run_dir / RESULT_FILE, _RESULT_FIELDS)
    if record is None:
        return None
    check_current(run_dir / RESULT_FILE, record)
    return RunResult(
        task=record["task"],
        label=run_dir.name,
        top1=float(record["top1"]),
        params_without_head=int(record["trainable_params"]) - int(record["head_params"]),
        run_dir=run_dir,
        record=record,
    )


def read_validation(run_dir: Path) -> dict[str, Any] | None:
    """What `validate` wrote in ``run_dir`` (``val_top1``, ``images``, ``partial``), or None; a StaleResult
    as :func:`read_result`."""
    path = Path(run_dir) / VALIDATION_FILE
    record = read_record(path, _VALIDATION_FIELDS)
    if record is not None:
        check_current(path, record)
    return record


def latest_evaluation(run_dir: Path, kind: str = "test") -> dict[str, Any] | None:
    """The newest ``evaluations/<kind>-<n>.json`` record in ``run_dir`` (a partial or foreign `test` or
    `validate`, e.g. a notebook's quick partial test), or None when there is none."""
    records = sorted((Path(run_dir) / EVALUATIONS).glob(f"{kind}-*.json"), key=lambda p: p.stat().st_mtime_ns)
    return json.loads(records[-1].read_text()) if records else None


def collect_results(runs_dir: Path, warn: Callable[[str], None]) -> list[RunResult]:
    """Every run's result under ``runs_dir`` (any depth), in path order; an unreadable or stale file is named
    through ``warn`` and left out (so is everything a `fit` set aside under ``previous/``)."""
    results = []
    for path in sorted(Path(runs_dir).rglob(RESULT_FILE)):
        if PREVIOUS in path.relative_to(runs_dir).parts:
            continue
        try:
            result = read_result(path.parent)
        except UnreadableResult as e:
            warn(f"skipped: {e}")
            continue
        if result is not None:
            results.append(result)
    return results
