"""A study's runs: tasks x methods x grid points x seeds, their folders and arguments, and the selection of
one grid point per (task, method) on validation.

Folders (``runs/<task>/<method>/`` as a plain sweep has them, then):

- a method run at a parameter budget (``--budgets``, methods with a size knob only): ``.../budget=<N>/``, its
  grid points, selection runs and final runs below it as below ``.../<method>/``;
- a grid point without selection: ``.../<variant>/`` (e.g. ``lr=1e-3,lily.scale=10``);
- a selection run (``--select-on val``): ``.../select/<variant>/``, trained on the tuning split (VTAB-1k
  ``train800``, FGVC ``train``) with the first seed and scored on validation (``val200`` / ``val``) by
  `validate`, never tested (one run per point, as NOAH and FacT tune: the seeds are for the final runs);
- a final run: ``runs/<task>/<method>/``, the chosen point trained on the full split (``train800val200`` /
  ``trainval``) for each seed and tested once;
- each of them in ``seed<k>/`` when ``--seeds`` is given.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lily_lightning.adapters import METHOD_SETTINGS, SIZE_KNOBS
from lily_lightning.data.tasks import FGVCTask, benchmark_task
from lily_lightning.errors import UsageError
from lily_lightning.studies.runs import RunSpec, file_digest
from lily_lightning.studies.settings import argument_key, read_config, resolved_settings
from lily_lightning.training.results import UnreadableResult, read_validation

SELECT_FOLDER = "select"
STUDY_FILE = "sweep_study.json"
# (tuning split, full split) of each data module: the selection runs train on the first and are scored on
# its validation split; the final runs train on the second, as the paper's protocol does.
VTAB_SPLITS = ("train800_val200", "train800val200")
FGVC_SPLITS = ("train_val", "trainval")
# Grid keys under a method's own setting vary only that method's runs (LoRA has no model.lily.scale;
# model.vpt.length is vpt_shallow's and vpt_deep's).
METHOD_SECTIONS = {method: f"model.{setting}." for method, setting in METHOD_SETTINGS.items() if setting}
BUDGET_KEY = "model.budget"


def config_arguments(configs: Sequence[Path]) -> list[str]:
    return [arg for config in configs for arg in ("--config", str(config))]


@dataclass(frozen=True)
class GridAxis:
    key: str  # as the CLI spells it, e.g. model.lily.scale
    values: tuple[str, ...]


def parse_grid(items: Sequence[str]) -> list[GridAxis]:
    """``["model.lr=1e-3,5e-4", "model.lily.scale=0.1,1,10"]`` -> one axis per key, values in order (as
    text: ``studies.grid_values`` reads them with their key's type)."""
    axes: list[GridAxis] = []
    for item in items:
        key, _, values = item.partition("=")
        key = key.strip().removeprefix("--")
        split = tuple(v.strip() for v in values.split(","))
        if not key or not values or not all(split):
            raise UsageError(f"--grid {item!r}: write KEY=VALUE,VALUE,... (e.g. model.lr=1e-3,5e-4)")
        if key.replace(".init_args.", ".") in {axis.key.replace(".init_args.", ".") for axis in axes}:
            raise UsageError(f"--grid names {key} twice; give all of its values in one KEY=V1,V2,...")
        axes.append(GridAxis(key, split))
    return axes


def owning_methods(key: str) -> list[str]:
    """The methods whose own setting ``key`` is under (``model.vpt.length``: vpt_shallow, vpt_deep); empty
    for a key every method has (``model.lr``)."""
    setting = argument_key(f"--{key}") or key
    return [method for method, section in METHOD_SECTIONS.items() if setting.startswith(section)]


def method_points(axes: Sequence[GridAxis], method: str) -> list[dict[str, str]]:
    """The grid points of one method's runs: the Cartesian product of the axes that concern it, in order."""
    mine = [axis for axis in axes if method in (owning_methods(axis.key) or [method])]
    return [
        dict(zip((a.key for a in mine), values, strict=True))
        for values in itertools.product(*(a.values for a in mine))
    ]


def variant_name(point: Mapping[str, str]) -> str:
    """A readable folder name for a grid point: ``lr=1e-3,lily.scale=10`` (``model.`` left out)."""
    parts = []
    for key, value in point.items():
        short = key.replace(".init_args.", ".").removeprefix("model.")
        parts.append(f"{short}={value}".replace("/", "_"))
    return ",".join(parts)


def budget_folder(budget: int | None) -> str:
    return "" if budget is None else f"budget={budget}"


def split_modes(task: str) -> tuple[str, str]:
    return FGVC_SPLITS if isinstance(benchmark_task(task), FGVCTask) else VTAB_SPLITS


@dataclass
class Study:
    """The runs one sweep command asks for; ``layered`` gives each (task, method)'s config files."""

    runs_dir: Path
    layered: Any  # (task, method) -> list[Path]
    extra: list[str]
    tasks: list[str]
    methods: list[str]
    seeds: list[int] | None
    axes: list[GridAxis]
    select_on: str | None
    budgets: list[int] | None = None  # --budgets: each method with a size knob runs at each
    _configs: dict[str, Any] = field(default_factory=dict, repr=False)  # each config file read once

    def _read_config(self, path: str) -> Any:
        if path not in self._configs:
            self._configs[path] = read_config(path)
        return self._configs[path]

    def per_run_keys(self) -> dict[str, str]:
        """The keys the sweep sets for each run, which neither `--` nor --grid may set, and why."""
        keys = {
            "data.name": "the sweep sets each run's task (--tasks)",
            "model.method": "the sweep sets each run's method (--methods)",
            "trainer.default_root_dir": "the sweep gives each run its own folder (--runs-dir)",
            "ckpt_path": "the sweep resumes each run from its own checkpoints/last.ckpt",
        }
        if self.seeds is not None:
            keys["seed_everything"] = "the sweep sets each run's seed (--seeds)"
        if self.select_on is not None:
            keys["data.split_mode"] = "--select-on sets the tuning and the full split of each run"
        if self.budgets is not None:
            keys[BUDGET_KEY] = "the sweep sets each run's budget (--budgets)"
        return keys

    def sized_methods(self) -> list[tuple[str, int | None]]:
        """(method, budget) of each method's runs: a method with a size knob once per budget (when
        ``budgets``), any other once with None."""
        return [
            (method, budget)
            for method in self.methods
            for budget in (self.budgets if self.budgets and method in SIZE_KNOBS else [None])
        ]

    def method_folder(self, task: str, method: str, budget: int | None) -> Path:
        return self.runs_dir / task / method / budget_folder(budget)

    def check(self) -> None:
        """Refuse what the sweep sets per run when `--` or --grid sets it too, and a key set by both."""
        per_run = self.per_run_keys()
        refused = [(arg, per_run[key]) for arg in self.extra if (key := argument_key(arg)) in per_run]
        refused += [
            (f"--grid {a.key}", per_run[k]) for a in self.axes if (k := argument_key(f"--{a.key}")) in per_run
        ]
        grid_keys = {argument_key(f"--{axis.key}") for axis in self.axes}
        refused += [(arg, "--grid sets it per run") for arg in self.extra if argument_key(arg) in grid_keys]
        if refused:
            lines = "\n".join(f"  {arg}: {why}" for arg, why in refused)
            raise UsageError(
                "arguments after -- go to every run, so they may not set what the sweep sets per run:\n"
                f"{lines}\nUse the sweep's own options instead (or a sweep per value, each with its own "
                "--runs-dir)."
            )
        if self.select_on is not None and not any(len(axis.values) > 1 for axis in self.axes):
            raise UsageError("--select-on val chooses among grid points: give a --grid with two or more")
        for axis in self.axes:
            if argument_key(f"--{axis.key}") == BUDGET_KEY:
                raise UsageError(
                    f"--grid {axis.key}: use --budgets N1 N2 ...: a budget sizes the methods with a size "
                    "knob, and runs the others once"
                )
            owners = owning_methods(axis.key)
            if owners and not set(owners) & set(self.methods):
                raise UsageError(
                    f"--grid {axis.key}: a setting of {', '.join(owners)} only, and --methods "
                    f"({' '.join(self.methods)}) has none of them: add one to --methods or leave the axis out"
                )
        if self.budgets is not None:
            self.check_budgets()

    def check_budgets(self) -> None:
        """Refuse budgets no requested method can be sized to, and a grid over a knob the budget sets."""
        sized = [method for method in self.methods if method in SIZE_KNOBS]
        if not sized:
            raise UsageError(
                f"--budgets sizes the methods with a size knob ({', '.join(SIZE_KNOBS)}); "
                f"--methods {' '.join(self.methods)} train a fixed count: add a method with a knob, or leave "
                "out --budgets"
            )
        if bad := [budget for budget in self.budgets if budget < 1]:
            raise UsageError(f"--budgets {' '.join(map(str, bad))}: a budget is a positive parameter count")
        knobs = {f"{METHOD_SECTIONS[method]}{SIZE_KNOBS[method].field}": method for method in sized}
        for axis in self.axes:
            if (key := argument_key(f"--{axis.key}")) in knobs:
                raise UsageError(
                    f"--grid {axis.key}: --budgets sets {knobs[key]}'s {SIZE_KNOBS[knobs[key]].field} to "
                    "meet each budget; grid it in a sweep without --budgets, or leave the axis out"
                )

    def _spec(
        self,
        task: str,
        method: str,
        budget: int | None,
        run_dir: Path,
        point: Mapping[str, str],
        seed: int | None,
        split_mode: str | None = None,
        selection: Mapping[str, Any] | None = None,
    ) -> RunSpec:
        configs = self.layered(task, method)
        args = config_arguments(configs)
        args += self.extra
        args += [arg for key, value in point.items() for arg in (f"--{key}", value)]
        args += ["--data.name", task, "--model.method", method]
        if budget is not None:
            args += [f"--{BUDGET_KEY}", str(budget)]
        if seed is not None:
            args += ["--seed_everything", str(seed)]
        if split_mode is not None:
            args += ["--data.split_mode", split_mode]
        args += ["--trainer.default_root_dir", str(run_dir)]
        return RunSpec(
            task=task,
            method=method,
            run_dir=run_dir,
            args=tuple(args),
            configs={str(config): file_digest(config) for config in configs},
            resolved=resolved_settings(args, self._read_config),
            evaluate="validate" if split_mode is not None and selection is None else "test",
            seed=seed,
            budget=budget,
            point=dict(point),
            variant=variant_name(point) if selection is None else "",
            selection=selection,
        )

    def _seed_dirs(self, folder: Path, first_only: bool = False) -> list[tuple[Path, int | None]]:
        if self.seeds is None:
            return [(folder, None)]
        seeds = self.seeds[:1] if first_only else self.seeds
        return [(folder / f"seed{seed}", seed) for seed in seeds]

    def training_specs(self) -> list[RunSpec]:
        """Without selection: every (task, method, grid point, seed), fit + test."""
        specs = []
        for task, (method, budget) in itertools.product(self.tasks, self.sized_methods()):
            for point in method_points(self.axes, method):
                folder = self.method_folder(task, method, budget)
                folder = folder / variant_name(point) if point else folder
                specs += [
                    self._spec(task, method, budget, d, point, seed) for d, seed in self._seed_dirs(folder)
                ]
        return specs

    def selection_specs(self) -> list[RunSpec]:
        """Every (task, method, grid point) on the tuning split with the first seed, fit + validate."""
        specs = []
        for task, (method, budget) in itertools.product(self.tasks, self.sized_methods()):
            tuning = split_modes(task)[0]
            for point in method_points(self.axes, method):
                folder = self.method_folder(task, method, budget) / SELECT_FOLDER / variant_name(point)
                specs += [
                    self._spec(task, method, budget, d, point, seed, tuning)
                    for d, seed in self._seed_dirs(folder, first_only=True)
                ]
        return specs

    def final_specs(
        self, task: str, method: str, budget: int | None, choice: Mapping[str, Any]
    ) -> list[RunSpec]:
        """The chosen point of (task, method, budget) on the full split, for each seed: fit + test."""
        folder = self.method_folder(task, method, budget)
        full = split_modes(task)[1]
        return [
            self._spec(task, method, budget, d, choice["point"], seed, full, choice)
            for d, seed in self._seed_dirs(folder)
        ]

    def write_record(self) -> None:
        """What the study asked for, for `report` (how many seeds a cell should have)."""
        record = {
            "tasks": self.tasks,
            "methods": self.methods,
            "seeds": self.seeds,
            "grid": {axis.key: list(axis.values) for axis in self.axes},
            "select_on": self.select_on,
        }
        if self.budgets is not None:  # only then: an earlier study's record stays as it was written
            record["budgets"] = self.budgets
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        path, text = self.runs_dir / STUDY_FILE, json.dumps(record, indent=2) + "\n"
        if not path.is_file() or path.read_text() != text:  # a rerun of the same study writes nothing
            path.write_text(text)


def choose(specs: Sequence[RunSpec]) -> dict[str, Any] | str:
    """The grid point of one (task, method) with the best validation top-1 (the mean if several seeds; ties:
    the first in grid order), as the record written into each final result; or why none can be chosen yet."""
    by_variant: dict[str, list[RunSpec]] = {}
    for spec in specs:
        by_variant.setdefault(spec.variant, []).append(spec)
    scores: dict[str, dict[str, float]] = {}
    missing = []
    for variant, runs in by_variant.items():
        for spec in runs:
            try:
                record = read_validation(spec.run_dir)
            except UnreadableResult:
                record = None
            if record is None or record.get("partial"):
                missing.append(spec.name)
            else:
                scores.setdefault(variant, {})[str(spec.seed)] = float(record["val_top1"])
    if missing:
        return f"no validation score yet for {len(missing)} selection run(s): {', '.join(missing)}"
    means = {variant: sum(s.values()) / len(s) for variant, s in scores.items()}
    best = max(means.values())
    tied = [variant for variant, mean in means.items() if mean == best]
    chosen = tied[0]
    return {
        "on": "val",
        "point": dict(by_variant[chosen][0].point),
        "variant": chosen,
        "val_top1": best,
        "val_top1_by_seed": scores[chosen],
        "candidates": means,
        "tied_with": tied[1:],
    }
