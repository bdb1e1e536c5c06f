"""Writes ``predict`` results to a CSV file next to the run's logs."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionCSVWriter(BasePredictionWriter):
    """One row per image of the predict loader: ``index, label, confidence`` (in loader order)."""

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
        if not trainer.is_global_zero or not predictions:
            return
        labels = torch.cat([p["label"] for p in predictions]).tolist()
        confidence = torch.cat([p["confidence"] for p in predictions]).tolist()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "label", "confidence"])
            writer.writerows(
                (i, label, f"{c:.6f}") for i, (label, c) in enumerate(zip(labels, confidence, strict=True))
            )
        print(f"predictions for {len(labels)} images written to {self.path}")
