"""One run of a sweep, in its folder: what it is (:class:`RunSpec`), where it stands, and how it is run.

A run is `fit` then `test` (or `validate`, for a hyper-parameter selection run) through the CLI's ``main``, in
one child process whose output goes to ``sweep_run.log`` in the run folder. Its resolved settings
(``studies.settings``), exact arguments and config files' digests are saved beside it in
``sweep_run.json``. :func:`execute` runs it under the run folder's lock (``training.run_lock``): a run held
by another writer is left alone, a finished one is skipped, an interrupted one resumes from
``checkpoints/last.ckpt``, and a run recorded with other settings is not touched unless ``rerun`` says to
start it again. The launchers (``studies.launchers``,
``studies.slurm``) call it wherever the run executes.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any, Literal

from lily_lightning.console import exit_code, show_package_logs
from lily_lightning.files import write_atomically
from lily_lightning.studies.settings import comparable, setting_changes
from lily_lightning.training.lightning_cli import run_command
from lily_lightning.training.results import (
    RESULT_FILE,
    VALIDATION_FILE,
    UnreadableResult,
    read_result,
    read_validation,
    write_result,
)
from lily_lightning.training.run_lock import HEARTBEAT_S, RunLock, RunLocked

RUN_SETTINGS = "sweep_run.json"
RUN_LOG = "sweep_run.log"
LAST = Path("checkpoints") / "last.ckpt"
WHOLE_VALIDATION = ("--trainer.limit_val_batches", "1.0")
INTERRUPTED = 130  # a run's exit code after Ctrl-C, as the CLI's
RESUME = "rerun the same sweep command to resume it (from its checkpoints/last.ckpt)"
Say = Callable[[str], None]
Status = Literal["done", "skipped", "failed", "differs", "busy", "queued", "submitted"]


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@dataclass(frozen=True)
class RunSpec:
    """One run: a task and method (and a seed and grid point) with the exact arguments of its steps.

    ``args`` are shared by both steps (configs in order, the arguments after ``--``, the grid point, then the
    keys the sweep sets per run, which nothing before them may override); ``evaluate`` is ``test`` or
    ``validate``; ``selection`` is the chosen grid point written into a final run's result.json.
    """

    task: str
    method: str
    run_dir: Path
    args: tuple[str, ...]
    configs: Mapping[str, str]
    resolved: Mapping[str, Any] = field(default_factory=dict, hash=False)  # studies.settings of ``args``
    evaluate: Literal["test", "validate"] = "test"
    seed: int | None = None
    budget: int | None = None  # --budgets: the trainable count the method is sized to
    point: Mapping[str, str] = field(default_factory=dict, hash=False)
    variant: str = ""  # the grid point's folder name (empty for a final run, whose point is chosen)
    selection: Mapping[str, Any] | None = field(default=None, hash=False)

    @property
    def name(self) -> str:
        seed = f" seed{self.seed}" if self.seed is not None else ""
        budget = f" budget={self.budget}" if self.budget is not None else ""
        variant = f" {self.variant}" if self.variant else ""
        select = " (selection)" if self.evaluate == "validate" else ""
        return f"{self.task} {self.method}{budget}{seed}{variant}{select}"

    def settings(self) -> dict[str, Any]:
        """What ``sweep_run.json`` records: the resolved settings (what a rerun must match to count as the
        same run), and the arguments and config digests as given."""
        return {"settings": dict(self.resolved), "args": list(self.args), "configs": dict(self.configs)}

    def steps(self, resume: bool) -> list[list[str]]:
        last = str(self.run_dir / LAST)
        # A selection is scored on the whole validation split, whatever limit_val_batches says for the
        # evaluations during fit (demo.yaml's 0 turns those off): a partial score could not be compared.
        whole = list(WHOLE_VALIDATION) if self.evaluate == "validate" else []
        return [
            ["fit", *self.args, *(["--ckpt_path", last] if resume else [])],
            [self.evaluate, *self.args, *whole, "--ckpt_path", last],
        ]


@dataclass(frozen=True)
class Outcome:
    run: str
    status: Status
    message: str
    score: float | None = None  # test top-1, or validation top-1 for a selection run


def recorded_settings(run_dir: Path) -> dict[str, Any] | None:
    """The settings saved beside a run, None when there are none ({} when the file cannot be read)."""
    path = run_dir / RUN_SETTINGS
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def other_settings(spec: RunSpec) -> str | None:
    """What differs when the run folder holds a trained run (a result or a checkpoint) with other settings
    than ``spec``'s, else None. Settings are compared by what they mean (``studies.settings``), not by how the
    command spelt them or where the files are. A run from before settings were recorded counts as the same."""
    trained = any((spec.run_dir / name).is_file() for name in (RESULT_FILE, VALIDATION_FILE, LAST))
    recorded = recorded_settings(spec.run_dir)
    if not trained or recorded is None:
        return None
    if not recorded:
        return f"its {RUN_SETTINGS} cannot be read"
    before, now = comparable([recorded, spec.settings()])
    return "; ".join(setting_changes(before, now)) or None


def differs_message(change: str) -> str:
    return (
        f"its folder holds a run with other settings ({change}); add --rerun to train it again with these "
        "(its result and checkpoint are replaced), or use another --runs-dir to keep both"
    )


def finished_score(spec: RunSpec, say: Say) -> float | None:
    """The score of a finished run (test top-1, or validation top-1 for a selection run), else None. A partial
    evaluation or an unreadable result file is said (one line, naming the file) and counts as unfinished."""
    try:
        if spec.evaluate == "validate":
            record = read_validation(spec.run_dir)
            partial = record is not None and bool(record.get("partial"))
            score = None if record is None else float(record["val_top1"])
            images = None if record is None else record.get("images", "?")
            path = spec.run_dir / VALIDATION_FILE
        else:
            result = read_result(spec.run_dir)
            partial = result is not None and result.partial
            score = None if result is None else result.top1
            images = None if result is None else result.record.get("images", "?")
            path = spec.run_dir / RESULT_FILE
    except UnreadableResult as e:
        say(f"{spec.name}: warning: {e}")
        return None
    if partial:
        say(f"{spec.name}: {path} is a partial {spec.evaluate} ({images} images): evaluating again")
        return None
    return score


def error_line(log: Path) -> str:
    """The CLI's one-line error (``error: ...``) from a run's log, else its last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


def _child_main(steps: list[list[str]], log: str, env: dict[str, str]) -> None:
    """In the child process: output to the run's log, the launcher's environment, then each step."""
    # A fork of a SLURM job process inherits submitit's handlers (SIGTERM ignored, USR2 requeues): `fit`
    # must stop on SIGTERM, and only the job process requeues.
    for number in (signal.SIGTERM, signal.SIGUSR2, signal.SIGCONT):
        signal.signal(number, signal.SIG_DFL)
    os.environ.update(env)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    descriptor = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    os.close(descriptor)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if "OMP_NUM_THREADS" in env:
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    # Ctrl-C reaches the runs too; Lightning ends an interrupted fit with exit code 1, so the interrupt is
    # noted here and the run ends with INTERRUPTED: the sweep then says how to resume a sweep's run.
    interrupts: list[int] = []

    def interrupt(number: int, frame: Any) -> None:
        interrupts.append(number)
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where the sweep ignores Ctrl-C
        signal.signal(signal.SIGINT, interrupt)
    # Each step is one `python -m lily_lightning STEP` (fit, validate or test), run in this process.
    show_package_logs()
    try:
        for step in steps:
            code = exit_code(lambda step=step: run_command(step))
            if code:
                sys.exit(code)
    except SystemExit:
        if interrupts:
            sys.exit(INTERRUPTED)
        raise


class ChildRunner:
    """Runs a run's steps in a child process of ``context`` and can stop it (a SLURM requeue does)."""

    def __init__(self, context: BaseContext | None = None) -> None:
        self.context = context or multiprocessing.get_context()
        self.process: Any = None

    def run(self, steps: list[list[str]], log: Path, env: dict[str, str], lock: RunLock) -> int:
        process = self.context.Process(target=_child_main, args=(steps, str(log), env), daemon=False)
        process.start()
        self.process = process  # only once started: Ctrl-C during a start leaves nothing to stop
        while self.process.exitcode is None:
            self.process.join(timeout=HEARTBEAT_S)
            lock.refresh()
        return int(self.process.exitcode)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the child, then SIGKILL it after ``grace_s``; its last checkpoint stays whole."""
        if self.process is not None and self.process.exitcode is None:
            self.process.terminate()
            self.process.join(timeout=grace_s)
            if self.process.exitcode is None:
                self.process.kill()
                self.process.join()


def clear_run(run_dir: Path) -> None:
    """What ``--rerun`` removes before a run starts again: its results and checkpoints."""
    for name in (RESULT_FILE, VALIDATION_FILE):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def execute(spec: RunSpec, rerun: bool, runner: ChildRunner, env: dict[str, str], say: Say) -> Outcome:
    """Run ``spec`` under its folder's lock, unless another writer holds it, it is finished, or its folder
    holds a run with other settings (``rerun``: start that one again)."""
    try:
        lock = RunLock(spec.run_dir).acquire()
    except RunLocked as e:
        holder = e.holder.describe() if e.holder is not None else "another writer"
        say(f"{spec.name}: not run here: held by {holder}")
        return Outcome(spec.name, "busy", f"held by {holder}")
    try:
        return _execute_locked(spec, rerun, runner, {**env, **lock.handed_down()}, say, lock)
    finally:
        lock.release()


def _execute_locked(
    spec: RunSpec, rerun: bool, runner: ChildRunner, env: dict[str, str], say: Say, lock: RunLock
) -> Outcome:
    change = other_settings(spec)
    if change is not None and not rerun:
        say(f"{spec.name}: not run: {differs_message(change)}")
        return Outcome(spec.name, "differs", differs_message(change))
    if change is not None:
        say(f"{spec.name}: other settings than before ({change}): starting again (--rerun)")
        clear_run(spec.run_dir)
    score = finished_score(spec, say)
    if score is not None:
        say(f"{spec.name}: skipped, finished before ({_score_text(spec, score)})")
        return Outcome(spec.name, "skipped", _score_text(spec, score), score)
    start = time.perf_counter()
    resume = (spec.run_dir / LAST).is_file()
    say(f"{spec.name}: fit + {spec.evaluate}" + (" (resuming from checkpoints/last.ckpt)" if resume else ""))
    steps = spec.steps(resume)
    record = {**spec.settings(), "steps": steps, "selection": spec.selection}
    write_atomically(spec.run_dir / RUN_SETTINGS, (json.dumps(record, indent=2) + "\n").encode())
    log = spec.run_dir / RUN_LOG
    with log.open("a") as out:
        out.write("".join(f"python -m lily_lightning {' '.join(step)}\n" for step in steps))
    code = runner.run(steps, log, env, lock)
    if code in (INTERRUPTED, -signal.SIGINT):
        say(f"{spec.name}: interrupted: {RESUME}")
        return Outcome(spec.name, "failed", f"interrupted: {RESUME}")
    score = finished_score(spec, say) if code == 0 else None
    if score is None:
        reason = error_line(log) if code != 0 else f"{spec.evaluate} wrote no complete result"
        say(f"{spec.name}: not finished: {reason} (log: {log})")
        return Outcome(spec.name, "failed", reason)
    if spec.selection is not None:
        result = read_result(spec.run_dir)
        assert result is not None  # finished_score just read it
        write_result(spec.run_dir, {**result.record, "selection": dict(spec.selection)})
    minutes, seconds = divmod(round(time.perf_counter() - start), 60)
    say(f"{spec.name}: done {_score_text(spec, score)} in {minutes}m{seconds:02d}s")
    return Outcome(spec.name, "done", _score_text(spec, score), score)


def _score_text(spec: RunSpec, score: float) -> str:
    return f"{'val_top1' if spec.evaluate == 'validate' else 'top1'}={score:.4f}"
