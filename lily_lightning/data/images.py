"""Decoding images; the two datasets (decode per access, decode once into memory); the batch collate."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from lily_lightning.data.records import ImageRecord
from lily_lightning.errors import UsageError

log = logging.getLogger(__name__)

Sample = tuple[torch.Tensor, int]
DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
)  # what PIL raises for unreadable, truncated or non-image files


def load_rgb(path: os.PathLike | str) -> Image.Image:
    """Decode an image fully as RGB; a damaged or non-image file is a UsageError that names it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() decodes everything, so truncation shows up here
    except DECODE_ERRORS as err:
        raise UsageError(
            f"Cannot decode image {path}: {err}. The file is damaged or not an image; re-download or "
            "re-extract it (`lily-lightning data check --root ...` lists every such file)."
        ) from err


def decode_threads() -> int:
    # PIL releases the GIL while decoding and resizing, so threads scale without forking a pool.
    return min(8, os.cpu_count() or 1)


def decodes(path: os.PathLike | str) -> bool:
    """True if the image decodes. JPEGs decode at reduced scale yet read every byte, so truncation shows."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (64, 64))
            image.load()
    except DECODE_ERRORS:
        return False
    return True


def undecodable(paths: Iterable[os.PathLike | str]) -> set[os.PathLike | str]:
    """The files among ``paths`` that do not decode (a damaged download, a text file named .jpg, ...)."""
    paths = list(paths)
    with ThreadPoolExecutor(decode_threads()) as pool:
        return {path for path, ok in zip(paths, pool.map(decodes, paths), strict=True) if not ok}


def collate_images(
    batch: Sequence[Sample], dataset: Dataset[Sample] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack uint8 samples and convert once per batch: float32 ``(B, 3, H, W)`` in [0, 1], int64 labels.

    An empty ``batch`` (a process's share of a ragged last batch under DDP, see ``GlobalBatchSampler``)
    becomes a zero-size batch shaped like ``dataset``'s images, so the model still runs (and joins its
    collectives).
    """
    if not batch and dataset is not None:
        return torch.zeros((0, *dataset[0][0].shape)), torch.zeros(0, dtype=torch.int64)
    images, labels = default_collate(batch)
    return images.float().div_(255), labels


class ImageListDataset(Dataset[Sample]):
    """Decodes and transforms the image on every access: ``(uint8 tensor (3, H, W), label)``."""

    def __init__(self, records: Sequence[ImageRecord], transform: Callable[[Image.Image], torch.Tensor]):
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        return self.transform(load_rgb(record.path)), record.label


class CachedImageDataset(Dataset[Sample]):
    """Decodes and transforms every image once, into one uint8 tensor ``(N, 3, H, W)``; items are those of
    ``ImageListDataset(records, transform)``, so ``transform`` must be deterministic (no augmentation).

    Built in the process that calls ``setup()`` (each DDP rank builds its own); DataLoader workers forked
    afterwards share the tensor copy-on-write, spawned ones receive it through shared memory.
    """

    def __init__(
        self, records: Sequence[ImageRecord], transform: Callable[[Image.Image], torch.Tensor], what: str
    ):
        self.records = list(records)
        self.labels = [r.label for r in self.records]
        start = time.perf_counter()
        log.info("Decoding %d %s images into memory (once, reused every epoch)...", len(self.records), what)
        with ThreadPoolExecutor(decode_threads()) as pool:
            decoded = pool.map(lambda record: transform(load_rgb(record.path)), self.records)
            self.images = torch.stack(list(decoded))
        log.info(
            "Decoded %d %s images in %.1f s: %s uint8, %.0f MB in memory.",
            len(self.records),
            what,
            time.perf_counter() - start,
            tuple(self.images.shape),
            self.images.numel() / 2**20,
        )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        return self.images[index], self.labels[index]
