"""`data check` on generated good and broken trees."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hand_made_images import GREY, write_bomb, write_png16
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
    # images, expected, labels, bad label, dup, missing, corrupt, status
    assert rows(output)["test"] == ["6", "-", "-1..2", "1", "0", "1", "1", "FAIL"]
    assert f"test.txt:1: {missing}" in output
    assert f"test.txt:2: {truncated}" in output and "images that do not decode" in output
    assert "test.txt:3:" in output and "labels out of range" in output
    assert "1 of 1 checked with problems: mine" in output


def list_lines(task_dir: Path, split: str) -> list[str]:
    return (task_dir / f"{split}.txt").read_text().splitlines()


def relabel(task_dir: Path, split: str, labels: dict[int, int]) -> None:
    """Give line ``n`` (1-based) of a split file label ``labels[n]``."""
    lines = list_lines(task_dir, split)
    for lineno, label in labels.items():
        lines[lineno - 1] = f"{lines[lineno - 1].split()[0]} {label}"
    (task_dir / f"{split}.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's, at open, before ours
def test_images_that_do_not_decode_say_why(tmp_path):
    task_dir = write_synthetic_vtab_task(tmp_path, "mine", 3, n_train800=3, n_val200=3, n_test=6)
    paths = [task_dir / line.split()[0] for line in list_lines(task_dir, "test")]
    write_bomb(paths[0], 20_000)  # beyond twice PIL's default limit: PIL refuses it at open
    write_bomb(paths[1], 10_000)  # between the limit and twice it: PIL only warns, then would decode it all
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(paths[2], format="TIFF")
    write_png16(paths[3], np.full((4, 4, 1), 40_000), GREY)  # readable: 16-bit grey
    code, output = run_check(tmp_path)
    assert code == 1
    assert rows(output)["test"] == ["6", "-", "0..2", "0", "0", "0", "3", "FAIL"]
    assert "test: images that do not decode (3):" in output
    assert f"test.txt:1: {paths[0]} " in output and "(400000000 pixels)" in output
    label = list_lines(task_dir, "test")[1].split()[1]
    limit = "10000 x 10000 pixels, more than PIL's decompression-bomb limit of 89,478,485"
    assert f"test.txt:2: {paths[1]} (label {label}): {limit}" in output
    assert f"test.txt:3: {paths[2]} " in output and "floating-point pixels" in output
    assert f"test.txt:4: {paths[3]}" not in output


def test_duplicate_lines(tmp_path):
    task_dir = write_synthetic_vtab_task(tmp_path, "mine", 3, n_train800=6, n_val200=3, n_test=3)
    train = list_lines(task_dir, "train800val200")
    (task_dir / "train800val200.txt").write_text("\n".join([*train, train[4], train[1]]) + "\n")
    code, output = run_check(tmp_path)
    assert code == 0, output  # repeated lines only: `fit` drops them
    assert rows(output)["train800val200"] == ["9", "-", "0..2", "0", "2", "0", "0", "warn"]
    assert "train800val200: repeated lines (same image and label as an earlier line) (2):" in output
    path, label = train[4].split()
    assert (
        f"train800val200.txt:10: {task_dir / path} (label {label}): first at train800val200.txt:5\n" in output
    )
    assert "train800val200.txt:11:" in output and "first at train800val200.txt:2" in output
    assert "`fit` drops them with a warning and uses each image once (9 images)" in output
    test = list_lines(task_dir, "test")
    path, label = test[0].split()
    other = (int(label) + 1) % 3
    (task_dir / "test.txt").write_text("\n".join([*test, f"{path} {other}"]) + "\n")
    code, output = run_check(tmp_path)
    assert code == 1
    assert rows(output)["test"] == ["3", "-", "0..2", "0", "1", "0", "0", "FAIL"]
    assert "test: images listed again with another label (1):" in output
    assert f"test.txt:4: {task_dir / path} (label {other}): first at test.txt:1 (label {label})\n" in output
    assert "`fit` refuses this split" in output


def test_labels_no_training_image_has(tmp_path, full_tree):
    # A custom task: its classes are whatever the labels say, so an evaluated label never trained on fails.
    task_dir = write_synthetic_vtab_task(tmp_path, "mine", 3, n_train800=6, n_val200=3, n_test=4)
    relabel(task_dir, "test", {2: 5, 4: 4})
    relabel(task_dir, "val200", {1: 3})
    code, output = run_check(tmp_path, "mine")
    assert code == 1
    assert rows(output)["test"] == ["4", "-", "0..5", "2", "0", "0", "0", "FAIL"]
    assert rows(output)["val200"][3:] == ["1", "0", "0", "0", "FAIL"]
    assert "test: labels no train800val200 image has (2):" in output
    assert f"test.txt:2: {task_dir / list_lines(task_dir, 'test')[1].split()[0]} (label 5)" in output
    assert "test.txt:4:" in output and "(label 4)" in output
    assert "val200: labels no train800 image has (1):" in output and "val200.txt:1:" in output
    assert "these classes cannot be learned" in output
    # A published task's split may leave classes out of training: shown, but only as a warning.
    shutil.copytree(full_tree, tmp_path / "published")
    eurosat = tmp_path / "published" / "eurosat"
    for split in ("train800", "val200", "train800val200"):  # class 9 only in test
        lines = list_lines(eurosat, split)
        relabel(eurosat, split, {n: 0 for n, line in enumerate(lines, 1) if line.endswith(" 9")})
    code, output = run_check(eurosat)
    assert code == 0, output
    assert rows(output)["test"][3:] == ["3", "0", "0", "0", "warn"]  # 30 test images: labels 0..9 thrice
    assert "test: labels no train800val200 image has (3):" in output and "a warning only" in output


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
