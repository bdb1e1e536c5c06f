"""Plain progress lines for logs read after the fact (SLURM output, CI, ``| tee``, ``> log``).

Rich's live bar redraws one terminal line; written to a file it shows nothing useful until the run ends.
This prints one self-contained line every ``every_seconds`` (and at each epoch's end), from rank 0 only::

    epoch 2/10 step 12/16 (global 28/160) loss 0.8123 images/s 143.2 elapsed 0:00:25 eta 0:01:58
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar


class PlainProgress(ProgressBar):
    """Periodic plain-text progress on stdout and, when ``log_file`` is given, appended to that file."""

    def __init__(self, every_seconds: float = 10.0, log_file: str | Path | None = None) -> None:
        super().__init__()
        self.every_seconds = every_seconds
        self.log_file = Path(log_file) if log_file is not None else None
        self._enabled = True
        self._logger = logging.getLogger("lily_lightning.progress")
        self._logger.propagate = False  # not through the package's Rich console handler
        self._start = self._last = 0.0
        self._images = 0
        self._steps = 0
        self._batch = 0  # batches done in the current epoch
        self._shown_step = -1  # the global step of the last line, so an epoch's end does not repeat it

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not trainer.is_global_zero or self._logger.handlers:
            return
        handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(self.log_file))
        for handler in handlers:
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
            self._logger.addHandler(handler)
        self._logger.setLevel(logging.INFO)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for handler in list(self._logger.handlers):
            self._logger.removeHandler(handler)
            handler.close()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = time.perf_counter()
        self._images = self._steps = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._steps, self._batch = self._steps + 1, batch_idx + 1
        self._images += len(batch[1]) * trainer.world_size  # every process's share of the global batch
        now = time.perf_counter()
        if self.is_enabled and trainer.is_global_zero and now - self._last >= self.every_seconds:
            self._emit(trainer, outputs, now)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_enabled and trainer.is_global_zero and trainer.global_step != self._shown_step:
            self._emit(trainer, None, time.perf_counter())

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self.is_enabled and trainer.is_global_zero) or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        shown = " ".join(f"{k} {float(v):.4f}" for k, v in metrics.items() if k.startswith("val/"))
        self._logger.info("epoch %d validation %s", trainer.current_epoch + 1, shown)

    def _emit(self, trainer: L.Trainer, outputs: Any, now: float) -> None:
        self._last, self._shown_step = now, trainer.global_step
        elapsed = now - self._start
        total = trainer.estimated_stepping_batches
        remaining = max(0.0, total - trainer.global_step) * elapsed / max(1, self._steps)
        loss = trainer.callback_metrics.get("train/loss")
        if isinstance(outputs, dict) and "loss" in outputs:
            loss = outputs["loss"]
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        self._logger.info(
            "epoch %d%s step %s/%s (global %d/%s) loss %s images/s %.1f elapsed %s eta %s",
            trainer.current_epoch + 1,
            epochs,
            self._batch,
            self.total_train_batches,
            trainer.global_step,
            int(total) if total != float("inf") else "?",
            f"{float(loss):.4f}" if loss is not None else "-",
            self._images / max(elapsed, 1e-9),
            datetime.timedelta(seconds=round(elapsed)),
            datetime.timedelta(seconds=round(remaining)),
        )
