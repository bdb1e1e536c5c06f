"""Loader plumbing shared by the VTAB-1k and FGVC DataModules."""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lily_lightning.data.images import collate_images
from lily_lightning.data.sampling import EpochShuffleSampler, GlobalBatchSampler, process_group
from lily_lightning.errors import UsageError

Role = Literal["train", "val", "test"]

_STAGE_ROLES: dict[str | None, tuple[Role, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
    None: ("train", "val", "test"),
}


class SplitDataModule(L.LightningDataModule, ABC):
    """A DataModule whose train/val/test loaders each read a fixed combination of split files.

    Batches are ``(images, labels)``: float32 ``(B, 3, H, W)`` in [0, 1] (the model normalises) and int64
    ``(B,)``; datasets hold uint8 images, converted a batch at a time by :func:`collate_images`.

    Subclasses say which split files feed each role (:meth:`role_splits`) and build the datasets
    (:meth:`make_dataset`); a dataset is built once, on first use, and shared by roles reading the same files.
    """

    def __init__(self, batch_size: int, eval_batch_size: int, num_workers: int):
        super().__init__()
        for name, value, least in (
            ("batch_size", batch_size, 1),
            ("eval_batch_size", eval_batch_size, 1),
            ("num_workers", num_workers, 0),
        ):
            if value < least:
                raise UsageError(f"data.{name} must be at least {least}, got {value}.")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self._datasets: dict[tuple[tuple[str, ...], bool], Dataset] = {}

    @abstractmethod
    def role_splits(self) -> dict[Role, tuple[str, ...]]:
        """Split names read by each role, e.g. ``{"train": ("train800val200",), "val": ("test",), ...}``."""

    @abstractmethod
    def make_dataset(self, splits: tuple[str, ...], train: bool) -> Dataset:
        """Validate the split files and build their dataset (``train`` selects the training transform)."""

    def dataset(self, role: Role) -> Dataset:
        splits = self.role_splits()[role]
        key = (splits, role == "train")
        if key not in self._datasets:
            self._datasets[key] = self.make_dataset(*key)
        return self._datasets[key]

    def setup(self, stage: str | None = None) -> None:
        # Validate and cache here, in each process before DataLoader workers start: a bad tree fails fast.
        for role in _STAGE_ROLES[stage]:
            self.dataset(role)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        """``batch_size`` images per process and step; under DDP each global batch is shared out."""
        order = EpochShuffleSampler(len(dataset), self._current_epoch) if shuffle else range(len(dataset))
        return DataLoader(
            dataset,
            batch_sampler=GlobalBatchSampler(order, batch_size, drop_last),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=partial(collate_images, dataset=dataset),
        )

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        train = self.dataset("train")
        world = process_group()[1]
        if len(train) < world:
            raise UsageError(f"{len(train)} training images cannot feed {world} processes; use fewer devices")
        # Drop the ragged last batch like the official Lily code, but never all of a small custom train set.
        global_batch = self.batch_size * world
        return self._loader(train, self.batch_size, shuffle=True, drop_last=len(train) >= global_batch)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), self.eval_batch_size, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), self.eval_batch_size, shuffle=False, drop_last=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    @property
    @abstractmethod
    def data_folder(self) -> Path:
        """The folder the split files name images relative to (the task folder)."""

    def image_files(self, role: Role) -> list[str]:
        """The images ``role`` reads, in loader order, as paths relative to :attr:`data_folder`."""
        return [r.path.relative_to(self.data_folder).as_posix() for r in self.dataset(role).records]
