"""VTAB-1k and FGVC DataModules on tiny generated trees (never the real data)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hand_made_images import GREY, GREY_ALPHA, RGB, write_bomb, write_png16
from PIL import Image

from lily_lightning.data import (
    FGVC_TASKS,
    VTAB_TASKS,
    FGVCDataModule,
    VTAB1kDataModule,
    vtab_group_means,
    write_synthetic_vtab_task,
)
from lily_lightning.data.fgvc import read_fgvc_splits
from lily_lightning.data.images import load_rgb
from lily_lightning.data.transforms import fgvc_resize_size
from lily_lightning.errors import UsageError

# The independent reference: class counts and groups as listed in the issue, typed by hand.
VTAB_REFERENCE = {
    "cifar": (100, "natural"),
    "caltech101": (102, "natural"),
    "dtd": (47, "natural"),
    "oxford_flowers102": (102, "natural"),
    "oxford_iiit_pet": (37, "natural"),
    "svhn": (10, "natural"),
    "sun397": (397, "natural"),
    "patch_camelyon": (2, "specialized"),
    "eurosat": (10, "specialized"),
    "resisc45": (45, "specialized"),
    "diabetic_retinopathy": (5, "specialized"),
    "clevr_count": (8, "structured"),
    "clevr_dist": (6, "structured"),
    "dmlab": (6, "structured"),
    "kitti": (4, "structured"),
    "dsprites_loc": (16, "structured"),
    "dsprites_ori": (16, "structured"),
    "smallnorb_azi": (18, "structured"),
    "smallnorb_ele": (9, "structured"),
}
FGVC_REFERENCE = {
    "cub": 200,
    "nabirds": 555,
    "oxford_flowers": 102,
    "stanford_dogs": 120,
    "stanford_cars": 196,
}
SIZE = 32  # image_size in tests: small, fast


def tiny_task(root: Path, name: str, num_classes: int = 5, **sizes: int) -> Path:
    counts = {"n_train800": 6, "n_val200": 2, "n_test": 3} | sizes
    return write_synthetic_vtab_task(root, name, num_classes, image_size=12, **counts)


def vtab(root: Path, name: str, **kwargs) -> VTAB1kDataModule:
    options = {"batch_size": 4, "eval_batch_size": 4, "num_workers": 0, "image_size": SIZE} | kwargs
    return VTAB1kDataModule(str(root), name, **options)


def list_lines(task_dir: Path, split: str) -> list[tuple[str, int]]:
    lines = (task_dir / f"{split}.txt").read_text().split()
    return [(path, int(label)) for path, label in zip(lines[::2], lines[1::2], strict=True)]


def all_samples(dataset) -> tuple[torch.Tensor, list[int]]:
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(images), list(labels)


# ---- task table -----------------------------------------------------------------------------------


def test_vtab_table_matches_the_issue():
    assert {name: (t.num_classes, t.group) for name, t in VTAB_TASKS.items()} == VTAB_REFERENCE
    assert {name: t.num_classes for name, t in FGVC_TASKS.items()} == FGVC_REFERENCE


def test_group_means():
    accuracy = {name: 10.0 * (i % 3) for i, name in enumerate(VTAB_REFERENCE)}
    means = vtab_group_means(accuracy)
    natural = [accuracy[n] for n, (_, g) in VTAB_REFERENCE.items() if g == "natural"]
    assert means["natural"] == pytest.approx(sum(natural) / 7)
    assert means["group_mean"] == pytest.approx(
        (means["natural"] + means["specialized"] + means["structured"]) / 3
    )
    assert means["task_mean"] == pytest.approx(sum(accuracy.values()) / 19)
    assert vtab_group_means({"cifar100": 50.0}) == {
        "natural": 50.0
    }  # aliases count; no mean of partial groups
    with pytest.raises(UsageError, match="not a VTAB-1k task"):
        vtab_group_means({"mnist": 1.0})


# ---- every VTAB-1k task ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VTAB_REFERENCE))
def test_every_vtab_task_loads(tmp_path, name):
    num_classes, group = VTAB_REFERENCE[name]
    tiny_task(tmp_path, name, num_classes)
    dm = vtab(tmp_path, name)
    assert (dm.task, dm.num_classes, dm.group) == (name, num_classes, group)  # known right after __init__
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        images, labels = next(iter(loader))
        assert images.dtype == torch.float32 and images.shape[1:] == (3, SIZE, SIZE)
        assert images.min() >= 0.0 and images.max() <= 1.0  # no normalisation: the model does it
        assert labels.dtype == torch.int64 and ((labels >= 0) & (labels < num_classes)).all()


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("cifar100", "cifar"),
        ("CIFAR-100", "cifar"),
        ("oxford_pet", "oxford_iiit_pet"),
        ("flowers102", "oxford_flowers102"),
        ("pcam", "patch_camelyon"),
        ("retinopathy", "diabetic_retinopathy"),
        ("clevr_distance", "clevr_dist"),
        ("smallnorb_azimuth", "smallnorb_azi"),
        ("dsprites_orientation", "dsprites_ori"),
    ],
)
def test_vtab_aliases(tmp_path, alias, canonical):
    tiny_task(tmp_path, canonical, VTAB_REFERENCE[canonical][0])
    dm = vtab(tmp_path, alias)
    assert dm.task == canonical and dm.task_dir == tmp_path / canonical


def test_task_folder_named_by_an_alias(tmp_path):
    tiny_task(tmp_path, "cifar100", 100)  # some copies of vtab-1k rename the folder
    dm = vtab(tmp_path, "cifar")
    assert dm.task == "cifar" and dm.task_dir == tmp_path / "cifar100"


# ---- splits, labels, cache ------------------------------------------------------------------------


def test_split_modes(tmp_path):
    task_dir = tiny_task(tmp_path, "dtd", 47)
    paper = vtab(tmp_path, "dtd")
    assert len(paper.dataset("train")) == 8  # train800val200 = 6 + 2
    assert paper.dataset("val") is paper.dataset("test")  # evaluated on test, as the official code does
    tuning = vtab(tmp_path, "dtd", split_mode="train800_val200")
    assert (
        len(tuning.dataset("train")) == 6
        and len(tuning.dataset("val")) == 2
        and len(tuning.dataset("test")) == 3
    )
    assert [r.label for r in tuning.dataset("val").records] == [
        label for _, label in list_lines(task_dir, "val200")
    ]
    with pytest.raises(UsageError, match="split_mode must be one of"):
        vtab(tmp_path, "dtd", split_mode="train")


def test_labels_and_pixels_round_trip(tmp_path):
    task_dir = tiny_task(tmp_path, "eurosat", 10, n_train800=8)
    dm = vtab(tmp_path, "eurosat", split_mode="train800_val200", cache_images=False, image_size=12)
    images, labels = all_samples(dm.dataset("train"))
    assert labels == [label for _, label in list_lines(task_dir, "train800")]
    # image_size equals the file size, so the dataset holds the PNG pixels themselves...
    first = np.array(Image.open(task_dir / list_lines(task_dir, "train800")[0][0]))
    assert images.dtype == torch.uint8 and torch.equal(images[0], torch.from_numpy(first).permute(2, 0, 1))
    # ...and the loader hands them over as float in [0, 1], one division per batch
    batch, batch_labels = next(iter(dm.val_dataloader()))
    val_images, val_labels = all_samples(dm.dataset("val"))
    assert torch.equal(batch, val_images.float() / 255) and batch_labels.tolist() == val_labels


def test_cache_is_pixel_identical_to_decoding(tmp_path):
    tiny_task(tmp_path, "svhn", 10)
    modules = [vtab(tmp_path, "svhn", split_mode="train800_val200", cache_images=c) for c in (True, False)]
    (cached, cached_labels), (decoded, decoded_labels) = (all_samples(m.dataset("train")) for m in modules)
    assert torch.equal(cached, decoded) and cached_labels == decoded_labels
    cached_batch, decoded_batch = (next(iter(m.val_dataloader()))[0] for m in modules)  # val200: also cached
    assert torch.equal(cached_batch, decoded_batch)


def test_test_split_is_never_cached(tmp_path):
    tiny_task(tmp_path, "svhn", 10)
    dm = vtab(tmp_path, "svhn", split_mode="train800_val200")
    assert [type(dm.dataset(role)).__name__ for role in ("train", "val", "test")] == [
        "CachedImageDataset",
        "CachedImageDataset",
        "ImageListDataset",
    ]


def count_opens(monkeypatch) -> Counter:
    opened = Counter()
    real_open = Image.open

    def counting_open(path, *args, **kwargs):
        opened[str(path)] += 1
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    return opened


def test_cache_decodes_each_image_once(tmp_path, monkeypatch):
    tiny_task(tmp_path, "kitti", 4)
    opened = count_opens(monkeypatch)
    dm = vtab(tmp_path, "kitti")
    dm.setup("fit")
    assert len(opened) == 8 and set(opened.values()) == {1}  # decoded in setup
    for _ in range(2):  # two epochs
        for _ in dm.train_dataloader():
            pass
    assert len(opened) == 8 and set(opened.values()) == {1}


def test_without_cache_every_epoch_decodes(tmp_path, monkeypatch):
    tiny_task(tmp_path, "kitti", 4)
    opened = count_opens(monkeypatch)
    dm = vtab(tmp_path, "kitti", cache_images=False, batch_size=8)
    dm.setup("fit")
    assert not opened
    for _ in range(2):
        for _ in dm.train_dataloader():
            pass
    assert len(opened) == 8 and set(opened.values()) == {2}


@pytest.mark.parametrize("cache_images", [True, False])
def test_worker_processes(tmp_path, cache_images):
    task_dir = tiny_task(tmp_path, "resisc45", 45, n_train800=14)
    dm = vtab(tmp_path, "resisc45", num_workers=2, batch_size=4, cache_images=cache_images)
    dm.setup("fit")
    seen = [label for _, labels in dm.train_dataloader() for label in labels.tolist()]
    assert len(seen) == 16  # 14 + 2 images, batches of 4: nothing dropped
    assert Counter(seen) == Counter(label for _, label in list_lines(task_dir, "train800val200"))


def test_training_order_depends_on_seed_and_epoch_only(tmp_path, monkeypatch):
    tiny_task(tmp_path, "dmlab", 6, n_train800=30)
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")

    def order(epoch: int) -> list[int]:
        dm = vtab(tmp_path, "dmlab", batch_size=38)
        dm._current_epoch = lambda: epoch
        torch.manual_seed(epoch + 100)  # the global RNG must not matter (a resumed run has another state)
        return next(iter(dm.train_dataloader()))[1].tolist()

    assert order(3) == order(3) != order(4)
    assert sorted(order(3)) == sorted(order(4))


def test_drop_last_only_when_a_full_batch_remains(tmp_path):
    tiny_task(tmp_path, "dmlab", 6)  # 8 training images
    assert vtab(tmp_path, "dmlab", batch_size=3).train_dataloader().batch_sampler.drop_last
    small = vtab(tmp_path, "dmlab", batch_size=64).train_dataloader()
    assert not small.batch_sampler.drop_last and len(small) == 1


# ---- bad input ------------------------------------------------------------------------------------


def test_missing_root(tmp_path):
    with pytest.raises(UsageError, match=r"does not exist(.|\n)*train800val200.txt(.|\n)*NOAH"):
        vtab(tmp_path / "nowhere", "cifar")


def test_missing_task_folder(tmp_path):
    tiny_task(tmp_path, "dtd", 47)
    with pytest.raises(
        UsageError, match=r"No folder for VTAB-1k task 'cifar'(.|\n)*contains: dtd(.|\n)*vtab-1k"
    ):
        vtab(tmp_path, "cifar100")


def test_unknown_task_lists_valid_names(tmp_path):
    with pytest.raises(UsageError, match="Unknown VTAB-1k task 'cifr'") as err:
        vtab(tmp_path, "cifr")
    for name in VTAB_REFERENCE:
        assert name in str(err.value)


def test_missing_list_file(tmp_path):
    task_dir = tiny_task(tmp_path, "dtd", 47)
    (task_dir / "test.txt").unlink()
    dm = vtab(tmp_path, "dtd")
    with pytest.raises(UsageError, match=r"Missing split file .*test.txt(.|\n)*NOAH"):
        dm.setup("fit")


def test_list_file_naming_a_missing_image(tmp_path):
    task_dir = tiny_task(tmp_path, "dtd", 47)
    path, _ = list_lines(task_dir, "train800val200")[2]
    (task_dir / path).unlink()
    with pytest.raises(
        UsageError, match=rf"images listed but not found \(1\):\n  train800val200.txt:3: .*{path}"
    ):
        vtab(tmp_path, "dtd").setup("fit")


def test_label_out_of_range(tmp_path):
    task_dir = tiny_task(tmp_path, "kitti", 4)
    lines = (task_dir / "test.txt").read_text().splitlines()
    lines[1] = lines[1].rsplit(maxsplit=1)[0] + " 4"
    (task_dir / "test.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError, match=r"labels outside \[0, 4\) \(1\):\n  test.txt:2: .*\(label 4\)"):
        vtab(tmp_path, "kitti").setup("test")


def test_malformed_list_line(tmp_path):
    task_dir = tiny_task(tmp_path, "kitti", 4)
    with (task_dir / "train800val200.txt").open("a") as f:
        f.write("images/train800/00000.png\n")
    with pytest.raises(UsageError, match=r"train800val200.txt:9: expected '<image path> <integer label>'"):
        vtab(tmp_path, "kitti").setup("fit")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])  # a half-downloaded file


def float_tiff(path: Path) -> None:
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(path, format="TIFF")


def int32_tiff(path: Path) -> None:
    Image.fromarray(np.full((4, 4), 70_000, np.int32)).save(path, format="TIFF")


# How each kind of bad file is damaged, and what the message must say about it. The bombs use PIL's real
# limit (89,478,485 pixels): above twice that PIL itself refuses at open, in between it only warns.
DAMAGE = {
    "truncated": (truncate, "image file is truncated|cannot identify image file"),
    "bomb": (lambda path: write_bomb(path, 20_000), "400000000 pixels"),
    "bomb below twice the limit": (
        lambda path: write_bomb(path, 10_000),
        "10000 x 10000 pixels, more than PIL's decompression-bomb limit of 89,478,485",
    ),
    "float pixels": (float_tiff, "floating-point pixels"),
    "32-bit pixels": (int32_tiff, r"outside the 16-bit range \(values 70000..70000\)"),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's, at open, before ours
@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("cache_images", [True, False])
def test_undecodable_image_is_named(tmp_path, cache_images, damage):
    task_dir = tiny_task(tmp_path, "eurosat", 10)
    bad = task_dir / list_lines(task_dir, "train800")[1][0]
    write, reason = DAMAGE[damage]
    write(bad)
    dm = vtab(tmp_path, "eurosat", cache_images=cache_images, batch_size=8)
    with pytest.raises(UsageError, match=rf"Cannot decode image {bad}: .*({reason})"):
        dm.setup("fit")  # cached: decoded here
        next(iter(dm.train_dataloader()))  # not cached: decoded when loaded


# 16-bit samples and their 8-bit values, worked out by hand: the top 8 of 16 bits (v // 256), which is also
# what PIL keeps of 16-bit RGB and grey+alpha PNGs.
SAMPLES_16 = np.array([[0, 255, 256], [511, 1000, 32767], [32896, 65280, 65535]])
EXPECTED_8 = np.array([[0, 0, 1], [1, 3, 127], [128, 255, 255]])
INVERTED_8 = np.array([[255, 255, 254], [254, 252, 128], [127, 0, 0]])  # of 65535 - SAMPLES_16


def test_16_bit_images_keep_their_top_8_bits(tmp_path):
    grey = np.stack([EXPECTED_8] * 3, axis=-1)
    ones = np.full((3, 3), 65535)
    pgm = tmp_path / "grey.pgm"  # PIL opens 16-bit PGMs as mode "I"
    pgm.write_bytes(b"P5\n3 3\n65535\n" + SAMPLES_16.astype(">u2").tobytes())
    Image.fromarray(SAMPLES_16.astype(np.uint16)).save(tmp_path / "pil.png")  # PIL writes mode "I;16"
    cases = {
        pgm: grey,
        tmp_path / "pil.png": grey,
        write_png16(tmp_path / "grey.png", SAMPLES_16[..., None], GREY): grey,
        write_png16(tmp_path / "grey_alpha.png", np.stack([SAMPLES_16, ones], -1), GREY_ALPHA): grey,
        write_png16(
            tmp_path / "rgb.png", np.stack([SAMPLES_16, 65535 - SAMPLES_16, SAMPLES_16.T], -1), RGB
        ): np.stack([EXPECTED_8, INVERTED_8, EXPECTED_8.T], -1),
    }
    for path, expected in cases.items():
        decoded = load_rgb(path)
        assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), expected), path.name


def test_repeated_lines_are_dropped_and_conflicting_ones_refused(tmp_path, caplog):
    task_dir = tiny_task(tmp_path, "dtd", 47)
    lines = (task_dir / "train800val200.txt").read_text().splitlines()
    with (task_dir / "train800val200.txt").open("a") as f:
        f.write(lines[0] + "\n")  # line 9 repeats line 1
    with caplog.at_level(logging.WARNING, logger="lily_lightning"):
        train = vtab(tmp_path, "dtd").dataset("train")
    assert [r.origin for r in train.records] == [f"train800val200.txt:{n}" for n in range(1, 9)]
    assert f"train800val200.txt:9: {task_dir / lines[0].split()[0]}" in caplog.text
    assert "first at train800val200.txt:1" in caplog.text
    path, label = lines[1].split()
    with (task_dir / "train800val200.txt").open("a") as f:
        f.write(f"{path} {(int(label) + 1) % 47}\n")  # line 10: line 2's image with another label
    conflict = r"another label \(1\):\n  train800val200.txt:10: .*first at train800val200.txt:2 "
    with pytest.raises(UsageError, match=conflict):
        vtab(tmp_path, "dtd").setup("fit")


# ---- your own task --------------------------------------------------------------------------------


def test_custom_task_with_num_classes(tmp_path):
    tiny_task(tmp_path, "my_leaves", 3)
    dm = vtab(tmp_path, "my_leaves", num_classes=7)
    assert (dm.task, dm.num_classes, dm.group) == ("my_leaves", 7, None)
    dm.setup("fit")
    with pytest.raises(UsageError, match=r"labels outside \[0, 2\)"):
        vtab(tmp_path, "my_leaves", num_classes=2).setup("fit")


def test_custom_task_infers_num_classes(tmp_path, caplog):
    tiny_task(tmp_path, "my_leaves", 3)
    with caplog.at_level(logging.INFO, logger="lily_lightning"):
        dm = vtab(tmp_path, "my_leaves")
    assert dm.num_classes == 3
    assert "num_classes=3 inferred" in caplog.text


def test_custom_task_only_needs_the_files_of_its_split_mode(tmp_path):
    task_dir = tiny_task(tmp_path, "my_leaves", 3)
    (task_dir / "train800.txt").unlink()
    (task_dir / "val200.txt").unlink()
    vtab(tmp_path, "my_leaves").setup("fit")
    with pytest.raises(UsageError, match=r"Missing split file .*train800.txt"):
        vtab(tmp_path, "my_leaves", split_mode="train800_val200")


def test_num_classes_of_a_known_task_cannot_change(tmp_path):
    tiny_task(tmp_path, "svhn", 10)
    assert vtab(tmp_path, "svhn", num_classes=10).num_classes == 10
    with pytest.raises(UsageError, match="'svhn' has 10 classes, but num_classes=12"):
        vtab(tmp_path, "svhn", num_classes=12)


# ---- FGVC -----------------------------------------------------------------------------------------


def class_id(k: int) -> int:
    return 1000 - 7 * k  # sparse and descending: remapping has to sort numerically


def fgvc_tree(root: Path, name: str, n_val: int = 2, n_test: int = 3) -> dict[str, dict[str, int]]:
    """VPT layout for ``name``: every class once in train, a few in val/test. Returns the json contents."""
    task = FGVC_TASKS[name]
    image_root = root / task.folder / task.image_dir
    pixels = [Image.new("RGB", (20, 14), (3 * k % 256, 50, 90)) for k in range(4)]
    splits = {
        "train": range(task.num_classes),
        "val": range(n_val),
        "test": range(task.num_classes - n_test, task.num_classes),
    }
    contents = {}
    for split, classes in splits.items():
        contents[split] = {f"{k:03d}.class/{split}_{k}.jpg": class_id(k) for k in classes}
        for path, cid in contents[split].items():
            (image_root / path).parent.mkdir(parents=True, exist_ok=True)
            pixels[cid % 4].save(image_root / path)
        (root / task.folder / f"{split}.json").write_text(json.dumps(contents[split]))
    return contents


def fgvc(root: Path, name: str, **kwargs) -> FGVCDataModule:
    options = {"batch_size": 4, "eval_batch_size": 4, "num_workers": 0, "image_size": SIZE} | kwargs
    return FGVCDataModule(str(root), name, **options)


@pytest.mark.parametrize("name", list(FGVC_REFERENCE))
def test_every_fgvc_dataset_loads(tmp_path, name):
    fgvc_tree(tmp_path, name)
    dm = fgvc(tmp_path, name)
    assert (dm.task, dm.num_classes) == (name, FGVC_REFERENCE[name])
    dm.setup("fit")
    assert len(dm.dataset("train")) == FGVC_REFERENCE[name] + 2  # train + val
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        images, labels = next(iter(loader))
        assert images.dtype == torch.float32 and images.shape[1:] == (3, SIZE, SIZE)
        assert images.min() >= 0.0 and images.max() <= 1.0
        assert ((labels >= 0) & (labels < FGVC_REFERENCE[name])).all()


def test_fgvc_class_ids_are_remapped_in_sorted_order(tmp_path):
    contents = fgvc_tree(tmp_path, "stanford_cars")
    splits = read_fgvc_splits(tmp_path / "Stanford-cars", FGVC_TASKS["stanford_cars"])
    ranks = {cid: i for i, cid in enumerate(sorted(class_id(k) for k in range(196)))}
    for split, records in splits.items():
        assert [r.label for r in records] == [ranks[cid] for cid in contents[split].values()]
    assert splits["train"][0].label == 195  # class_id(0) is the largest id
    assert splits["train"][0].path == tmp_path / "Stanford-cars" / "000.class" / "train_0.jpg"


def test_fgvc_image_folders_follow_vpt(tmp_path):
    fgvc_tree(tmp_path, "cub")
    record = fgvc(tmp_path, "cub").dataset("test").records[0]
    assert record.path.parent.parent == tmp_path / "CUB_200_2011" / "images"


@pytest.mark.parametrize("alias", ["cub200", "CUB_200_2011", "cub_200"])
def test_fgvc_aliases_and_dataset_folder_as_root(tmp_path, alias):
    fgvc_tree(tmp_path, "cub")
    assert fgvc(tmp_path, alias).task == "cub"
    assert fgvc(tmp_path / "CUB_200_2011", alias).dataset_dir == tmp_path / "CUB_200_2011"


def test_fgvc_split_modes_and_transforms(tmp_path):
    fgvc_tree(tmp_path, "oxford_flowers", n_val=5)
    tuning = fgvc(tmp_path, "flowers102", split_mode="train_val")
    assert [len(tuning.dataset(role)) for role in ("train", "val", "test")] == [102, 5, 3]
    train_ops = [type(t).__name__ for t in tuning.dataset("train").transform.transforms]
    eval_ops = [type(t).__name__ for t in tuning.dataset("val").transform.transforms]
    assert train_ops == ["Resize", "RandomCrop", "RandomHorizontalFlip", "PILToTensor"]
    assert eval_ops == ["Resize", "CenterCrop", "PILToTensor"]
    assert [fgvc_resize_size(s) for s in (224, 384, 448)] == [256, 438, 512]  # VPT's sizes


def test_fgvc_errors(tmp_path):
    with pytest.raises(UsageError, match=r"Unknown FGVC dataset 'birds'(.|\n)*cub(.|\n)*stanford_cars"):
        fgvc(tmp_path, "birds")
    with pytest.raises(UsageError, match=r"FGVC root folder .* does not exist(.|\n)*VPT"):
        fgvc(tmp_path / "nowhere", "cub")
    with pytest.raises(
        UsageError, match=r"No CUB_200_2011/train.json(.|\n)*Stanford-dogs/\{train,val,test\}.json"
    ):
        fgvc(tmp_path, "cub")
    fgvc_tree(tmp_path, "stanford_dogs")
    (tmp_path / "Stanford-dogs" / "val.json").unlink()
    with pytest.raises(UsageError, match=r"Missing split file .*val.json"):
        fgvc(tmp_path, "dogs").setup("fit")


def test_fgvc_repeated_json_keys(tmp_path):
    contents = fgvc_tree(tmp_path, "cub")
    test_json = tmp_path / "CUB_200_2011" / "test.json"
    key, class_id_ = next(iter(contents["test"].items()))
    text = json.dumps(contents["test"])
    test_json.write_text(text[:-1] + f", {json.dumps(key)}: {class_id_}}}")  # the same pair twice
    assert len(fgvc(tmp_path, "cub").dataset("test")) == 3
    test_json.write_text(text[:-1] + f", {json.dumps(key)}: {class_id(0)}}}")  # json.loads keeps the last
    with pytest.raises(
        UsageError, match=rf"listed again with another label \(1\):\n  test.json\[{key!r}\] #2"
    ):
        fgvc(tmp_path, "cub").setup("test")


def test_fgvc_wrong_class_count_and_missing_image(tmp_path):
    contents = fgvc_tree(tmp_path, "stanford_dogs")
    folder = tmp_path / "Stanford-dogs"
    first = next(iter(contents["test"]))
    (folder / "Images" / first).unlink()
    with pytest.raises(UsageError, match=rf"images listed but not found \(1\):\n  test.json\[{first!r}\]"):
        fgvc(tmp_path, "stanford_dogs").setup("test")
    del contents["train"]["116.class/train_116.jpg"]  # a class that is in no other split
    (folder / "train.json").write_text(json.dumps(contents["train"]))
    with pytest.raises(UsageError, match="use 119 distinct class ids, but stanford_dogs has 120"):
        fgvc(tmp_path, "stanford_dogs").setup("fit")
