"""The FGVC benchmark (CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs and Cars) in the VPT layout."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

from torch.utils.data import Dataset

from lily_lightning.data.base import Role, SplitDataModule
from lily_lightning.data.images import ImageListDataset
from lily_lightning.data.records import ImageRecord, read_json_split, validate, without_duplicates
from lily_lightning.data.tasks import FGVC_TASKS, FGVCTask, require_fgvc_task
from lily_lightning.data.transforms import (
    DataConfig,
    fgvc_data_config,
    fgvc_eval_transform,
    fgvc_train_transform,
)
from lily_lightning.errors import UsageError
from lily_lightning.paths import resolve_path, shown_path

FGVC_SPLITS: tuple[str, ...] = ("train", "val", "test")
FGVC_SOURCE = (
    "FGVC comes as prepared by VPT: the json splits linked from the VPT repository (github.com/KMnP/vpt, "
    "data preparation notes) copied into each dataset folder, next to the images from the official archives."
)
FGVC_LAYOUT = (
    "Expected layout (json: {'<image path>': <class id>, ...}, paths relative to the image folder):\n"
    + "\n".join(
        f"  <root>/{t.folder}/{{train,val,test}}.json   images under <root>/{t.folder}/{t.image_dir}"
        for t in FGVC_TASKS.values()
    )
    + f"\n{FGVC_SOURCE}"
)

_ROLE_SPLITS: dict[str, dict[Role, tuple[str, ...]]] = {
    # VPT's final protocol: train on train+val, report test.
    "trainval": {"train": ("train", "val"), "val": ("test",), "test": ("test",)},
    "train_val": {"train": ("train",), "val": ("val",), "test": ("test",)},
}


def locate_fgvc_dataset(root: str | Path, task: FGVCTask) -> Path:
    """The dataset folder: ``root/<VPT folder>``, ``root/<name>``, or ``root`` itself if it holds the json."""
    root = resolve_path(root)
    if not root.is_dir():
        raise UsageError(f"FGVC root folder {shown_path(root)} does not exist.\n{FGVC_LAYOUT}")
    for folder in (root / task.folder, root / task.name, root):
        if (folder / "train.json").is_file():
            return folder
    contents = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir())[:20]) or "no folders"
    raise UsageError(
        f"No {task.folder}/train.json for FGVC dataset {task.name!r} under {root} "
        f"({root} contains: {contents}).\n"
        f"{FGVC_LAYOUT}"
    )


def read_fgvc_splits(dataset_dir: Path, task: FGVCTask) -> dict[str, list[ImageRecord]]:
    """All three splits, class ids mapped to 0..num_classes-1 in sorted order, the same way in every split;
    a key repeated in a json file is dropped with a warning, or refused if its class ids differ."""
    return _read_fgvc_splits(dataset_dir, task)[0]


def fgvc_class_names(records: list[ImageRecord], image_root: Path, class_ids: list[int]) -> list[str]:
    """Each class's folder name when the dataset sorts its images into one folder per class (CUB:
    ``001.Black_footed_Albatross``, Stanford Dogs: ``n02085620-Chihuahua``), else the dataset's class id."""
    folders: dict[int, set[str]] = {}
    for r in records:
        parts = r.path.relative_to(image_root).parts
        folders.setdefault(r.label, set()).add(parts[0] if len(parts) > 1 else "")
    names = [next(iter(folders[c])) if len(folders[c]) == 1 else "" for c in class_ids]
    if "" in names or len(set(names)) != len(names):
        return [str(c) for c in class_ids]
    return names


def _read_fgvc_splits(dataset_dir: Path, task: FGVCTask) -> tuple[dict[str, list[ImageRecord]], list[str]]:
    image_root = dataset_dir / task.image_dir
    hint = f"Fix or re-download {dataset_dir}.\n{FGVC_LAYOUT}"
    raw = {
        split: without_duplicates(read_json_split(dataset_dir / f"{split}.json", image_root, hint), hint)
        for split in FGVC_SPLITS
    }
    class_ids = sorted({r.label for records in raw.values() for r in records})
    if len(class_ids) != task.num_classes:
        raise UsageError(
            f"The json splits in {dataset_dir} use {len(class_ids)} distinct class ids, but {task.name} has "
            f"{task.num_classes} classes: the split files are incomplete or belong to another dataset.\n"
            f"{FGVC_SOURCE}"
        )
    contiguous = {class_id: index for index, class_id in enumerate(class_ids)}
    names = fgvc_class_names([r for records in raw.values() for r in records], image_root, class_ids)
    splits = {
        split: [replace(r, label=contiguous[r.label]) for r in records] for split, records in raw.items()
    }
    return splits, names


class FGVCDataModule(SplitDataModule):
    """One FGVC dataset with VPT's splits and transforms (train: resize, random crop, flip; eval: centre
    crop).

    Yields ``(images, labels)`` with images float32 in [0, 1]; ImageNet normalisation, as VPT uses, is applied
    by the model (``model.normalize: imagenet`` in the FGVC configs). Class ids are remapped to
    0..num_classes-1 in sorted order.

    Args:
        root: folder holding the dataset folders (``CUB_200_2011``, ``nabirds``, ``OxfordFlower``,
            ``Stanford-dogs``, ``Stanford-cars``), or one dataset folder itself.
        name: ``cub``, ``nabirds``, ``oxford_flowers``, ``stanford_dogs``, ``stanford_cars`` or an alias.
        split_mode: ``"trainval"`` (VPT's final runs: train on train+val, validate and test on test) or
            ``"train_val"`` (train on train, validate on val, for tuning).
        batch_size: training batch size. eval_batch_size: validation/test/predict batch size.
        num_workers: DataLoader worker processes.
        image_size: crop size; images are first resized to 8/7 of it (256 for 224), as in VPT.
        predict_path: ``predict`` these new images (a folder, a file or a glob) instead of the test split.

    Class names are the datasets' class folder names where they sort images by class (CUB, NABirds,
    Stanford Dogs), else their class ids (read from the json splits on first use).
    """

    def __init__(
        self,
        root: str,
        name: str,
        split_mode: Literal["trainval", "train_val"] = "trainval",
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 4,
        image_size: int = 224,
        predict_path: str | None = None,
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, predict_path)
        if split_mode not in _ROLE_SPLITS:
            raise UsageError(f"split_mode must be one of {', '.join(_ROLE_SPLITS)}, got {split_mode!r}.")
        task = require_fgvc_task(name)
        self.split_mode = split_mode
        self.image_size = image_size
        self.task: str = task.name
        self.num_classes: int = task.num_classes
        self.dataset_dir = locate_fgvc_dataset(root, task)
        self._fgvc_task = task
        self._splits: tuple[dict[str, list[ImageRecord]], list[str]] | None = None

    def role_splits(self) -> dict[Role, tuple[str, ...]]:
        return _ROLE_SPLITS[self.split_mode]

    @property
    def data_folder(self) -> Path:
        return self.dataset_dir

    @property
    def data_config(self) -> DataConfig:
        return fgvc_data_config(self.image_size)

    @property
    def class_names(self) -> list[str]:  # type: ignore[override]
        return self._read()[1]

    def _read(self) -> tuple[dict[str, list[ImageRecord]], list[str]]:
        if self._splits is None:  # all three json files are needed for the class-id mapping
            self._splits = _read_fgvc_splits(self.dataset_dir, self._fgvc_task)
        return self._splits

    def make_dataset(self, splits: tuple[str, ...], train: bool) -> Dataset:
        records = [r for split in splits for r in self._read()[0][split]]
        validate(records, self.num_classes, f"Fix or re-download {self.dataset_dir}.\n{FGVC_SOURCE}")
        transform = fgvc_train_transform if train else fgvc_eval_transform
        return ImageListDataset(records, transform(self.image_size))
