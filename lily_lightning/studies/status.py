"""`sweep --status RUNS_DIR`: where every run of the sweeps in a runs folder stands.

A run folder is one holding ``sweep_run.json``. Its state, first match wins: ``done`` (a complete result:
its score), ``running`` (its lock is held: host, pid, SLURM job), ``queued`` / ``running`` (its SLURM job is
pending or running), ``failed`` (its log's error line), ``interrupted`` (a checkpoint to resume from), else
``not started``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from lily_lightning.errors import UsageError
from lily_lightning.studies.runs import LAST, RUN_LOG, RUN_SETTINGS, error_line, recorded_settings
from lily_lightning.training.results import (
    RESULT_FILE,
    VALIDATION_FILE,
    UnreadableResult,
    read_result,
    read_validation,
)
from lily_lightning.training.run_lock import LOCK_FILE, read_holder, stale_reason


def _score(run_dir: Path, evaluate: str) -> str | None:
    """``top1=0.7312`` of a complete evaluation, else None (the reason, for a partial or unreadable file)."""
    try:
        if evaluate == "validate":
            record = read_validation(run_dir)
            if record is not None and not record.get("partial"):
                return f"val_top1={float(record['val_top1']):.4f}"
        else:
            result = read_result(run_dir)
            if result is not None and not result.partial:
                return f"top1={result.top1:.4f}"
    except UnreadableResult:
        return None
    return None


def run_state(run_dir: Path) -> tuple[str, str]:
    """(state, detail) of one run folder, with the SLURM job id when a sweep submitted it."""
    from lily_lightning.studies.slurm import recorded_job

    state, detail = _local_state(run_dir)
    job = recorded_job(run_dir)
    if job is not None and "SLURM job" not in detail:
        detail = f"{detail}, SLURM job {job['job_id']}" if detail else f"SLURM job {job['job_id']}"
    return state, detail


def _local_state(run_dir: Path) -> tuple[str, str]:
    recorded = recorded_settings(run_dir) or {}
    steps = recorded.get("steps") or [["fit"], ["test"]]
    evaluate = steps[-1][0] if steps[-1] else "test"
    if (score := _score(run_dir, evaluate)) is not None:
        return "done", score
    lock = run_dir / LOCK_FILE
    if lock.is_file() and stale_reason(holder := read_holder(lock), lock) is None:
        return "running", holder.describe() if holder is not None else "lock held"
    slurm_job = _slurm_state(run_dir)
    if slurm_job is not None:
        return slurm_job
    log = run_dir / RUN_LOG
    if log.is_file() and (line := error_line(log)).startswith("error:"):
        return "failed", line
    if (run_dir / LAST).is_file():
        return "interrupted", "resumes from checkpoints/last.ckpt"
    if (run_dir / RESULT_FILE).is_file() or (run_dir / VALIDATION_FILE).is_file():
        return "failed", "its result is partial or cannot be read: it is evaluated again"
    return "not started", ""


def _slurm_state(run_dir: Path) -> tuple[str, str] | None:
    """("queued" | "running", "SLURM job <id> <STATE>") when the run's SLURM job is not over, else None."""
    from lily_lightning.studies.slurm import ACTIVE_STATES, JOB_FILE, job_state

    if not (run_dir / JOB_FILE).is_file():
        return None
    found = job_state(run_dir)
    if found is None or found[1] not in ACTIVE_STATES:
        return None
    job_id, state = found
    return ("running" if state == "RUNNING" else "queued"), f"SLURM job {job_id} {state}"


def print_status(runs_dir: Path) -> int:
    """Print one line per run and a count per state; exit code 0."""
    if not runs_dir.is_dir():
        raise UsageError(f"runs folder {runs_dir} does not exist")
    run_dirs = sorted(path.parent for path in runs_dir.rglob(RUN_SETTINGS))
    if not run_dirs:
        raise UsageError(f"no sweep run under {runs_dir} (a sweep writes <run>/{RUN_SETTINGS})")
    counts: Counter[str] = Counter()
    for run_dir in run_dirs:
        state, detail = run_state(run_dir)
        counts[state] += 1
        print(f"{run_dir.relative_to(runs_dir).as_posix()}: {state}" + (f" ({detail})" if detail else ""))
    print(f"{len(run_dirs)} runs: " + ", ".join(f"{n} {state}" for state, n in counts.most_common()))
    return 0
