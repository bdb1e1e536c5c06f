"""Test-only stand-ins for SLURM's sbatch, srun, sacct, squeue, scancel and scontrol, on one machine.

``install(bin_dir, state_dir)`` writes one executable per command into ``bin_dir``; put it first on PATH and
set ``FAKE_SLURM_DIR=state_dir``. ``sbatch`` reads the script's ``#SBATCH`` lines (``--array=0-N%P``,
``--output``), gives the job an id and starts a scheduler process that runs the array's tasks locally, at
most P at once, each with the environment SLURM gives a task (``SLURM_JOB_ID``, ``SLURM_ARRAY_JOB_ID``,
``SLURM_ARRAY_TASK_ID``, ``SLURM_PROCID`` ...). ``scontrol requeue`` marks a task to run again when its
process exits (with the same ids, as SLURM does); ``scancel --signal SIG`` signals a task's job step (what
``srun`` started), as SLURM does before a time limit or on preemption; ``sacct`` and ``squeue`` report the
states (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

COMMANDS = ("sbatch", "srun", "sacct", "squeue", "scancel", "scontrol")


def install(bin_dir: Path, state_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for command in COMMANDS:
        path = bin_dir / command
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" {command} "$@"\n')
        path.chmod(0o755)


def state_dir() -> Path:
    return Path(os.environ["FAKE_SLURM_DIR"])


@contextmanager
def jobs() -> Iterator[dict]:
    """The jobs table (``{job id: job}``), read and written back under a file lock."""
    path = state_dir() / "jobs.json"
    with (state_dir() / "jobs.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = json.loads(path.read_text()) if path.is_file() else {}
        yield table
        path.write_text(json.dumps(table, indent=1))


def sbatch(args: list[str]) -> None:
    script = Path(args[-1])
    options = dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", script.read_text(), re.MULTILINE))
    array = re.fullmatch(r"0-(\d+)(?:%(\d+))?", options.get("array", ""))
    count = int(array.group(1)) + 1 if array else 1
    parallelism = int(array.group(2) or count) if array else 1
    with jobs() as table:
        job_id = str(1000 + len(table))
        table[job_id] = {
            "script": str(script),
            "array": array is not None,
            "parallelism": parallelism,
            "output": options.get("output", "slurm-%j.out"),
            "cwd": os.getcwd(),
            "tasks": {str(i): {"state": "PENDING", "requeue": False, "pid": None} for i in range(count)},
        }
    log = (state_dir() / f"scheduler_{job_id}.log").open("w")
    subprocess.Popen(
        [sys.executable, __file__, "_schedule", job_id], stdout=log, stderr=log, start_new_session=True
    )
    print(f"Submitted batch job {job_id}")


def _task_env(job_id: str, task: str, array: bool) -> dict[str, str]:
    env = {
        **os.environ,
        "SLURM_JOB_ID": f"{job_id}{int(task):03d}" if array else job_id,
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_NAME": "lily-sweep",
        "FAKE_SLURM_TASK": f"{job_id}_{task}",
    }
    if array:
        env |= {"SLURM_ARRAY_JOB_ID": job_id, "SLURM_ARRAY_TASK_ID": task}
    return env


def _expand(pattern: str, env: dict[str, str]) -> str:
    names = {
        "%A": env.get("SLURM_ARRAY_JOB_ID", env["SLURM_JOB_ID"]),
        "%a": env.get("SLURM_ARRAY_TASK_ID", "0"),
        "%j": env["SLURM_JOB_ID"],
        "%t": "0",
    }
    for key, value in names.items():
        pattern = pattern.replace(key, value)
    return pattern


def schedule(job_id: str) -> None:
    """Run the job's tasks, at most ``parallelism`` at once; a task marked for requeue runs again."""
    running: dict[str, subprocess.Popen] = {}
    while True:
        with jobs() as table:
            job = table[job_id]
            for task, process in list(running.items()):
                if process.poll() is None:
                    continue
                del running[task]
                entry = job["tasks"][task]
                if entry["state"] == "CANCELLED":
                    continue
                if entry["requeue"]:
                    entry.update(state="PENDING", requeue=False)
                else:
                    entry["state"] = "COMPLETED" if process.returncode == 0 else "FAILED"
            for task, entry in job["tasks"].items():
                if entry["state"] == "PENDING" and len(running) < job["parallelism"]:
                    env = _task_env(job_id, task, job["array"])
                    output = open(_expand(job["output"], env), "a")  # noqa: SIM115 - the task's whole life
                    running[task] = subprocess.Popen(
                        ["bash", job["script"]], env=env, cwd=job["cwd"], stdout=output, stderr=output
                    )
                    entry.update(state="RUNNING", pid=running[task].pid)
            finished = not running and all(e["state"] != "PENDING" for e in job["tasks"].values())
        if finished:
            return
        time.sleep(0.2)


def srun(args: list[str]) -> None:
    """Run the job step: record its pid (for ``scancel --signal``), then become the command."""
    output = error = None
    while args and args[0].startswith("--"):
        option = args.pop(0)
        if option in ("--output", "--error"):
            value = args.pop(0)
            output, error = (value, error) if option == "--output" else (output, value)
    env = dict(os.environ)
    job_id, task = env["FAKE_SLURM_TASK"].split("_")
    with jobs() as table:
        table[job_id]["tasks"][task]["step_pid"] = os.getpid()
    for path, descriptor in ((output, 1), (error or output, 2)):
        if path:
            file = os.open(_expand(path, env), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.dup2(file, descriptor)
    os.execvp(args[0], args)


def _matching(table: dict, ids: list[str]) -> Iterator[tuple[str, str, dict]]:
    for job_id, job in table.items():
        for task, entry in job["tasks"].items():
            if job_id in ids or f"{job_id}_{task}" in ids:
                yield job_id, task, entry


def sacct(args: list[str]) -> None:
    ids = [args[i + 1] for i, arg in enumerate(args) if arg == "-j"]
    print("JobID|State|NodeList")
    with jobs() as table:
        for job_id, task, entry in _matching(table, ids):
            name = f"{job_id}_{task}" if table[job_id]["array"] else job_id
            print(f"{name}|{entry['state']}|localhost")


def squeue(args: list[str]) -> None:
    """``JOBID STATE`` of every pending or running task."""
    with jobs() as table:
        for job_id, job in table.items():
            for task, entry in job["tasks"].items():
                if entry["state"] in ("PENDING", "RUNNING"):
                    print(f"{job_id}_{task} {entry['state']}")


def scancel(args: list[str]) -> None:
    sig = next((args[i + 1] for i, arg in enumerate(args) if arg == "--signal"), None)
    ids = [arg for arg in args if not arg.startswith("--") and arg != sig]
    with jobs() as table:
        for _, _, entry in _matching(table, ids):
            if sig is not None:
                os.kill(entry["step_pid"], getattr(signal, sig if sig.startswith("SIG") else f"SIG{sig}"))
            elif entry["state"] in ("PENDING", "RUNNING"):
                if entry["state"] == "RUNNING":
                    os.kill(entry["pid"], signal.SIGKILL)
                entry["state"] = "CANCELLED"


def scontrol(args: list[str]) -> None:
    assert args[0] == "requeue", args
    with jobs() as table:
        for _, _, entry in _matching(table, args[1:]):
            entry["requeue"] = True


if __name__ == "__main__":
    command, arguments = sys.argv[1], sys.argv[2:]
    if command == "_schedule":
        schedule(arguments[0])
    else:
        {"sbatch": sbatch, "srun": srun, "sacct": sacct, "squeue": squeue, "scancel": scancel}.get(
            command, scontrol
        )(arguments)
