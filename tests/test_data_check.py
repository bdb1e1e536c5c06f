"""`data check` on generated good and broken trees."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from lily_lightning.data import FGVC_TASKS, write_synthetic_vtab_task
from lily_lightning.data.check import check_tree, main
from lily_lightning.errors import UsageError


def run_check(root: Path, name: str | None = None) -> tuple[int, str]:
    out = io.StringIO()
    code = check_tree(root, name, console=Console(file=out, width=120))
    return code, out.getvalue()


def rows(output: str) -> dict[str, list[str]]:
    """Table rows by split name (first column)."""
    splits = ("train800", "val200", "train800val200", "test", "train", "val")
    return {
        cells[0]: cells[1:] for line in output.splitlines() if (cells := line.split()) and cells[0] in splits
    }


@pytest.fixture(scope="module")
def full_tree(tmp_path_factory) -> Path:
    """A known task with the real 800/200/1000 training sizes (tiny images) and a small test split."""
    root = tmp_path_factory.mktemp("vtab-1k")
    write_synthetic_vtab_task(root, "eurosat", 10, n_train800=800, n_val200=200, n_test=30, image_size=8)
    return root


def test_good_tree(full_tree):
    code, output = run_check(full_tree)
    assert code == 0, output
    table = rows(output)
    assert table["train800"][:3] == ["800", "800", "0..9"]
    assert table["train800val200"][:2] == ["1000", "1000"]
    assert table["test"][:2] == ["30", "5400"] and table["test"][-1] == "warn"  # shown, not fatal
    assert "VTAB-1k eurosat (specialized, 10 classes)" in output
    assert "All 1 checked are complete and readable" in output


def test_wrong_training_split_size_fails(tmp_path):
    write_synthetic_vtab_task(tmp_path, "eurosat", 10, n_train800=20, n_val200=5, n_test=5, image_size=8)
    code, output = run_check(tmp_path, "eurosat")
    assert code == 1
    assert rows(output)["train800"][-1] == "FAIL"


def test_broken_tree_names_every_problem(tmp_path):
    task_dir = write_synthetic_vtab_task(tmp_path, "mine", 3, n_test=6, image_format="jpg", image_size=48)
    lines = (task_dir / "test.txt").read_text().splitlines()
    missing, truncated, _ = (task_dir / line.split()[0] for line in lines[:3])
    missing.unlink()
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])  # a half-downloaded JPEG
    lines[2] = lines[2].split()[0] + " -1"
    (task_dir / "test.txt").write_text("\n".join(lines) + "\n")
    code, output = run_check(tmp_path)
    assert code == 1
    assert rows(output)["test"] == ["6", "-", "-1..2", "1", "1", "1", "FAIL"]
    assert f"test.txt:1: {missing}" in output
    assert f"test.txt:2: {truncated}" in output and "images that do not decode" in output
    assert "test.txt:3:" in output and "labels out of range" in output
    assert "1 of 1 checked with problems: mine" in output


def test_custom_task_without_optional_split_files(tmp_path):
    task_dir = write_synthetic_vtab_task(tmp_path, "mine", 3, n_train800=6, n_val200=3, n_test=3)
    (task_dir / "train800.txt").unlink()
    (task_dir / "val200.txt").unlink()
    code, output = run_check(tmp_path)
    assert code == 0, output
    assert rows(output)["train800"][-1] == "absent" and rows(output)["train800val200"][0] == "9"


def test_known_task_missing_a_split_file_fails(tmp_path):
    task_dir = write_synthetic_vtab_task(tmp_path, "dtd", 47, n_test=3, image_size=8)
    (task_dir / "val200.txt").unlink()
    code, output = run_check(tmp_path)
    assert code == 1
    assert "val200: Missing split file" in output


def test_every_task_under_root_or_only_the_named_one(tmp_path):
    for name in ("cifar", "kitti", "custom"):
        write_synthetic_vtab_task(tmp_path, name, 4, n_train800=4, n_val200=2, n_test=2, image_size=8)
    (tmp_path / "notes").mkdir()  # not a task: skipped
    _, output = run_check(tmp_path)
    assert "VTAB-1k cifar" in output and "VTAB-1k kitti" in output and "VTAB-1k custom" in output
    _, output = run_check(tmp_path, "cifar100")
    assert "VTAB-1k cifar" in output and "kitti" not in output
    _, output = run_check(tmp_path / "kitti")  # root pointing at one task folder
    assert "VTAB-1k kitti" in output and "cifar" not in output


def write_fgvc(root: Path, name: str) -> Path:
    task = FGVC_TASKS[name]
    folder = root / task.folder
    image = Image.fromarray(np.full((10, 10, 3), 128, np.uint8))
    for split, classes in (("train", range(task.num_classes)), ("val", range(3)), ("test", range(4))):
        mapping = {f"c{k}/{split}{k}.png": k + 1 for k in classes}  # VPT ids start at 1
        for path in mapping:
            (folder / task.image_dir / path).parent.mkdir(parents=True, exist_ok=True)
            image.save(folder / task.image_dir / path)
        (folder / f"{split}.json").write_text(json.dumps(mapping))
    return folder


def test_fgvc_tree(tmp_path):
    folder = write_fgvc(tmp_path, "oxford_flowers")
    code, output = run_check(tmp_path)
    assert code == 0, output
    assert "FGVC oxford_flowers (102 classes)" in output
    assert rows(output)["train"][:3] == ["102", "1020", "1..102"]
    (folder / "c1" / "test1.png").unlink()
    code, output = run_check(tmp_path, "flowers102")
    assert code == 1 and "test: images listed but not found (1)" in output


def test_unusable_arguments(tmp_path, capsys):
    with pytest.raises(UsageError, match=r"Found no VTAB-1k task or FGVC dataset(.|\n)*NOAH(.|\n)*VPT"):
        check_tree(tmp_path)
    with pytest.raises(UsageError, match="Unknown VTAB-1k task 'cifr'"):
        check_tree(tmp_path, "cifr")
    with pytest.raises(UsageError, match=r"No CUB_200_2011/train.json"):
        check_tree(tmp_path, "cub")
    assert main(["--root", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_main_exit_code(full_tree, capsys):
    assert main(["--root", str(full_tree), "--name", "eurosat"]) == 0
    assert "eurosat" in capsys.readouterr().out
