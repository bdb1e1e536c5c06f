"""The report's table model: columns (a task or a mean over tasks), cells (mean and spread over seeds) and
rows (one method's runs, or a paired difference of two methods), shared by `report` and the field's summary
(:mod:`.field`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..data.tasks import FGVC_TASKS, VTAB_GROUPS, VTAB_TASKS, vtab_group_means

MISSING = "-"
DUPLICATE = "dup"
FEWER = " †"
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


def column_value(column: Column, accuracy: Mapping[str, float]) -> float:
    """A task column's accuracy (0..1), or the column's mean, from one value per task of the column."""
    values = {task: accuracy[task] for task in column.tasks}
    if column.title == GROUP_MEAN:
        return vtab_group_means(values)["group_mean"]
    if column.title == TASK_MEAN:
        return vtab_group_means(values)["task_mean"]
    return sum(values.values()) / len(values)


@dataclass(frozen=True)
class Stats:
    """A cell: mean over seeds, their sample standard deviation (None for one seed), and how many."""

    mean: float
    std: float | None
    n: int


def stats(values: Sequence[float]) -> Stats | None:
    if not values:
        return None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return Stats(mean, None, 1)
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return Stats(mean, math.sqrt(variance), len(values))


Seed = int | None


def seed_samples(values: Mapping[str, Mapping[Seed, float]], tasks: Sequence[str]) -> list[dict[str, float]]:
    """One ``{task: accuracy}`` per seed that every task of ``tasks`` has; a row with one run per task (of
    any seeds) is one sample. Empty when a task has no run: a mean needs all of its tasks."""
    if not all(values.get(task) for task in tasks):
        return []
    if all(len(values[task]) == 1 for task in tasks):
        return [{task: next(iter(values[task].values())) for task in tasks}]
    common = set.intersection(*(set(values[task]) for task in tasks))
    return [{task: values[task][seed] for task in tasks} for seed in sorted(common, key=str)]


@dataclass
class Row:
    """One table row: runs with the same folder label, backbone and protocol; ``values[task][seed]`` is a
    run's top-1, and ``duplicated`` the tasks where two runs claimed the same seed (left out, and named)."""

    label: str
    method: str
    backbone: str
    protocol: str
    values: dict[str, dict[Seed, float]] = field(default_factory=dict)
    params: set[int] = field(default_factory=set)
    duplicated: set[str] = field(default_factory=set)
    selections: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> the chosen grid point
    budgets: set[int | None] = field(default_factory=set)  # result.json's "budget" (None: the method's size)
    difference: bool = False  # a paired ``lily - <method>`` row: values are differences, shown signed

    def cell(self, column: Column) -> Stats | None:
        return stats([column_value(column, sample) for sample in seed_samples(self.values, column.tasks)])

    def params_text(self) -> str:
        if not self.params:
            return MISSING
        low, high = min(self.params) / 1e6, max(self.params) / 1e6
        return f"{low:.3f}" if low == high else f"{low:.3f}-{high:.3f}"

    @property
    def budget(self) -> int | None:
        """The one parameter budget all of the row's runs were sized to, else None."""
        return next(iter(self.budgets)) if len(self.budgets) == 1 else None


def cell_text(row: Row, column: Column, seeds: int) -> str:
    """``72.9``, ``72.9 ± 0.4 (n=3)`` (``+1.2 ± ...`` for a difference); ``†`` when fewer than ``seeds``
    runs; ``dup`` / ``-`` for none."""
    value = row.cell(column)
    if value is None:
        return DUPLICATE if not column.is_mean and column.tasks[0] in row.duplicated else MISSING
    text = f"{100 * value.mean:+.1f}" if row.difference else f"{100 * value.mean:.1f}"
    if value.std is not None:
        text += f" ± {100 * value.std:.1f}"
    if seeds > 1:
        text += f" (n={value.n})"
    return text + (FEWER if value.n < seeds else "")
