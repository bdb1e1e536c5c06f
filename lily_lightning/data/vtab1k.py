"""VTAB-1k in the layout of NOAH / RepAdapter / FacT / the official Lily code."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from torch.utils.data import Dataset

from lily_lightning.data.base import Role, SplitDataModule
from lily_lightning.data.images import CachedImageDataset, ImageListDataset
from lily_lightning.data.records import ImageRecord, read_list_file, validate, without_duplicates
from lily_lightning.data.tasks import VTABTask, vtab_names_help, vtab_task
from lily_lightning.data.transforms import DataConfig, vtab_data_config, vtab_transform
from lily_lightning.errors import UsageError
from lily_lightning.paths import CACHE_ENV, default_cache_dir, resolve_path, shown_path

log = logging.getLogger(__name__)

VTAB_SPLITS: tuple[str, ...] = ("train800", "val200", "train800val200", "test")
VTAB_SOURCE = (
    "VTAB-1k comes as prepared by NOAH / RepAdapter: the `vtab-1k` folder from the Google Drive link in "
    "their READMEs (github.com/ZhangYuanhan-AI/NOAH, github.com/luogen1996/RepAdapter)."
)
VTAB_LAYOUT = f"""Expected layout:
  <root>/<task>/train800.txt  val200.txt  train800val200.txt  test.txt
  <root>/<task>/images/...    (each list line: 'images/<split>/<file> <label>', label in [0, num_classes))
{VTAB_SOURCE} Your own data works in the same layout under a new task name."""

SplitMode = Literal["train800val200", "train800_val200"]
_ROLE_SPLITS: dict[str, dict[Role, tuple[str, ...]]] = {
    # The paper protocol: train on all 1,000 images, evaluate on test (as the official code validates).
    "train800val200": {"train": ("train800val200",), "val": ("test",), "test": ("test",)},
    # For tuning hyper-parameters without looking at test.
    "train800_val200": {"train": ("train800",), "val": ("val200",), "test": ("test",)},
}
# The 1,000 images are cached (150 MB at 224 px); test splits (up to 74k images) are decoded per access.
CLASS_NAMES_FILE = "classes.txt"  # optional: one class name per line, line i naming label i
_CACHED_SPLITS = frozenset({"train800", "val200", "train800val200"})


def locate_vtab_task(root: str | Path, name: str) -> tuple[VTABTask | None, Path]:
    """The task (None for a custom one) and its folder under ``root``; a UsageError says what is missing."""
    root = resolve_path(root)
    task = vtab_task(name)
    candidates = list(dict.fromkeys([name, *((task.name, *task.aliases) if task else ())]))
    for candidate in candidates:
        if (root / candidate).is_dir():
            return task, root / candidate
    if root.is_relative_to(default_cache_dir()):  # `cache:` data is written by `prepare demo` alone
        raise UsageError(
            f"task {name!r} is not in {root}, lily_lightning's cache: the demo's data is written there by "
            "`python -m lily_lightning prepare demo` (the digits and the backbone weights; the `demo` "
            f"extra, no internet). Run it first, with the same {CACHE_ENV} if you set one."
        )
    if not root.is_dir():
        raise UsageError(f"VTAB-1k root folder {shown_path(root)} does not exist.\n{VTAB_LAYOUT}")
    contents = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir())[:20]) or "no folders"
    if task is not None:
        raise UsageError(
            f"No folder for VTAB-1k task {task.name!r} under {root} (looked for {', '.join(candidates)}); "
            f"{root} contains: {contents}.\n{VTAB_LAYOUT}"
        )
    raise UsageError(
        f"Unknown VTAB-1k task {name!r}: it is not one of the 19 tasks and {root / name} does not exist "
        f"({root} contains: {contents}).\nThe 19 tasks:\n{vtab_names_help()}\n"
        f"To train on your own images, create {root / name} in the same layout.\n{VTAB_LAYOUT}"
    )


def required_splits(split_mode: SplitMode = "train800val200") -> tuple[str, ...]:
    """The split files a run in ``split_mode`` reads (`fit` needs all of them; `data check` too)."""
    return tuple(sorted({split for splits in _ROLE_SPLITS[split_mode].values() for split in splits}))


def read_vtab_split(task_dir: Path, split: str, hint: str = "") -> list[ImageRecord]:
    """One split's records; a missing, malformed or empty list file is a UsageError (fit and data check)."""
    records = read_list_file(task_dir / f"{split}.txt", task_dir, hint)
    if not records:
        raise UsageError(f"{task_dir / f'{split}.txt'} lists no images.\n{hint}")
    return records


class VTAB1kDataModule(SplitDataModule):
    """One VTAB-1k task: 1,000 training images resized to ``image_size`` squares (bicubic), no augmentation.

    Yields ``(images, labels)`` with images float32 in [0, 1]: normalisation is done by the model, with its
    backbone's pretrained mean/std by default (``model.normalize``).

    Args:
        root: folder holding one sub-folder per task (the ``vtab-1k`` folder of NOAH / RepAdapter).
        name: one of the 19 task names or an alias (``cifar100``, ``oxford_pet``, ...), or the folder name of
            your own task in the same layout.
        split_mode: ``"train800val200"`` (paper protocol: train on all 1,000, validate and test on
            ``test``) or ``"train800_val200"`` (train on 800, validate on 200, for tuning; test on ``test``).
        num_classes: only for your own tasks; inferred from the largest label in the list files when omitted.
        batch_size: training batch size. eval_batch_size: validation/test/predict batch size.
        num_workers: DataLoader worker processes.
        image_size: side of the square input images.
        cache_images: decode the 1,000 training (and val200) images once into memory, as uint8 tensors,
            instead of decoding them again every epoch. Test images are never cached.
        predict_path: ``predict`` these new images (a folder, a file or a glob) instead of the test split.

    Class names are the label ids (``"0"``, ``"1"``, ...: the VTAB-1k folders carry none), unless the task
    folder has a ``classes.txt`` with one name per line, line i naming label i.
    """

    def __init__(
        self,
        root: str,
        name: str,
        split_mode: SplitMode = "train800val200",
        num_classes: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 4,
        image_size: int = 224,
        cache_images: bool = True,
        predict_path: str | None = None,
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, predict_path)
        if split_mode not in _ROLE_SPLITS:
            raise UsageError(f"split_mode must be one of {', '.join(_ROLE_SPLITS)}, got {split_mode!r}.")
        self.split_mode = split_mode
        self.image_size = image_size
        self.cache_images = cache_images
        known, self.task_dir = locate_vtab_task(root, name)
        self.task: str = known.name if known else self.task_dir.name
        self.group: str | None = known.group if known else None
        self.given_num_classes = num_classes
        self._split_records: dict[str, list[ImageRecord]] = {}
        self.num_classes: int = self._num_classes(known, num_classes)
        self.class_names: list[str] = self._class_names()

    def _class_names(self) -> list[str]:
        names_file = self.task_dir / CLASS_NAMES_FILE
        if not names_file.is_file():
            return [str(label) for label in range(self.num_classes)]
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if len(names) != self.num_classes:
            raise UsageError(
                f"{names_file} names {len(names)} classes, but the task has {self.num_classes}: give one "
                "name per line for every label 0..num_classes-1 (or delete the file: classes are then ids)."
            )
        return names

    def _num_classes(self, known: VTABTask | None, given: int | None) -> int:
        if given is not None and given < 1:
            raise UsageError(f"num_classes must be positive, got {given}.")
        if known is not None:
            if given is not None and given != known.num_classes:
                raise UsageError(
                    f"VTAB-1k task {known.name!r} has {known.num_classes} classes, but num_classes={given} "
                    "was given. Leave num_classes unset for the 19 VTAB-1k tasks."
                )
            return known.num_classes
        if given is not None:
            return given
        # A custom task: the list files are cheap to read, the images are not touched here. The count comes
        # from the splits fit reads (train and val): a tuning run (train800_val200) never reads the test
        # list, so hyper-parameter selection neither looks at test labels nor needs the list.
        roles = _ROLE_SPLITS[self.split_mode]
        splits = tuple(dict.fromkeys(roles["train"] + roles["val"]))
        labels = sorted({r.label for r in self._records(splits)})
        inferred = labels[-1] + 1
        files = ", ".join(f"{s}.txt" for s in splits)
        shown = ", ".join(map(str, labels[:20])) + (", ..." if len(labels) > 20 else "")
        if labels != list(range(inferred)):
            # A typo ("9" for "3") would otherwise silently add empty classes to the head.
            log.warning(
                "Custom task %r: num_classes=%d inferred from the largest label in %s, but the labels seen "
                "are not 0..%d: %s (%d distinct). Fix the list files, or pass data.num_classes to confirm.",
                self.task,
                inferred,
                files,
                inferred - 1,
                shown,
                len(labels),
            )
        else:
            log.info(
                "Custom task %r: num_classes=%d inferred from the largest label in %s (labels seen: %s). "
                "Pass data.num_classes to set it explicitly.",
                self.task,
                inferred,
                files,
                shown,
            )
        return inferred

    def _hint(self) -> str:
        return f"Fix or re-download the task folder {self.task_dir}.\n{VTAB_LAYOUT}"

    def _records(self, splits: tuple[str, ...]) -> list[ImageRecord]:
        return [record for split in splits for record in self._split(split)]

    def _split(self, split: str) -> list[ImageRecord]:
        """One split file's records, read once: a repeated line is dropped with a warning, an image listed
        with two labels is refused."""
        if split not in self._split_records:
            records = read_vtab_split(self.task_dir, split, self._hint())
            self._split_records[split] = without_duplicates(records, self._hint())
        return self._split_records[split]

    def role_splits(self) -> dict[Role, tuple[str, ...]]:
        return _ROLE_SPLITS[self.split_mode]

    @property
    def data_folder(self) -> Path:
        return self.task_dir

    @property
    def data_config(self) -> DataConfig:
        return vtab_data_config(self.image_size)

    def make_dataset(self, splits: tuple[str, ...], train: bool) -> Dataset:
        records = self._records(splits)
        label_hint = None
        if self.given_num_classes is not None:
            label_hint = (
                f"data.num_classes={self.given_num_classes} was given for the custom task {self.task!r}: set "
                "it to cover every label, or leave it out to infer it from the labels."
            )
        validate(records, self.num_classes, self._hint(), label_hint)
        transform = vtab_transform(self.image_size)
        if self.cache_images and _CACHED_SPLITS.issuperset(splits):
            return CachedImageDataset(records, transform, f"{self.task}/{'+'.join(splits)}")
        return ImageListDataset(records, transform)
