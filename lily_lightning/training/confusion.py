"""Which classes fail: the confusion matrix `test` writes to the run folder (CSV and PNG), per-class accuracy.

On the training side so that `test` draws the figure without importing the studies' plots (which re-export
:func:`confusion_matrix_figure` as ``lily_lightning.studies.plots.confusion_matrix_figure``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..figures import InlineFigure
from ..files import write_atomically

CONFUSION_CSV = "confusion_matrix.csv"
CONFUSION_PNG = "confusion_matrix.png"
_ANNOTATED = 30  # up to this many classes, every cell shows its count
_LABELLED = 60  # up to this many classes, the axes name every class


def class_accuracy(matrix: np.ndarray) -> list[float | None]:
    """Per class (rows: true class): the share of its images predicted as it; None for a class without any."""
    support = matrix.sum(1)
    return [float(matrix[i, i] / n) if n else None for i, n in enumerate(support)]


def write_confusion_csv(path: Path, matrix: np.ndarray, class_names: Sequence[str]) -> Path:
    """Rows are true classes, columns predicted ones, cells image counts; first row and column: names."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["true \\ predicted", *class_names])
    for name, row in zip(class_names, matrix.tolist(), strict=True):
        writer.writerow([name, *row])
    return write_atomically(path, buffer.getvalue().encode())


def per_class_table(matrix: np.ndarray, class_names: Sequence[str]) -> str:
    """A plain-text table: class, test images, correct, top-1 (``-`` for a class without test images)."""
    width = max(5, *(len(name) for name in class_names))
    lines = [f"  {'class':<{width}}  images  correct   top-1"]
    for i, (name, accuracy) in enumerate(zip(class_names, class_accuracy(matrix), strict=True)):
        shown = "-" if accuracy is None else f"{accuracy:.3f}"
        lines.append(f"  {name:<{width}}  {int(matrix[i].sum()):>6}  {int(matrix[i, i]):>7}  {shown:>6}")
    return "\n".join(lines)


def confusion_matrix_figure(
    matrix: np.ndarray, class_names: Sequence[str], save: Path | str | None = None, title: str | None = None
) -> Figure:
    """The confusion matrix as a heatmap: each row (true class) coloured by its share of the class's images,
    so small classes show as clearly as large ones; cells hold the image counts (up to 30 classes).

    Built without pyplot (works headless); written as a PNG when ``save`` is given.
    """
    matrix = np.asarray(matrix)
    classes = len(class_names)
    side = min(20.0, max(4.5, 0.45 * classes + 2.5))
    fig = InlineFigure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    support = matrix.sum(1, keepdims=True)
    shares = np.divide(matrix, support, out=np.zeros(matrix.shape), where=support > 0)
    image = ax.imshow(shares, vmin=0.0, vmax=1.0, cmap="Blues")
    if classes <= _ANNOTATED:
        for (row, col), count in np.ndenumerate(matrix):
            if count:
                colour = "white" if shares[row, col] > 0.6 else "black"
                ax.text(col, row, str(count), ha="center", va="center", fontsize=8, color=colour)
    if classes <= _LABELLED:
        ax.set_xticks(range(classes), list(class_names), rotation=90 if classes > 8 else 0, fontsize=8)
        ax.set_yticks(range(classes), list(class_names), fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(image, ax=ax, label="share of the true class's images", shrink=0.8)
    accuracy = np.trace(matrix) / max(1, matrix.sum())
    ax.set_title(title or f"Confusion matrix ({int(matrix.sum())} images, top-1 {accuracy:.3f})")
    if save is not None:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save, dpi=120)
    return fig
