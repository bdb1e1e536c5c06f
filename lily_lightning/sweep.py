"""``python -m lily_lightning sweep``: fit + test many tasks and methods, one run after another.

    python -m lily_lightning sweep --config configs/vit_vtab.yaml --tasks vtab [--methods lily lora] [-- ARGS]

Each (task, method) is one run in ``<runs-dir>/<task>/<method>/``, made of ``fit`` then ``test``, each in its
own process (``python -m lily_lightning``, so one run's crash or memory cannot take the sweep down) with the
configs layered as the README describes: the ``--config`` files, ``lora_vtab.yaml`` next to the first one for
LoRA, then ``vtab/<task>.yaml`` or ``fgvc/<task>.yaml`` next to it when there is one, then the arguments after
``--``, then the keys the sweep sets per run (which ``--`` may not set). Each run's exact arguments and its
config files' digests are saved beside it (``sweep_run.json``). A run with a complete ``result.json`` is
finished and skipped; a run with ``checkpoints/last.ckpt`` and no complete result resumes from it; a run
recorded with other settings is not touched unless ``--rerun`` says to start it again. A run that cannot
start (its data folder is missing, say) is listed at the end and the sweep goes on.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .data.tasks import FGVC_TASKS, VTAB_TASKS, FGVCTask, VTABTask, benchmark_task, canonical_task
from .errors import UsageError
from .files import write_atomically
from .results import RESULT_FILE, VALIDATION_FILE, RunResult, UnreadableResult, read_result

BENCHMARKS = {"vtab": tuple(VTAB_TASKS), "fgvc": tuple(FGVC_TASKS)}
LORA_CONFIG = "lora_vtab.yaml"
LOG_FILE = "sweep.log"
RUN_SETTINGS = "sweep_run.json"
# The keys the sweep sets for each run: arguments after `--` may not set them (they would train one task or
# method under another's name, or several runs into one folder).
PER_RUN_KEYS = {
    "data.name": "the sweep sets each run's task (--tasks)",
    "model.method": "the sweep sets each run's method (--methods)",
    "trainer.default_root_dir": "the sweep gives each run its own folder (--runs-dir)",
    "ckpt_path": "the sweep resumes each run from its own checkpoints/last.ckpt",
}
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


def argument_key(argument: str) -> str | None:
    """``--data.init_args.name=x`` -> ``data.name``: the setting a command-line flag sets, else None."""
    if not argument.startswith("--"):
        return None
    return argument[2:].split("=", 1)[0].replace(".init_args.", ".")


def refuse_per_run_keys(extra: Sequence[str], per_run: dict[str, str]) -> None:
    """A UsageError for each argument after ``--`` that sets a key the sweep sets per run."""
    refused = [(arg, per_run[key]) for arg in extra if (key := argument_key(arg)) in per_run]
    if refused:
        lines = "\n".join(f"  {arg}: {why}" for arg, why in refused)
        raise UsageError(
            f"arguments after -- go to every run, so they may not set what the sweep sets per run:\n{lines}\n"
            "Use the sweep's own options instead (or a sweep per value, each with its own --runs-dir)."
        )


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def argument_units(args: Sequence[str]) -> list[str]:
    """``["--a", "1", "--b=2"]`` -> ``["--a 1", "--b=2"]``: each flag with its value, to say what changed."""
    units: list[str] = []
    for arg in args:
        if units and units[-1].startswith("--") and " " not in units[-1] and not arg.startswith("--"):
            units[-1] += f" {arg}"
        else:
            units.append(arg)
    return units


def settings_change(before: dict, now: dict) -> str:
    """What differs between two runs' recorded settings, in words."""
    changes = []
    if before.get("args") != now["args"]:
        old_units, new_units = argument_units(before.get("args") or []), argument_units(now["args"])
        matcher = difflib.SequenceMatcher(a=old_units, b=new_units, autojunk=False)
        for op, a0, a1, b0, b1 in matcher.get_opcodes():
            if op != "equal":
                old, new = " ".join(old_units[a0:a1]) or "nothing", " ".join(new_units[b0:b1]) or "nothing"
                changes.append(f"arguments: {old} -> {new}")
    for config, digest in now["configs"].items():
        if before.get("configs", {}).get(config, digest) != digest:
            changes.append(f"{config} changed since")
    return "; ".join(changes) or "recorded settings differ"


@dataclass
class Outcome:
    task: str
    method: str
    status: str  # "done", "skipped", "failed" or "differs" (recorded with other settings, not run)
    message: str


def _error_line(log: Path) -> str:
    """The CLI's one-line error (``error: ...``) from a run's log, else its last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


class Sweep:
    """Runs the (task, method) grid; progress lines go to the console and to ``<runs-dir>/sweep.log``."""

    def __init__(
        self, configs: Sequence[Path], runs_dir: Path, extra_args: Sequence[str], rerun: bool = False
    ) -> None:
        missing = [str(c) for c in configs if not c.is_file()]
        if missing:
            raise UsageError(f"config file not found: {', '.join(missing)}")
        refuse_per_run_keys(extra_args, PER_RUN_KEYS)
        self.configs, self.runs_dir, self.extra_args = list(configs), runs_dir, list(extra_args)
        self.rerun = rerun
        runs_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = runs_dir / LOG_FILE

    def say(self, line: str) -> None:
        print(line, flush=True)
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        with self.log_path.open("a") as log:
            log.write(f"{stamp} {line}\n")

    def settings(self, task: str, method: str, run_dir: Path) -> dict:
        """One run's settings: the arguments of its steps (the subcommand and checkpoint aside: configs in
        order, the arguments after --, then the per-run keys, which nothing may override) and a digest of
        each config file, so an edited config counts as other settings too."""
        configs = run_configs(self.configs, task, method)
        args = [arg for config in configs for arg in ("--config", str(config))]
        args += [*self.extra_args, "--data.name", task, "--model.method", method]
        args += ["--trainer.default_root_dir", str(run_dir)]
        return {"args": args, "configs": {str(config): file_digest(config) for config in configs}}

    def previous_result(self, run_dir: Path, name: str) -> RunResult | None:
        """The run's complete result, or None (a partial or unreadable one is said, and run again)."""
        try:
            result = read_result(run_dir)
        except UnreadableResult as e:
            self.say(f"{name}: warning: {e}")
            return None
        if result is not None and result.partial:
            images = result.record.get("images", "?")
            self.say(f"{name}: {result.path} is a partial test ({images} images): testing again")
            return None
        return result

    def settings_check(
        self, run_dir: Path, settings: dict, name: str, task: str, method: str
    ) -> Outcome | None:
        """None when the run may go on with ``settings``; an Outcome "differs" when its folder holds a
        trained run (a result or a checkpoint) with other settings (with --rerun, that run's result and
        checkpoint are removed instead). Runs from before settings were recorded count as the same."""
        recorded_path = run_dir / RUN_SETTINGS
        trained = (run_dir / RESULT_FILE).is_file() or (run_dir / "checkpoints" / "last.ckpt").is_file()
        if not trained or not recorded_path.is_file():
            return None
        try:
            recorded = json.loads(recorded_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            recorded = {}  # unreadable: not known to be the same settings
        if not isinstance(recorded, dict):
            recorded = {}
        if (recorded.get("args"), recorded.get("configs")) == (settings["args"], settings["configs"]):
            return None
        change = settings_change(recorded, settings)
        if self.rerun:
            self.say(f"{name}: other settings than before ({change}): starting again (--rerun)")
            for file in (RESULT_FILE, VALIDATION_FILE):
                (run_dir / file).unlink(missing_ok=True)
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            return None
        message = (
            f"its folder holds a run with other settings ({change}); add --rerun to train it again with "
            "these (its result and checkpoint are replaced), or use another --runs-dir to keep both"
        )
        self.say(f"{name}: not run: {message}")
        return Outcome(task, method, "differs", message)

    def run_one(self, task: str, method: str, prefix: str) -> Outcome:
        run_dir = self.runs_dir / task / method
        name = f"{prefix} {task} {method}"
        settings = self.settings(task, method, run_dir)
        refused = self.settings_check(run_dir, settings, name, task, method)
        if refused is not None:
            return refused
        result = self.previous_result(run_dir, name)
        if result is not None:
            self.say(f"{name}: skipped, finished before (top1={result.top1:.4f})")
            return Outcome(task, method, "skipped", f"top1={result.top1:.4f}")
        start = time.perf_counter()
        last = run_dir / "checkpoints" / "last.ckpt"
        resume = ["--ckpt_path", str(last)] if last.is_file() else []
        resuming = " (resuming from checkpoints/last.ckpt)" if resume else ""
        self.say(f"{name}: fit + test{resuming}")
        steps = [
            ["fit", *settings["args"], *resume],
            ["test", *settings["args"], "--ckpt_path", str(last)],
        ]
        record = json.dumps({**settings, "steps": steps}, indent=2) + "\n"
        write_atomically(run_dir / RUN_SETTINGS, record.encode())
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
        result = self.previous_result(run_dir, name) if child.returncode == 0 else None
        if result is None:
            reason = _error_line(log) if child.returncode != 0 else "test wrote no complete result.json"
            self.say(f"{name}: not finished: {reason} (log: {log})")
            return Outcome(task, method, "failed", reason)
        minutes, seconds = divmod(round(time.perf_counter() - start), 60)
        self.say(f"{name}: done top1={result.top1:.4f} in {minutes}m{seconds:02d}s")
        return Outcome(task, method, "done", f"top1={result.top1:.4f}")

    def run(self, tasks: Sequence[str], methods: Sequence[str]) -> list[Outcome]:
        grid = [(task, method) for task in tasks for method in methods]
        self.say(f"sweep: {len(grid)} runs ({len(tasks)} tasks x {', '.join(methods)}) into {self.runs_dir}")
        outcomes = [self.run_one(t, m, f"[{i}/{len(grid)}]") for i, (t, m) in enumerate(grid, start=1)]
        counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed", "differs")}
        differs = f", {counts['differs']} not run (other settings)" if counts["differs"] else ""
        self.say(
            f"sweep: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} not finished"
            + differs
        )
        for outcome in outcomes:
            if outcome.status == "failed":
                self.say(f"  not finished: {outcome.task} {outcome.method}: {outcome.message}")
            if outcome.status == "differs":
                self.say(f"  not run: {outcome.task} {outcome.method}: {outcome.message}")
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
    parser.add_argument(
        "--rerun",
        action="store_true",
        help="train again the runs recorded with other settings (their result and checkpoint are replaced)",
    )
    return parser.parse_args(argv[:split]), argv[split + 1 :]


def main(argv: Sequence[str]) -> int:
    """``argv`` follows ``sweep``. Exit code 0 when every run finished, 1 otherwise."""
    args, extra = parse_args(argv)
    sweep = Sweep(args.config, args.runs_dir, extra, args.rerun)
    outcomes = sweep.run(expand_tasks(args.tasks), args.methods)
    return 0 if all(o.status in ("done", "skipped") for o in outcomes) else 1
