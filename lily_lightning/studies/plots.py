"""The figures: learning curves, Lily's routing heatmaps, parameter counts, results bars, accuracy against
trainable parameters.

Every function returns a matplotlib ``Figure`` built without pyplot (no global state, no display needed, so
it works under the Agg backend, in scripts, in `report` and in notebooks) and writes a PNG when ``save`` is
given. In Jupyter the figure shows as a picture when it is a cell's value or passed to ``display`` (see
:class:`InlineFigure`). The same calls draw the README's, the CLI's and the notebooks' pictures.
"""

from __future__ import annotations

import csv
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox
from torch import nn

from ..adapters import LilyAdapter, LilyConfig, LoRAConfig
from ..figures import DPI, InlineFigure
from ..training.confusion import confusion_matrix_figure as confusion_matrix_figure  # `test` draws it too
from ..vit.inject import ADAPTERS_ATTR, adapted_vit
from ..vit.state import count_backbone_parameters

RunDirs = Path | str | Sequence[Path | str] | Mapping[str, Path | str]


def _save(fig: Figure, save: Path | str | None) -> Figure:
    if save is not None:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save, dpi=DPI)
    return fig


def _finish(fig: Figure, save: Path | str | None) -> Figure:
    fig.tight_layout()
    return _save(fig, save)


# -- learning curves ---------------------------------------------------------------------------------------


def read_metrics(run_dir: Path | str) -> dict[str, list[tuple[int, float]]]:
    """``metric -> [(step, value)]`` from a run's CSV logs (``<run>/csv/version_*/metrics.csv``).

    A resumed run logs into a new version folder; versions are read in order and a later value for the same
    (metric, step) replaces an earlier one.
    """
    paths = sorted(
        Path(run_dir).glob("csv/version_*/metrics.csv"),
        key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0),
    )
    merged: dict[str, dict[int, float]] = {}
    for path in paths:
        with path.open(newline="") as file:
            for row in csv.DictReader(file):
                step = int(row["step"])
                for name, value in row.items():
                    if name not in ("step", "epoch") and value not in ("", None):
                        merged.setdefault(name, {})[step] = float(value)
    return {name: sorted(values.items()) for name, values in merged.items()}


def _named_runs(runs: RunDirs) -> dict[str, Path]:
    if isinstance(runs, Mapping):
        return {str(name): Path(path) for name, path in runs.items()}
    paths = [Path(runs)] if isinstance(runs, (str, Path)) else [Path(r) for r in runs]
    # runs/<task>/<method>: name a run "<task>/<method>", unless all share the task.
    tasks = {p.parent.name for p in paths}
    return {(p.name if len(tasks) == 1 else f"{p.parent.name}/{p.name}"): p for p in paths}


def learning_curves(runs: RunDirs, save: Path | str | None = None, title: str | None = None) -> Figure:
    """Train loss, validation / test accuracy and learning rate against the step, one line per run.

    ``runs``: a run folder (``runs/<task>/<method>``), several, or ``{label: folder}``.
    """
    fig = InlineFigure(figsize=(13, 3.8))
    loss_ax, acc_ax, lr_ax = fig.subplots(1, 3, sharex=True)
    for index, (label, run_dir) in enumerate(_named_runs(runs).items()):
        colour = f"C{index}"
        metrics = read_metrics(run_dir)
        if not metrics:
            raise FileNotFoundError(f"no CSV logs under {run_dir} (expected csv/version_*/metrics.csv)")
        for name, ax, style, suffix in (
            ("train/loss", loss_ax, "-", ""),
            ("val/acc", acc_ax, "-o", " val"),
            ("train/acc", acc_ax, ":s", " train"),
            ("lr", lr_ax, "-", ""),
        ):
            if points := metrics.get(name):
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, style, color=colour, label=label + suffix, markersize=3)
        if points := metrics.get("test/acc"):
            # `test` logs in its own version at step 0: mark it at the end of training.
            last_step = max(step for values in metrics.values() for step, _ in values)
            value = points[-1][1]
            test_label = f"{label} test {value:.3f}"
            acc_ax.plot([last_step], [value], "*", color=colour, markersize=12, label=test_label)
    for ax, name in ((loss_ax, "train loss"), (acc_ax, "top-1 accuracy"), (lr_ax, "learning rate")):
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _finish(fig, save)


# -- routing -----------------------------------------------------------------------------------------------


def _fixed_mixes(adapter: LilyAdapter, depth: int) -> np.ndarray | None:
    """(blocks, E) when the site's mix does not depend on the input (in the mode the model is in), else None:
    uniform routing, or batch routing at eval with ``eval_routing="running"`` (``LilyAdapter.fixed_mix``)."""
    mixes = [adapter.fixed_mix(block) for block in range(depth)]
    if any(mix is None for mix in mixes):
        return None
    return torch.stack(mixes).detach().float().cpu().numpy()


@torch.no_grad()
def routing_weights(
    model: nn.Module, batches: Iterable[Any], max_batches: int | None = None
) -> dict[str, np.ndarray]:
    """``site -> (blocks, experts)``: each block's router softmax, averaged over every token of ``batches``.

    Captured with forward hooks on ``adapters[site].router[block]`` (Lily's ``p = softmax(router(z))``),
    with the model in eval mode. ``batches`` yields images or ``(images, labels)`` and goes through
    ``model(images)`` (a ``ViTClassifier`` normalises its inputs itself). A site whose eval mix does not
    depend on the input shows that mix: ``1 / E`` without routers (uniform routing), the running mix with
    ``eval_routing="running"``. LoRA sites have no experts and are left out.
    """
    owner = adapted_vit(model)
    adapters = getattr(owner, ADAPTERS_ATTR)
    depth = len(owner.blocks)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, list[int]] = {}
    fixed: dict[str, np.ndarray] = {}
    handles = []

    def capture(site: str, block: int):
        def hook(module: nn.Module, inputs: Any, logits: torch.Tensor) -> None:
            probs = F.softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])
            sums[site][block] += probs.sum(0).cpu()
            counts[site][block] += probs.shape[0]

        return hook

    was_training = model.training
    model.eval()
    try:
        for site, adapter in adapters.items():
            if not isinstance(adapter, LilyAdapter):
                continue  # LoRA: no experts
            if (mixes := _fixed_mixes(adapter, depth)) is not None:
                fixed[site] = mixes
                continue
            sums[site] = torch.zeros(len(adapter.router), adapter.hp.shape[0], dtype=torch.float64)
            counts[site] = [0] * len(adapter.router)
            handles += [
                router.register_forward_hook(capture(site, i)) for i, router in enumerate(adapter.router)
            ]
        if not sums and not fixed:
            raise ValueError("this model has no Lily sites (routing needs Lily's expert banks)")
        device = next(model.parameters()).device
        for index, batch in enumerate(batches if sums else ()):
            if max_batches is not None and index >= max_batches:
                break
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            model(images.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if sums and min(min(c) for c in counts.values()) == 0:
        raise ValueError("no images went through the model: the data set is empty")
    weights = fixed | {site: (sums[site] / torch.tensor(counts[site])[:, None]).numpy() for site in sums}
    return {site: weights[site] for site in adapters if site in weights}


def routing_weights_from_checkpoint(
    checkpoint: Path | str, datamodule: Any, max_batches: int | None = 4, **overrides: Any
) -> dict[str, np.ndarray]:
    """:func:`routing_weights` of a `fit` checkpoint over the first ``max_batches`` test batches.

    The model is rebuilt from the checkpoint's hyper-parameters (``overrides`` replace some, e.g.
    ``weights=...`` for a backbone file that moved) and its trainable tensors loaded.
    """
    from ..training.module import ViTClassifier  # the Lightning module; plots of bare models do not need it

    with warnings.catch_warnings():  # the frozen backbone is not in the checkpoint, by design
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not")
        model = ViTClassifier.load_from_checkpoint(checkpoint, map_location="cpu", **overrides)
    datamodule.setup("test")
    return routing_weights(model, datamodule.test_dataloader(), max_batches=max_batches)


def routing_heatmap(
    weights: Mapping[str, np.ndarray], save: Path | str | None = None, title: str | None = None
) -> Figure:
    """One blocks x experts heatmap per site of the mean expert weight (each row sums to 1)."""
    sites = list(weights)
    fig = InlineFigure(figsize=(1.6 + 2.6 * len(sites), 4.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(sites), squeeze=False)[0])
    image = None
    for ax, site in zip(axes, sites, strict=True):
        grid = np.asarray(weights[site])
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for (row, col), value in np.ndenumerate(grid):
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if value < 0.6 else "black")  # fmt: skip
        ax.set_title(f"site {site}")
        ax.set_xlabel("HP expert")
        ax.set_xticks(range(grid.shape[1]))
        ax.set_yticks(range(grid.shape[0]))
    axes[0].set_ylabel("block")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="mean router weight", shrink=0.9)
    fig.suptitle(title or "Lily routing: mean expert weight per block")
    return _save(fig, save)  # constrained layout places the colour bar and the title; no tight_layout here


# -- parameters --------------------------------------------------------------------------------------------


def parameter_plot(
    backbone: str = "vit_base_patch16_224",
    ranks: Sequence[int] = (4, 8, 16, 32),
    experts: Sequence[int] = (2, 4),
    save: Path | str | None = None,
) -> Figure:
    """Trainable parameters (M, head excluded) of LoRA on q, v and Lily on k, v, mlp across ranks.

    Counted on the real timm model built on the meta device (:func:`count_backbone_parameters`); full
    fine-tuning is the dashed line, a linear probe trains the head only (0 here).
    """
    fig = InlineFigure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    lora = [count_backbone_parameters(backbone, LoRAConfig(rank=r, alpha=r)) / 1e6 for r in ranks]
    ax.plot(ranks, lora, "o-", label="LoRA on q, v")
    for num_experts in experts:
        lily = [count_backbone_parameters(backbone, LilyConfig(rank=r, num_experts=num_experts)) / 1e6
                for r in ranks]  # fmt: skip
        ax.plot(ranks, lily, "s-", label=f"Lily on k, v, mlp (E={num_experts})")
    ax.axhline(
        count_backbone_parameters(backbone, None) / 1e6, color="grey", ls="--", label="full fine-tuning"
    )
    ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ranks), [str(r) for r in ranks])
    ax.set_xlabel("rank r")
    ax.set_ylabel("trainable parameters (M, head excluded)")
    ax.set_title(f"{backbone}: adapter size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _finish(fig, save)


# -- results -----------------------------------------------------------------------------------------------


def results_bar_chart(
    scores: Mapping[str, Mapping[str, float]],
    tasks: Sequence[str] | None = None,
    save: Path | str | None = None,
    title: str = "Top-1 accuracy per task",
    errors: Mapping[str, Mapping[str, float]] | None = None,
) -> Figure:
    """Grouped bars: one group per task, one bar per method; ``scores[method][task]`` in [0, 1].

    A task a method has no result for gets no bar and a "-" mark (never a zero bar). ``errors[method][task]``
    (the std over seeds, in [0, 1]) draws an error bar.
    """
    methods = list(scores)
    tasks = list(tasks) if tasks is not None else sorted({t for s in scores.values() for t in s})
    width = 0.8 / max(1, len(methods))
    fig = InlineFigure(figsize=(max(6.0, 0.55 * len(tasks) * max(1, len(methods)) + 2), 4.4))
    ax = fig.subplots()
    for index, method in enumerate(methods):
        offsets = np.arange(len(tasks)) + (index - (len(methods) - 1) / 2) * width
        present = [
            (x, 100 * scores[method][t]) for x, t in zip(offsets, tasks, strict=True) if t in scores[method]
        ]
        if present:
            xs, ys = zip(*present, strict=True)
            spread = (errors or {}).get(method, {})
            yerr = [100 * spread.get(t, 0.0) for t in tasks if t in scores[method]] if spread else None
            bars = ax.bar(xs, ys, width, label=method, color=f"C{index}", yerr=yerr, capsize=3)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        for x, task in zip(offsets, tasks, strict=True):
            if task not in scores[method]:
                ax.text(x, 2, "no run", ha="center", va="bottom", rotation=90, fontsize=7, color=f"C{index}")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, save)


# -- the field: accuracy against size ------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamPoint:
    """One method (or one variant of it) in :func:`accuracy_vs_params`."""

    label: str
    params: int  # trainable parameters, head excluded
    accuracy: float  # mean top-1 in [0, 1]
    spread: float | None  # its sample std over seeds (None: one seed)
    budget: int | None = None  # the trainable-parameter budget it was sized to (None: its method's own size)


def count_text(count: int) -> str:
    """A parameter count in short: ``400k``, ``1.2M``, ``950``."""
    for size, suffix in ((1_000_000, "M"), (1_000, "k")):
        if count >= size:
            return f"{count / size:.3g}{suffix}"
    return str(count)


BUDGET_MARKERS = "s^Dvph"  # one per budget; circles are the methods at their own size
OWN_SIZE = "own default size"


def budget_legend(budget: int) -> str:
    return f"budget {count_text(budget)}: sized to equal counts"


# Where a point's label may go, tried in order: (x, y) offset in points, and the side the text extends to.
LABEL_SPOTS = [(4, 3, "left"), (4, -10, "left"), (-4, 3, "right"), (-4, -10, "right"),
               (4, 12, "left"), (4, -19, "left"), (-4, 12, "right"), (-4, -19, "right")]  # fmt: skip
MARKER_HALF = 4  # points: the half size of a marker's box, kept free of other points' labels
LABEL_GAP = 2  # points kept free around each placed label


def _place_labels(ax: Any, labels: Sequence[tuple[float, float, str]]) -> None:
    """Annotate each ``(x, y, text)`` at the first spot of :data:`LABEL_SPOTS` whose box overlaps no label
    placed before it and no other point (the first spot when none is free), highest point first. The axes
    must be laid out (scale, limits, figure layout) so that boxes are measured where they will be drawn."""
    renderer = FigureCanvasAgg(ax.figure).get_renderer()
    ax.autoscale_view()  # the limits the points will be drawn in (matplotlib settles them lazily)
    pad = MARKER_HALF * ax.figure.dpi / 72
    centres = [ax.transData.transform((x, y)) for x, y, _ in labels]
    taken = [Bbox.from_extents(cx - pad, cy - pad, cx + pad, cy + pad) for cx, cy in centres]

    def annotate(x: float, y: float, text: str, spot: tuple[int, int, str]) -> Any:
        dx, dy, side = spot
        return ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7, ha=side)

    for index in sorted(range(len(labels)), key=lambda i: -labels[i][1]):
        others = [box for i, box in enumerate(taken) if i != index]  # its own marker aside
        for spot in LABEL_SPOTS:
            note = annotate(*labels[index], spot)
            if not any(note.get_window_extent(renderer).overlaps(box) for box in others):
                break
            note.remove()
        else:
            note = annotate(*labels[index], LABEL_SPOTS[0])
        taken.append(note.get_window_extent(renderer).padded(LABEL_GAP * ax.figure.dpi / 72))


def accuracy_vs_params(
    panels: Mapping[str, Sequence[ParamPoint]],
    save: Path | str | None = None,
    title: str = "Accuracy against trainable parameters",
) -> Figure:
    """Mean top-1 against trainable parameters (head excluded, log x), one labelled point per method with its
    spread over seeds as error bar; one panel per ``{panel title: points}``.

    Points sized to one budget (``--model.budget``) share a colour and a marker and stand by a dotted vertical
    line labelled ``budget 400k``; points at their method's own size are grey circles. A method that trains
    nothing but the head (a linear probe) has no place on a log axis: it is drawn at 1, its label saying 0.
    """
    budgets = sorted({p.budget for points in panels.values() for p in points if p.budget is not None})
    fig = InlineFigure(figsize=(1.0 + 6.0 * len(panels), 4.8))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    panel_labels: list[tuple[Any, list[tuple[float, float, str]]]] = []
    for ax, (name, points) in zip(axes, panels.items(), strict=True):
        shown: set[str] = set()
        labels = []
        for point in points:
            group = None if point.budget is None else budgets.index(point.budget)
            legend = OWN_SIZE if point.budget is None else budget_legend(point.budget)
            ax.errorbar(
                [max(point.params, 1)],
                [100 * point.accuracy],
                yerr=None if point.spread is None else [100 * point.spread],
                fmt="o" if group is None else BUDGET_MARKERS[group % len(BUDGET_MARKERS)],
                color="0.35" if group is None else f"C{group}",
                capsize=3,
                label="_nolegend_" if legend in shown else legend,
            )
            shown.add(legend)
            text = point.label if point.params else f"{point.label} (0)"
            labels.append((max(point.params, 1), 100 * point.accuracy, text))
        for group, budget in enumerate(budgets):
            if any(p.budget == budget for p in points):
                colour = f"C{group}"
                ax.axvline(budget, color=colour, ls=":", lw=1)
                ax.text(budget, 0.99, f"budget {count_text(budget)}", transform=ax.get_xaxis_transform(),
                        rotation=90, ha="right", va="top", fontsize=7, color=colour)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (head excluded, log scale)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        panel_labels.append((ax, labels))
    fig.suptitle(title)
    fig.tight_layout()  # the layout the labels are measured in
    for ax, labels in panel_labels:
        _place_labels(ax, labels)
    return _finish(fig, save)
