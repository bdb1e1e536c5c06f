"""The front door: every command listed by --help and naming itself in its own --help; class folders that
count each file once, refuse link loops and a split drawn with other settings; and the user mistakes that
ended in a traceback or an unclear message (issue 24, sections 4-6), each one message with exit code 2."""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import NUM_CLASSES
from PIL import Image
from test_cli import tiny_run_config
from test_imagefolder import backbone_weights, write_config  # noqa: F401 (a fixture)

from lily_lightning import ImageFolderDataModule, UsageError, load_classifier
from lily_lightning.cli import main
from lily_lightning.data.imagefolder import scan_image_folders
from lily_lightning.training.module import ViTClassifier

REPO = Path(__file__).resolve().parents[1]
# Each command as typed, and the words its --help usage line must hold.
COMMANDS = [
    ["fit"],
    ["validate"],
    ["test"],
    ["predict"],
    ["sweep"],
    ["report"],
    ["export"],
    ["prepare", "demo"],
    ["prepare", "vtab1k"],
    ["prepare", "fgvc"],
    ["data", "check"],
]


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``main(args)``'s exit code (argparse's --help exits through SystemExit), stdout and stderr."""
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as stop:
        code = stop.code or 0
    out, err = capsys.readouterr()
    return code, out, err


# -- section 6: the front door -------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["-h"], []])
def test_help_and_no_command_list_every_command_once(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(args, capsys)
    assert code == (0 if args else 2)
    listing = out if args else err
    for command in COMMANDS:
        lines = [line for line in listing.splitlines() if line.split()[: len(command)] == command]
        assert len(lines) == 1, (command, listing)
        assert len(lines[0].split()) > len(command) + 2  # a line that says what it does


@pytest.mark.parametrize("command", [*COMMANDS, ["prepare"], ["data"]], ids=" ".join)
def test_every_command_help_works_and_names_itself(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run([*command, "--help"], capsys)
    assert code == 0
    usage = next(line for line in out.splitlines() if line.startswith("usage:"))
    assert usage.startswith("usage: python -m lily_lightning")
    words = usage.replace("[options]", "").split()
    assert words[4 : 4 + len(command)] == command, usage  # `export`, never `test`
    if command in (["prepare"], ["data"]):  # a group lists its commands
        for sub in (c for c in COMMANDS if c[0] == command[0]):
            assert f"python -m lily_lightning {' '.join(sub)} " in out


def test_unknown_commands_are_one_message(capsys: pytest.CaptureFixture[str]) -> None:
    for args, expected in (
        (["trian"], "unknown command 'trian'"),
        (["prepare", "cifar"], "unknown `prepare`"),
    ):
        code, _, err = run(args, capsys)
        assert code == 2 and expected in err and "Traceback" not in err


# -- section 4: class folders ------------------------------------------------------------------------------


def write_images(folder: Path, count: int, value: int, prefix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = np.full((8, 8, 3), value, dtype=np.uint8)
        pixels[0, 0] = i  # distinct files
        Image.fromarray(pixels).save(folder / f"{prefix}{i}.png")


def thirteen(root: Path) -> Path:
    """train/cat (6 images) and train/dog (7): 13 images."""
    write_images(root / "train" / "cat", 6, 40, "c")
    write_images(root / "train" / "dog", 7, 200, "d")
    return root


def test_a_symlink_loop_is_refused_and_data_check_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = thirteen(tmp_path / "pets")
    os.symlink("..", root / "train" / "dog" / "loop")  # train/dog/loop -> train (on main: 526 images)
    with pytest.raises(UsageError, match="link loop") as refused:
        scan_image_folders(root)
    assert f"{root / 'train' / 'dog' / 'loop'} links to {root / 'train'}" in str(refused.value)
    code, out, _ = run(["data", "check", "--root", str(root)], capsys)
    assert code == 1 and "FAIL" in out and "link loop" in out


def test_links_count_each_file_once_with_its_own_label(tmp_path: Path) -> None:
    root = thirteen(tmp_path / "pets")
    os.symlink("d0.png", root / "train" / "dog" / "again.png")  # the same file twice in one class
    write_images(tmp_path / "elsewhere", 2, 210, "e")
    os.symlink(tmp_path / "elsewhere", root / "train" / "dog" / "more")  # a linked folder that adds images
    scan = scan_image_folders(root)
    labels = {r.path.relative_to(root).as_posix(): r.label for r in scan.splits["train"]}
    assert len(labels) == 13 + 2  # on main: 16 (again.png counted as a second image)
    assert {name for name, label in labels.items() if label == 0} == {f"train/cat/c{i}.png" for i in range(6)}
    assert sum(label == 1 for label in labels.values()) == 9


@pytest.mark.parametrize(
    ("link", "target", "second"),
    [
        ("train/dog/cats", "../cat", "train/dog/cats/c0.png (train, class dog)"),
        ("test/cat/c0.png", "../../train/cat/c0.png", "test/cat/c0.png (test, class cat)"),
    ],
    ids=["two classes", "two splits"],
)
def test_a_file_in_two_classes_or_splits_is_refused_naming_both(
    tmp_path: Path, link: str, target: str, second: str
) -> None:
    root = thirteen(tmp_path / "pets")
    write_images(root / "test" / "cat", 1, 50, "t")
    write_images(root / "test" / "dog", 1, 190, "t")
    os.symlink(target, root / link)
    with pytest.raises(UsageError, match="two classes or two splits") as refused:
        scan_image_folders(root)
    assert f"train/cat/c0.png (train, class cat) is also {second}" in str(refused.value)


def test_data_config_works_outside_a_trainer(tmp_path: Path) -> None:
    """From Python (and `report`'s routing figures) the data module has no Trainer: timm's defaults at
    image_size (on main: timm's AssertionError)."""
    data = ImageFolderDataModule(str(thirteen(tmp_path / "pets")), image_size=16, num_workers=0)
    config = data.data_config
    assert config["input_size"] == (3, 16, 16)
    assert (config["interpolation"], config["crop_pct"], config["crop_mode"]) == ("bicubic", 0.875, "center")
    data.setup("test")
    images, labels = next(iter(data.test_dataloader()))
    assert images.shape[1:] == (3, 16, 16) and set(labels.tolist()) <= {0, 1}


@pytest.fixture(scope="module")
def fitted_split(tmp_path_factory: pytest.TempPathFactory, backbone_weights: Path) -> tuple[Path, Path]:  # noqa: F811
    """(config, tree) of a one-step fit on 3 class folders of 10 images: it draws and writes split.csv."""
    base = tmp_path_factory.mktemp("split")
    tree = base / "three"
    for label, name in enumerate(("ant", "bee", "cow")):
        write_images(tree / "train" / name, 10, 60 * label + 20, name)
    config = write_config(base, tree, backbone_weights)
    assert main(["fit", "--config", str(config), *ONE_STEP]) == 0
    return config, tree


ONE_STEP = [
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "1",
    "--trainer.limit_val_batches",
    "1",
]


def test_a_split_drawn_with_other_fractions_or_seed_is_not_reused(
    fitted_split: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config, tree = fitted_split
    split_file = config.parent / "run" / "split.csv"
    before = split_file.read_text()
    code, _, err = run(
        ["fit", "--config", str(config), *ONE_STEP, "--data.init_args.val_fraction", "0.3"], capsys
    )
    message = " ".join(err.split())
    assert code == 2 and f"{split_file} was drawn with " in message  # on main: reused, an INFO line only
    assert "data.val_fraction 0.2" in message and "data.val_fraction 0.3" in message
    assert "Pass the old values" in message and f"move {split_file}" in message
    assert split_file.read_text() == before  # nothing replaced
    # Another seed, as the data module reads the run folder's split (its Trainer's default_root_dir).
    data = ImageFolderDataModule(str(tree), val_fraction=0.2, test_fraction=0.25, split_seed=5, num_workers=0)
    data.trainer = SimpleNamespace(default_root_dir=str(config.parent / "run"), is_global_zero=True)
    with pytest.raises(UsageError, match=r"data\.split_seed 0; this run asks for .* data\.split_seed 5"):
        data.roles()


def test_a_checkpoint_of_other_classes_names_itself(
    fitted_split: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = fitted_split
    checkpoint = config.parent / "run" / "checkpoints" / "last.ckpt"
    two = tmp_path / "two"
    write_images(two / "train" / "ant", 4, 20, "a")
    write_images(two / "train" / "bee", 4, 80, "b")
    args = [
        "test",
        "--config",
        str(config),
        "--ckpt_path",
        str(checkpoint),
        "--data.init_args.root",
        str(two),
    ]
    code, _, err = run([*args, "--trainer.default_root_dir", str(tmp_path / "run")], capsys)
    message = " ".join(err.split())
    assert code == 2 and f"checkpoint {checkpoint}" in message  # on main: "class_names names 3 classes"
    assert "model.num_classes: checkpoint has 3, config says 2" in message


# -- section 5: tracebacks and unclear messages ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    return tiny_run_config(tmp_path_factory.mktemp("tiny"), data_root, epochs=1)


@pytest.mark.parametrize(("key", "value"), [("lr", "-0.01"), ("weight_decay", "-1")])
def test_negative_lr_or_weight_decay_is_one_message(
    tiny_config: Path, key: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["fit", "--config", str(tiny_config), f"--model.{key}", value], capsys)
    assert code == 2 and f"model.{key} must be >= 0, got {float(value)}" in err and "Traceback" not in err
    with pytest.raises(UsageError, match=r"model\.lr must be >= 0"):
        ViTClassifier(num_classes=NUM_CLASSES, pretrained=False, lr=float("nan"))


def test_pure_fp16_is_refused_pointing_to_mixed_precision(
    tiny_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["fit", "--config", str(tiny_config), "--trainer.precision", "16-true"], capsys)
    message = " ".join(err.split())
    assert code == 2 and "16-true (pure float16" in message and "is not supported" in message
    assert "--trainer.precision 16-mixed" in message and "bf16-mixed" in message
    assert "diverged" not in message  # on main: it trains, diverges and blames the learning rate


def test_garbage_safetensors_names_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is no safetensors file")
    with pytest.raises(UsageError, match=r"is not a readable \.safetensors file") as refused:
        load_classifier(garbage)
    assert str(garbage) in str(refused.value)


def test_demo_config_before_prepare_demo_says_prepare_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LILY_LIGHTNING_CACHE", str(tmp_path / "empty_cache"))
    code, _, err = run(["fit", "--config", str(REPO / "configs" / "demo.yaml")], capsys)
    message = " ".join(err.split())
    assert code == 2 and "`python -m lily_lightning prepare demo`" in message
    assert "Google Drive" not in message  # on main: how to download VTAB-1k


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="needs the demo extra")
def test_prepare_demo_under_a_parent_that_cannot_hold_folders(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["prepare", "demo", "--cache-dir", "/proc/lily_lightning_test/cache"], capsys)
    message = " ".join(err.split())
    assert code == 2 and "cannot write /proc/lily_lightning_test/cache/demo" in message
    assert "--cache-dir" in message and "Traceback" not in err


def _cub_archive(damage: str) -> bytes:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        for i in range(20):
            content = np.random.default_rng(i).bytes(4000)  # incompressible, so a cut falls inside the data
            member = tarfile.TarInfo(f"CUB_200_2011/images/001.Bird/{i}.jpg")
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content))
    whole = data.getvalue()
    return whole[: len(whole) // 2] if damage == "cut off" else gzip.compress(b"not a tar" * 100)


@pytest.mark.parametrize("damage", ["cut off", "not a tar"])
def test_a_damaged_fgvc_archive_is_named_with_download_again(
    tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    archive = downloads / "CUB_200_2011.tgz"
    archive.write_bytes(_cub_archive(damage))
    args = [
        "prepare",
        "fgvc",
        "--root",
        str(tmp_path / "fgvc"),
        "--from",
        str(downloads),
        "--datasets",
        "cub",
    ]
    code, _, err = run(args, capsys)
    message = " ".join(err.split())
    assert code == 2 and f"{archive} is damaged or cut off" in message and "download it again" in message


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow_datasets") is not None, reason="this Python has TFDS"
)
def test_tfds_python_without_tfds_gives_the_install_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "prepare",
        "vtab1k",
        "--root",
        str(tmp_path / "vtab"),
        "--tasks",
        "dtd",
        "--tfds-python",
        sys.executable,
    ]
    code, _, err = run(args, capsys)
    message = " ".join(err.split())
    assert code == 2 and f"the TFDS Python {sys.executable} has no tensorflow-datasets" in message
    assert f"{sys.executable} -m pip install tensorflow-cpu tensorflow-datasets" in message
