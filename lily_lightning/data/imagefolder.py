"""Your own images: one folder per class (torchvision's ``ImageFolder`` layout), or CSVs of path,label."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from timm.data import resolve_data_config
from torch import nn
from torch.utils.data import Dataset

from lily_lightning.data.base import Role, SplitDataModule
from lily_lightning.data.discover import (
    SkippedFile,
    describe_skipped,
    drop_undecodable,
    is_image_name,
    relative_posix,
    split_by_name,
    walk_files,
)
from lily_lightning.data.images import ImageListDataset
from lily_lightning.data.records import ImageRecord, describe, missing_images
from lily_lightning.data.transforms import DataConfig, timm_train_transform
from lily_lightning.errors import UsageError
from lily_lightning.files import write_atomically
from lily_lightning.paths import resolve_path, shown_path

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
HELD_OUT: tuple[Role, ...] = ("test", "val")  # drawn from train in this order when their folder is missing
SPLIT_FILE = "split.csv"  # in the run folder: which training-folder image each role got
SPLIT_SETTINGS_FILE = "split_settings.json"  # beside it: the fractions and seed that drew it
NOT_IN_A_CLASS_FOLDER = "not in a class folder"
IMAGE_FOLDER_LAYOUT = """Expected layout (class names: the folder names, sorted as torchvision sorts them):
  <root>/train/<class>/<images>      (any depth below the class folder; .jpg .jpeg .png .bmp .webp .tif ...)
  <root>/val/<class>/...   <root>/test/<class>/...   (optional: drawn from train, stratified, when missing)
For images that are not sorted into class folders: <root>/train.csv (val.csv, test.csv) with rows
'path,label', path relative to <root>, label a class name or a class id (with data.class_names)."""


@dataclass
class ImageFolderScan:
    """What a class-folder tree holds: class names, each split's images, and the files left out."""

    root: Path
    class_names: list[str]
    splits: dict[str, list[ImageRecord]]  # only the splits the tree has: "train", maybe "val", "test"
    sources: dict[str, str]  # split -> "train/" (class folders) or "train.csv"
    skipped: list[SkippedFile] = field(default_factory=list)

    def drop_undecodable(self) -> None:
        """Decode every image once; those that fail move to :attr:`skipped`."""
        for split, records in self.splits.items():
            self.splits[split], bad = drop_undecodable(records)
            self.skipped += bad

    def images_per_class(self, split: str) -> list[int]:
        counts = [0] * len(self.class_names)
        for record in self.splits.get(split, []):
            counts[record.label] += 1
        return counts


def looks_like_image_folders(folder: Path) -> bool:
    return (folder / "train").is_dir() or (folder / "train.csv").is_file()


def class_folders(split_dir: Path) -> list[str]:
    """The class folder names of a split, sorted as torchvision's ``find_classes`` sorts them."""
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


def _folder_split(
    split_dir: Path, classes: Sequence[str], index: Mapping[str, int]
) -> tuple[list[ImageRecord], list[SkippedFile]]:
    records: list[ImageRecord] = []
    loose, skipped = split_by_name(p for p in sorted(split_dir.iterdir()) if p.is_file())
    skipped += [SkippedFile(p, NOT_IN_A_CLASS_FOLDER) for p in loose]
    for name in classes:
        images, not_images = split_by_name(walk_files(split_dir / name))
        records += [ImageRecord(path, index[name], f"{split_dir.name}/{name}") for path in images]
        skipped += not_images
    return records, skipped


def _read_csv_split(csv_file: Path, root: Path) -> tuple[list[tuple[Path, str, str]], list[SkippedFile]]:
    """``[(path, label text, origin)]`` of ``path,label`` rows (a header row is allowed); non-images."""
    rows, skipped = [], []
    for lineno, row in enumerate(csv.reader(io.StringIO(csv_file.read_text())), start=1):
        if not row or (lineno == 1 and [c.strip().lower() for c in row] == ["path", "label"]):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise UsageError(
                f"{csv_file}:{lineno}: expected 'path,label', got {row!r}.\n{IMAGE_FOLDER_LAYOUT}"
            )
        path = root / row[0].strip()  # an absolute path stays absolute
        if is_image_name(path):
            rows.append((path, row[1].strip(), f"{csv_file.name}:{lineno}"))
        else:
            skipped.append(SkippedFile(path, "not an image file"))
    return rows, skipped


def _csv_class_names(labels: Sequence[str], csv_file: Path) -> list[str]:
    """Class ids ``0..max`` when every label is an integer; else the sorted label names."""
    numeric = [label.isdigit() for label in labels]
    if all(numeric):
        return [str(i) for i in range(max(map(int, labels)) + 1)]
    if not any(numeric):
        return sorted(set(labels))
    raise UsageError(
        f"{csv_file} mixes class names and class ids as labels: give data.class_names (the class names in "
        "id order) so that both can be read."
    )


def _resolve_label(label: str, index: Mapping[str, int], origin: str) -> int:
    if label in index:
        return index[label]
    if label.isdigit() and int(label) < len(index):
        return int(label)
    raise UsageError(
        f"{origin}: label {label!r} is neither a class name nor a class id 0..{len(index) - 1}; "
        f"the classes are: {', '.join(list(index)[:20])}{', ...' if len(index) > 20 else ''}."
    )


def _each_file_once(
    splits: Mapping[str, list[ImageRecord]], names: Sequence[str], root: Path
) -> dict[str, list[ImageRecord]]:
    """Each split's records with every real file (links resolved) once; a file in two classes or two splits
    (through a link, or listed twice in CSVs) is a UsageError naming both paths."""
    first: dict[Path, tuple[str, ImageRecord]] = {}
    conflicts: list[str] = []
    once: dict[str, list[ImageRecord]] = {}
    for split, records in splits.items():
        once[split] = []
        for record in records:
            real = record.path.resolve()
            if real not in first:
                first[real] = (split, record)
                once[split].append(record)
                continue
            other_split, other = first[real]
            if (other_split, other.label) != (split, record.label):
                conflicts.append(
                    f"{relative_posix(other.path, root)} ({other_split}, class {names[other.label]}) is also "
                    f"{relative_posix(record.path, root)} ({split}, class {names[record.label]})"
                    + (f", both {real}" if real not in (other.path, record.path) else "")
                )
    if conflicts:
        raise UsageError(
            f"{root}: {len(conflicts)} image file{'s are' if len(conflicts) > 1 else ' is'} in two classes "
            f"or two splits (links, or CSV rows, that lead to one file): {'; '.join(conflicts[:5])}"
            f"{'; ...' if len(conflicts) > 5 else ''}. A file must be in one class of one split, or it is "
            "learnt under two labels, or tested on after training on it: remove the link or row that puts "
            "it in the second place."
        )
    return once


def scan_image_folders(root: str | Path, class_names: Sequence[str] | None = None) -> ImageFolderScan:
    """List a class-folder (or CSV) tree: class names from ``train``, every split's image files, and the files
    that are not images. Nothing is decoded here (:meth:`ImageFolderScan.drop_undecodable` does that).

    A UsageError says what is wrong: no ``train``, a split given both as a folder and a CSV, a class folder
    of val/test that train lacks, a training class without images, a CSV row or label that cannot be read.
    """
    root = resolve_path(root)
    if not root.is_dir():
        raise UsageError(f"image folder root {shown_path(root)} does not exist.\n{IMAGE_FOLDER_LAYOUT}")
    if not looks_like_image_folders(root):
        contents = ", ".join(sorted(p.name for p in root.iterdir())[:20]) or "nothing"
        raise UsageError(
            f"no train/ folder or train.csv in {root} (it holds: {contents}).\n{IMAGE_FOLDER_LAYOUT}"
        )
    sources: dict[str, str] = {}
    for split in SPLITS:
        folder, table = (root / split).is_dir(), (root / f"{split}.csv").is_file()
        if folder and table:
            raise UsageError(
                f"{root} has both {split}/ and {split}.csv: keep one of them for the {split} split."
            )
        if folder or table:
            sources[split] = f"{split}/" if folder else f"{split}.csv"

    csv_rows: dict[str, list[tuple[Path, str, str]]] = {}
    skipped: list[SkippedFile] = []
    for split, source in sources.items():
        if source.endswith(".csv"):
            csv_rows[split], not_images = _read_csv_split(root / source, root)
            skipped += not_images
    if class_names is not None:
        names = list(class_names)
    elif sources["train"] == "train/":
        names = class_folders(root / "train")
    else:
        names = _csv_class_names([label for _, label, _ in csv_rows["train"]], root / "train.csv")
    if len(names) < 2 or len(set(names)) != len(names):
        raise UsageError(f"{root}: need at least 2 distinct classes, got {names}.\n{IMAGE_FOLDER_LAYOUT}")
    index = {name: i for i, name in enumerate(names)}

    splits: dict[str, list[ImageRecord]] = {}
    for split, source in sources.items():
        if split in csv_rows:
            splits[split] = [ImageRecord(path, _resolve_label(label, index, origin), origin)
                             for path, label, origin in csv_rows[split]]  # fmt: skip
            absent = missing_images(splits[split])
            if absent:
                raise UsageError(f"{describe(absent, f'{source}: images listed but not found')}")
            continue
        folders = class_folders(root / split)
        unknown = [name for name in folders if name not in index]
        if unknown:
            raise UsageError(
                f"{root / split} has class folders that are not classes of the training set: "
                f"{', '.join(unknown)}. Training classes: {', '.join(names)}."
            )
        splits[split], not_images = _folder_split(root / split, folders, index)
        skipped += not_images
    scan = ImageFolderScan(root, names, _each_file_once(splits, names, root), sources, skipped)
    empty = [name for name, count in zip(names, scan.images_per_class("train"), strict=True) if count == 0]
    if empty:
        raise UsageError(
            f"{root / sources['train']}: no training image for class{'es' if len(empty) > 1 else ''} "
            f"{', '.join(empty)}. Add images, or remove the class."
        )
    return scan


def stratified_split(
    records: Sequence[ImageRecord], fractions: Mapping[str, float], seed: int
) -> dict[str, list[ImageRecord]]:
    """Share ``records`` out into ``"train"`` and the roles of ``fractions``, class by class.

    Each class gives each role ``int(n * fraction + 0.5)`` of its n images (rounded half up), drawn in
    order from one permutation of the class's images (sorted by path first, so the listing order does not
    matter) by ``numpy.random.default_rng(seed)``; a class always keeps at least one training image (the
    last role's share shrinks first). Each role's records come back sorted by path.
    """
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[ImageRecord]] = {}
    for record in sorted(records, key=lambda r: r.path):
        by_class.setdefault(record.label, []).append(record)
    shares: dict[str, list[ImageRecord]] = {"train": [], **{role: [] for role in fractions}}
    for label in sorted(by_class):
        members = by_class[label]
        order = rng.permutation(len(members))
        counts = {role: int(len(members) * fraction + 0.5) for role, fraction in fractions.items()}
        for role in reversed(list(counts)):
            counts[role] -= min(counts[role], max(0, sum(counts.values()) - (len(members) - 1)))
        start = 0
        for role, count in [*counts.items(), ("train", len(members))]:
            shares[role] += [members[i] for i in order[start : start + count]]
            start += count
    return {role: sorted(share, key=lambda r: r.path) for role, share in shares.items()}


def write_split_file(path: Path, roles: Mapping[str, Sequence[ImageRecord]], scan: ImageFolderScan) -> None:
    """``split,file,class`` rows (``file`` relative to the root) for the images of the training source."""
    train_files = {r.path for r in scan.splits["train"]}
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(("split", "file", "class"))
    for role, records in roles.items():
        for r in records:
            if r.path in train_files:
                writer.writerow((role, relative_posix(r.path, scan.root), scan.class_names[r.label]))
    write_atomically(path, buffer.getvalue().encode())


def read_split_file(path: Path, scan: ImageFolderScan) -> dict[str, list[ImageRecord]]:
    """The roles a split file gave the training source's images; images added since then train."""
    by_file = {relative_posix(r.path, scan.root): r for r in scan.splits["train"]}
    roles: dict[str, list[ImageRecord]] = {"train": [], "val": [], "test": []}
    missing = []
    for row in csv.DictReader(io.StringIO(path.read_text())):
        record = by_file.pop(row["file"], None)
        if record is None:
            missing.append(row["file"])
        else:
            roles[row["split"]].append(record)
    if missing:
        raise UsageError(
            f"{path} assigns {len(missing)} images that {scan.root / scan.sources['train']} no longer has "
            f"(readable), e.g. {', '.join(missing[:3])}. The tree changed since the split was drawn: delete "
            f"{path} to draw a new split (a `test` of this run would then no longer test on held-out images)."
        )
    if by_file:
        log.warning(
            "%d images are new since %s was written: they go to the training set.", len(by_file), path
        )
        roles["train"] = sorted([*roles["train"], *by_file.values()], key=lambda r: r.path)
    return roles


def split_settings_file(split_file: Path) -> Path:
    return split_file.with_name(SPLIT_SETTINGS_FILE)


def check_split_settings(split_file: Path, wanted: Mapping[str, Any]) -> None:
    """Refuse to reuse ``split_file`` when it was drawn with other fractions or another seed than
    ``wanted``; one written before the settings were recorded is reused with a warning."""
    settings_file = split_settings_file(split_file)
    if not settings_file.is_file():
        log.warning(
            "Reusing the split in %s; the fractions and seed it was drawn with were not recorded (an older "
            "version wrote it). Delete it to draw a new one with data.val_fraction, data.test_fraction "
            "and data.split_seed.",
            split_file,
        )
        return
    recorded = json.loads(settings_file.read_text())
    if recorded == dict(wanted):
        log.info("Reusing the split in %s (drawn with the same fractions and seed).", split_file)
        return

    def settings(values: Mapping[str, Any]) -> str:
        fractions = ", ".join(f"data.{role}_fraction {f}" for role, f in values["fractions"].items())
        return f"{fractions or 'no fraction'}, data.split_seed {values['split_seed']}"

    raise UsageError(
        f"{split_file} was drawn with {settings(recorded)}; this run asks for {settings(wanted)}. Reusing it "
        "would not follow the new settings, drawing anew would train on images the old split held out. Pass "
        f"the old values to keep that split, or move {split_file} and {settings_file.name} (and the run's "
        "checkpoints, trained on that split) away to draw a new one, or use another "
        "--trainer.default_root_dir."
    )


class ImageFolderDataModule(SplitDataModule):
    """Your own images, one folder per class: ``root/train/<class>/*`` and optional ``root/val/<class>/*``,
    ``root/test/<class>/*`` (torchvision's ``ImageFolder`` layout), or ``root/train.csv`` of ``path,label``.

    Class names are the training folder names, sorted (torchvision's order); ``num_classes`` follows. A
    missing val or test split is drawn from train: stratified by class, seeded (``split_seed``), and written
    as ``split.csv`` to the run folder (the Trainer's ``default_root_dir``), which later runs there (``test``)
    read back instead of drawing again. Files that are not images (``.DS_Store``, ``notes.txt``) and images
    that do not decode are skipped and counted. Preprocessing comes from timm: the backbone's
    ``resolve_data_config`` (interpolation, crop) at ``image_size``, with ``create_transform``'s training
    augmentation unless ``augment`` is false.

    Args:
        root: the folder holding ``train/`` (and ``val/``, ``test/``) or ``train.csv`` (...).
        class_names: the classes in id order, for CSV labels given as ids (or to fix the order); by default
            the training folder names, or the CSV's label names, sorted.
        val_fraction, test_fraction: the share of each class drawn from train when ``val/`` or ``test/`` is
            missing. With 0, a missing val uses the test split (and a missing test the val split).
        split_seed: seeds the drawn split (not the training).
        augment: random resized crops (50-100 % of the image) and horizontal flips while training.
        batch_size: training batch size. eval_batch_size: validation/test/predict batch size.
        num_workers: DataLoader worker processes.
        image_size: side of the square input images.
        predict_path: ``predict`` these new images (a folder, a file or a glob) instead of the test split.
    """

    def __init__(
        self,
        root: str,
        class_names: list[str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        augment: bool = True,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 4,
        image_size: int = 224,
        predict_path: str | None = None,
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, predict_path)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 <= value < 1:
                raise UsageError(f"data.{name} must be in [0, 1), got {value}.")
        if val_fraction + test_fraction >= 1:
            raise UsageError("data.val_fraction + data.test_fraction must leave images to train on (< 1).")
        self.scan = scan_image_folders(root, class_names)
        self.class_names: list[str] = self.scan.class_names
        self.num_classes: int = len(self.class_names)
        self.task: str = self.scan.root.name
        self.fractions = {
            role: fraction
            for role, fraction in (("test", test_fraction), ("val", val_fraction))
            if role not in self.scan.sources and fraction > 0
        }
        if not any(role in self.scan.sources or role in self.fractions for role in HELD_OUT):
            raise UsageError(
                f"{self.scan.root} has no val/ or test/ and data.val_fraction = data.test_fraction = 0: "
                "nothing is held out to evaluate on. Add a test/ folder or set data.test_fraction."
            )
        self.split_seed = split_seed
        self.augment = augment
        self.image_size = image_size
        self._roles: dict[str, list[ImageRecord]] | None = None

    def role_splits(self) -> dict[Role, tuple[str, ...]]:
        # A held-out role with neither a folder nor a fraction reads the other held-out split.
        def has(role: Role) -> bool:
            return role in self.scan.sources or role in self.fractions

        return {
            "train": ("train",),
            "val": ("val",) if has("val") else ("test",),
            "test": ("test",) if has("test") else ("val",),
        }

    @property
    def data_folder(self) -> Path:
        return self.scan.root

    @property
    def data_config(self) -> DataConfig:
        """The backbone's timm preprocessing (interpolation, crop) at ``image_size``: the backbone is the
        Trainer's model's; outside a Trainer, timm's defaults."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        backbone = getattr(module, "model", None)
        # The input size given as an argument: timm asserts it has a model or arguments to resolve from.
        config = resolve_data_config(
            {"input_size": (3, self.image_size, self.image_size)},
            model=backbone if isinstance(backbone, nn.Module) else None,
        )
        return {
            "input_size": (3, self.image_size, self.image_size),
            "interpolation": config["interpolation"],
            "crop_pct": config["crop_pct"],
            "crop_mode": config["crop_mode"],
        }

    def _run_folder(self) -> Path | None:
        return Path(self.trainer.default_root_dir) if self.trainer is not None else None

    def roles(self) -> dict[str, list[ImageRecord]]:
        """Each role's images (decoded once to skip bad files; the drawn split read back or drawn)."""
        if self._roles is not None:
            return self._roles
        self.scan.drop_undecodable()
        if self.scan.skipped:
            log.warning("%s: %s", self.scan.root, describe_skipped(self.scan.skipped, self.scan.root))
        roles = {split: self.scan.splits[split] for split in self.scan.sources}
        run_folder = self._run_folder()
        split_file = run_folder / SPLIT_FILE if run_folder is not None else None
        if self.fractions:
            wanted = {"fractions": self.fractions, "split_seed": self.split_seed}
            if split_file is not None and split_file.is_file():
                check_split_settings(split_file, wanted)
                drawn = read_split_file(split_file, self.scan)
                roles |= {role: drawn[role] for role in ("train", *self.fractions)}
            else:
                roles |= stratified_split(self.scan.splits["train"], self.fractions, self.split_seed)
                if split_file is not None and self.trainer.is_global_zero:
                    write_split_file(split_file, roles, self.scan)
                    write_atomically(split_settings_file(split_file), json.dumps(wanted).encode())
        where = {role: "drawn from train" for role in self.fractions} | self.scan.sources
        counts = ", ".join(f"{role} {len(records)} ({where[role]})" for role, records in roles.items())
        log.info("Image folders %s: %d classes; %s.", self.scan.root, self.num_classes, counts)
        self._roles = roles
        return roles

    def make_dataset(self, splits: tuple[str, ...], train: bool) -> Dataset:
        (split,) = splits
        records = self.roles()[split]
        if not records:
            raise UsageError(
                f"no {split} images in {self.scan.root} after the split (classes too small for "
                f"data.{split}_fraction?): add images, a {split}/ folder, or raise the fraction."
            )
        augmenting = train and self.augment
        return ImageListDataset(
            records, timm_train_transform(self.data_config) if augmenting else self.eval_transform()
        )
