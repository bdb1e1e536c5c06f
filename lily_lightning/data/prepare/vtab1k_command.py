"""``prepare vtab1k``: skip complete tasks, export the others in a TFDS worker process, then check."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lily_lightning.data.prepare import vtab1k
from lily_lightning.data.prepare.common import closing_check, is_complete
from lily_lightning.data.tasks import VTAB_TASKS, vtab_names_help, vtab_task
from lily_lightning.errors import UsageError
from lily_lightning.paths import resolve_path

TFDS_PYTHON_ENV = "LILY_TFDS_PYTHON"
_TFDS_SETUP = (
    "`prepare vtab1k` reads TensorFlow Datasets: it needs tensorflow-datasets and a CPU TensorFlow. Either\n"
    "  python3 -m venv .venv-tfds && .venv-tfds/bin/pip install tensorflow-cpu tensorflow-datasets\n"
    "and add `--tfds-python .venv-tfds/bin/python` (or set LILY_TFDS_PYTHON), or install them here with\n"
    "  pip install -e '.[vtab]'\n"
    "(a separate venv is better: TensorBoard imports TensorFlow in every training run once it is installed)."
)


def resolve_tasks(names: Sequence[str]) -> list[str]:
    """Canonical task names in the order given (``vtab`` = all 19); an unknown name is a UsageError."""
    tasks = []
    for name in names:
        if name == "vtab":
            tasks.extend(VTAB_TASKS)
            continue
        task = vtab_task(name)
        if task is None:
            raise UsageError(f"{name!r} is not a VTAB-1k task. The 19 tasks:\n{vtab_names_help()}")
        tasks.append(task.name)
    return list(dict.fromkeys(tasks))


def tfds_python(given: str | None) -> str:
    """The exporter's interpreter: --tfds-python, $LILY_TFDS_PYTHON, or this one if it has TFDS."""
    chosen = given or os.environ.get(TFDS_PYTHON_ENV)
    if chosen:
        path = resolve_path(chosen)
        if not path.is_file():
            raise UsageError(f"--tfds-python {chosen}: no such interpreter.\n{_TFDS_SETUP}")
        return str(path)
    if importlib.util.find_spec("tensorflow_datasets") is None:
        raise UsageError(
            f"tensorflow-datasets is not installed in this Python ({sys.executable}).\n{_TFDS_SETUP}"
        )
    return sys.executable


def prepare_vtab1k(root: Path, tasks: Sequence[str], tfds_dir: Path, python: str) -> int:
    """Build each task of ``tasks`` not already complete under ``root``; returns the exit code."""
    root.mkdir(parents=True, exist_ok=True)
    todo = []
    for number, task in enumerate(tasks, start=1):
        if is_complete(root, task):
            print(f"[{number}/{len(tasks)}] {task}: complete (data check passes), skipped", flush=True)
        else:
            todo.append(task)
    outcome: dict[str, str] = {}
    if todo:
        with tempfile.TemporaryDirectory() as scratch:
            outcome_file = Path(scratch) / "outcome.json"
            command = [python, vtab1k.__file__, "--root", str(root), "--tfds-dir", str(tfds_dir)]
            command += ["--outcome", str(outcome_file), *todo]
            finished = subprocess.run(command, check=False)  # progress goes straight to the terminal
            if finished.returncode == vtab1k.NO_TFDS_EXIT:
                raise UsageError(
                    f"the TFDS Python {python} has no tensorflow-datasets: install it there "
                    f"({python} -m pip install tensorflow-cpu tensorflow-datasets) or point --tfds-python "
                    f"at another.\n{_TFDS_SETUP}"
                )
            if finished.returncode != 0 or not outcome_file.is_file():
                raise UsageError(
                    f"The TFDS exporter ({python}) stopped with exit code {finished.returncode} (its error "
                    f"is above); finished tasks are kept. Run the same command again to go on.\n{_TFDS_SETUP}"
                )
            outcome = json.loads(outcome_file.read_text())
    not_built = {task: why for task, why in outcome.items() if why != "built"}
    return closing_check(root, [task for task in tasks if task not in not_built], not_built)


def main(argv: Sequence[str] | None = None) -> int:
    """``prepare vtab1k --root R [--tasks ...] [--tfds-dir D] [--tfds-python P]`` (``argv`` after vtab1k)."""
    parser = argparse.ArgumentParser(
        prog="python -m lily_lightning prepare vtab1k",
        description="Build VTAB-1k (NOAH / RepAdapter layout) from TensorFlow Datasets, as the VTAB "
        "benchmark defines its tasks; complete tasks are skipped, so an interrupted build goes on.",
    )
    parser.add_argument("--root", required=True, help="the vtab-1k folder to write, one sub-folder per task")
    parser.add_argument("--tasks", nargs="+", default=["vtab"], help="task names (default: all 19)")
    parser.add_argument(
        "--tfds-dir",
        default=os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"),
        help="TFDS data folder (downloads, prepared datasets; manual downloads go in DIR/downloads/manual); "
        "default $TFDS_DATA_DIR or ~/tensorflow_datasets",
    )
    parser.add_argument(
        "--tfds-python",
        default=None,
        help=f"Python with tensorflow-datasets (default ${TFDS_PYTHON_ENV}, else this one)",
    )
    args = parser.parse_args(argv)
    tasks = resolve_tasks(args.tasks)
    python = tfds_python(args.tfds_python)
    root, tfds_dir = resolve_path(args.root).absolute(), resolve_path(args.tfds_dir).absolute()
    return prepare_vtab1k(root, tasks, tfds_dir, python)
