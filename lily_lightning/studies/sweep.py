"""``python -m lily_lightning sweep``: fit + test many tasks and methods, one run after another.

    python -m lily_lightning sweep --config configs/vit_vtab.yaml --tasks vtab [--methods lily lora] [-- ARGS]

Each (task, method) is one run in ``<runs-dir>/<task>/<method>/``, made of ``fit`` then ``test``, each in its
own process (``python -m lily_lightning``, so one run's crash or memory cannot take the sweep down) with the
configs layered as the README describes: the ``--config`` files, ``lora_vtab.yaml`` next to the first one for
LoRA, then ``vtab/<task>.yaml`` or ``fgvc/<task>.yaml`` next to it when there is one. A run with a
``result.json`` is finished and skipped; a run with ``checkpoints/last.ckpt`` and no result resumes from it.
A run that cannot start (its data folder is missing, say) is listed at the end and the sweep goes on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..data.tasks import FGVC_TASKS, VTAB_TASKS, FGVCTask, VTABTask, benchmark_task, canonical_task
from ..errors import UsageError
from ..training.results import read_result

BENCHMARKS = {"vtab": tuple(VTAB_TASKS), "fgvc": tuple(FGVC_TASKS)}
LORA_CONFIG = "lora_vtab.yaml"
LOG_FILE = "sweep.log"
# The child process of one run: each step through the CLI's main(), stopping at the first non-zero exit code.
_CHILD = (
    "import json, sys; from lily_lightning.cli import main; "
    "sys.exit(next((code for code in map(main, json.loads(sys.argv[1])) if code), 0))"
)


def expand_tasks(names: Sequence[str]) -> list[str]:
    """``vtab`` -> the 19 VTAB-1k tasks, ``fgvc`` -> the 5 FGVC ones, other names as given (canonical
    spelling for known tasks); each task once, in order."""
    tasks: list[str] = []
    for name in names:
        for task in BENCHMARKS.get(name.lower(), (canonical_task(name),)):
            if task not in tasks:
                tasks.append(task)
    return tasks


def run_configs(configs: Sequence[Path], task: str, method: str) -> list[Path]:
    """The config files of one run, layered left to right."""
    folder = configs[0].parent
    layered = list(configs)
    if method == "lora" and (folder / LORA_CONFIG).is_file():
        layered.append(folder / LORA_CONFIG)
    known = benchmark_task(task)
    benchmark = "vtab" if isinstance(known, VTABTask) else "fgvc" if isinstance(known, FGVCTask) else None
    if benchmark is not None and (override := folder / benchmark / f"{task}.yaml").is_file():
        layered.append(override)
    return layered


@dataclass
class Outcome:
    task: str
    method: str
    status: str  # "done", "skipped", or "failed"
    message: str


def _error_line(log: Path) -> str:
    """The CLI's one-line error (``error: ...``) from a run's log, else its last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


class Sweep:
    """Runs the (task, method) grid; progress lines go to the console and to ``<runs-dir>/sweep.log``."""

    def __init__(self, configs: Sequence[Path], runs_dir: Path, extra_args: Sequence[str]) -> None:
        missing = [str(c) for c in configs if not c.is_file()]
        if missing:
            raise UsageError(f"config file not found: {', '.join(missing)}")
        self.configs, self.runs_dir, self.extra_args = list(configs), runs_dir, list(extra_args)
        runs_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = runs_dir / LOG_FILE

    def say(self, line: str) -> None:
        print(line, flush=True)
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        with self.log_path.open("a") as log:
            log.write(f"{stamp} {line}\n")

    def cli_args(self, subcommand: str, task: str, method: str, run_dir: Path, extra: list[str]) -> list[str]:
        """The ``python -m lily_lightning`` arguments of one step of the run."""
        args = [subcommand]
        for config in run_configs(self.configs, task, method):
            args += ["--config", str(config)]
        args += ["--data.name", task, "--model.method", method, "--trainer.default_root_dir", str(run_dir)]
        return [*args, *extra, *self.extra_args]

    def run_one(self, task: str, method: str, prefix: str) -> Outcome:
        run_dir = self.runs_dir / task / method
        result = read_result(run_dir)
        if result is not None:
            self.say(f"{prefix} {task} {method}: skipped, finished before (top1={result.top1:.4f})")
            return Outcome(task, method, "skipped", f"top1={result.top1:.4f}")
        start = time.perf_counter()
        last = run_dir / "checkpoints" / "last.ckpt"
        resume = ["--ckpt_path", str(last)] if last.is_file() else []
        resuming = " (resuming from checkpoints/last.ckpt)" if resume else ""
        self.say(f"{prefix} {task} {method}: fit + test{resuming}")
        steps = [
            self.cli_args("fit", task, method, run_dir, resume),
            self.cli_args("test", task, method, run_dir, ["--ckpt_path", str(last)]),
        ]
        run_dir.mkdir(parents=True, exist_ok=True)
        log = run_dir / "sweep_run.log"
        with log.open("w") as out:
            out.write("\n".join(f"python -m lily_lightning {' '.join(step)}" for step in steps) + "\n")
            out.flush()
            # fit then test in one fresh process: the imports are paid once, and nothing leaks between runs.
            child = subprocess.run(
                [sys.executable, "-c", _CHILD, json.dumps(steps)],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        result = read_result(run_dir)
        if child.returncode != 0 or result is None:
            reason = _error_line(log) if child.returncode != 0 else "test wrote no result.json"
            self.say(f"{prefix} {task} {method}: not finished: {reason} (log: {log})")
            return Outcome(task, method, "failed", reason)
        minutes, seconds = divmod(round(time.perf_counter() - start), 60)
        self.say(f"{prefix} {task} {method}: done top1={result.top1:.4f} in {minutes}m{seconds:02d}s")
        return Outcome(task, method, "done", f"top1={result.top1:.4f}")

    def run(self, tasks: Sequence[str], methods: Sequence[str]) -> list[Outcome]:
        grid = [(task, method) for task in tasks for method in methods]
        self.say(f"sweep: {len(grid)} runs ({len(tasks)} tasks x {', '.join(methods)}) into {self.runs_dir}")
        outcomes = [self.run_one(t, m, f"[{i}/{len(grid)}]") for i, (t, m) in enumerate(grid, start=1)]
        counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed")}
        self.say(
            f"sweep: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} not finished"
        )
        for outcome in outcomes:
            if outcome.status == "failed":
                self.say(f"  not finished: {outcome.task} {outcome.method}: {outcome.message}")
        return outcomes


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(
        prog="python -m lily_lightning sweep",
        description="Fit and test each task and method in turn (arguments after -- go to every run).",
    )
    parser.add_argument("--config", type=Path, action="append", required=True, help="base config(s), layered")
    parser.add_argument("--tasks", nargs="+", required=True, help="vtab, fgvc and/or task names")
    parser.add_argument("--methods", nargs="+", default=["lily"], help="lily, lora, linear_probe, full")
    parser.add_argument(
        "--runs-dir", type=Path, default=Path("runs"), help="runs go to RUNS_DIR/<task>/<method>"
    )
    return parser.parse_args(argv[:split]), argv[split + 1 :]


def main(argv: Sequence[str]) -> int:
    """``argv`` follows ``sweep``. Exit code 0 when every run finished, 1 otherwise."""
    args, extra = parse_args(argv)
    outcomes = Sweep(args.config, args.runs_dir, extra).run(expand_tasks(args.tasks), args.methods)
    return 0 if all(o.status != "failed" for o in outcomes) else 1
