"""``prepare fgvc``: the VPT layout of the five FGVC datasets, built from their official archives.

Each dataset folder gets its images (extracted once, as they are) and ``{train,val,test}.json`` mapping image
paths to the dataset's own class ids. VPT's json splits, when they lie in ``DOWNLOADS/<folder>/``, are used as
they are; otherwise the official train/test split, with a seeded, class-stratified 10 % of train as val (VPT's
proportion), so that the final protocol (train on train + val) trains on exactly the official train set.
Oxford Flowers ships its own validation split (``setid.mat``), which is used.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import os
import random
import shutil
import tarfile
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from lily_lightning.data.fgvc import FGVC_SPLITS
from lily_lightning.data.prepare.common import closing_check, is_complete
from lily_lightning.data.prepare.vtab1k import partial_folder
from lily_lightning.data.tasks import FGVC_TASKS, FGVCTask, require_fgvc_task
from lily_lightning.errors import UsageError
from lily_lightning.paths import resolve_path

VAL_FRACTION = 0.1  # VPT: 10 % of the official train set is held out as val
Example = tuple[str, int]  # (image path relative to the dataset's image folder, class id)
Splits = dict[str, list[Example]]  # "train", "test", and "val" where the dataset ships one


def _within(name: str, depth: int = 1) -> PurePosixPath:
    """``name`` without its first ``depth`` folders; a path that could leave the folder is refused."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise UsageError(f"archive member {name!r} points outside the folder it is extracted to")
    return PurePosixPath(*path.parts[depth:])


def scan_archive(
    archive: Path, folder: str | None, destination: Path, keep: Sequence[str] = ()
) -> dict[str, bytes]:
    """One pass over a tar archive: the files under ``folder`` (at the top of the archive or one folder down)
    are written below ``destination``, keeping their paths inside ``folder``; the files named in ``keep``
    (small index files, at the same depth as ``folder``) come back as bytes."""
    try:
        kept = _scan_tar(archive, folder, destination, keep)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:  # cut-off or damaged download
        raise UsageError(
            f"{archive} is damaged or cut off ({type(err).__name__}: {err or 'unexpected end of data'}), "
            f"so it cannot be read to its end: download it again ({archive.stat().st_size:,} bytes now), "
            "then rerun the same command (datasets already built are skipped)."
        ) from err
    missing = [name for name in keep if name not in kept]
    if missing:
        raise UsageError(
            f"{archive} has no {', '.join(missing)}: it is not the official archive, or is damaged."
        )
    return kept


def _scan_tar(archive: Path, folder: str | None, destination: Path, keep: Sequence[str]) -> dict[str, bytes]:
    kept: dict[str, bytes] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if not member.isfile() or not parts:
                continue
            depth = 1 if len(parts) > 2 and parts[1] == folder else 0  # one top folder (CUB_200_2011/...)
            if parts[depth] == folder:
                target = destination / _within(member.name, depth + 1)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
            elif len(parts) <= 2 and parts[-1] in keep:
                kept[parts[-1]] = tar.extractfile(member).read()
    return kept


def load_mat(data: bytes | Path) -> dict[str, Any]:
    """A MATLAB file's variables, 1 x N arrays squeezed to N (scipy is needed for the .mat index files)."""
    try:
        from scipy.io import loadmat
    except ImportError as err:
        raise UsageError("Reading the .mat index files needs scipy: pip install -e '.[fgvc]'") from err
    return loadmat(io.BytesIO(data) if isinstance(data, bytes) else data, squeeze_me=True)


def _table(text: bytes) -> dict[str, str]:
    """``<image id> <value>`` lines (CUB and NABirds index files) as a dict."""
    return dict(line.split(maxsplit=1) for line in text.decode().splitlines() if line.strip())


def read_indexed(archive: Path, folder: Path) -> Splits:
    """CUB-200-2011 and NABirds: ``images.txt``, ``image_class_labels.txt`` and ``train_test_split.txt``
    (``<image id> <value>`` per line) beside ``images/`` in the archive's top folder."""
    index = ("images.txt", "image_class_labels.txt", "train_test_split.txt")
    kept = scan_archive(archive, "images", folder / "images", index)
    paths, labels, is_train = (_table(kept[name]) for name in index)
    splits: Splits = {"train": [], "test": []}
    for image_id, path in paths.items():
        splits["train" if is_train[image_id].strip() == "1" else "test"].append((path, int(labels[image_id])))
    return splits


def read_cub(downloads: Path, folder: Path) -> Splits:
    return read_indexed(downloads / "CUB_200_2011.tgz", folder)


def read_nabirds(downloads: Path, folder: Path) -> Splits:
    return read_indexed(downloads / "nabirds.tar.gz", folder)


def read_flowers(downloads: Path, folder: Path) -> Splits:
    """102flowers.tgz (``jpg/image_00001.jpg`` ...), imagelabels.mat (``labels``: class of image i at i-1),
    setid.mat (``trnid``, ``valid``, ``tstid``: 1-based image numbers of the official splits)."""
    scan_archive(downloads / "102flowers.tgz", "jpg", folder / "jpg")
    labels = load_mat(downloads / "imagelabels.mat")["labels"]
    ids = load_mat(downloads / "setid.mat")
    return {
        split: [(f"jpg/image_{int(i):05d}.jpg", int(labels[int(i) - 1])) for i in ids[key]]
        for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid"))
    }


def read_dogs(downloads: Path, folder: Path) -> Splits:
    """images.tar (``Images/<synset>-<breed>/<file>.jpg``), lists.tar (``train_list.mat``, ``test_list.mat``:
    ``file_list`` relative to ``Images/`` and ``labels`` 1..120)."""
    scan_archive(downloads / "images.tar", "Images", folder / "Images")
    lists = scan_archive(downloads / "lists.tar", None, folder, ["train_list.mat", "test_list.mat"])
    splits: Splits = {}
    for split in ("train", "test"):
        mat = load_mat(lists[f"{split}_list.mat"])
        splits[split] = [(str(f), int(c)) for f, c in zip(mat["file_list"], mat["labels"], strict=True)]
    return splits


def _struct_rows(mat: Mapping[str, Any], *fields: str) -> list[tuple[Any, ...]]:
    annotations = mat["annotations"]
    return list(zip(*(annotations[f] for f in fields), strict=True))


def read_cars(downloads: Path, folder: Path) -> Splits:
    """car_ims.tgz (``car_ims/000001.jpg`` ...) and cars_annos.mat (``annotations``: ``relative_im_path``,
    ``class`` 1..196, ``test`` 0/1): the release VPT's json paths (``car_ims/...``) refer to."""
    scan_archive(downloads / "car_ims.tgz", "car_ims", folder / "car_ims")
    splits: Splits = {"train": [], "test": []}
    for path, class_id, test in _struct_rows(
        load_mat(downloads / "cars_annos.mat"), "relative_im_path", "class", "test"
    ):
        splits["test" if int(test) else "train"].append((str(path), int(class_id)))
    return splits


def read_cars_devkit(downloads: Path, folder: Path) -> Splits:
    """cars_train.tgz and cars_test.tgz (``cars_train/00001.jpg`` ...), car_devkit.tgz
    (``devkit/cars_train_annos.mat``: ``fname``, ``class``) and cars_test_annos_withlabels.mat (the test
    labels, published after the devkit)."""
    for split in ("train", "test"):
        scan_archive(downloads / f"cars_{split}.tgz", f"cars_{split}", folder / f"cars_{split}")
    devkit = scan_archive(downloads / "car_devkit.tgz", None, folder, ["cars_train_annos.mat"])
    annotations = {
        "train": load_mat(devkit["cars_train_annos.mat"]),
        "test": load_mat(downloads / "cars_test_annos_withlabels.mat"),
    }
    return {
        split: [(f"cars_{split}/{name}", int(c)) for name, c in _struct_rows(mat, "fname", "class")]
        for split, mat in annotations.items()
    }


@dataclass(frozen=True)
class Release:
    """One way a dataset is shipped: the files (in DOWNLOADS) and how to read them."""

    files: tuple[str, ...]
    read: Callable[[Path, Path], Splits]


@dataclass(frozen=True)
class Source:
    task: str
    page: str  # the official page the archives come from
    releases: tuple[Release, ...]  # the first whose files are all present is used


SOURCES: dict[str, Source] = {
    s.task: s
    for s in (
        Source(
            "cub",
            "https://www.vision.caltech.edu/datasets/cub_200_2011/",
            (Release(("CUB_200_2011.tgz",), read_cub),),
        ),
        Source(
            "nabirds", "https://dl.allaboutbirds.org/nabirds", (Release(("nabirds.tar.gz",), read_nabirds),)
        ),
        Source(
            "oxford_flowers",
            "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
            (Release(("102flowers.tgz", "imagelabels.mat", "setid.mat"), read_flowers),),
        ),
        Source(
            "stanford_dogs",
            "http://vision.stanford.edu/aditya86/ImageNetDogs/",
            (Release(("images.tar", "lists.tar"), read_dogs),),
        ),
        Source(
            "stanford_cars",
            "https://ai.stanford.edu/~jkrause/cars/car_dataset.html",
            (
                Release(("car_ims.tgz", "cars_annos.mat"), read_cars),
                Release(
                    ("cars_train.tgz", "cars_test.tgz", "car_devkit.tgz", "cars_test_annos_withlabels.mat"),
                    read_cars_devkit,
                ),
            ),
        ),
    )
}


def stratified_val(
    train: Sequence[Example], seed: int, fraction: float = VAL_FRACTION
) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of each class (rounded half up: a one-image class keeps its image), chosen by
    a seeded shuffle; returns (train, val), each in the order of ``train``."""
    by_class: dict[int, list[str]] = defaultdict(list)
    for path, class_id in train:
        by_class[class_id].append(path)
    rng = random.Random(seed)
    held_out: set[str] = set()
    for class_id in sorted(by_class):
        paths = sorted(by_class[class_id])
        rng.shuffle(paths)
        held_out.update(paths[: math.floor(len(paths) * fraction + 0.5)])
    return [e for e in train if e[0] not in held_out], [e for e in train if e[0] in held_out]


def vpt_json(downloads: Path, task: FGVCTask) -> Path | None:
    """The folder in DOWNLOADS holding VPT's own {train,val,test}.json for ``task``, if any."""
    for folder in (downloads / task.folder, downloads / task.name):
        if all((folder / f"{split}.json").is_file() for split in FGVC_SPLITS):
            return folder
    return None


def build_dataset(task: FGVCTask, release: Release, downloads: Path, root: Path, seed: int) -> str:
    """Write ``root/<VPT folder>`` (by way of a partial folder); returns a one-line summary."""
    partial = partial_folder(root, task.folder)
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted build left
    splits = release.read(downloads, partial)
    vpt = vpt_json(downloads, task)
    if vpt is not None:
        for split in FGVC_SPLITS:
            shutil.copyfile(vpt / f"{split}.json", partial / f"{split}.json")
        how = f"VPT's json splits from {vpt}"
    else:
        if "val" not in splits:
            official = len(splits["train"])
            splits["train"], splits["val"] = stratified_val(splits["train"], seed)
            how = f"official split, val = {len(splits['val'])} of the {official} train images (seed {seed})"
        else:
            how = "official train / val / test split"
        for split in FGVC_SPLITS:
            (partial / f"{split}.json").write_text(json.dumps(dict(splits[split]), indent=0))
    final = root / task.folder
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    return how


def prepare_fgvc(root: Path, downloads: Path, tasks: Sequence[FGVCTask], seed: int) -> int:
    """Build each dataset of ``tasks`` not already complete under ``root``; returns the exit code."""
    if not downloads.is_dir():
        raise UsageError(f"--from {downloads}: no such folder (it should hold the downloaded archives).")
    root.mkdir(parents=True, exist_ok=True)
    not_built: dict[str, str] = {}
    for number, task in enumerate(tasks, start=1):
        head = f"[{number}/{len(tasks)}] {task.name}"
        if is_complete(root, task.name):
            print(f"{head}: complete (data check passes), skipped", flush=True)
            continue
        source = SOURCES[task.name]
        release = next((r for r in source.releases if all((downloads / f).is_file() for f in r.files)), None)
        if release is None:
            wanted = source.releases[0].files
            absent = [f for f in wanted if not (downloads / f).is_file()]
            not_built[task.name] = f"{task.name}: {', '.join(absent)} not in {downloads}; from {source.page}"
            print(f"{head}: {not_built[task.name]}", flush=True)
            continue
        print(f"{head}: extracting {', '.join(release.files)} into {root / task.folder}", flush=True)
        started = time.monotonic()
        how = build_dataset(task, release, downloads, root, seed)
        print(f"{head}: done in {time.monotonic() - started:.0f} s ({how})", flush=True)
    built = [task.name for task in tasks if task.name not in not_built]
    return closing_check(root, built, not_built)


def main(argv: Sequence[str] | None = None) -> int:
    """``prepare fgvc --root R --from DOWNLOADS [--datasets ...] [--seed N]`` (``argv`` after fgvc)."""
    parser = argparse.ArgumentParser(
        prog="python -m lily_lightning prepare fgvc",
        description="Build the FGVC benchmark (VPT layout) from the five official archives in DOWNLOADS.",
    )
    parser.add_argument("--root", required=True, help="the fgvc folder to write, one sub-folder per dataset")
    parser.add_argument("--from", dest="downloads", required=True, help="folder holding the downloaded files")
    parser.add_argument("--datasets", nargs="+", default=list(FGVC_TASKS), help="default: all five")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified val split (default 0)")
    args = parser.parse_args(argv)
    tasks = list({task.name: task for task in map(require_fgvc_task, args.datasets)}.values())
    return prepare_fgvc(resolve_path(args.root), resolve_path(args.downloads), tasks, args.seed)
