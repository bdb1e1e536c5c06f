"""`prepare vtab1k`: VTAB's label and split rules against hand-computed cases; the whole command on TFDS mock
data (in a TFDS venv: $LILY_TFDS_PYTHON, or this one if it has tensorflow-datasets)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lily_lightning.cli import main
from lily_lightning.data import VTAB_TASKS
from lily_lightning.data.prepare.vtab1k import (
    SOURCES,
    Binned,
    ClassLabel,
    ClevrCount,
    ClevrDistance,
    KittiVehicleDistance,
    image_suffix,
    smallnorb_splits,
    tail_of_train,
    train_only,
    validation_split,
)

SPLITS = ("train800", "val200", "train800val200", "test")


def clevr(depths: list[float]) -> dict:
    return {
        "objects": {"size": np.zeros(len(depths)), "pixel_coords": np.array([[1.0, 2.0, d] for d in depths])}
    }


def test_clevr_count_is_objects_minus_three():
    assert [ClevrCount()(clevr([9.0] * n)) for n in (3, 4, 10)] == [0, 1, 7]


@pytest.mark.parametrize(
    ("depths", "label"),
    [
        ([7.0], 0),
        ([8.0], 0),  # a bin takes its upper edge: label = largest i with threshold[i] < depth
        ([8.01], 1),
        ([8.5], 1),
        ([8.51], 2),
        ([9.25], 3),
        ([10.0], 4),
        ([10.01], 5),
        ([50.0], 5),
        ([12.0, 8.2, 9.9], 1),  # the closest object counts
    ],
)
def test_clevr_distance_bins(depths, label):
    assert ClevrDistance()(clevr(depths)) == label


CAR, VAN, TRUCK, PEDESTRIAN, CYCLIST = 0, 1, 2, 3, 5  # TFDS kitti object types


def kitti(objects: list[tuple[int, float]]) -> dict:
    return {
        "objects": {
            "type": np.array([kind for kind, _ in objects], dtype=np.int64),
            "location": np.array([[0.5, 1.0, z] for _, z in objects], dtype=np.float32).reshape(-1, 3),
        }
    }


@pytest.mark.parametrize(
    ("objects", "label"),
    [
        ([(CAR, 5.0)], 0),
        ([(VAN, 8.0)], 0),
        ([(TRUCK, 8.5)], 1),
        ([(CAR, 20.0)], 1),
        ([(CAR, 20.5)], 2),
        ([(CAR, 60.0), (VAN, 30.0)], 2),  # the closest vehicle
        ([(PEDESTRIAN, 2.0), (CAR, 25.0)], 2),  # people and cyclists are not vehicles
        ([(PEDESTRIAN, 2.0), (CYCLIST, 3.0)], 3),  # "no vehicle"
        ([], 3),
    ],
)
def test_kitti_closest_vehicle_bins(objects, label):
    assert KittiVehicleDistance()(kitti(objects)) == label


@pytest.mark.parametrize(("key", "num_values"), [("label_x_position", 32), ("label_orientation", 40)])
def test_dsprites_16_bins(key, num_values):
    values = np.arange(num_values)
    # dsprites.py's float32 formula: floor(value / (num_values / 16)).
    reference = np.floor(values.astype(np.float32) / np.float32(num_values / 16)).astype(int)
    labels = [Binned(key, num_values)({key: v}) for v in values]
    assert labels == reference.tolist()
    assert labels[:4] == ([0, 0, 1, 1] if num_values == 32 else [0, 0, 0, 1])  # by hand: 3 / 2.5 = 1.2
    assert labels[-1] == 15 and sorted(set(labels)) == list(range(16))


def test_smallnorb_labels_are_the_tfds_attributes():
    example = {"label_azimuth": np.int64(17), "label_elevation": np.int64(8)}
    assert SOURCES["smallnorb_azi"].label(example) == 17
    assert SOURCES["smallnorb_ele"].label(example) == 8
    assert ClassLabel()({"label": np.int64(3)}) == 3


@pytest.mark.parametrize(
    ("rule", "counts", "expected"),
    [  # TFDS split sizes of the real datasets; slices computed by hand from task_adaptation's rules
        (tail_of_train(90), {"train": 50_000}, ("train[:800]", "train[45000:45200]", "test")),  # cifar100
        (tail_of_train(90), {"train": 3_060}, ("train[:800]", "train[2754:2954]", "test")),  # caltech101
        (tail_of_train(80), {"train": 3_680}, ("train[:800]", "train[2944:3144]", "test")),  # pets
        (
            tail_of_train(90, "validation"),
            {"train": 70_000},
            ("train[:800]", "train[63000:63200]", "validation"),
        ),
        (validation_split, {"train": 1_880}, ("train[:800]", "validation[:200]", "test")),  # dtd
        (
            train_only(60, 20),
            {"train": 27_000},
            ("train[:800]", "train[16200:16400]", "train[21600:]"),
        ),  # eurosat
        (
            train_only(60, 20),
            {"train": 31_500},
            ("train[:800]", "train[18900:19100]", "train[25200:]"),
        ),  # resisc
        (train_only(80, 10), {"train": 737_280}, ("train[:800]", "train[589824:590024]", "train[663552:]")),
        (smallnorb_splits, {"train": 24_300, "test": 24_300}, ("train[:800]", "test[:200]", "test[50%:]")),
    ],
)
def test_split_rules(rule, counts, expected):
    assert tuple(rule(counts)[split] for split in ("train800", "val200", "test")) == expected


def test_task_tables_agree():
    assert list(SOURCES) == list(VTAB_TASKS)
    assert {t: s.num_classes for t, s in SOURCES.items()} == {t: v.num_classes for t, v in VTAB_TASKS.items()}


def test_image_suffix_from_the_bytes():
    assert image_suffix(b"\x89PNG\r\n\x1a\n....") == "png"
    assert image_suffix(b"\xff\xd8\xff\xe0..") == "jpg"
    with pytest.raises(ValueError, match="neither PNG nor JPEG"):
        image_suffix(b"GIF89a")


# --- The whole command on TFDS mock data ------------------------------------------------------------------

TESTS = Path(__file__).parent
# Split sizes for each TFDS dataset's metadata: the smallest that hold every slice VTAB takes (train[:800],
# the 200 after the train tail), with small test splits. The mock yields up to 800 examples per slice.
MOCK_SPLITS = {
    **{
        name: {"train": 2000, "test": 9}
        for name in ("cifar100:3.*.*", "caltech101:3.*.*", "svhn_cropped:3.*.*")
    },
    "oxford_iiit_pet:4.*.*": {"train": 1000, "test": 9},
    "clevr:3.*.*": {"train": 2000, "validation": 9, "test": 5},
    **{
        name: {"train": 800, "validation": 200, "test": 9}
        for name in (
            "dtd:3.*.*",
            "oxford_flowers102:2.*.*",
            "sun397/tfds:4.*.*",
            "patch_camelyon:2.*.*",
            "dmlab:2.0.1",
            "kitti:3.1.0",
            "diabetic_retinopathy_detection/btgraham-300:3.*.*",
        )
    },
    "eurosat/rgb:2.*.*": {"train": 800},  # test = train[640:]: 160
    "resisc45:3.*.*": {"train": 800},
    "dsprites:2.*.*": {"train": 1000},  # test = train[900:]: 100
    "smallnorb:2.*.*": {"train": 800, "test": 200},  # test = test[50%:]: 100
}
TIMEOUT_S = 900  # for one exporter run
MOCK_TEST_SIZES = {"eurosat": 160, "resisc45": 160, "dsprites_loc": 100, "dsprites_ori": 100}
MOCK_TEST_SIZES |= {"smallnorb_azi": 100, "smallnorb_ele": 100, "clevr_count": 9, "clevr_dist": 9}


def tfds_python() -> str | None:
    given = os.environ.get("LILY_TFDS_PYTHON")
    if given:
        return given
    return sys.executable if importlib.util.find_spec("tensorflow_datasets") else None


needs_tfds = pytest.mark.skipif(tfds_python() is None, reason="no TFDS venv (set LILY_TFDS_PYTHON)")


class MockTFDS:
    """An interpreter for --tfds-python: runs the exporter on mock data with the metadata in ``splits``."""

    def __init__(self, folder: Path, splits: dict[str, dict[str, int]]):
        self.spec = folder / "spec.json"
        self.python = folder / "python"
        self.tfds_dir = folder / "tfds"
        self.spec.write_text(json.dumps({"metadata_dir": str(folder / "metadata"), "splits": splits}))
        worker = TESTS / "tfds_mock_worker.py"
        # A time limit on the exporter (the command runs it without one); --foreground keeps it in the
        # caller's process group, which the resume test kills.
        limit = f"timeout --foreground {TIMEOUT_S}"
        self.python.write_text(f'#!/bin/sh\nexec {limit} "{tfds_python()}" "{worker}" "{self.spec}" "$@"\n')
        self.python.chmod(0o755)

    def command(self, root: Path, *tasks: str) -> list[str]:
        command = [sys.executable, "-m", "lily_lightning", "prepare", "vtab1k", "--root", str(root)]
        command += ["--tfds-dir", str(self.tfds_dir), "--tfds-python", str(self.python)]
        return command + (["--tasks", *tasks] if tasks else [])

    def run(self, root: Path, *tasks: str) -> tuple[int, str]:
        """The command in this process (the exporter is its subprocess): exit code, what it printed.

        The exporter prints straight to file descriptor 1 (pytest keeps it: shown if a test fails)."""
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = main(self.command(root, *tasks)[3:])
        return code, printed.getvalue()


@pytest.fixture(scope="module")
def mock_build(tmp_path_factory) -> tuple[Path, tuple[int, str]]:
    """All 19 tasks, built once from mock data: the root, and the build's exit code and output."""
    folder = tmp_path_factory.mktemp("mock-tfds")
    root = folder / "vtab-1k"
    return root, MockTFDS(folder, MOCK_SPLITS).run(root)


@needs_tfds
def test_all_19_tasks_pass_data_check(mock_build):
    root, (code, out) = mock_build
    assert code == 0, out
    assert "All 19 checked are complete and readable" in out  # the closing `data check`
    assert not any(p.name.startswith(".") for p in root.iterdir())  # no partial folder left


@needs_tfds
def test_manual_download_task_without_its_file(tmp_path):
    # No TFDS metadata for diabetic_retinopathy: TFDS has not prepared it, and its manual folder is empty.
    splits = {k: v for k, v in MOCK_SPLITS.items() if k.startswith("dtd")}
    mock, root = MockTFDS(tmp_path, splits), tmp_path / "vtab-1k"
    code, out = mock.run(root, "diabetic_retinopathy", "dtd")
    assert code == 1, out
    manual = str(mock.tfds_dir / "downloads" / "manual")
    message = [line for line in out.splitlines() if line.startswith("not built: diabetic_retinopathy")]
    assert len(message) == 1, out
    assert "kaggle.com/c/diabetic-retinopathy-detection" in message[0] and manual in message[0]
    assert "trainLabels.csv" in message[0] and "run the same command again" in message[0]
    assert "1 not built: diabetic_retinopathy" in out
    assert "All 1 checked are complete and readable" in out  # dtd was still built
    assert sorted(p.name for p in root.iterdir()) == ["dtd"]


def read_list(task_dir: Path, split: str) -> list[tuple[str, int]]:
    lines = (task_dir / f"{split}.txt").read_text().splitlines()
    return [(path, int(label)) for path, label in (line.rsplit(" ", 1) for line in lines)]


@needs_tfds
@pytest.mark.parametrize("task", list(VTAB_TASKS))
def test_mock_task_layout(mock_build, task):
    task_dir = mock_build[0] / task
    lists = {split: read_list(task_dir, split) for split in SPLITS}
    sizes = {split: len(records) for split, records in lists.items()}
    test_size = MOCK_TEST_SIZES.get(task, 9)
    assert sizes == {"train800": 800, "val200": 200, "train800val200": 1000, "test": test_size}
    assert lists["train800val200"] == lists["train800"] + lists["val200"]  # the same files, not copies
    for split in ("train800", "val200", "test"):
        paths = [path for path, _ in lists[split]]
        suffix = paths[0].rsplit(".", 1)[1]
        assert paths == [f"images/{split}/{i:06d}.{suffix}" for i in range(len(paths))]
        assert suffix in ("png", "jpg")
        assert sorted(p.name for p in (task_dir / "images" / split).iterdir()) == [
            p.split("/")[-1] for p in paths
        ]
    labels = [label for records in lists.values() for _, label in records]
    assert min(labels) >= 0 and max(labels) < VTAB_TASKS[task].num_classes


@needs_tfds
def test_dsprites_pixels_are_scaled_to_0_255(mock_build):
    task_dir = mock_build[0] / "dsprites_loc"
    path, _ = read_list(task_dir, "train800")[0]
    pixels = np.asarray(Image.open(task_dir / path))
    assert set(np.unique(pixels)) == {0, 255}  # the mock's 0/1 pixels, times 255 as in dsprites.py


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@needs_tfds
def test_killed_build_resumes_to_the_same_tree(tmp_path, mock_build):
    mock = MockTFDS(tmp_path, MOCK_SPLITS)
    root, tasks = tmp_path / "vtab-1k", ("dtd", "clevr_count")
    process = subprocess.Popen(
        mock.command(root, *tasks),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    half_written = root / ".clevr_count.partial" / "images" / "train800"
    deadline = time.monotonic() + 600
    try:
        while not (half_written.is_dir() and len(os.listdir(half_written)) >= 100):
            assert process.poll() is None, "the build ended before it could be interrupted"
            assert time.monotonic() < deadline, "the build never reached clevr_count"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the command and its TFDS worker
        process.wait(timeout=60)
    assert (root / "dtd" / "test.txt").is_file() and not (root / "clevr_count").exists()
    code, out = mock.run(root, *tasks)
    assert code == 0, out
    assert "dtd: complete (data check passes), skipped" in out
    assert sorted(p.name for p in root.iterdir()) == sorted(tasks)  # the partial folder is gone
    for task in tasks:  # equal to the uninterrupted build of the same mock data
        assert tree(root / task) == tree(mock_build[0] / task)
