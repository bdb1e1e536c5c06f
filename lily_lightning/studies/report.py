"""``python -m lily_lightning report RUNS_DIR [--out DIR]``: the paper's tables from finished runs.

Reads every ``result.json`` that `test` wrote under RUNS_DIR (``runs/<task>/<method>/``) and writes
``results.md`` and ``results.csv`` laid out as the paper's Table 1 (VTAB-1k: 19 tasks in their three groups,
each group's mean, the mean over the 19 tasks and the mean of the three group means) and its FGVC table
(5 tasks and their mean), one row per run-folder name, backbone and protocol, with the trainable parameters
in millions without the head. Every method is paired with Lily (``lily - <method>`` rows) and summed up in
a ``Methods`` table per table (:mod:`.field`). It also draws ``results.png`` (bars per task and row),
``accuracy_vs_params.png`` and ``routing_<run folder>.png`` per Lily run. A task with no run is "-" (empty in
the CSV), never 0; a mean needs all of its tasks. Runs in ``seed<k>`` folders (or recording their seed) give
mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

from ..data.tasks import FGVC_TASKS, VTAB_TASKS, canonical_task
from ..errors import UsageError
from ..figures import DPI
from ..training.results import RunResult, collect_results
from .field import budget_note, figure_points, methods_table, paired_differences, summary_column
from .grid import STUDY_FILE
from .plots import accuracy_vs_params, results_bar_chart, routing_heatmap, routing_weights_from_checkpoint
from .runs import recorded_settings
from .settings import SEED_KEYS, comparable, differing_keys, value_text
from .table import DUPLICATE, FEWER, MISSING, Column, Row, Seed, cell_text, fgvc_columns, vtab_columns

SEED_FOLDER = re.compile(r"seed(-?\d+)")
ACCURACY_VS_PARAMS = "accuracy_vs_params.png"


def run_label(result: RunResult, runs_dir: Path) -> tuple[str, Seed]:
    """The row label of a run folder and its seed: ``runs/<task>/<label...>[/seed<k>]``; the seed is the one
    the result records, else the ``seed<k>`` folder's."""
    parts = list(result.run_dir.relative_to(runs_dir).parts)
    seed = result.record.get("seed")
    if parts and (match := SEED_FOLDER.fullmatch(parts[-1])):
        parts.pop()
        seed = int(match.group(1)) if seed is None else seed
    label = "/".join(parts[1:]) or (parts[0] if parts else runs_dir.name)
    return label, seed if isinstance(seed, int) else None


def protocol_text(record: Mapping[str, Any]) -> str:
    """What the number means and how it was got: the report kind, the split mode and the input size."""
    size = record.get("img_size")
    parts = [str(record.get("report", "?")), record.get("split_mode")]
    if isinstance(size, list) and size:
        parts.append(f"{size[0]}px" if len(set(size)) == 1 else "x".join(map(str, size)) + "px")
    return ", ".join(str(part) for part in parts if part)


RowKey = tuple[str, str, str, str]  # (folder label, method, backbone, protocol)


def method_label(result: RunResult) -> str:
    """The method as rows name it: result.json's ``method``, with its type when the method's own setting is
    a typed mapping (``method: peft`` with ``peft: {peft_type: LORA}``: ``peft:lora``), read from the result
    or else from the config the run saved, so runs of two types never share a row."""
    method = str(result.record.get("method", "?"))
    kind = result.record.get("peft_type") or _configured_type(result.run_dir, method)
    return f"{method}:{str(kind).lower()}" if kind else method


def _configured_type(run_dir: Path, method: str) -> str | None:
    setting = ((_latest_config(run_dir) or {}).get("model") or {}).get(method)
    return setting.get("peft_type") if isinstance(setting, dict) else None


def row_key(result: RunResult, runs_dir: Path) -> RowKey:
    """A run's row: its folder label (the method's name with its type when the folder is named after the
    bare method), method, backbone and protocol."""
    record = result.record
    label, method = run_label(result, runs_dir)[0], method_label(result)
    if label == record.get("method"):
        label = method
    return label, method, str(record.get("backbone", "?")), protocol_text(record)


def settings_apart(
    results: Sequence[RunResult], runs_dir: Path, apart: Callable[[str], None]
) -> dict[Path, str]:
    """What sets apart a run trained with other settings than the other seeds of its cell (row and task), by
    result path: ``trainer.max_epochs=4``; the cell's largest group of same settings (the first, on a tie)
    keeps the row. Settings are those its ``sweep_run.json`` records (``studies.settings``), seeds left out; a
    run without one (trained by `fit`, not `sweep`) is not compared. Each split cell is said through
    ``apart``."""
    cells: dict[tuple[RowKey, str], list[tuple[RunResult, dict[str, Any]]]] = {}
    for result in results:
        if record := recorded_settings(result.run_dir):
            cell = (row_key(result, runs_dir), canonical_task(result.task))
            cells.setdefault(cell, []).append((result, record))
    variants: dict[Path, str] = {}
    for (key, task), runs in cells.items():
        groups: list[tuple[dict[str, Any], list[RunResult]]] = []
        for (result, _), settings in zip(runs, comparable([record for _, record in runs]), strict=True):
            group = next((g for g in groups if not differing_keys([g[0], settings], SEED_KEYS)), None)
            if group is None:
                groups.append((settings, [result]))
            else:
                group[1].append(result)
        if len(groups) < 2:
            continue
        keys = differing_keys([settings for settings, _ in groups], SEED_KEYS)
        kept = max(groups, key=lambda group: len(group[1]))
        texts = []
        for settings, members in groups:
            text = ", ".join(f"{name}={value_text(settings.get(name))}" for name in keys)
            folders = ", ".join(r.run_dir.relative_to(runs_dir).as_posix() for r in members)
            row = key[0] if members is kept[1] else f"{key[0]} [{text}]"
            texts.append(f"{text} ({folders}): row {row}")
            if members is not kept[1]:
                variants.update({r.path: text for r in members})
        apart(
            f"shown apart: {task} / {key[0]} has runs trained with other settings (they differ in "
            f"{', '.join(keys)}), never averaged together: {'; '.join(texts)}"
        )
    return variants


def table_rows(
    results: Sequence[RunResult],
    runs_dir: Path,
    warn: Callable[[str], None],
    apart: Callable[[str], None] | None = None,
) -> list[Row]:
    """Rows in order of first appearance: one per (folder label, method, backbone, protocol), and one more
    for the runs of a task trained with other settings than its other seeds (:func:`settings_apart`, said
    through ``apart``, else ``warn``). Partial tests and duplicates (two runs of a row's task with the same
    seed) are named through ``warn`` and left out."""
    complete = []
    for result in results:
        if result.partial:
            images = result.record.get("images", "?")
            warn(f"left out: {result.path} is a partial test ({images} images): test on the whole split")
        else:
            complete.append(result)
    variants = settings_apart(complete, runs_dir, apart or warn)
    rows: dict[RowKey, Row] = {}
    claimed: dict[tuple[RowKey, str, Seed], RunResult] = {}
    for result in complete:
        label, method, backbone, protocol = row_key(result, runs_dir)
        seed = run_label(result, runs_dir)[1]
        if variant := variants.get(result.path):
            label = f"{label} [{variant}]"
        record = result.record
        key = (label, method, backbone, protocol)
        row = rows.setdefault(key, Row(*key))
        task = canonical_task(result.task)
        if (first := claimed.get((key, task, seed))) is not None:
            row.duplicated.add(task)
            row.values[task].pop(seed, None)
            warn(
                f"left out: duplicate runs of {task} / {label} (seed {seed}): {first.path} "
                f"(top1={first.top1:.4f}) and {result.path} (top1={result.top1:.4f}); keep one of them"
            )
            continue
        claimed[(key, task, seed)] = result
        row.values.setdefault(task, {})[seed] = result.top1
        row.params.add(result.params_without_head)
        budget = record.get("budget")  # `--model.budget N` (None: the method's own size)
        row.budgets.add(budget if isinstance(budget, int) and not isinstance(budget, bool) else None)
        if isinstance(selection := record.get("selection"), dict):
            row.selections.setdefault(task, selection)
    found = list(rows.values())
    twins = {label: [row for row in found if row.label == label] for label in {row.label for row in found}}
    for row in found:  # two rows with one label: the label says what tells them apart
        if len(same := twins[row.label]) > 1:
            differ = [
                f"{name}={getattr(row, name)}"
                for name in ("method", "backbone", "protocol")
                if len({getattr(twin, name) for twin in same}) > 1
            ]
            row.label = f"{row.label} [{', '.join(differ)}]"
    return found


def tables(rows: Sequence[Row]) -> list[tuple[str, list[Column]]]:
    """(title, columns) of each table that has at least one run: VTAB-1k, FGVC, other tasks."""
    done = {task for row in rows for task, seeds in row.values.items() if seeds} | {
        task for row in rows for task in row.duplicated
    }
    found = []
    if done & set(VTAB_TASKS):
        found.append(("VTAB-1k", vtab_columns()))
    if done & set(FGVC_TASKS):
        found.append(("FGVC", fgvc_columns()))
    others = sorted(done - set(VTAB_TASKS) - set(FGVC_TASKS))
    if others:
        found.append(("Other tasks", [Column(name, (name,)) for name in others]))
    return found


def markdown_table(title: str, columns: list[Column], rows: Sequence[Row], seeds: int) -> list[str]:
    header = [
        "method",
        "backbone",
        "params (M)",
        "protocol",
        *(f"**{c.title}**" if c.is_mean else c.title for c in columns),
    ]
    lines = [
        f"## {title}",
        "",
        "| " + " | ".join(header) + " |",
        "|---|---|---:|---|" + "---:|" * len(columns),
    ]
    for row in rows:
        cells = []
        for column in columns:
            text = cell_text(row, column, seeds)
            cells.append(f"**{text}**" if column.is_mean and text not in (MISSING, DUPLICATE) else text)
        lines.append(
            "| " + " | ".join([row.label, row.backbone, row.params_text(), row.protocol, *cells]) + " |"
        )
    return [*lines, ""]


def write_csv(path: Path, sections: list[tuple[str, list[Column]]], rows: Sequence[Row]) -> None:
    """Wide CSV, one row per table row: per column the mean accuracy in percent, its std over seeds and the
    number of seeds; empty cells where a task has no run."""
    columns = [c for _, section in sections for c in section]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        titles = [name for c in columns for name in (c.title, f"{c.title} std", f"{c.title} n")]
        writer.writerow(["method", "backbone", "params_M", "protocol", *titles])
        for row in rows:
            cells: list[str] = []
            for column in columns:
                value = row.cell(column)
                if value is None:
                    cells += ["", "", "0"]
                else:
                    std = "" if value.std is None else f"{100 * value.std:.2f}"
                    cells += [f"{100 * value.mean:.2f}", std, str(value.n)]
            writer.writerow([row.label, row.backbone, row.params_text(), row.protocol, *cells])


def write_seed_csv(path: Path, rows: Sequence[Row]) -> None:
    """Long CSV, one line per run in the tables: row, task, seed and top-1 in percent."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["method", "backbone", "protocol", "task", "seed", "top1"])
        for row in rows:
            for task, seeds in row.values.items():
                for seed, value in seeds.items():
                    writer.writerow([row.label, row.backbone, row.protocol, task, seed, f"{100 * value:.2f}"])


def selection_table(rows: Sequence[Row]) -> list[str]:
    """The grid point `sweep --select-on val` chose per task and row, with the validation scores."""
    chosen = [(task, row, choice) for row in rows for task, choice in sorted(row.selections.items())]
    if not chosen:
        return []
    lines = [
        "## Chosen hyper-parameters (selected on validation, never on test)",
        "",
        "| task | method | chosen | validation top-1 | other points (validation top-1) |",
        "|---|---|---|---:|---|",
    ]
    for task, row, choice in chosen:
        variant = choice.get("variant", "?")
        candidates = choice.get("candidates") or {}
        others = ", ".join(f"{v}: {100 * m:.1f}" for v, m in candidates.items() if v != variant)
        tied = choice.get("tied_with") or []
        tie = f" (tied with {', '.join(tied)}: the first in grid order)" if tied else ""
        score = candidates.get(variant, choice.get("val_top1", math.nan))
        lines.append(f"| {task} | {row.label} | {variant}{tie} | {100 * score:.1f} | {others or MISSING} |")
    return [*lines, ""]


def expected_seeds(runs_dir: Path, rows: Sequence[Row]) -> int:
    """How many seeds a cell should have: the study's ``--seeds`` (``sweep_study.json``), else the most any
    task of any row has."""
    try:
        seeds = json.loads((runs_dir / STUDY_FILE).read_text()).get("seeds")
    except (OSError, ValueError, AttributeError):
        seeds = None
    if isinstance(seeds, list) and seeds:
        return len(seeds)
    return max((len(s) for row in rows for s in row.values.values()), default=1)


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


def draw_routing(result: RunResult, runs_dir: Path, out_dir: Path, max_batches: int) -> str:
    """Draw one Lily run's routing heatmap into ``out_dir``; a markdown line with the picture, or why not."""
    name = result.run_dir.relative_to(runs_dir).as_posix()
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
    path = out_dir / f"routing_{name.replace('/', '_')}.png"
    routing_heatmap(weights, save=path, title=f"Lily routing: {name}")
    return f"{name}: `{path.name}`\n\n  ![routing {name}]({path.name})"


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def write_report(
    runs_dir: Path | str,
    out_dir: Path | str | None = None,
    routing_batches: int = 4,
    warn: Callable[[str], None] = _warn,
    figure: Path | str | None = None,
) -> Path:
    """Write results.md, results.csv, results.png, accuracy_vs_params.png (also to ``figure`` when given)
    and the routing heatmaps; return the markdown's path.

    Result files that cannot be read, partial tests and duplicate runs are left out of the tables, named
    through ``warn`` (one line each) and listed under "Not in the tables"."""
    runs_dir = Path(runs_dir)
    out = Path(out_dir) if out_dir is not None else runs_dir
    if routing_batches < 1:
        raise UsageError(f"--routing-batches must be at least 1, got {routing_batches}")
    if not runs_dir.is_dir():
        raise UsageError(f"runs folder {runs_dir} does not exist")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; the report writes several files: give a folder")
    if figure is not None and Path(figure).is_dir():
        raise UsageError(f"--figure {figure} is a folder; give the PNG file to write")
    left_out: list[str] = []
    apart: list[str] = []

    def note(line: str) -> None:
        left_out.append(line)
        warn(line)

    def keep_apart(line: str) -> None:
        apart.append(line)
        warn(line)

    results = collect_results(runs_dir, note)
    if not results:
        raise UsageError(f"no finished run under {runs_dir}: `test` writes <run>/result.json (see `sweep`)")
    runs = table_rows(results, runs_dir, note, keep_apart)
    pairings = paired_differences(runs)
    rows = [*runs, *(pairing.difference for pairing in pairings)]
    sections = tables(rows)
    seeds = expected_seeds(runs_dir, runs)
    out.mkdir(parents=True, exist_ok=True)

    lines = [
        f"# Results: {runs_dir}",
        "",
        "Top-1 accuracy (%) on each task's test split, as each run's `report` says "
        "(`final`: the final model; `best_of_evals`: the best of the evaluations during training, "
        "as the official code reports). "
        "Params: trainable parameters in millions without the classifier head. "
        f"`{MISSING}`: no finished run (a mean needs all of its tasks); `{DUPLICATE}`: only duplicate runs. "
        "A row is one run-folder name with one backbone and protocol (report, split mode, input size); "
        "runs of a task trained with other settings than its other seeds get a row of their own, labelled "
        "with the settings that differ (`lily [trainer.max_epochs=4]`); "
        "with several seeds a cell is the mean ± sample std over seeds (n: how many), a mean column is "
        f"taken per seed first; `{FEWER.strip()}`: fewer seeds than the study asked for ({seeds}). "
        "A `lily - <method>` row is Lily's paired difference to that method (same task, same seed, same "
        "backbone and protocol) in points, with its spread over seeds; positive: Lily ahead.",
        "",
    ]
    for title, columns in sections:
        lines += markdown_table(title, columns, rows, seeds)
    for title, columns in sections:
        lines += methods_table(title, columns, runs, pairings, seeds)
    lines += field_figure(sections, runs, out, figure, warn)
    lines += selection_table(runs)
    write_csv(out / "results.csv", sections, rows)
    write_seed_csv(out / "results_seeds.csv", runs)

    tasks = [c.title for _, columns in sections for c in columns if not c.is_mean]
    done = [t for t in tasks if any(t in row.values for row in runs)]
    cells = {row.label: {t: cell for t in done if (cell := row.cell(Column(t, (t,))))} for row in runs}
    results_bar_chart(
        {label: {t: cell.mean for t, cell in found.items()} for label, found in cells.items()},
        done,
        save=out / "results.png",
        errors={label: {t: cell.std or 0.0 for t, cell in found.items()} for label, found in cells.items()},
    )
    lines += ["![top-1 per task](results.png)", "", "## Routing (Lily runs)", ""]
    lily_runs = [r for r in results if r.record.get("method") == "lily" and not r.partial]
    for result in lily_runs:
        lines.append(f"- {draw_routing(result, runs_dir, out, routing_batches)}")
    if not lily_runs:
        lines.append("No Lily run.")
    if apart:
        lines += ["", "## Runs with other settings, in rows of their own", ""]
        lines += [f"- {line}" for line in apart]
    if left_out:
        lines += ["", "## Not in the tables", "", *(f"- {line}" for line in left_out)]
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def field_figure(
    sections: Sequence[tuple[str, list[Column]]],
    rows: Sequence[Row],
    out: Path,
    figure: Path | str | None,
    warn: Callable[[str], None],
) -> list[str]:
    """Draw ``accuracy_vs_params.png`` (one panel per table with a row that has all of its summary tasks),
    copy it to ``figure`` when given, and return the markdown lines that show it, or say why there is none."""
    panels = {
        f"{title}: {summary_column(columns).title}": points
        for title, columns in sections
        if (points := figure_points(columns, rows))
    }
    if not panels:
        why = "no row has every task of a table's mean"
        if figure is not None:
            warn(f"no accuracy-vs-parameters figure for --figure {figure}: {why}")
        return [f"No accuracy-vs-parameters figure: {why}.", ""]
    path = out / ACCURACY_VS_PARAMS
    drawn = accuracy_vs_params(panels, save=path)
    if figure is not None:
        _save_copy(drawn, Path(figure))
    note = budget_note([point for points in panels.values() for point in points])
    return [
        "## Accuracy against trainable parameters",
        "",
        "One point per row at its mean top-1 over the table's tasks (error bar: spread over seeds), x: "
        f"trainable parameters without the head on a log scale. {note}",
        "",
        f"![accuracy vs trainable parameters]({ACCURACY_VS_PARAMS})",
        "",
    ]


def _save_copy(figure: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)


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
    parser.add_argument(
        "--figure",
        type=Path,
        default=None,
        help=f"also write the accuracy-vs-parameters figure ({ACCURACY_VS_PARAMS}) to this PNG file "
        "(e.g. the README's docs/_static/accuracy_vs_params.png)",
    )
    args = parser.parse_args(argv)
    path = write_report(args.runs_dir, args.out, args.routing_batches, figure=args.figure)
    print(path.read_text())
    print(f"wrote {path}, {path.with_suffix('.csv')}, {path.parent / 'results.png'}")
    if (path.parent / ACCURACY_VS_PARAMS).is_file():
        also = f" and {args.figure}" if args.figure is not None else ""
        print(f"wrote {path.parent / ACCURACY_VS_PARAMS}{also}")
    return 0
