"""Loader plumbing shared by the DataModules (VTAB-1k, FGVC, image folders), and predicting new images."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lily_lightning.data.discover import find_predict_images, relative_posix
from lily_lightning.data.images import ImageListDataset, collate_images
from lily_lightning.data.sampling import EpochShuffleSampler, GlobalBatchSampler, process_group
from lily_lightning.data.transforms import DataConfig, timm_eval_transform
from lily_lightning.errors import UsageError

Role = Literal["train", "val", "test", "predict"]

_STAGE_ROLES: dict[str | None, tuple[Role, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("predict",),
    None: ("train", "val", "test"),
}


class SplitDataModule(L.LightningDataModule, ABC):
    """A DataModule whose train/val/test loaders each read a fixed combination of split files.

    Batches are ``(images, labels)``: float32 ``(B, 3, H, W)`` in [0, 1] (the model normalises) and int64
    ``(B,)``; datasets hold uint8 images, converted a batch at a time by :func:`collate_images`.

    Subclasses say which split files feed each role (:meth:`role_splits`) and build the datasets
    (:meth:`make_dataset`); a dataset is built once, on first use, and shared by roles reading the same files.
    They also say how they preprocess for evaluation, as a timm data config (:attr:`data_config`), and
    name their classes (:attr:`class_names`).

    ``predict`` reads the test split, or with ``predict_path`` new, unlabelled images: a folder (any depth),
    a file or a glob, through the evaluation transform; files that are not readable images are skipped.
    """

    class_names: list[str]

    def __init__(
        self, batch_size: int, eval_batch_size: int, num_workers: int, predict_path: str | None = None
    ):
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
        self.predict_path = predict_path
        self._predict_files: list[str] = []
        self._datasets: dict[tuple[tuple[str, ...], bool], Dataset] = {}

    @abstractmethod
    def role_splits(self) -> dict[Role, tuple[str, ...]]:
        """Split names read by each role, e.g. ``{"train": ("train800val200",), "val": ("test",), ...}``."""

    @abstractmethod
    def make_dataset(self, splits: tuple[str, ...], train: bool) -> Dataset:
        """Validate the split files and build their dataset (``train`` selects the training transform)."""

    @property
    @abstractmethod
    def data_config(self) -> DataConfig:
        """The evaluation preprocessing as a timm data config (``input_size``, ``interpolation``,
        ``crop_pct``, ``crop_mode``): predict, the Python loader and ``export`` rebuild the eval transform
        from it."""

    def eval_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> uint8 ``(3, H, W)``: the eval transform, built by timm from :attr:`data_config`."""
        return timm_eval_transform(self.data_config)

    def dataset(self, role: Role) -> Dataset:
        if role == "predict":
            return self.dataset("test") if self.predict_path is None else self._predict_dataset()
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
        return self._loader(self.dataset("predict"), self.eval_batch_size, shuffle=False, drop_last=False)

    def _predict_dataset(self) -> Dataset:
        key = (("predict_path",), False)
        if key not in self._datasets:
            records, self._predict_files, _ = find_predict_images(str(self.predict_path))
            self._datasets[key] = ImageListDataset(records, self.eval_transform())
        return self._datasets[key]

    @property
    @abstractmethod
    def data_folder(self) -> Path:
        """The folder the split files name images relative to (the task folder)."""

    def image_files(self, role: Role) -> list[str]:
        """The images ``role`` reads, in loader order, as paths relative to :attr:`data_folder` (predicting
        ``predict_path``: relative to that folder, or as its glob matched them)."""
        if role == "predict" and self.predict_path is not None:
            self.dataset(role)
            return self._predict_files
        return [relative_posix(r.path, self.data_folder) for r in self.dataset(role).records]
