"""``python -m lily_lightning sweep``: fit + test many tasks and methods, seeds and grid points - a study.

    python -m lily_lightning sweep --config configs/vit_vtab.yaml --tasks vtab [--methods lily lora ...]
        [--budgets 100000 400000] [--recipes] [--seeds 0 1 2] [--grid model.lr=1e-3,5e-4 ...]
        [--select-on val]
        [--launcher local --parallel N --gpus-per-run G | --launcher slurm --slurm-... [--no-wait]] [-- ARGS]
    python -m lily_lightning sweep --status RUNS_DIR

Each run is `fit` then `test` in its own folder (``studies.grid`` lays them out:
``<runs-dir>/<task>/<method>/`` plus the grid point and ``seed<k>``), in its own child process (so one run's
crash or memory cannot take the sweep down), with the configs layered as the README describes: the
``--config`` files, ``lora_vtab.yaml`` next to the first one for LoRA, with ``--recipes`` the method's own
``methods/<method>.yaml`` next to it (each paper's optimiser; without, all methods share the ``--config``
files' optimiser), then ``vtab/<task>.yaml`` or
``fgvc/<task>.yaml`` next to it when there is one, then the arguments after ``--``, the grid point, then the
keys the sweep sets per run (which ``--`` and ``--grid`` may not set). Each run's resolved settings
(``studies.settings``) and exact arguments are saved beside it (``sweep_run.json``). A run with a complete
``result.json`` is finished and skipped; a run with ``checkpoints/last.ckpt`` and no complete result resumes
from it (rerunning the same command resumes an interrupted sweep); a run recorded with other settings (by
what they mean, not how they are spelt) is not touched unless ``--rerun`` says to start it again; a run held
by another writer (its lock) is left to it. A run that cannot start (its data folder is missing, say) is
listed at the end and the sweep goes on.

With ``--select-on val`` every grid point is trained on the tuning split and scored on validation; the
best point per (task, method) is then trained on the full split for each seed and tested once. A grid key
under a method's own setting (``model.vpt.length``) varies only that method's runs.

With ``--budgets`` each method with a size knob runs at each budget (``--model.budget N``: the knob value
whose trainable count is closest), in its own folder ``budget=<N>``, with its own grid points and selection;
a method with a fixed count runs once.
"""

from __future__ import annotations

import argparse
import itertools
import threading
import typing
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..adapters import SIZE_KNOBS
from ..data.tasks import FGVC_TASKS, VTAB_TASKS, FGVCTask, VTABTask, benchmark_task, canonical_task
from ..errors import UsageError
from ..training.module import Method
from .grid import Study, choose, config_arguments, parse_grid
from .grid_values import typed_axes
from .launchers import LocalLauncher
from .runs import Outcome, RunSpec, Say, differs_message, finished_score, other_settings
from .settings import resolved_settings
from .slurm import SlurmLauncher, SlurmOptions, active_job, parse_extra

METHODS: tuple[str, ...] = typing.get_args(Method)

BENCHMARKS = {"vtab": tuple(VTAB_TASKS), "fgvc": tuple(FGVC_TASKS)}
LORA_CONFIG = "lora_vtab.yaml"
METHOD_RECIPES = "methods"  # configs/methods/<method>.yaml: each paper's VTAB-1k optimiser (--recipes)
LOG_FILE = "sweep.log"
UNFINISHED = ("failed", "differs")
LIMIT_VAL = "trainer.limit_val_batches"  # outcomes that make the exit code 1


def expand_tasks(names: Sequence[str]) -> list[str]:
    """``vtab`` -> the 19 VTAB-1k tasks, ``fgvc`` -> the 5 FGVC ones, other names as given (canonical
    spelling for known tasks); each task once, in order."""
    tasks: list[str] = []
    for name in names:
        for task in BENCHMARKS.get(name.lower(), (canonical_task(name),)):
            if task not in tasks:
                tasks.append(task)
    return tasks


def recipe(configs: Sequence[Path], method: str) -> Path | None:
    """``method``'s own recipe, ``methods/<method>.yaml`` beside the first config, when there is one."""
    path = configs[0].parent / METHOD_RECIPES / f"{method}.yaml"
    return path if path.is_file() else None


def run_configs(configs: Sequence[Path], task: str, method: str, recipes: bool = False) -> list[Path]:
    """The config files of one run, layered left to right; with ``recipes``, the method's own after the
    ``--config`` files."""
    folder = configs[0].parent
    layered = list(configs)
    if method == "lora" and (folder / LORA_CONFIG).is_file():
        layered.append(folder / LORA_CONFIG)
    if recipes and (own := recipe(configs, method)) is not None:
        layered.append(own)
    known = benchmark_task(task)
    benchmark = "vtab" if isinstance(known, VTABTask) else "fgvc" if isinstance(known, FGVCTask) else None
    if benchmark is not None and (override := folder / benchmark / f"{task}.yaml").is_file():
        layered.append(override)
    return layered


class Sweep:
    """Plans and launches a study's stages; progress lines go to the console and ``<runs-dir>/sweep.log``."""

    def __init__(self, study: Study, launcher: Any, rerun: bool) -> None:
        self.study, self.launcher, self.rerun = study, launcher, rerun
        study.runs_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = study.runs_dir / LOG_FILE
        self._say_lock = threading.Lock()  # runs report from several threads

    def say(self, line: str) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        with self._say_lock:
            print(line, flush=True)
            with self.log_path.open("a") as log:
                log.write(f"{stamp} {line}\n")

    def stage(self, title: str, specs: Sequence[RunSpec]) -> list[Outcome]:
        """Skip finished runs and runs with other settings, leave queued SLURM jobs be, launch the rest."""
        if not specs:
            return []
        self.say(f"sweep: {title}: {len(specs)} runs into {self.study.runs_dir}")
        outcomes: list[Outcome] = []
        launch: list[tuple[RunSpec, Say]] = []
        active: list[tuple[RunSpec, str]] = []
        for index, spec in enumerate(specs, start=1):

            def say(line: str, prefix: str = f"[{index}/{len(specs)}]") -> None:
                self.say(f"{prefix} {line}")

            change = other_settings(spec)
            if change is not None and not self.rerun:
                say(f"{spec.name}: not run: {differs_message(change)}")
                outcomes.append(Outcome(spec.name, "differs", differs_message(change)))
                continue
            if change is None and (score := finished_score(spec, say)) is not None:
                text = f"{'val_top1' if spec.evaluate == 'validate' else 'top1'}={score:.4f}"
                say(f"{spec.name}: skipped, finished before ({text})")
                outcomes.append(Outcome(spec.name, "skipped", text, score))
                continue
            if isinstance(self.launcher, SlurmLauncher) and (job_id := active_job(spec.run_dir)):
                say(f"{spec.name}: queued or running as SLURM job {job_id}: not submitted again")
                active.append((spec, job_id))
                continue
            launch.append((spec, say))
        if isinstance(self.launcher, SlurmLauncher):
            outcomes += self.launcher.launch([spec for spec, _ in launch], active)
        else:
            outcomes += self.launcher.launch(launch)
        return outcomes

    def run(self) -> list[Outcome]:
        study = self.study
        study.write_record()
        if study.select_on is None:
            return self.summary(self.stage("runs", study.training_specs()))
        selection = study.selection_specs()
        outcomes = self.stage("selection on validation (tuning split, no test)", selection)
        finals: list[RunSpec] = []
        for task, (method, budget) in itertools.product(study.tasks, study.sized_methods()):
            choice = choose([s for s in selection if (s.task, s.method, s.budget) == (task, method, budget)])
            cell = f"{task} {method}" + (f" budget={budget}" if budget is not None else "")
            if isinstance(choice, str):
                waiting = any(o.status in ("submitted", "busy") for o in outcomes)
                status = "submitted" if waiting else "failed"
                again = " (run the same command again when they end)" if waiting else ""
                self.say(f"{cell}: no final runs: {choice}{again}")
                outcomes.append(Outcome(f"{cell} final", status, choice))
                continue
            others = "".join(
                f"; {v}: {m:.4f}" for v, m in choice["candidates"].items() if v != choice["variant"]
            )
            tie = (
                f"; tied with {', '.join(choice['tied_with'])}: the first in grid order is taken"
                if choice["tied_with"]
                else ""
            )
            self.say(
                f"{cell}: chose {choice['variant'] or 'its one point'} (validation top-1 "
                f"{choice['val_top1']:.4f}{others}){tie}"
            )
            finals += study.final_specs(task, method, budget, choice)
        return self.summary(outcomes + self.stage("final runs (chosen point, full split, test)", finals))

    def summary(self, outcomes: list[Outcome]) -> list[Outcome]:
        counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed")}
        others = {
            "differs": "not run (other settings)",
            "busy": "held by another writer",
            "submitted": "submitted, not finished yet",
        }
        extra = "".join(
            f", {n} {words}"
            for status, words in others.items()
            if (n := sum(o.status == status for o in outcomes))
        )
        self.say(
            f"sweep: {counts['done']} done, {counts['skipped']} skipped, "
            f"{counts['failed']} not finished{extra}"
        )
        for outcome in outcomes:
            if outcome.status in UNFINISHED:
                what = "not finished" if outcome.status == "failed" else "not run"
                self.say(f"  {what}: {outcome.run}: {outcome.message}")
        return outcomes


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(
        prog="python -m lily_lightning sweep",
        description="Fit and test each task, method, grid point and seed (arguments after -- go to all).",
    )
    parser.add_argument("--status", type=Path, metavar="RUNS_DIR", help="print every run's state and exit")
    parser.add_argument("--config", type=Path, action="append", help="base config(s), layered")
    parser.add_argument("--tasks", nargs="+", help="vtab, fgvc and/or task names")
    parser.add_argument(
        "--methods", nargs="+", default=["lily"], metavar="METHOD", help=f"any of {', '.join(METHODS)}"
    )
    parser.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        metavar="N",
        help="run each method with a size knob at each trainable-parameter budget (--model.budget N)",
    )
    parser.add_argument(
        "--runs-dir", type=Path, default=Path("runs"), help="runs go to RUNS_DIR/<task>/<method>"
    )
    parser.add_argument(
        "--rerun",
        action="store_true",
        help="train again the runs recorded with other settings (their result and checkpoint are replaced)",
    )
    parser.add_argument(
        "--recipes",
        action="store_true",
        help="layer each method's own recipe, methods/<method>.yaml beside the first --config (its paper's "
        "VTAB-1k optimiser); without it every method trains with the --config files' optimiser",
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="one run per seed, in RUN/seed<k>/")
    parser.add_argument(
        "--grid", nargs="+", default=[], metavar="KEY=V1,V2", help="hyper-parameter grid (Cartesian product)"
    )
    parser.add_argument(
        "--select-on",
        choices=["val"],
        help="choose each (task, method)'s grid point on validation, then test it",
    )
    parser.add_argument("--launcher", choices=["local", "slurm"], default="local")
    parser.add_argument("--parallel", type=int, default=1, help="local: runs at once (default 1)")
    parser.add_argument("--gpus-per-run", type=int, help="local: GPUs of each run (default 1 when GPUs)")
    parser.add_argument("--slurm-partition", help="slurm: partition")
    parser.add_argument("--slurm-time", default="02:00:00", help="slurm: time limit per run (requeued at it)")
    parser.add_argument("--slurm-gpus-per-run", type=int, default=1, help="slurm: GPUs per run (gres)")
    parser.add_argument(
        "--slurm-array-parallelism", type=int, default=256, help="slurm: runs of the array at once"
    )
    parser.add_argument(
        "--slurm-extra", nargs="+", default=[], metavar="OPTION=VALUE", help="slurm: more sbatch options"
    )
    parser.add_argument("--no-wait", action="store_true", help="slurm: return once the jobs are submitted")
    return parser.parse_args(argv[:split]), argv[split + 1 :]


def make_launcher(args: argparse.Namespace, say: Say) -> LocalLauncher | SlurmLauncher:
    if args.launcher == "local":
        if args.no_wait:
            raise UsageError("--no-wait is for --launcher slurm: local runs end with the sweep")
        return LocalLauncher(args.parallel, args.gpus_per_run, args.rerun, say)
    if args.parallel != 1 or args.gpus_per_run is not None:
        raise UsageError("with --launcher slurm use --slurm-array-parallelism and --slurm-gpus-per-run")
    options = SlurmOptions(
        partition=args.slurm_partition,
        time=args.slurm_time,
        gpus_per_run=args.slurm_gpus_per_run,
        array_parallelism=args.slurm_array_parallelism,
        extra=parse_extra(args.slurm_extra),
    )
    return SlurmLauncher(args.runs_dir, options, args.rerun, not args.no_wait, say)


def main(argv: Sequence[str]) -> int:
    """``argv`` follows ``sweep``. Exit code 0 when no run failed or was refused, 1 otherwise."""
    args, extra = parse_args(argv)
    if args.status is not None:
        from .status import print_status

        return print_status(args.status)
    if not args.config or not args.tasks:
        raise UsageError("sweep needs --config and --tasks (or --status RUNS_DIR)")
    missing = [str(c) for c in args.config if not c.is_file()]
    if missing:
        raise UsageError(f"config file not found: {', '.join(missing)}")
    tasks = expand_tasks(args.tasks)
    methods = list(dict.fromkeys(args.methods))
    if unknown := [method for method in methods if method not in METHODS]:
        raise UsageError(
            f"--methods: unknown method(s) {' '.join(unknown)}; choose among {', '.join(METHODS)}"
        )
    # The first run's settings: where the grid keys' types are found (a data module's class_path).
    first_configs = run_configs(args.config, tasks[0], methods[0], args.recipes)
    first = resolved_settings([*config_arguments(first_configs), *extra])
    axes, notes = typed_axes(parse_grid(args.grid), first)
    study = Study(
        runs_dir=args.runs_dir,
        layered=lambda task, method: run_configs(args.config, task, method, args.recipes),
        extra=extra,
        tasks=tasks,
        methods=methods,
        seeds=args.seeds,
        axes=axes,
        select_on=args.select_on,
        budgets=list(dict.fromkeys(args.budgets)) if args.budgets else None,
    )
    study.check()
    if args.recipes and (plain := [method for method in methods if recipe(args.config, method) is None]):
        folder = args.config[0].parent / METHOD_RECIPES
        notes.append(
            f"sweep: --recipes: no {folder}/<method>.yaml for {', '.join(plain)}: they train with the "
            "--config files' settings"
        )
    if study.budgets and (fixed := [method for method in methods if method not in SIZE_KNOBS]):
        notes.append(f"sweep: {', '.join(fixed)}: a fixed parameter count, run once, not per budget")
    if args.select_on is not None and first.get(LIMIT_VAL, 1.0) != 1.0:
        notes.append(
            f"sweep: {LIMIT_VAL} is {first[LIMIT_VAL]} in these settings: it holds for the evaluations "
            "during fit; each selection run's `validate` scores the whole validation split"
        )
    sweep: Sweep | None = None
    launcher = make_launcher(args, lambda line: sweep.say(line) if sweep else print(line))
    sweep = Sweep(study, launcher, args.rerun)
    for note in notes:
        sweep.say(note)
    try:
        outcomes = sweep.run()
    except KeyboardInterrupt:
        sweep.say(
            "sweep: interrupted (Ctrl-C): rerun the same sweep command to go on: finished runs are skipped, "
            "interrupted ones resume from their checkpoints/last.ckpt"
        )
        raise
    return 0 if all(o.status not in UNFINISHED for o in outcomes) else 1
