"""Lily against the field (issue 25, item 4): every method's size, mean accuracy and paired difference to
Lily in one table per report table, and the accuracy-vs-parameters figure.

A difference row ``lily - <method>`` pairs each Lily row with each row of another method that shares its
backbone and protocol: per task, the difference of the two runs of each seed both have, so its mean ± std is
that of the paired differences over seeds (positive: Lily ahead). Only the method ``lily`` is special, as
the reference; any other method name (one this code has never heard of too) gets its rows and its pairing.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from .plots import ParamPoint, count_text
from .table import MISSING, Column, Row, cell_text

REFERENCE = "lily"  # the method every other one is compared with: this project's


@dataclass(frozen=True)
class Pairing:
    """A difference row and the two rows it pairs: ``difference = reference - other``."""

    reference: Row
    other: Row
    difference: Row


def paired_differences(rows: Sequence[Row]) -> list[Pairing]:
    """A ``lily - <method>`` row for each Lily row and each row of another method with one backbone and
    protocol: per task, the difference of the two runs of each seed both have (one run each, of different
    or unrecorded seeds: that pair), so the spread shown is the spread of paired differences over seeds."""
    found = []
    for reference, other in itertools.product(rows, rows):
        if reference.method != REFERENCE or other.method == REFERENCE:
            continue
        if (reference.backbone, reference.protocol) != (other.backbone, other.protocol):
            continue
        label = f"{reference.label} - {other.label}"
        difference = Row(label, f"{REFERENCE} - {other.method}", reference.backbone, reference.protocol)
        difference.difference = True
        for task in reference.values.keys() & other.values.keys():
            mine, theirs = reference.values[task], other.values[task]
            if len(mine) == len(theirs) == 1 and mine.keys() != theirs.keys():
                pairs = {None: (next(iter(mine.values())), next(iter(theirs.values())))}
            else:
                pairs = {seed: (mine[seed], theirs[seed]) for seed in mine.keys() & theirs.keys()}
            if pairs:
                difference.values[task] = {seed: a - b for seed, (a, b) in pairs.items()}
        found.append(Pairing(reference, other, difference))
    return found


def summary_column(columns: Sequence[Column]) -> Column:
    """The one number that sums up a row of a table: the table's first mean over all of its tasks (VTAB-1k:
    Mean (19 tasks); FGVC: FGVC mean), else (the other tasks' table has no mean column) the plain mean over
    its tasks, which is the task itself for one task."""
    tasks = tuple(column.tasks[0] for column in columns if not column.is_mean)
    whole = [column for column in columns if column.is_mean and set(column.tasks) == set(tasks)]
    if whole:
        return whole[0]
    if len(tasks) == 1:
        return Column(tasks[0], tasks)
    return Column(f"Mean ({len(tasks)} tasks)", tasks, is_mean=True)


def params_count(row: Row) -> str:
    """The row's trainable parameters without the head, in full (``294,912``; a range if runs differ)."""
    if not row.params:
        return MISSING
    low, high = min(row.params), max(row.params)
    return f"{low:,}" if low == high else f"{low:,}-{high:,}"


def versus_text(row: Row, pairings: Sequence[Pairing], column: Column, seeds: int) -> str:
    """The row's paired difference to Lily in ``column``, one per Lily row (named when there are several)."""
    if row.method == REFERENCE:
        return "reference"
    mine = [pairing for pairing in pairings if pairing.other is row]
    texts = [cell_text(pairing.difference, column, seeds) for pairing in mine]
    if len(mine) > 1:
        texts = [f"{text} (vs {pairing.reference.label})" for text, pairing in zip(texts, mine, strict=True)]
    return "; ".join(texts) or MISSING


def methods_table(
    title: str, columns: Sequence[Column], rows: Sequence[Row], pairings: Sequence[Pairing], seeds: int
) -> list[str]:
    """``## Methods: <title>``: one line per row of the table (method, backbone, protocol) with its trainable
    parameters without the head (result.json's ``trainable_params - head_params``, which for an adapter
    method is the RESULT line's ``adapter_params``), its budget, its summary column and its paired
    difference to Lily there."""
    column = summary_column(columns)
    lines = [
        f"## Methods: {title}",
        "",
        f"| method | backbone | protocol | trainable params (head excluded) | budget | top-1: {column.title} "
        f"| {REFERENCE} - method (paired seeds) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        budget = MISSING if row.budget is None else f"{row.budget:,}"
        cells = [row.label, row.backbone, row.protocol, params_count(row), budget]
        cells += [cell_text(row, column, seeds), versus_text(row, pairings, column, seeds)]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def figure_points(columns: Sequence[Column], rows: Sequence[Row]) -> list[ParamPoint]:
    """One point per row that has every task of the table's summary column (a mean needs all of them): its
    mean over seeds, their spread, its trainable parameters (the mean when its runs differ) and budget."""
    column = summary_column(columns)
    points = []
    for row in rows:
        if row.params and (cell := row.cell(column)) is not None:
            params = round(sum(row.params) / len(row.params))
            points.append(ParamPoint(row.label, params, cell.mean, cell.std, row.budget))
    return points


def budget_note(points: Sequence[ParamPoint]) -> str:
    """What the figure groups: the budgets its points were sized to."""
    budgets = sorted({p.budget for p in points if p.budget is not None})
    if not budgets:
        return "No run records a budget: every method is at its own default size."
    named = ", ".join(f"{count_text(budget)} ({budget:,})" for budget in budgets)
    return f"Points of one colour and marker by a dotted line share a budget: {named}."
