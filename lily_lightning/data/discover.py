"""Finding image files in folders: what `ImageFolderDataModule`, `data check` and ``--data.predict_path``
read, and what they skip (files that are not images, images that do not decode), counted and named."""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from lily_lightning.data.images import undecodable
from lily_lightning.data.records import ImageRecord
from lily_lightning.errors import UsageError
from lily_lightning.paths import resolve_path, shown_path

log = logging.getLogger(__name__)

NOT_AN_IMAGE = "not an image file"
DOES_NOT_DECODE = "does not decode"
_SHOWN = 10  # skipped files named in a log line; the rest are counted


@dataclass(frozen=True)
class SkippedFile:
    """A file a data module left out, and why (``NOT_AN_IMAGE``, ``DOES_NOT_DECODE``, ...)."""

    path: Path
    reason: str


def relative_posix(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder``, with / (``../`` for a file outside it, which a CSV may name)."""
    return Path(os.path.relpath(path, folder)).as_posix()


def is_image_name(path: Path) -> bool:
    """An image by its name: torchvision ``ImageFolder``'s extensions, in any case (``.JPG`` too)."""
    return path.suffix.lower() in IMG_EXTENSIONS


def walk_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` (any depth, following links as torchvision does), sorted; a file reached
    twice (a link beside its target) is listed once, by its first path.

    A linked folder that is one already walked (``dog/loop -> ..``) is refused: os.walk would list the same
    images again and again, down to the OS's limit on link depth.
    """
    walked: dict[Path, Path] = {}  # real folder -> the path it was first walked as
    files: dict[Path, Path] = {}  # real file -> its first path
    for parent, folders, names in os.walk(folder, followlinks=True):
        here = Path(parent).resolve()
        walked.setdefault(here, Path(parent))
        for name in folders:
            link = Path(parent) / name
            target = link.resolve()
            if link.is_symlink() and (target in walked or target in here.parents):
                where = f"walked already as {walked[target]}" if target in walked else "a folder above it"
                raise UsageError(
                    f"{link} links to {target}, {where}: a link loop (or a second way to the same images) "
                    "would list the same images again and again, under other classes too. Remove the link, "
                    "or replace it with a copy of the images it should add."
                )
        for name in names:
            files.setdefault((Path(parent) / name).resolve(), Path(parent) / name)
    return sorted(files.values())


def split_by_name(files: Iterable[Path]) -> tuple[list[Path], list[SkippedFile]]:
    """``(images, skipped)``: files with an image extension, and the rest (``.DS_Store``, ``notes.txt``)."""
    images, skipped = [], []
    for path in files:
        if is_image_name(path):
            images.append(path)
        else:
            skipped.append(SkippedFile(path, NOT_AN_IMAGE))
    return images, skipped


def drop_undecodable(records: Sequence[ImageRecord]) -> tuple[list[ImageRecord], list[SkippedFile]]:
    """``(readable, skipped)``: each image is decoded once here, so a bad one never reaches a loader."""
    bad = undecodable(r.path for r in records)
    kept = [r for r in records if r.path not in bad]
    return kept, [SkippedFile(r.path, DOES_NOT_DECODE) for r in records if r.path in bad]


def describe_skipped(skipped: Sequence[SkippedFile], relative_to: Path | None = None) -> str:
    """``"skipped 3 files (2 not an image file, 1 does not decode): a.txt (not an image file), ..."``."""
    counts: dict[str, int] = {}
    for file in skipped:
        counts[file.reason] = counts.get(file.reason, 0) + 1

    def shown(path: Path) -> str:
        return path.relative_to(relative_to).as_posix() if relative_to is not None else str(path)

    names = ", ".join(f"{shown(f.path)} ({f.reason})" for f in skipped[:_SHOWN])
    more = f", ... and {len(skipped) - _SHOWN} more" if len(skipped) > _SHOWN else ""
    reasons = ", ".join(f"{count} {reason}" for reason, count in counts.items())
    return f"skipped {len(skipped)} file{'s' if len(skipped) != 1 else ''} ({reasons}): {names}{more}"


def find_predict_images(predict_path: str) -> tuple[list[ImageRecord], list[str], list[SkippedFile]]:
    """The images ``--data.predict_path`` names, readable ones only: a folder (every image under it, any
    depth), one file, or a glob (``photos/*.jpg``, ``new/**/*.png``).

    Returns ``(records, shown names, skipped)``: records carry label -1 (unlabelled); a shown name is the
    path relative to the folder given, or as the glob matched it. Files that are not images, or do not
    decode, are skipped (and logged), never fatal; finding no readable image at all is a UsageError.
    """
    path = resolve_path(predict_path)
    if path.is_dir():
        base: Path | None = path
        files = walk_files(path)
    elif path.is_file():
        base, files = path.parent, [path]
    else:
        matches = sorted(glob.glob(str(path), recursive=True))
        if not matches:
            raise UsageError(
                f"data.predict_path {shown_path(path)} is no folder or file and matches nothing as a glob; "
                "give a folder of images (searched at any depth), an image file, or a pattern like "
                "'photos/**/*.jpg'."
            )
        base = None
        files = sorted({f for m in map(Path, matches) for f in (walk_files(m) if m.is_dir() else [m])})
    images, skipped = split_by_name(files)
    readable, bad = drop_undecodable([ImageRecord(p, -1, "predict_path") for p in images])
    skipped += bad
    if skipped:
        log.warning("data.predict_path %s: %s", predict_path, describe_skipped(skipped, base))
    if not readable:
        raise UsageError(
            f"data.predict_path {shown_path(path)} holds no readable image ({len(files)} files)."
        )
    names = [r.path.relative_to(base).as_posix() if base is not None else str(r.path) for r in readable]
    return readable, names, skipped
