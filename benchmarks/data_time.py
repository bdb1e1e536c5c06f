"""Seconds per epoch of the VTAB-1k training loader with and without the in-memory image cache.

Writes a generated 1,000-image task in the VTAB-1k layout (JPEGs of --source-size pixels; real VTAB-1k images
range from 32 px to several hundred), then times full passes over the training loader of
``VTAB1kDataModule(cache_images=True)`` and ``(cache_images=False)``. Epochs of the two are interleaved, in
alternating order, and repeated, so drift in a noisy machine's speed hits both alike; the table gives median,
min and max, and the ratio of the medians. The one-off cost of building the cache is reported separately.

    python benchmarks/data_time.py                      # 3 repeats, 2 workers, 224 px
    python benchmarks/data_time.py --num-workers 0 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from lily_lightning.data import VTAB1kDataModule, write_synthetic_vtab_task


def epoch_seconds(loader: DataLoader) -> float:
    start = time.perf_counter()
    for images, _ in loader:
        images.sum()  # touch the batch, as a training step would
    return time.perf_counter() - start


def run(args: argparse.Namespace, root: Path) -> None:
    console = Console()
    start = time.perf_counter()
    write_synthetic_vtab_task(
        root,
        "bench",
        10,
        n_train800=800,
        n_val200=200,
        n_test=1,
        image_size=args.source_size,
        image_format="jpg",
    )
    console.print(f"Wrote 1,000 {args.source_size} px JPEGs in {time.perf_counter() - start:.1f} s.")

    loaders, build_seconds = {}, 0.0
    for cached in (True, False):
        dm = VTAB1kDataModule(
            str(root),
            "bench",
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            image_size=args.image_size,
            cache_images=cached,
        )
        start = time.perf_counter()
        dm.setup("fit")
        if cached:
            build_seconds = time.perf_counter() - start
            cache_mb = dm.dataset("train").images.numel() / 2**20
        loaders["cached" if cached else "decoded"] = dm.train_dataloader()
    for loader in loaders.values():  # warm-up epoch: starts the persistent workers
        epoch_seconds(loader)

    times: dict[str, list[float]] = {name: [] for name in loaders}
    for repeat in range(args.repeats):
        order = list(loaders) if repeat % 2 == 0 else list(reversed(loaders))
        for name in order:
            times[name].append(epoch_seconds(loaders[name]))

    table = Table(title=f"VTAB-1k train loader, 1,000 images, {args.image_size} px, seconds per epoch")
    for column in ("loader", "median", "min", "max", "images/s"):
        table.add_column(column, justify="left" if column == "loader" else "right")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        table.add_row(
            name, f"{median:.2f}", f"{min(seconds):.2f}", f"{max(seconds):.2f}", f"{1000 / median:.0f}"
        )
    console.print(table)
    ratio = statistics.median(times["decoded"]) / statistics.median(times["cached"])
    console.print(
        f"decoded / cached = {ratio:.1f}x per epoch. Cache built once in {build_seconds:.1f} s, "
        f"{cache_mb:.0f} MB. {args.repeats} interleaved repeats, batch {args.batch_size}, "
        f"{args.num_workers} workers, {os.cpu_count()} CPUs, torch {torch.__version__}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per loader (default 3)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (default 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size (default 64)")
    parser.add_argument("--image-size", type=int, default=224, help="model input side (default 224)")
    parser.add_argument("--source-size", type=int, default=384, help="generated JPEG side (default 384)")
    parser.add_argument(
        "--root", type=Path, default=None, help="where to write the task (default: a temp dir)"
    )
    args = parser.parse_args()
    if args.root is not None:
        run(args, args.root)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run(args, Path(tmp))


if __name__ == "__main__":
    main()
