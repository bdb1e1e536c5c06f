"""Writes ``predict`` results to one CSV file, once, from rank 0, in dataset order: ``--out FILE``, else a
new ``predictions.csv`` / ``predictions-2.csv`` ... in the run folder (an earlier predict's file stays)."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter

from ..files import check_out_file

HEADER = ("index", "file", "label", "class", "confidence")
PREDICTIONS = "predictions.csv"
PREDICTIONS_GLOB = "predictions*.csv"

log = logging.getLogger(__name__)


def predictions_file(run_dir: Path, out: Path | None, force: bool) -> Path:
    """Where `predict` writes: ``out`` (refused when it exists, unless ``force``), else the first free one of
    ``run_dir/predictions.csv``, ``predictions-2.csv``, ... so an earlier predict's file is never replaced."""
    if out is not None:
        check_out_file(out, force, out / PREDICTIONS)
        return out
    path, number = run_dir / PREDICTIONS, 1
    while path.exists():
        number += 1
        path = run_dir / f"predictions-{number}.csv"
    if number > 1:
        log.info(
            "%s holds an earlier predict's rows (kept): this one writes %s (or name it: --out FILE).",
            run_dir / PREDICTIONS,
            path,
        )
    return path


def header(top_k: int) -> list[str]:
    """``index,file,label,class,confidence``, then ``label_2,class_2,confidence_2`` ... up to ``top_k``."""
    ranked = [f"{column}_{rank}" for rank in range(2, top_k + 1) for column in HEADER[2:]]
    return [*HEADER, *ranked]


class PredictionCSVWriter(BasePredictionWriter):
    """One row per image of the predict set: ``index, file, label, class, confidence`` for the most probable
    class, then the same three for the next ones (``label_2, class_2, confidence_2``, ...) up to the model's
    ``predict_top_k``.

    ``index`` is the image's position in the predict set, ``file`` its path relative to the data module's
    ``data_folder`` (the task folder; with ``predict_path``, relative to that folder), ``label`` a class id,
    ``class`` its name (the model's ``class_names``, else the data module's, else the id again) and
    ``confidence`` its softmax probability. Under DDP every process predicts its share of each batch; the
    shares are gathered to rank 0, which writes each image once, sorted by index.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(write_interval="epoch")
        self.path = Path(path)

    def write_on_epoch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        indices = [i for batch in batch_indices[0] for i in batch] if batch_indices else []
        rows = list(
            zip(
                indices,
                torch.cat([p["label"] for p in predictions]).tolist() if predictions else [],
                torch.cat([p["confidence"] for p in predictions]).tolist() if predictions else [],
                strict=True,
            )
        )
        if trainer.world_size > 1:
            shares: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(shares, rows)  # every process's rows, of any length
            rows = [row for share in shares for row in share]
        if not trainer.is_global_zero:
            return
        rows.sort()
        if [index for index, _, _ in rows] != list(range(len(rows))):
            raise RuntimeError(f"predict saw images {len(rows)} times, not each of them once")
        names = getattr(pl_module, "class_names", None) or getattr(trainer.datamodule, "class_names", None)
        self._write(rows, trainer.datamodule, names)
        print(f"predictions for {len(rows)} images written to {self.path}")

    def _write(
        self, rows: list[tuple[int, list[int], list[float]]], datamodule: Any, names: Sequence[str] | None
    ) -> None:
        files = datamodule.image_files("predict") if hasattr(datamodule, "image_files") else None
        top_k = len(rows[0][1]) if rows else 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header(top_k))
            for index, labels, confidences in rows:
                ranked = [
                    (label, names[label] if names is not None else label, f"{confidence:.6f}")
                    for label, confidence in zip(labels, confidences, strict=True)
                ]
                file = files[index] if files is not None else ""
                writer.writerow([index, file, *(cell for prediction in ranked for cell in prediction)])
