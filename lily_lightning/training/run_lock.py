"""One writer per run folder: ``<run dir>/writer.lock`` names the process that trains the run.

`fit` takes it (rank 0 only), and so does each run of a `sweep`, whose `fit` child then runs under its
parent's lock (the lock's token is handed down in ``LILY_LIGHTNING_RUN_LOCK``). A second writer gets a
:class:`RunLocked` that says who holds the folder. The holder refreshes the file's time while it works
(:class:`RunLockHeartbeat`, or ``RunLock.refresh`` from a waiting parent); a lock is stale, and is taken over
with a warning, when its process is gone (same host), when it was left by this same SLURM job before a
requeue, or when nobody refreshed it for ``STALE_AFTER_S`` (a holder on another host that died).

The lock file is created whole and atomically (``os.link`` of a written file, which fails if the name
exists), so two writers starting at once cannot both get it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback

from ..errors import UsageError

log = logging.getLogger("lily_lightning")

LOCK_FILE = "writer.lock"
TOKEN_ENV = "LILY_LIGHTNING_RUN_LOCK"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


def slurm_job_id() -> str | None:
    """This process's SLURM job (``<array job>_<task>`` in an array, as submitit names it), or None."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


@dataclass(frozen=True)
class Holder:
    """Who holds a run folder."""

    host: str
    pid: int
    job_id: str | None
    token: str
    since: str

    def describe(self) -> str:
        job = f", SLURM job {self.job_id}" if self.job_id else ""
        return f"{self.host} pid {self.pid}{job}, since {self.since}"


def read_holder(path: Path) -> Holder | None:
    """The holder recorded in a lock file; None when there is none or it cannot be read."""
    try:
        return Holder(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_reason(holder: Holder | None, path: Path) -> str | None:
    """Why the lock at ``path`` held by ``holder`` is stale, or None while its holder may be working."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "it is gone"
    if holder is not None and holder.job_id is not None and holder.job_id == slurm_job_id():
        return "left by this SLURM job before it was requeued"
    if holder is not None and holder.host == socket.gethostname():
        return None if _process_alive(holder.pid) else "its process is gone"
    if age > STALE_AFTER_S:
        return f"not refreshed for {age / 60:.0f} minutes"
    return None


class RunLocked(UsageError):
    """The run folder is held by another writer."""

    def __init__(self, run_dir: Path, holder: Holder | None) -> None:
        self.holder = holder
        who = holder.describe() if holder is not None else "another process (its lock cannot be read yet)"
        super().__init__(
            f"{run_dir} is being trained by {who}. Wait for it to end (`sweep --status` lists every run), "
            f"give this run another trainer.default_root_dir, or, if that process is gone on another "
            f"machine, delete {run_dir / LOCK_FILE}."
        )


class RunLock:
    """The lock of one run folder; ``acquire`` it (or use ``with``), ``refresh`` it while working."""

    def __init__(self, run_dir: Path | str) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.token: str | None = None
        self._refreshed = 0.0

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a contender may remove or create the file between our steps
            if self._create():
                return self
            holder = read_holder(self.path)
            reason = stale_reason(holder, self.path)
            if reason is None:
                raise RunLocked(self.run_dir, holder)
            shown = holder.describe() if holder is not None else "an unreadable lock"
            log.warning("Taking over %s from %s: %s.", self.path, shown, reason)
            if read_holder(self.path) == holder:  # still the stale one, not a contender's new lock
                self.path.unlink(missing_ok=True)
        raise RunLocked(self.run_dir, read_holder(self.path))

    def _create(self) -> bool:
        token = uuid.uuid4().hex
        holder = Holder(
            host=socket.gethostname(),
            pid=os.getpid(),
            job_id=slurm_job_id(),
            token=token,
            since=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        )
        draft = self.path.with_name(f".{LOCK_FILE}.{token}")
        draft.write_text(json.dumps(asdict(holder)))
        try:
            os.link(draft, self.path)
        except FileExistsError:
            return False
        finally:
            draft.unlink(missing_ok=True)
        self.token, self._refreshed = token, time.monotonic()
        return True

    def refresh(self) -> None:
        """Touch the lock (at most every HEARTBEAT_S), so other hosts see its holder is alive."""
        if self.token is not None and time.monotonic() - self._refreshed >= HEARTBEAT_S:
            self._refreshed = time.monotonic()
            try:
                os.utime(self.path)
            except FileNotFoundError:
                log.warning("%s was removed while this run held it.", self.path)

    def release(self) -> None:
        holder = read_holder(self.path)
        if self.token is not None and holder is not None and holder.token == self.token:
            self.path.unlink(missing_ok=True)
        self.token = None

    def handed_down(self) -> dict[str, str]:
        """The environment that lets a child process (`fit`) work under this lock."""
        return {TOKEN_ENV: self.token or ""}

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def hold_for_fit(run_dir: Path) -> tuple[RunLock, bool]:
    """The lock a `fit` into ``run_dir`` works under, and whether it took it itself (to release at the end):
    its parent's when the parent (a sweep) handed it down, else its own, newly acquired."""
    lock = RunLock(run_dir)
    holder = read_holder(lock.path)
    inherited = os.environ.get(TOKEN_ENV)
    if inherited and holder is not None and holder.token == inherited:
        lock.token = inherited  # refreshed by this process too; released by the parent
        return lock, False
    return lock.acquire(), True


class RunLockHeartbeat(Callback):
    """Refreshes the run's lock as training and validation batches go by."""

    def __init__(self, lock: RunLock) -> None:
        self.lock = lock

    def on_train_batch_end(self, *args: Any) -> None:
        self.lock.refresh()

    def on_validation_batch_end(self, *args: Any) -> None:
        self.lock.refresh()
