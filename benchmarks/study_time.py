"""Wall time of one small study with `sweep --parallel 1` and `--parallel 2`, measured in one run.

Writes three generated 4-class tasks in the VTAB-1k layout and a one-epoch config (vit_tiny at 32 px, 16
training images, batch 8), then times the whole command
``sweep --tasks t0 t1 t2 --methods lily lora --seeds 0 1 --parallel P`` (12 runs: fit + test each) in a
fresh runs folder, as a user starts it (its own process: imports, forkserver and all). The two settings
are interleaved in alternating order and repeated, so drift in a noisy machine's speed hits both alike.

    python benchmarks/study_time.py                 # 2 repeats of each
    python benchmarks/study_time.py --repeats 3 --parallel 1 2 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lily_lightning.data import write_synthetic_vtab_task

TASKS = ("t0", "t1", "t2")
CONFIG = """
seed_everything: 0
trainer:
  max_epochs: 1
  accelerator: cpu
  devices: 1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
model:
  backbone: vit_tiny_patch16_224
  pretrained: false
  img_size: 32
  lily: {{rank: 4, num_experts: 2}}
  drop_path_rate: 0.0
  warmup_epochs: 0
data:
  class_path: lily_lightning.data.VTAB1kDataModule
  init_args:
    root: {root}
    name: t0
    batch_size: 8
    eval_batch_size: 16
    num_workers: 0
    image_size: 32
"""


def study_seconds(config: Path, runs: Path, parallel: int) -> float:
    command = [sys.executable, "-m", "lily_lightning", "sweep", "--config", str(config), "--tasks", *TASKS]
    command += ["--methods", "lily", "lora", "--seeds", "0", "1", "--parallel", str(parallel)]
    command += ["--runs-dir", str(runs)]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=3600)
    return time.perf_counter() - start


def run(args: argparse.Namespace, root: Path) -> None:
    for seed, task in enumerate(TASKS):
        write_synthetic_vtab_task(root / "data", task, 4, n_train800=8, n_val200=8, n_test=16, seed=seed)
    config = root / "study.yaml"
    config.write_text(CONFIG.format(root=root / "data"))
    load_before = os.getloadavg()
    start = time.perf_counter()
    times: dict[int, list[float]] = {p: [] for p in args.parallel}
    for repeat in range(args.repeats):
        order = args.parallel if repeat % 2 == 0 else list(reversed(args.parallel))
        for parallel in order:
            seconds = study_seconds(config, root / f"runs_p{parallel}_r{repeat}", parallel)
            times[parallel].append(seconds)
            print(f"repeat {repeat + 1}: --parallel {parallel}: {seconds:.1f} s", flush=True)
    print(f"\n3 tasks x lily, lora x 2 seeds = 12 runs (fit + test), vit_tiny 32 px; {args.repeats} repeats")
    print("| --parallel | median s | min s | max s | runs/min |")
    print("|---:|---:|---:|---:|---:|")
    for parallel, seconds in times.items():
        median, low, high = statistics.median(seconds), min(seconds), max(seconds)
        print(f"| {parallel} | {median:.1f} | {low:.1f} | {high:.1f} | {12 * 60 / median:.1f} |")
    first = statistics.median(times[args.parallel[0]])
    for parallel in args.parallel[1:]:
        ratio = first / statistics.median(times[parallel])
        print(f"--parallel {args.parallel[0]} / --parallel {parallel}: {ratio:.2f}x")
    load_after = os.getloadavg()
    print(
        f"{os.cpu_count()} CPUs; load average {' '.join(f'{x:.1f}' for x in load_before)} at start, "
        f"{' '.join(f'{x:.1f}' for x in load_after)} at end; wall time {time.perf_counter() - start:.0f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed studies per setting (default 2)")
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 2], help="settings (default 1 2)")
    parser.add_argument("--root", type=Path, default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run(args, args.root or Path(tmp))


if __name__ == "__main__":
    main()
