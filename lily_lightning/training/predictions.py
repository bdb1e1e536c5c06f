"""Writes ``predict`` results to one CSV file next to the run's logs, once, from rank 0, in dataset order."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter

HEADER = ("index", "file", "label", "class", "confidence")


class PredictionCSVWriter(BasePredictionWriter):
    """One row per image of the predict set: ``index, file, label, class, confidence``.

    ``index`` is the image's position in the predict set, ``file`` its path relative to the data module's
    ``data_folder`` (the task folder), ``label`` the predicted class id and ``class`` its name when the data
    module has ``class_names`` (else the id again). Under DDP every process predicts its share of each
    batch; the shares are gathered to rank 0, which writes each image once, sorted by index.
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
        self._write(rows, trainer.datamodule)
        print(f"predictions for {len(rows)} images written to {self.path}")

    def _write(self, rows: list[tuple[int, int, float]], datamodule: Any) -> None:
        files = datamodule.image_files("test") if hasattr(datamodule, "image_files") else None
        names = getattr(datamodule, "class_names", None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(HEADER)
            for index, label, confidence in rows:
                file = files[index] if files is not None else ""
                name = names[label] if names is not None else label
                writer.writerow((index, file, label, name, f"{confidence:.6f}"))
