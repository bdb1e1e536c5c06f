"""Decoding images; the two datasets (decode per access, decode once into memory); the batch collate."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from lily_lightning.data.records import ImageRecord
from lily_lightning.errors import UsageError

log = logging.getLogger(__name__)

Sample = tuple[torch.Tensor, int]
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,  # raised instead of warned when warnings are errors (-W error)
)  # what PIL raises for unreadable, truncated, non-image or decompression-bomb-sized files


class UndecodableImage(Exception):
    """An image file that cannot be used; the message says why (without the path)."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. PIL's own ``convert("RGB")`` clips 16-bit grey pixels to 255 (an all-white image), so
    those are scaled here, keeping the top 8 of 16 bits as PIL does itself for 16-bit RGB and grey+alpha PNGs
    (so one 16-bit value decodes alike in every colour type)."""
    if image.mode == "F":
        raise UndecodableImage(
            "floating-point pixels have no fixed range; save the image with 8 or 16 bits per channel"
        )
    if image.mode == "I" or image.mode.startswith("I;16"):
        # "I;16*": 16-bit grey PNG/TIFF. "I": 32-bit integers, which PIL also uses for 16-bit PGMs (scaled to
        # 0..65535) and, in older releases, for 16-bit grey PNGs.
        pixels = np.asarray(image)
        low, high = int(pixels.min()), int(pixels.max())
        if low < 0 or high > 0xFFFF:
            raise UndecodableImage(
                f"integer pixels outside the 16-bit range (values {low}..{high}); save the image with 8 or "
                "16 bits per channel"
            )
        return Image.fromarray((pixels >> 8).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")  # convert() decodes everything, so truncation shows up here


def decode_rgb(path: os.PathLike | str, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image fully as 8-bit RGB: the one test of "is this image readable", for the datasets and
    `data check` alike. Raises UndecodableImage (why) for a damaged, non-image or unsupported file, and for
    one larger than PIL's decompression-bomb limit ``Image.MAX_IMAGE_PIXELS``.

    ``draft_size`` lets JPEGs decode at reduced scale (still reading every byte, so truncation shows).
    """
    try:
        with Image.open(path) as image:
            # PIL refuses more than twice the limit at open but only warns above it, then decodes it all.
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and image.width * image.height > limit:
                raise UndecodableImage(
                    f"{image.width} x {image.height} pixels, more than PIL's decompression-bomb limit of "
                    f"{limit:,} (PIL.Image.MAX_IMAGE_PIXELS; raise it only for images you trust)"
                )
            if draft_size is not None:
                image.draft("RGB", draft_size)
            return _to_rgb(image)
    except _DECODE_ERRORS as err:
        raise UndecodableImage(str(err) or type(err).__name__) from err


def load_rgb(path: os.PathLike | str) -> Image.Image:
    """:func:`decode_rgb`, with an undecodable file as a UsageError that names it."""
    try:
        return decode_rgb(path)
    except UndecodableImage as err:
        raise UsageError(
            f"Cannot decode image {path}: {err}. Replace the file (re-download or re-extract it) or remove "
            "it from the split file (`lily-lightning data check --root ...` lists every such file)."
        ) from err


def decode_threads() -> int:
    # PIL releases the GIL while decoding and resizing, so threads scale without forking a pool.
    return min(8, os.cpu_count() or 1)


def why_undecodable(path: os.PathLike | str) -> str | None:
    """Why the image does not decode as the datasets decode it (:func:`decode_rgb`), or None. JPEGs decode at
    reduced scale yet read every byte, so truncation shows."""
    try:
        decode_rgb(path, draft_size=(64, 64))
    except UndecodableImage as err:
        return str(err)
    return None


def undecodable(paths: Iterable[os.PathLike | str]) -> dict[os.PathLike | str, str]:
    """The files among ``paths`` that do not decode (a damaged download, a text file named .jpg, ...), each
    with the reason."""
    paths = list(paths)
    with ThreadPoolExecutor(decode_threads()) as pool:
        reasons = pool.map(why_undecodable, paths)
        return {path: why for path, why in zip(paths, reasons, strict=True) if why is not None}


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
