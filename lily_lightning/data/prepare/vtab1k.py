"""VTAB-1k from TensorFlow Datasets: the benchmark's own task definitions, and the exporter that writes them.

The definitions follow google-research/task_adaptation (`task_adaptation/data/<dataset>.py`, each cited below,
and `scripts/run_all_tasks.sh` for the task variant of each VTAB-1k task): the TFDS dataset and version, the
TFDS slices that become ``train800``, ``val200`` and ``test``, and the label of each example.

This file runs on its own in a venv with only ``tensorflow-cpu`` and ``tensorflow-datasets`` (no torch, no
lily_lightning import): ``python -m lily_lightning prepare vtab1k`` starts it as a worker process with that
venv's interpreter (TensorBoard imports TensorFlow whenever it is installed, so the training venv is better
off without it). TensorFlow is imported only inside :func:`export_tasks`.
"""

from __future__ import annotations

import argparse
import bisect
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPLITS = ("train800", "val200", "test")
FIXED_SIZES = {"train800": 800, "val200": 200}
PROGRESS_EVERY = 5000  # images between progress lines of a long split

SplitRule = Callable[[Mapping[str, int]], dict[str, str]]


def tail_of_train(train_percent: int, test: str = "test") -> SplitRule:
    """val200 is the first 200 of the held-out tail of TFDS ``train`` (cifar.py, caltech.py, svhn.py, ...)."""

    def splits(counts: Mapping[str, int]) -> dict[str, str]:
        start = train_percent * counts["train"] // 100
        return {"train800": "train[:800]", "val200": f"train[{start}:{start + 200}]", "test": test}

    return splits


def validation_split(counts: Mapping[str, int]) -> dict[str, str]:
    """TFDS has a validation split: val200 is its first 200 (dtd.py, sun397.py, dmlab.py, kitti.py, ...)."""
    return {"train800": "train[:800]", "val200": "validation[:200]", "test": "test"}


def train_only(train_percent: int, val_percent: int) -> SplitRule:
    """TFDS has only ``train``: train / val / test are consecutive percentages of it (eurosat.py 60/20/20,
    resisc45.py 60/20/20, dsprites.py 80/10/10); each count is rounded down on its own, as there."""

    def splits(counts: Mapping[str, int]) -> dict[str, str]:
        train = train_percent * counts["train"] // 100
        val = val_percent * counts["train"] // 100
        return {
            "train800": "train[:800]",
            "val200": f"train[{train}:{train + 200}]",
            "test": f"train[{train + val}:]",
        }

    return splits


def smallnorb_splits(counts: Mapping[str, int]) -> dict[str, str]:
    """smallnorb.py: validation is the first half of TFDS ``test``, the VTAB test the second half."""
    return {"train800": "train[:800]", "val200": "test[:200]", "test": "test[50%:]"}


def _bin(value: float, thresholds: Sequence[float]) -> int:
    """The largest i with thresholds[i] < value (VTAB: ``reduce_max(where(thrs - value < 0))``), or -1."""
    return bisect.bisect_left(thresholds, value) - 1


@dataclass(frozen=True)
class ClassLabel:
    """The TFDS class label as it is."""

    key: str = "label"

    def features(self) -> dict[str, Any]:
        return {self.key: True}

    def __call__(self, example: Mapping[str, Any]) -> int:
        return int(example[self.key])


@dataclass(frozen=True)
class Binned:
    """dsprites.py: ``num_classes`` groups of neighbouring values of a ``num_values``-valued label.

    VTAB computes ``floor(value / (num_values / num_classes))`` in float32; for integer values that is exactly
    ``value * num_classes // num_values`` (32 x positions -> 16 bins of 2, 40 orientations -> 16 bins of 2.5).
    """

    key: str
    num_values: int
    num_classes: int = 16

    def features(self) -> dict[str, Any]:
        return {self.key: True}

    def __call__(self, example: Mapping[str, Any]) -> int:
        return int(example[self.key]) * self.num_classes // self.num_values


@dataclass(frozen=True)
class ClevrCount:
    """clevr.py ``count_all``: the number of objects minus 3 (scenes hold 3 to 10 objects: 8 classes)."""

    def features(self) -> dict[str, Any]:
        return {"objects": {"size": True}}

    def __call__(self, example: Mapping[str, Any]) -> int:
        return len(example["objects"]["size"]) - 3


# clevr.py `closest_object_distance`: bins of the smallest depth (pixel_coords[:, 2]) among the objects.
CLEVR_DISTANCE_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)


@dataclass(frozen=True)
class ClevrDistance:
    def features(self) -> dict[str, Any]:
        return {"objects": {"pixel_coords": True}}

    def __call__(self, example: Mapping[str, Any]) -> int:
        depths = example["objects"]["pixel_coords"][:, 2]
        return _bin(float(min(depths)), CLEVR_DISTANCE_THRESHOLDS)


# kitti.py `closest_vehicle_distance`: Car, Van and Truck are TFDS types 0, 1, 2; with no vehicle the distance
# is 1000 m, which lands in the last bin ("no vehicle").
KITTI_VEHICLE_TYPES = 3
KITTI_NO_VEHICLE_DISTANCE = 1000.0
KITTI_DISTANCE_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)


@dataclass(frozen=True)
class KittiVehicleDistance:
    def features(self) -> dict[str, Any]:
        return {"objects": {"type": True, "location": True}}

    def __call__(self, example: Mapping[str, Any]) -> int:
        objects = example["objects"]
        depths = [
            float(location[2])
            for kind, location in zip(objects["type"], objects["location"], strict=True)
            if kind < KITTI_VEHICLE_TYPES
        ]
        return _bin(min([*depths, KITTI_NO_VEHICLE_DISTANCE]), KITTI_DISTANCE_THRESHOLDS)


Label = ClassLabel | Binned | ClevrCount | ClevrDistance | KittiVehicleDistance


@dataclass(frozen=True)
class ManualDownload:
    """A TFDS source that cannot download itself: what to fetch, from where, and what TFDS expects to find."""

    fetch: str  # what to download, and from where
    expects: tuple[str, ...]  # paths under the manual folder that TFDS reads

    def message(self, task: str, manual_dir: Path) -> str:
        missing = [p for p in self.expects if not (manual_dir / p).exists()]
        return (
            f"{task}: needs a manual download. {self.fetch} Put it in {manual_dir} (missing there: "
            f"{', '.join(missing)}), then run the same command again."
        )

    def missing(self, manual_dir: Path) -> bool:
        return not all((manual_dir / p).exists() for p in self.expects)


@dataclass(frozen=True)
class Source:
    """How one VTAB-1k task is made from TFDS. ``dataset`` is the TFDS name, config and version."""

    task: str
    num_classes: int
    dataset: str
    splits: SplitRule
    label: Label = field(default_factory=ClassLabel)
    manual: ManualDownload | None = None
    binary_image: bool = False  # dsprites: 0/1 pixels, scaled to 0/255 as dsprites.py does


_RESISC45 = ManualDownload(
    "Download NWPU-RESISC45.rar (linked from the RESISC45 page, "
    "gcheng-nwpu.github.io/#Datasets, and TFDS's resisc45 catalogue entry) and extract it.",
    ("NWPU-RESISC45",),
)
_RETINOPATHY = ManualDownload(
    "Download the Kaggle competition data (kaggle.com/c/diabetic-retinopathy-detection/data: train.zip.*, "
    "test.zip.*, sample.zip, trainLabels.csv.zip) and unpack train/, test/, sample/ and trainLabels.csv.",
    ("train", "test", "sample", "trainLabels.csv"),
)

SOURCES: dict[str, Source] = {
    s.task: s
    for s in (
        # Natural.
        Source("cifar", 100, "cifar100:3.*.*", tail_of_train(90)),  # cifar.py (num_classes=100)
        Source("caltech101", 102, "caltech101:3.*.*", tail_of_train(90)),  # caltech.py
        Source("dtd", 47, "dtd:3.*.*", validation_split),  # dtd.py
        Source("oxford_flowers102", 102, "oxford_flowers102:2.*.*", validation_split),  # oxford_flowers102.py
        # oxford_iiit_pet.py pins 3.*.*; TFDS 4.9 keeps only 4.0.0 ("add head bounding boxes, fix corrupt
        # images, update dataset URL"), so the slices are taken from 4.0.0.
        Source("oxford_iiit_pet", 37, "oxford_iiit_pet:4.*.*", tail_of_train(80)),  # oxford_iiit_pet.py
        Source("svhn", 10, "svhn_cropped:3.*.*", tail_of_train(90)),  # svhn.py
        Source("sun397", 397, "sun397/tfds:4.*.*", validation_split),  # sun397.py (config "tfds")
        # Specialized.
        Source("patch_camelyon", 2, "patch_camelyon:2.*.*", validation_split),  # patch_camelyon.py
        Source("eurosat", 10, "eurosat/rgb:2.*.*", train_only(60, 20)),  # eurosat.py (subset "rgb")
        Source("resisc45", 45, "resisc45:3.*.*", train_only(60, 20), manual=_RESISC45),  # resisc45.py
        Source(  # diabetic_retinopathy.py (config "btgraham-300", run_all_tasks.sh)
            "diabetic_retinopathy",
            5,
            "diabetic_retinopathy_detection/btgraham-300:3.*.*",
            validation_split,
            manual=_RETINOPATHY,
        ),
        # Structured.
        Source(
            "clevr_count", 8, "clevr:3.*.*", tail_of_train(90, test="validation"), ClevrCount()
        ),  # clevr.py
        Source(
            "clevr_dist", 6, "clevr:3.*.*", tail_of_train(90, test="validation"), ClevrDistance()
        ),  # clevr.py
        Source("dmlab", 6, "dmlab:2.0.1", validation_split),  # dmlab.py
        Source("kitti", 4, "kitti:3.1.0", validation_split, KittiVehicleDistance()),  # kitti.py
        Source(  # dsprites.py (label_x_position, num_classes=16)
            "dsprites_loc",
            16,
            "dsprites:2.*.*",
            train_only(80, 10),
            Binned("label_x_position", 32),
            binary_image=True,
        ),
        Source(  # dsprites.py (label_orientation, num_classes=16)
            "dsprites_ori",
            16,
            "dsprites:2.*.*",
            train_only(80, 10),
            Binned("label_orientation", 40),
            binary_image=True,
        ),
        Source(
            "smallnorb_azi", 18, "smallnorb:2.*.*", smallnorb_splits, ClassLabel("label_azimuth")
        ),  # smallnorb.py
        Source(
            "smallnorb_ele", 9, "smallnorb:2.*.*", smallnorb_splits, ClassLabel("label_elevation")
        ),  # smallnorb.py
    )
}


class ManualDownloadMissing(Exception):
    """The task's TFDS source needs files the user has to download; the message says which."""


def image_suffix(data: bytes) -> str:
    """The file suffix of an encoded image: TFDS stores PNG or JPEG, and the bytes are written as they are."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpg"
    raise ValueError(f"TFDS gave an image that is neither PNG nor JPEG (starts with {data[:8]!r})")


def partial_folder(root: Path, task: str) -> Path:
    """Where a task is written before it gets its name: an interrupted build leaves only this folder."""
    return root / f".{task}.partial"


def _say(line: str) -> None:
    print(line, flush=True)


def _export_split(
    builder: Any, source: Source, tfds_split: str, expected: int, folder: Path, split: str
) -> list[str]:
    """Write one split's images under ``folder/images/<split>/`` and return its list-file lines."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    decoders = None if source.binary_image else {"image": tfds.decode.SkipDecoding()}
    wanted = tfds.decode.PartialDecoding({"image": True, **source.label.features()}, decoders=decoders)
    dataset = builder.as_dataset(split=tfds_split, decoders=wanted, shuffle_files=False).take(expected)
    (folder / "images" / split).mkdir(parents=True, exist_ok=True)
    lines, started = [], time.monotonic()
    for index, example in enumerate(tfds.as_numpy(dataset)):
        label = source.label(example)
        if not 0 <= label < source.num_classes:
            raise ValueError(
                f"{source.task}: example {index} of {tfds_split} has label {label}, outside "
                f"[0, {source.num_classes}); the TFDS data is not what VTAB defines."
            )
        image = example["image"]
        data = tf.io.encode_png(image * 255).numpy() if source.binary_image else image
        relative = f"images/{split}/{index:06d}.{image_suffix(data)}"
        (folder / relative).write_bytes(data)
        lines.append(f"{relative} {label}")
        if (index + 1) % PROGRESS_EVERY == 0:
            _say(f"  {source.task} {split}: {index + 1}/{expected}")
    if len(lines) != expected:
        raise ValueError(f"{source.task}: TFDS {tfds_split} gave {len(lines)} examples, expected {expected}.")
    _say(
        f"  {source.task} {split}: {len(lines)} images from {tfds_split} ({time.monotonic() - started:.0f} s)"
    )
    return lines


def export_task(source: Source, root: Path, tfds_dir: Path) -> Path:
    """Build ``root/<task>`` from TFDS (download and prepare first if needed); returns the task folder."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(source.dataset, data_dir=str(tfds_dir))
    manual_dir = tfds_dir / "downloads" / "manual"  # TFDS's default manual folder under --tfds-dir
    if source.manual is not None and not builder.is_prepared() and source.manual.missing(manual_dir):
        raise ManualDownloadMissing(source.manual.message(source.task, manual_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    counts = {name: info.num_examples for name, info in builder.info.splits.items()}
    tfds_splits = source.splits(counts)
    folder = partial_folder(root, source.task)
    shutil.rmtree(folder, ignore_errors=True)  # what an interrupted build left
    lines = {}
    for split in SPLITS:
        expected = builder.info.splits[tfds_splits[split]].num_examples
        if expected != FIXED_SIZES.get(split, expected):
            raise ValueError(
                f"{source.task}: TFDS {tfds_splits[split]} has {expected} examples, not {FIXED_SIZES[split]}."
            )
        lines[split] = _export_split(builder, source, tfds_splits[split], expected, folder, split)
    lines["train800val200"] = lines["train800"] + lines["val200"]  # the same image files, listed twice
    for split, split_lines in lines.items():
        (folder / f"{split}.txt").write_text("".join(f"{line}\n" for line in split_lines))
    final = root / source.task
    shutil.rmtree(final, ignore_errors=True)
    os.replace(folder, final)
    return final


def export_tasks(tasks: Sequence[str], root: Path, tfds_dir: Path) -> dict[str, str]:
    """Build each task in turn; returns ``{task: "built" | <why not>}``. A failure does not stop the rest."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    outcome = {}
    for number, task in enumerate(tasks, start=1):
        source = SOURCES[task]
        _say(f"[{number}/{len(tasks)}] {task}: {source.dataset}")
        try:
            export_task(source, root, tfds_dir)
            outcome[task] = "built"
        except ManualDownloadMissing as err:
            outcome[task] = str(err)
        except Exception as err:  # reported per task: the other tasks still get built
            outcome[task] = f"{task}: {type(err).__name__}: {err}"
        if outcome[task] != "built":
            _say(f"  not built (the reason is repeated at the end): {outcome[task]}")
    return outcome


NO_TFDS_EXIT = 3  # the exporter's exit code for an interpreter without tensorflow-datasets


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="VTAB-1k exporter (started by `prepare vtab1k`).")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--tfds-dir", type=Path, required=True)
    parser.add_argument("--outcome", type=Path, required=True, help="json file: {task: 'built' or why not}")
    parser.add_argument("tasks", nargs="+", choices=sorted(SOURCES))
    args = parser.parse_args(argv)
    if importlib.util.find_spec("tensorflow_datasets") is None:
        return NO_TFDS_EXIT  # `prepare vtab1k` says what to install
    outcome = export_tasks(args.tasks, args.root, args.tfds_dir)
    args.outcome.write_text(json.dumps(outcome, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
