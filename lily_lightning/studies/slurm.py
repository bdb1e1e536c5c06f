"""`sweep --launcher slurm`: each stage of a sweep is one SLURM job array, submitted through submitit (as
DINOv2, DeiT and MAE submit theirs), one run per array task.

Each task runs :func:`studies.runs.execute` for its run: under the run folder's lock, skipping it when it is
finished, resuming it from ``checkpoints/last.ckpt``. submitit has SLURM signal the job ``signal_delay_s``
before its time limit (and on preemption); the job then stops its `fit`, which leaves the last epoch's
checkpoint whole, and is requeued with the same job id; the requeued job takes the lock over from its own
earlier self and resumes. Submitted job ids are kept in each run folder (``slurm_job.json``), so rerunning the
same sweep never submits a queued or running run again.
"""

from __future__ import annotations

import json
import multiprocessing
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lily_lightning.errors import UsageError
from lily_lightning.studies.runs import ChildRunner, Outcome, RunSpec, Say, execute

JOB_FILE = "slurm_job.json"
LOG_FOLDER = "slurm"  # submitit's scripts, pickles and job logs, under the runs folder
# SLURM states of a job that is not over yet (sacct's names).
ACTIVE_STATES = frozenset(
    {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD"}
)
SIGNAL_DELAY_S = 120  # time to stop `fit` and requeue before the limit (an epoch-end checkpoint is on disk)
POLL_S = 5.0
JUST_SUBMITTED_S = 300  # sacct may not list a job yet for this long after it was submitted


def parse_time(text: str) -> int:
    """SLURM's ``--time`` forms (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``)
    as whole minutes, for submitit."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if match is None:
        raise UsageError(f"--slurm-time {text!r}: use minutes (120), HH:MM:SS (02:00:00) or D-HH:MM:SS")
    days, first, second, third = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + first * 3600 + (second or 0) * 60 + (third or 0)
    elif third is not None:  # HH:MM:SS
        seconds = first * 3600 + (second or 0) * 60 + third
    else:  # MM[:SS]
        seconds = first * 60 + (second or 0)
    return max(1, -(-seconds // 60))


def parse_extra(items: Sequence[str]) -> dict[str, str]:
    """``["account=abc", "qos=high"]`` -> sbatch options ``--account=abc --qos=high``."""
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--slurm-extra {item!r}: write OPTION=VALUE, e.g. account=myproject qos=normal")
        extra[key.strip().removeprefix("--")] = value.strip()
    return extra


@dataclass
class SlurmOptions:
    partition: str | None = None
    time: str = "02:00:00"
    gpus_per_run: int = 1
    array_parallelism: int = 256
    extra: dict[str, str] = field(default_factory=dict)


class RunJob:
    """What one SLURM array task runs: one run, checkpointable (submitit requeues it with :meth:`checkpoint`
    on timeout or preemption)."""

    def __init__(self, spec: RunSpec, rerun: bool) -> None:
        self.spec, self.rerun = spec, rerun
        self._runner: ChildRunner | None = None

    def __call__(self) -> Outcome:
        # The job process is single-threaded: fork its child, already importing nothing again.
        self._runner = ChildRunner(multiprocessing.get_context("fork"))
        return execute(self.spec, self.rerun, self._runner, {}, lambda line: print(line, flush=True))

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Stop `fit` (its last checkpoint stays whole) and requeue this run; the requeued job resumes it. A
        rerun's restart already happened: the requeued job must not clear the run again."""
        from submitit.helpers import DelayedSubmission

        if self._runner is not None:
            self._runner.stop()
        return DelayedSubmission(RunJob(self.spec, rerun=False))

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "rerun": self.rerun, "_runner": None}


def _submitit() -> Any:
    try:
        import submitit
    except ImportError as e:
        raise UsageError(
            "--launcher slurm submits through submitit, which is not installed: "
            "pip install 'lily_lightning[slurm]' (or pip install submitit)"
        ) from e
    return submitit


def recorded_job(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / JOB_FILE
    try:
        record = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "job_id" in record else None


def job_state(run_dir: Path) -> tuple[str, str] | None:
    """(job id, SLURM state) of the job last submitted for a run, or None; ``sacct`` asked through
    submitit (one call for all the jobs asked about within a few seconds)."""
    record = recorded_job(run_dir)
    if record is None:
        return None
    job = _submitit().SlurmJob(folder=record["folder"], job_id=record["job_id"])
    state = job.state.split()[0].upper()  # "CANCELLED by 123" -> CANCELLED
    submitted = float(record.get("submitted_at", 0))
    if state == "UNKNOWN" and time.time() - submitted < JUST_SUBMITTED_S:
        state = "PENDING"
    return record["job_id"], state


def active_job(run_dir: Path) -> str | None:
    """The id of a queued or running job of this run, else None."""
    found = job_state(run_dir)
    return found[0] if found is not None and found[1] in ACTIVE_STATES else None


class SlurmLauncher:
    """Submits runs as one job array and (unless ``wait`` is off) waits for them, saying each end."""

    def __init__(self, runs_dir: Path, options: SlurmOptions, rerun: bool, wait: bool, say: Say) -> None:
        self.runs_dir, self.options, self.rerun, self.wait, self.say = runs_dir, options, rerun, wait, say

    def executor(self) -> Any:
        submitit = _submitit()
        folder = self.runs_dir / LOG_FOLDER
        try:
            executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=3)
        except RuntimeError as e:  # no srun on PATH
            raise UsageError(
                f"--launcher slurm: SLURM's commands are not on this machine ({e}); run the sweep on the "
                "cluster's login node, or use --launcher local"
            ) from e
        options = self.options
        executor.update_parameters(
            job_name="lily-sweep",
            partition=options.partition,
            time=parse_time(options.time),
            gres=f"gpu:{options.gpus_per_run}" if options.gpus_per_run else None,
            ntasks_per_node=1,
            array_parallelism=options.array_parallelism,
            signal_delay_s=SIGNAL_DELAY_S,
            stderr_to_stdout=True,
            additional_parameters=options.extra,
        )
        return executor

    def launch(self, specs: Sequence[RunSpec], active: Sequence[tuple[RunSpec, str]] = ()) -> list[Outcome]:
        """Submit ``specs``; then wait for them and for the ``active`` ones (already queued or running)."""
        submitit = _submitit()
        executor = self.executor() if specs else None
        jobs: list[tuple[RunSpec, Any]] = []
        if specs:
            with executor.batch():
                submitted = [executor.submit(RunJob(spec, self.rerun)) for spec in specs]
            now = time.time()
            for spec, job in zip(specs, submitted, strict=True):
                record = {
                    "job_id": job.job_id,
                    "folder": str(executor.folder),
                    "submitted_at": now,
                    "submitted": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                }
                spec.run_dir.mkdir(parents=True, exist_ok=True)
                (spec.run_dir / JOB_FILE).write_text(json.dumps(record, indent=2) + "\n")
                jobs.append((spec, job))
            array = submitted[0].job_id.split("_")[0]
            self.say(
                f"sweep: submitted {len(specs)} run(s) as SLURM job {array} (at most "
                f"{min(len(specs), self.options.array_parallelism)} at once; logs in {executor.folder})"
            )
        folder = self.runs_dir / LOG_FOLDER
        jobs += [(spec, submitit.SlurmJob(folder=folder, job_id=job_id)) for spec, job_id in active]
        if not self.wait:
            return [Outcome(spec.name, "submitted", f"SLURM job {job.job_id}") for spec, job in jobs]
        return self._wait(jobs)

    def _wait(self, jobs: list[tuple[RunSpec, Any]]) -> list[Outcome]:
        outcomes: dict[int, Outcome] = {}
        while len(outcomes) < len(jobs):
            for index, (spec, job) in enumerate(jobs):
                if index in outcomes or not job.done():
                    continue
                try:
                    outcome = job.result()
                except Exception as e:  # the job died outside `execute` (killed, out of memory, node lost)
                    lines = [line for line in str(e).splitlines() if line.strip()]
                    outcome = Outcome(spec.name, "failed", lines[-1] if lines else str(e))
                outcomes[index] = outcome
                self.say(
                    f"[{len(outcomes)}/{len(jobs)}] {spec.name}: {outcome.status} {outcome.message} "
                    f"(SLURM job {job.job_id})"
                )
            if len(outcomes) < len(jobs):
                time.sleep(POLL_S)
        return [outcomes[index] for index in range(len(jobs))]
