"""``python -m lily_lightning report RUNS_DIR [--out DIR]``: the paper's tables from finished runs.

Reads every ``result.json`` that `test` wrote under RUNS_DIR (``runs/<task>/<method>/``) and writes
``results.md`` and ``results.csv`` laid out as the paper's Table 1 (VTAB-1k: 19 tasks in their three groups,
each group's mean, the mean over the 19 tasks and the mean of the three group means) and its FGVC table
(5 tasks and their mean), one row per method, with the trainable parameters in millions without the head.
It also draws ``results.png`` (bars per task and method) and ``routing_<task>_<method>.png`` per Lily run.
A task with no run is "-" (empty in the CSV), never 0; a mean needs all of its tasks.
"""

from __future__ import annotations

import argparse
import csv
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..data.tasks import FGVC_TASKS, VTAB_GROUPS, VTAB_TASKS, canonical_task, vtab_group_means
from ..errors import UsageError
from ..training.results import RunResult, collect_results
from .plots import results_bar_chart, routing_heatmap, routing_weights_from_checkpoint

MISSING = "-"
GROUP_TITLES = {"natural": "Natural", "specialized": "Specialized", "structured": "Structured"}
TASK_MEAN = "Mean (19 tasks)"
GROUP_MEAN = "Mean (3 group means)"
FGVC_MEAN = "FGVC mean"


@dataclass(frozen=True)
class Column:
    """One table column: a task's accuracy, or a mean over ``tasks``."""

    title: str
    tasks: tuple[str, ...]
    is_mean: bool = False


def vtab_columns() -> list[Column]:
    """The 19 tasks in the paper's order, each group followed by its mean, then the two overall means."""
    columns = []
    for group in VTAB_GROUPS:
        names = tuple(t.name for t in VTAB_TASKS.values() if t.group == group)
        columns += [Column(name, (name,)) for name in names]
        columns.append(Column(GROUP_TITLES[group], names, is_mean=True))
    every = tuple(VTAB_TASKS)
    return [*columns, Column(TASK_MEAN, every, is_mean=True), Column(GROUP_MEAN, every, is_mean=True)]


def fgvc_columns() -> list[Column]:
    names = tuple(FGVC_TASKS)
    return [*(Column(name, (name,)) for name in names), Column(FGVC_MEAN, names, is_mean=True)]


def cell_value(column: Column, accuracy: dict[str, float]) -> float | None:
    """Accuracy (0..1) of a task column, or the column's mean; None when a task it needs has no run."""
    if not all(task in accuracy for task in column.tasks):
        return None
    values = {task: accuracy[task] for task in column.tasks}
    if column.title == GROUP_MEAN:
        return vtab_group_means(values)["group_mean"]
    if column.title == TASK_MEAN:
        return vtab_group_means(values)["task_mean"]
    return sum(values.values()) / len(values)


@dataclass
class MethodRow:
    """One table row: a method's accuracy per task and its parameter counts (head excluded)."""

    label: str
    accuracy: dict[str, float]
    params: set[int]
    protocols: set[str]

    def params_text(self) -> str:
        low, high = min(self.params) / 1e6, max(self.params) / 1e6
        return f"{low:.3f}" if low == high else f"{low:.3f}-{high:.3f}"


def method_rows(results: Sequence[RunResult]) -> list[MethodRow]:
    """One row per run-folder name (``runs/<task>/<label>``), in order of first appearance."""
    rows: dict[str, MethodRow] = {}
    for result in results:
        row = rows.setdefault(result.label, MethodRow(result.label, {}, set(), set()))
        row.accuracy[canonical_task(result.task)] = result.top1
        row.params.add(result.params_without_head)
        row.protocols.add(str(result.record.get("report", "?")))
    return list(rows.values())


def tables(rows: Sequence[MethodRow]) -> list[tuple[str, list[Column]]]:
    """(title, columns) of each table that has at least one run: VTAB-1k, FGVC, other tasks."""
    done = {task for row in rows for task in row.accuracy}
    found = []
    if done & set(VTAB_TASKS):
        found.append(("VTAB-1k", vtab_columns()))
    if done & set(FGVC_TASKS):
        found.append(("FGVC", fgvc_columns()))
    others = sorted(done - set(VTAB_TASKS) - set(FGVC_TASKS))
    if others:
        found.append(("Other tasks", [Column(name, (name,)) for name in others]))
    return found


def markdown_table(title: str, columns: list[Column], rows: Sequence[MethodRow]) -> list[str]:
    header = [
        "method",
        "params (M)",
        "protocol",
        *(f"**{c.title}**" if c.is_mean else c.title for c in columns),
    ]
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|---|---:|---|" + "---:|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = cell_value(column, row.accuracy)
            text = MISSING if value is None else f"{100 * value:.1f}"
            cells.append(f"**{text}**" if column.is_mean and value is not None else text)
        protocol = "/".join(sorted(row.protocols))
        lines.append("| " + " | ".join([row.label, row.params_text(), protocol, *cells]) + " |")
    return [*lines, ""]


def write_csv(path: Path, sections: list[tuple[str, list[Column]]], rows: Sequence[MethodRow]) -> None:
    """Wide CSV, one row per method: accuracy in percent; an empty cell where a task has no run."""
    columns = [c for _, section in sections for c in section]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["method", "params_M", "protocol", *(c.title for c in columns)])
        for row in rows:
            values = [cell_value(c, row.accuracy) for c in columns]
            writer.writerow(
                [
                    row.label,
                    row.params_text(),
                    "/".join(sorted(row.protocols)),
                    *("" if v is None else f"{100 * v:.2f}" for v in values),
                ]
            )


def _latest_config(run_dir: Path) -> dict[str, Any] | None:
    """The config LightningCLI saved with the run (``csv/version_*/config.yaml``, newest first)."""
    for path in sorted(
        run_dir.glob("csv/version_*/config.yaml"), key=lambda p: p.stat().st_mtime, reverse=True
    ):
        config = yaml.safe_load(path.read_text())
        if isinstance(config, dict) and isinstance(config.get("data"), dict):
            return config
    return None


def datamodule_from_config(data: dict[str, Any]) -> Any:
    """Instantiate ``data: {class_path, init_args}`` as the CLI would."""
    module_name, _, class_name = data["class_path"].rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)(**data.get("init_args", {}))


def draw_routing(result: RunResult, out_dir: Path, max_batches: int) -> str:
    """Draw one Lily run's routing heatmap into ``out_dir``; a markdown line with the picture, or why not."""
    name = f"{result.task}/{result.label}"
    checkpoint = result.run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        return f"{name}: no heatmap, no checkpoint at {checkpoint}"
    config = _latest_config(result.run_dir)
    if config is None:
        return f"{name}: no heatmap, no saved config (csv/version_*/config.yaml) names its data"
    try:
        datamodule = datamodule_from_config(config["data"])
        weights = routing_weights_from_checkpoint(checkpoint, datamodule, max_batches=max_batches)
    except UsageError as e:  # data or backbone weights absent here: say so, draw the others
        first_line = str(e).splitlines()[0]
        return f"{name}: no heatmap, data or weights not available here ({first_line})"
    path = out_dir / f"routing_{result.task}_{result.label}.png"
    routing_heatmap(weights, save=path, title=f"Lily routing: {name}")
    return f"{name}: `{path.name}`\n\n  ![routing {name}]({path.name})"


def write_report(runs_dir: Path | str, out_dir: Path | str | None = None, routing_batches: int = 4) -> Path:
    """Write results.md, results.csv, results.png and the routing heatmaps; return the markdown's path."""
    runs_dir = Path(runs_dir)
    out = Path(out_dir) if out_dir is not None else runs_dir
    if not runs_dir.is_dir():
        raise UsageError(f"runs folder {runs_dir} does not exist")
    results = collect_results(runs_dir)
    if not results:
        raise UsageError(f"no finished run under {runs_dir}: `test` writes <run>/result.json (see `sweep`)")
    out.mkdir(parents=True, exist_ok=True)
    rows = method_rows(results)
    sections = tables(rows)

    lines = [
        f"# Results: {runs_dir}",
        "",
        "Top-1 accuracy (%) on each task's test split, as each run's `report` says "
        "(`final`: the final model; `best_of_evals`: the best of the evaluations during training, "
        "as the official code reports). "
        "Params: trainable parameters in millions without the classifier head. "
        f"`{MISSING}`: no finished run (a mean needs all of its tasks).",
        "",
    ]
    for title, columns in sections:
        lines += markdown_table(title, columns, rows)
    write_csv(out / "results.csv", sections, rows)

    tasks = [c.title for _, columns in sections for c in columns if not c.is_mean]
    done = [t for t in tasks if any(t in row.accuracy for row in rows)]
    results_bar_chart({row.label: row.accuracy for row in rows}, done, save=out / "results.png")
    lines += ["![top-1 per task](results.png)", "", "## Routing (Lily runs)", ""]
    lily_runs = [r for r in results if r.record.get("method") == "lily"]
    for result in lily_runs:
        lines.append(f"- {draw_routing(result, out, routing_batches)}")
    if not lily_runs:
        lines.append("No Lily run.")
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: Sequence[str]) -> int:
    """``python -m lily_lightning report RUNS_DIR [--out DIR]``; ``argv`` follows ``report``."""
    parser = argparse.ArgumentParser(
        prog="python -m lily_lightning report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("runs_dir", type=Path, help="folder holding runs/<task>/<method>/result.json")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: RUNS_DIR)")
    parser.add_argument(
        "--routing-batches", type=int, default=4, help="test batches averaged per routing heatmap (default 4)"
    )
    args = parser.parse_args(argv)
    path = write_report(args.runs_dir, args.out, args.routing_batches)
    print(path.read_text())
    print(f"wrote {path}, {path.with_suffix('.csv')}, {path.parent / 'results.png'}")
    return 0
