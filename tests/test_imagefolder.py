"""Your own images end to end: class folders -> data check -> fit -> test -> predict new images -> export ->
plain timm, on a generated tree with the mess real folders have."""

from __future__ import annotations

import csv
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from rich.console import Console
from safetensors.torch import save_file

from lily_lightning import ImageFolderDataModule, UsageError, load_classifier
from lily_lightning.cli import main
from lily_lightning.data import VTAB1kDataModule, write_synthetic_vtab_task
from lily_lightning.data.check import check_tree
from lily_lightning.data.synthetic import synthetic_image
from lily_lightning.data.transforms import (
    fgvc_data_config,
    fgvc_eval_transform,
    timm_eval_transform,
    vtab_transform,
)
from lily_lightning.training.module import ViTClassifier

# Classes as folders, with how many readable training images each gets; fox and owl are small.
CLASSES = {"cat": 14, "dog": 14, "fox": 5, "owl": 3}
VAL_FRACTION, TEST_FRACTION = 0.2, 0.25


def _image(label: int, seed: int) -> Image.Image:
    return synthetic_image(label, len(CLASSES), 32, np.random.default_rng(seed))


def write_tree(root: Path, classes: dict[str, int]) -> Path:
    """``root/train/<class>/`` with the mess of real folders: an upper-case .JPG, a nested folder, a grayscale
    and an RGBA PNG, a .DS_Store and a notes.txt, a corrupt JPEG."""
    for label, (name, count) in enumerate(classes.items()):
        folder = root / "train" / name
        (folder / "more").mkdir(parents=True)
        for i in range(count):
            image = _image(label, 100 * label + i)
            if name == "cat" and i == 0:
                image.save(folder / "UPPER.JPG", format="JPEG", quality=95)
            elif name == "cat" and i == 1:
                image.save(folder / "more" / "nested.png")
            elif name == "dog" and i == 0:
                image.convert("L").save(folder / "gray.png")
            elif name == "dog" and i == 1:
                image.convert("RGBA").save(folder / "rgba.png")
            else:
                image.save(folder / f"{i:03d}.png")
    (root / "train" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "train" / "dog" / "notes.txt").write_text("taken in the garden\n")
    good = io.BytesIO()
    _image(2, 999).save(good, format="JPEG")
    (root / "train" / "owl" / "broken.jpg").write_bytes(good.getvalue()[:200])  # a half-downloaded JPEG
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tree(tmp_path_factory.mktemp("my_images") / "my_images", CLASSES)


@pytest.fixture(scope="module")
def backbone_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny ViT's weights as a file: the frozen backbone a checkpoint is loaded onto."""
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file(vit.state_dict(), str(path))
    return path


def write_config(folder: Path, root: Path, weights: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "imagefolder.yaml"
    config.write_text(
        f"""
seed_everything: 0
trainer:
  max_epochs: 2
  accelerator: cpu
  devices: 1
  log_every_n_steps: 1
  enable_progress_bar: false
  default_root_dir: {folder / "run"}
model:
  backbone: test_vit
  weights: {weights}
  pretrained: false
  img_size: 32
  lily: {{rank: 4, num_experts: 2, targets: [k, v], eval_routing: running}}
  drop_path_rate: 0.0
  lr: 3.0e-3
  warmup_epochs: 0.5
data:
  class_path: lily_lightning.data.ImageFolderDataModule
  init_args:
    root: {root}
    val_fraction: {VAL_FRACTION}
    test_fraction: {TEST_FRACTION}
    batch_size: 8
    eval_batch_size: 16
    num_workers: 0
    image_size: 32
"""
    )
    return config


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, tree: Path, backbone_weights: Path
) -> tuple[Path, Path, str]:
    """(config, checkpoint, fit's log) of a 2-epoch fit on the tree."""
    folder = tmp_path_factory.mktemp("fit")
    config = write_config(folder, tree, backbone_weights)
    handler = logging.StreamHandler(stream := io.StringIO())
    logging.getLogger("lily_lightning").addHandler(handler)
    try:
        assert main(["fit", "--config", str(config)]) == 0
    finally:
        logging.getLogger("lily_lightning").removeHandler(handler)
    return config, folder / "run" / "checkpoints" / "last.ckpt", stream.getvalue()


def test_skipped_files_are_counted_and_the_split_is_stratified(
    trained: tuple[Path, Path, str], tree: Path
) -> None:
    config, checkpoint, log = trained
    assert "skipped 3 files (2 not an image file, 1 does not decode)" in log
    for name in (".DS_Store", "dog/notes.txt", "owl/broken.jpg"):
        assert name in log
    rows = read_csv(config.parent / "run" / "split.csv")
    files = {row["file"] for row in rows}
    assert "train/cat/UPPER.JPG" in files and "train/cat/more/nested.png" in files
    assert {"train/dog/gray.png", "train/dog/rgba.png"} <= files
    assert len(rows) == sum(CLASSES.values())  # every readable image once, no skipped one
    for name, count in CLASSES.items():  # each class gives each held-out split round(n x fraction)
        mine = [row for row in rows if row["class"] == name]
        assert all(row["file"].startswith(f"train/{name}/") for row in mine)
        test, val = int(count * TEST_FRACTION + 0.5), int(count * VAL_FRACTION + 0.5)
        by_split = {split: sum(row["split"] == split for row in mine) for split in ("train", "val", "test")}
        assert by_split == {"test": test, "val": val, "train": count - test - val}, name
    hparams = torch.load(checkpoint, weights_only=False)["hyper_parameters"]
    assert hparams["class_names"] == ["cat", "dog", "fox", "owl"] and hparams["num_classes"] == 4


def test_test_predict_export_and_plain_timm_agree(
    trained: tuple[Path, Path, str], tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, checkpoint, _ = trained
    run = config.parent / "run"
    capsys.readouterr()
    assert main(["test", "--config", str(config), "--ckpt_path", "last"]) == 0
    out = capsys.readouterr().out
    assert "per-class top-1" in out and "RESULT task=my_images" in out

    # predict the same test images from another run folder, from the checkpoint file: the split drawn
    # there again is the same, and every row gives all four classes with their probabilities.
    other = tmp_path / "other"
    args = [
        "--ckpt_path",
        str(checkpoint),
        "--trainer.default_root_dir",
        str(other),
        "--model.predict_top_k",
        "4",
    ]
    assert main(["predict", "--config", str(config), *args]) == 0
    assert (other / "split.csv").read_text() == (run / "split.csv").read_text()
    test_files = [row["file"] for row in read_csv(run / "split.csv") if row["split"] == "test"]
    rows = read_csv(other / "predictions.csv")
    assert [row["file"] for row in rows] == sorted(test_files)

    # Per-class accuracy and the confusion matrix, by hand from the predictions (true class: the folder).
    names = list(CLASSES)
    matrix = np.zeros((4, 4), dtype=int)
    for row in rows:
        matrix[names.index(row["file"].split("/")[1]), names.index(row["class"])] += 1
    written = read_csv(run / "confusion_matrix.csv")
    assert [row["true \\ predicted"] for row in written] == names
    assert np.array_equal(np.array([[int(row[n]) for n in names] for row in written]), matrix)
    assert (run / "confusion_matrix.png").stat().st_size > 5_000
    result = json.loads((run / "result.json").read_text())
    assert result["class_names"] == names
    by_hand = {n: matrix[i, i] / matrix[i].sum() for i, n in enumerate(names)}
    assert result["per_class_acc"] == pytest.approx(by_hand)
    metrics = read_csv(max((run / "csv").glob("version_*/metrics.csv")))
    logged = {
        n: float(next(r[f"test/acc_class/{n}"] for r in metrics if r.get(f"test/acc_class/{n}")))
        for n in names
    }
    assert logged == pytest.approx(by_hand)  # torchmetrics' average=None, as `test` logged it
    assert result["final"] == pytest.approx(np.trace(matrix) / matrix.sum())

    # New, unlabelled images: a folder with a nested one, an upper-case .JPG, and two files to skip.
    new = tmp_path / "new"
    (new / "sub").mkdir(parents=True)
    _image(0, 7).save(new / "a.png")
    _image(1, 8).save(new / "sub" / "b.jpg")
    _image(3, 9).convert("RGBA").save(new / "C.PNG")
    (new / "notes.txt").write_text("not an image")
    (new / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    assert main(["predict", "--config", str(config), *args, "--data.predict_path", str(new)]) == 0
    rows = read_csv(other / "predictions-2.csv")  # the first predict's file is kept
    assert [row["file"] for row in rows] == ["C.PNG", "a.png", "sub/b.jpg"]  # readable ones, sorted
    cli_probs = {}
    for row in rows:
        ranked = [("", "")] + [(f"_{k}", "") for k in range(2, 5)]
        classes = [row[f"class{suffix}"] for suffix, _ in ranked]
        probs = [float(row[f"confidence{suffix}"]) for suffix, _ in ranked]
        assert sorted(classes) == names and probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert names[int(row["label"])] == row["class"]
        cli_probs[row["file"]] = [probs[classes.index(n)] for n in names]

    # The Python loader (checkpoint), and the exported file in plain timm, give the same probabilities.
    model, transform, class_names = load_classifier(checkpoint)
    assert class_names == names
    with torch.no_grad():
        for file, expected in cli_probs.items():
            image = Image.open(new / file).convert("RGB")
            probs = model(transform(image).unsqueeze(0)).softmax(-1)[0].tolist()
            assert probs == pytest.approx(expected, abs=1e-4), file
    exported = tmp_path / "model.safetensors"
    assert main(["export", "--config", str(config), "--ckpt_path", "last", "--out", str(exported)]) == 0
    assert load_classifier(exported).class_names == names
    run_timm = subprocess.run(
        [sys.executable, "-c", PLAIN_TIMM, str(exported), str(new), *cli_probs],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run_timm.returncode == 0, run_timm.stderr
    plain = json.loads(run_timm.stdout.splitlines()[-1])
    assert plain["names"] == names
    for file, expected in cli_probs.items():
        assert plain["probs"][file] == pytest.approx(expected, abs=1e-4), file


PLAIN_TIMM = """
import json, sys
import timm, torch
from PIL import Image
from safetensors import safe_open

path, folder, *files = sys.argv[1:]
with safe_open(path, "pt") as f:
    metadata = f.metadata()
statement, expression = metadata["load"].split("; ", 1)
model = eval(expression).eval()  # the file's own instructions
transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
with torch.no_grad():
    images = {f: transform(Image.open(f"{folder}/{f}").convert("RGB")).unsqueeze(0) for f in files}
    probs = {f: model(image).softmax(-1)[0].tolist() for f, image in images.items()}
assert "lily_lightning" not in sys.modules
print(json.dumps({"names": model.pretrained_cfg["label_names"], "probs": probs}))
"""


def test_checkpoint_refuses_a_tree_with_other_classes(
    trained: tuple[Path, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, checkpoint, _ = trained
    other = write_tree(tmp_path / "zoo", {"cat": 4, "dog": 4, "emu": 4, "owl": 4})  # fox -> emu
    for ckpt in (str(checkpoint), "last"):  # rebuilt from the checkpoint, or from the config
        capsys.readouterr()
        assert main(["test", "--config", str(config), "--ckpt_path", ckpt, "--data.root", str(other)]) == 2
        err = capsys.readouterr().err
        assert "only in the model's: fox; only in the data: emu" in err, err
        assert "Traceback" not in err


def test_model_from_python_refuses_a_checkpoint_of_other_classes() -> None:
    # Outside the CLI the model has the data's class names (given, or taken at setup); loading compares.
    model = ViTClassifier(
        "test_vit",
        num_classes=3,
        pretrained=False,
        img_size=32,
        class_names=["cat", "dog", "emu"],
    )
    for trained, message in ((["cat", "dog", "fox"], "only in the model's: fox; only in the data: emu"),
                             (["dog", "cat", "emu"], "in another order")):  # fmt: skip
        with pytest.raises(UsageError, match=message):
            model.on_load_checkpoint({"hyper_parameters": {"class_names": trained}, "state_dict": {}})


def test_data_check_lists_classes_splits_and_skipped_files(tree: Path) -> None:
    out = io.StringIO()
    assert check_tree(tree, console=Console(file=out, width=120)) == 0
    text = out.getvalue()
    assert "Image folders (4 classes; val and test drawn from train at fit (stratified))" in text
    table = {cells[0]: cells[1:] for line in text.splitlines() if (cells := line.split())}
    assert {name: table[name] for name in CLASSES} == {name: [str(n)] for name, n in CLASSES.items()}
    assert table["total"] == [str(sum(CLASSES.values()))]
    assert "skipped 3 files (2 not an image file, 1 does not decode)" in text


def test_data_check_names_classes_missing_from_a_split(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "t", {"cat": 3, "dog": 3, "owl": 2})
    (root / "test" / "cat").mkdir(parents=True)
    _image(0, 1).save(root / "test" / "cat" / "x.png")
    (root / "test" / "dog").mkdir()
    out = io.StringIO()
    assert check_tree(root, console=Console(file=out, width=120)) == 0
    assert "classes missing from test/: dog, owl" in out.getvalue()
    (root / "test" / "emu").mkdir()
    assert check_tree(root, console=Console(file=out, width=120)) == 1
    assert "not classes of the training set: emu" in out.getvalue()


def test_csv_labels_by_name_or_id(tmp_path: Path) -> None:
    for label, name in enumerate(("b", "a")):
        for i in range(4):
            _image(label, i).save(tmp_path / f"{name}{i}.png")
    (tmp_path / "train.csv").write_text(
        "path,label\n" + "".join(f"{n}{i}.png,{n}\n" for n in "ab" for i in range(3))
    )
    (tmp_path / "test.csv").write_text("b3.png,1\na3.png,a\n")  # an id and a name; images train lacks
    data = ImageFolderDataModule(str(tmp_path), val_fraction=0.0, num_workers=0, image_size=32)
    assert data.class_names == ["a", "b"]
    records = data.roles()["test"]
    assert [(r.path.name, r.label) for r in records] == [("b3.png", 1), ("a3.png", 0)]
    (tmp_path / "train.csv").write_text("a0.png,0\nb0.png,b\n")
    with pytest.raises(UsageError, match="mixes class names and class ids"):
        ImageFolderDataModule(str(tmp_path))


def test_eval_data_configs_rebuild_each_data_modules_eval_transform(tmp_path: Path) -> None:
    # predict_path images, load_classifier and export use timm's transform from `data_config`: it must be the
    # data module's own eval transform, pixel for pixel.
    write_synthetic_vtab_task(tmp_path, "shapes", 3, n_train800=3, n_val200=3, n_test=3)
    vtab = VTAB1kDataModule(str(tmp_path), "shapes", image_size=48)
    rng = np.random.default_rng(0)
    for config, own in (
        (vtab.data_config, vtab_transform(48)),
        (fgvc_data_config(40), fgvc_eval_transform(40)),
    ):
        for size in ((37, 61), (90, 50)):
            image = Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))
            assert torch.equal(timm_eval_transform(config)(image), own(image))
