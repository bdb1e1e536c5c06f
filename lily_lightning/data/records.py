"""Split files -> (image path, label) records, and the checks that keep bad trees from training silently."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lily_lightning.errors import UsageError

log = logging.getLogger(__name__)

_SHOWN = 5  # problems listed per error message; the rest are counted


@dataclass(frozen=True)
class ImageRecord:
    """One image of a split; ``origin`` says where it was declared (``"train800.txt:17"``), for messages."""

    path: Path
    label: int
    origin: str


def read_list_file(list_file: Path, image_root: Path, hint: str = "") -> list[ImageRecord]:
    """Read a VTAB-1k list file: one ``<image path relative to image_root> <integer label>`` per line.

    ``hint`` (what to do about it) ends every error message.
    """
    if not list_file.is_file():
        raise UsageError(f"Missing split file {list_file}.\n{hint}")
    records = []
    for lineno, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)  # from the right, so paths with spaces still parse
        origin = f"{list_file.name}:{lineno}"
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise UsageError(
                f"{list_file}:{lineno}: expected '<image path> <integer label>', got {line!r}. "
                f"The file is damaged or not a VTAB-1k list file.\n{hint}"
            )
        records.append(ImageRecord(image_root / parts[0], int(parts[1]), origin))
    return records


class _JsonPairs(list):
    """A json object as its list of ``(key, value)`` pairs."""


def read_json_split(json_file: Path, image_root: Path, hint: str = "") -> list[ImageRecord]:
    """Read a VPT json split: ``{"<image path relative to image_root>": <integer class id>, ...}``.

    ``hint`` (what to do about it) ends every error message.
    """
    if not json_file.is_file():
        raise UsageError(f"Missing split file {json_file}.\n{hint}")
    try:
        # Every key/value pair, in file order: a dict would keep only the last of a repeated key.
        mapping = json.loads(json_file.read_text(), object_pairs_hook=_JsonPairs)
    except json.JSONDecodeError as err:
        raise UsageError(f"{json_file} is not valid json ({err}).\n{hint}") from err
    if not isinstance(mapping, _JsonPairs):
        raise UsageError(
            f"{json_file} must map image paths to class ids, got a {type(mapping).__name__}.\n{hint}"
        )
    records = []
    seen: Counter[str] = Counter()
    for key, label in mapping:
        if not isinstance(label, int) or isinstance(label, bool):
            raise UsageError(f"{json_file}: class id of {key!r} must be an integer, got {label!r}.\n{hint}")
        seen[key] += 1
        again = f" #{seen[key]}" if seen[key] > 1 else ""  # a repeated key: which occurrence
        records.append(ImageRecord(image_root / key, label, f"{json_file.name}[{key!r}]{again}"))
    return records


def missing_images(records: Iterable[ImageRecord]) -> list[ImageRecord]:
    """Records whose image file does not exist (one directory listing per folder, not one stat per image)."""
    listings: dict[Path, set[str]] = {}
    missing = []
    for record in records:
        folder = record.path.parent
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(folder))
            except OSError:
                listings[folder] = set()
        if record.path.name not in listings[folder]:
            missing.append(record)
    return missing


def labels_out_of_range(records: Iterable[ImageRecord], num_classes: int) -> list[ImageRecord]:
    return [r for r in records if not 0 <= r.label < num_classes]


def describe(
    records: Sequence[ImageRecord], what: str, notes: Mapping[ImageRecord, str] | None = None
) -> str:
    """``"<what> (<count>):"`` followed by the first few records, one per line, each with its note if any."""
    notes = notes or {}
    shown = "\n".join(
        f"  {r.origin}: {r.path} (label {r.label})" + (f": {notes[r]}" if r in notes else "")
        for r in records[:_SHOWN]
    )
    more = f"\n  ... and {len(records) - _SHOWN} more" if len(records) > _SHOWN else ""
    return f"{what} ({len(records)}):\n{shown}{more}"


def validate(
    records: Sequence[ImageRecord], num_classes: int, hint: str, label_hint: str | None = None
) -> None:
    """Raise a UsageError when a label is outside [0, num_classes) or an image file is missing.

    ``label_hint`` replaces ``hint`` for bad labels (when num_classes, not the files, may be what is wrong).
    """
    bad = labels_out_of_range(records, num_classes)
    if bad:
        raise UsageError(f"{describe(bad, f'labels outside [0, {num_classes})')}\n{label_hint or hint}")
    absent = missing_images(records)
    if absent:
        raise UsageError(f"{describe(absent, 'images listed but not found')}\n{hint}")


@dataclass(frozen=True)
class Duplicates:
    """Records that name an image an earlier record of the same split file already named, each mapped to
    that earlier record: ``repeated`` with the same label, ``conflicting`` with another one."""

    repeated: dict[ImageRecord, ImageRecord]
    conflicting: dict[ImageRecord, ImageRecord]


def find_duplicates(records: Iterable[ImageRecord]) -> Duplicates:
    first: dict[Path, ImageRecord] = {}
    duplicates = Duplicates({}, {})
    for record in records:
        earlier = first.setdefault(record.path, record)
        if earlier is not record:
            same = earlier.label == record.label
            (duplicates.repeated if same else duplicates.conflicting)[record] = earlier
    return duplicates


def describe_duplicates(duplicates: Mapping[ImageRecord, ImageRecord], what: str) -> str:
    """:func:`describe`, each duplicate with where its image was listed first."""
    notes = {
        r: f"first at {first.origin}" + (f" (label {first.label})" if first.label != r.label else "")
        for r, first in duplicates.items()
    }
    return describe(list(duplicates), what, notes)


def without_duplicates(records: Sequence[ImageRecord], hint: str) -> list[ImageRecord]:
    """The records of one split file with repeated lines dropped (and a warning), so no image counts twice;
    an image listed with two different labels is a UsageError (which label is right is for the user to say).
    """
    duplicates = find_duplicates(records)
    if duplicates.conflicting:
        what = "images listed again with another label"
        raise UsageError(f"{describe_duplicates(duplicates.conflicting, what)}\n{hint}")
    if duplicates.repeated:
        what = "repeated lines dropped (same image and label as an earlier line)"
        log.warning("%s\nEach of these images is used once.", describe_duplicates(duplicates.repeated, what))
    return [r for r in records if r not in duplicates.repeated]
