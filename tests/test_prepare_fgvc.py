"""`prepare fgvc` on small archives written in each dataset's official file layout."""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lily_lightning.cli import main as cli_main
from lily_lightning.data import FGVC_TASKS, FGVCDataModule, check_tree

scipy_io = pytest.importorskip("scipy.io")


def jpeg(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (index % 256, index // 256 % 256, 7)).save(buffer, "JPEG")
    return buffer.getvalue()


def mat(variables: dict) -> bytes:
    buffer = io.BytesIO()
    scipy_io.savemat(buffer, variables)
    return buffer.getvalue()


def write_tar(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz" if path.name.endswith(("gz", "tgz")) else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def column_cell(strings: list[str]) -> np.ndarray:
    """An N x 1 MATLAB cell array of strings (the Stanford Dogs lists)."""
    cell = np.empty((len(strings), 1), dtype=object)
    cell[:, 0] = strings
    return cell


def struct_array(rows: list[dict]) -> np.ndarray:
    """A 1 x N MATLAB struct array (the Stanford Cars annotations)."""
    fields = list(rows[0])
    array = np.empty((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        for f in fields:
            array[0, i][f] = row[f]
    return array


def train_count(class_index: int) -> int:
    return 4 + class_index % 7  # 4..10 training images: 0 or 1 of them go to val


def official_indexed(top: str, class_ids: list[int], image_name) -> tuple[dict[str, bytes], dict]:
    """CUB / NABirds: images.txt, image_class_labels.txt, train_test_split.txt and images/ under ``top``."""
    files, paths, labels, split, truth = {}, [], [], [], {"train": {}, "test": {}}
    for index, class_id in enumerate(class_ids):
        for k in range(train_count(index) + 1):  # the last one is a test image
            image_id = image_name(class_id, k).rsplit("/", 1)[-1].removesuffix(".jpg")  # unique per image
            relative = image_name(class_id, k)
            files[f"{top}/images/{relative}"] = jpeg(len(files))
            is_train = k < train_count(index)
            paths.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {int(is_train)}")
            truth["train" if is_train else "test"][relative] = class_id
    for name, lines in (
        ("images.txt", paths),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
    ):
        files[f"{top}/{name}"] = "".join(f"{line}\n" for line in lines).encode()
    return files, truth


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    """The official files of all five datasets, every class present; returns the folder and the truth."""
    folder = tmp_path_factory.mktemp("downloads")
    truth: dict[str, dict] = {}
    cub_files, truth["cub"] = official_indexed(
        "CUB_200_2011", list(range(1, 201)), lambda c, k: f"{c:03d}.Bird_{c}/Bird_{c}_{k:04d}_{c}{k}.jpg"
    )
    cub_files["attributes.txt"] = b"1 has_bill_shape::curved\n"  # the real archive has it at its top level
    write_tar(folder / "CUB_200_2011.tgz", cub_files)
    # NABirds: sparse class ids, image ids are UUID-like strings.
    nabirds_files, truth["nabirds"] = official_indexed(
        "nabirds", [295 + 3 * i for i in range(555)], lambda c, k: f"{c:04d}/{c:08x}-{k:04d}-4e1f-9b2c.jpg"
    )
    write_tar(folder / "nabirds.tar.gz", nabirds_files)
    # Oxford Flowers: image i has labels[i-1]; setid holds 1-based image numbers per official split.
    rng = np.random.default_rng(0)
    numbers = rng.permutation(np.arange(1, 102 * 3 + 1))
    labels = np.zeros(len(numbers), dtype=float)
    setid = {"trnid": [], "valid": [], "tstid": []}
    for position, number in enumerate(numbers):
        labels[number - 1] = position % 102 + 1
        setid[("trnid", "valid", "tstid")[position // 102]].append(number)
    write_tar(folder / "102flowers.tgz", {f"jpg/image_{n:05d}.jpg": jpeg(int(n)) for n in numbers})
    (folder / "imagelabels.mat").write_bytes(mat({"labels": labels[None, :]}))
    (folder / "setid.mat").write_bytes(mat({k: np.array(v, dtype=float)[None, :] for k, v in setid.items()}))
    truth["oxford_flowers"] = {
        split: {f"jpg/image_{n:05d}.jpg": int(labels[n - 1]) for n in setid[key]}
        for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid"))
    }
    # Stanford Dogs: images.tar and lists.tar (train_list.mat / test_list.mat).
    dog_images, dog_lists, truth["stanford_dogs"] = {}, {}, {"train": {}, "test": {}}
    for split, per_class in (("train", 5), ("test", 1)):  # 5 training images: one goes to val
        files, classes = [], []
        for c in range(1, 121):
            for k in range(per_class):
                relative = f"n0208{c:04d}-Breed_{c}/n0208{c:04d}_{split}{k}.jpg"
                dog_images[f"Images/{relative}"] = jpeg(len(dog_images))
                files.append(relative)
                classes.append(c)
                truth["stanford_dogs"][split][relative] = c
        dog_lists[f"{split}_list.mat"] = mat(
            {
                "file_list": column_cell(files),
                "annotation_list": column_cell([f.removesuffix(".jpg") for f in files]),
                "labels": np.array(classes, dtype=float)[:, None],
            }
        )
    dog_lists["file_list.mat"] = dog_lists["train_list.mat"]
    write_tar(folder / "images.tar", dog_images)
    write_tar(folder / "lists.tar", dog_lists)
    # Stanford Cars, the release VPT used: car_ims.tgz + cars_annos.mat.
    rows, car_images, truth["stanford_cars"] = [], {}, {"train": {}, "test": {}}
    for number in range(1, 196 * 6 + 1):  # 5 training images per class, then one test image
        class_id, test = (number - 1) % 196 + 1, int(number > 196 * 5)
        path = f"car_ims/{number:06d}.jpg"
        car_images[path] = jpeg(number)
        box = {"bbox_x1": 1.0, "bbox_y1": 1.0, "bbox_x2": 3.0, "bbox_y2": 3.0}
        rows.append({"relative_im_path": path, **box, "class": float(class_id), "test": float(test)})
        truth["stanford_cars"]["test" if test else "train"][path] = class_id
    write_tar(folder / "car_ims.tgz", car_images)
    class_names = np.array([[f"Make Model {c}" for c in range(1, 197)]], dtype=object)
    (folder / "cars_annos.mat").write_bytes(
        mat({"annotations": struct_array(rows), "class_names": class_names})
    )
    return folder, truth


def prepare(root: Path, downloads: Path, *extra: str) -> int:
    return cli_main(["prepare", "fgvc", "--root", str(root), "--from", str(downloads), *extra])


@pytest.fixture(scope="module")
def built(tmp_path_factory, downloads) -> Path:
    root = tmp_path_factory.mktemp("fgvc")
    assert prepare(root, downloads[0]) == 0
    return root


def read_splits(root: Path, name: str) -> dict[str, dict[str, int]]:
    folder = root / FGVC_TASKS[name].folder
    return {split: json.loads((folder / f"{split}.json").read_text()) for split in ("train", "val", "test")}


@pytest.mark.parametrize("name", list(FGVC_TASKS))
def test_official_split_with_stratified_val(built, downloads, name):
    splits, truth = read_splits(built, name), downloads[1][name]
    task = FGVC_TASKS[name]
    if "val" in truth:  # Oxford Flowers ships its own val split: used as it is
        assert splits == truth
    else:  # train + val is exactly the official train set, test the official test set
        assert splits["train"].keys().isdisjoint(splits["val"])
        assert splits["train"] | splits["val"] == truth["train"]
        assert splits["test"] == truth["test"]
        per_class = Counter(truth["train"].values())
        held_out = Counter(splits["val"].values())
        # 10 % of each class, rounded half up (4 -> 0, 5..10 -> 1, as the archives were written)
        assert all(held_out[c] == math.floor(n * 0.1 + 0.5) for c, n in per_class.items())
        assert held_out.total() > 0
    assert len(set(splits["train"].values())) == task.num_classes
    for split in splits.values():  # every listed image was extracted, bytes as in the archive
        for key in split:
            assert (built / task.folder / task.image_dir / key).is_file()


def test_datamodule_and_data_check_accept_the_tree(built):
    assert check_tree(built) == 0
    for name, task in FGVC_TASKS.items():
        datamodule = FGVCDataModule(root=str(built), name=name, num_workers=0, image_size=8)
        datamodule.setup("fit")
        assert datamodule.num_classes == task.num_classes
        splits = read_splits(built, name)
        assert len(datamodule.dataset("train")) == len(splits["train"]) + len(splits["val"])  # VPT's trainval


def test_same_output_twice_and_the_seed_matters(tmp_path, built, downloads):
    again, other_seed = tmp_path / "again", tmp_path / "seed1"
    assert prepare(again, downloads[0], "--datasets", "cub", "stanford_dogs") == 0
    assert prepare(other_seed, downloads[0], "--datasets", "cub", "--seed", "1") == 0
    for name in ("cub", "stanford_dogs"):
        folder = FGVC_TASKS[name].folder
        for split in ("train", "val", "test"):
            assert (again / folder / f"{split}.json").read_bytes() == (
                built / folder / f"{split}.json"
            ).read_bytes()
    assert read_splits(other_seed, "cub")["val"] != read_splits(built, "cub")["val"]
    assert read_splits(other_seed, "cub")["test"] == read_splits(built, "cub")["test"]


def test_rerun_skips_complete_datasets(built, downloads, capsys):
    assert prepare(built, downloads[0], "--datasets", "cub") == 0
    assert "cub: complete (data check passes), skipped" in capsys.readouterr().out


def test_vpt_json_beside_the_archives_is_used_as_it_is(tmp_path, downloads):
    source, truth = downloads[0], downloads[1]["cub"]
    vpt = tmp_path / "downloads"
    vpt.mkdir()
    for file in source.iterdir():
        (vpt / file.name).symlink_to(file)
    (vpt / "CUB_200_2011").mkdir()
    keys = sorted(truth["train"])
    vpt_splits = {"train": keys[::2], "val": keys[1::2], "test": sorted(truth["test"])}
    for split, split_keys in vpt_splits.items():
        mapping = {k: (truth["train"] | truth["test"])[k] for k in split_keys}
        (vpt / "CUB_200_2011" / f"{split}.json").write_text(json.dumps(mapping))
    root = tmp_path / "fgvc"
    assert prepare(root, vpt, "--datasets", "cub") == 0
    for split in vpt_splits:
        written = (root / "CUB_200_2011" / f"{split}.json").read_bytes()
        assert written == (vpt / "CUB_200_2011" / f"{split}.json").read_bytes()


def test_missing_archive_is_one_line_and_the_others_are_built(tmp_path, downloads, capsys):
    partial = tmp_path / "downloads"
    partial.mkdir()
    for file in downloads[0].iterdir():
        if file.name not in ("nabirds.tar.gz", "lists.tar"):
            (partial / file.name).symlink_to(file)
    root = tmp_path / "fgvc"
    assert prepare(root, partial, "--datasets", "nabirds", "stanford_dogs", "oxford_flowers") == 1
    out = capsys.readouterr().out
    assert "nabirds: nabirds.tar.gz not in" in out and "https://dl.allaboutbirds.org/nabirds" in out
    assert "stanford_dogs: lists.tar not in" in out and "ImageNetDogs" in out
    assert (root / "OxfordFlower" / "test.json").is_file()
    assert not (root / "nabirds").exists() and not (root / "Stanford-dogs").exists()


def test_cars_devkit_release(tmp_path, downloads):
    """Without car_ims.tgz, the devkit release (cars_train/cars_test + devkit annotations) is used."""
    folder, rows = tmp_path / "downloads", {"train": [], "test": []}
    folder.mkdir()
    images: dict[str, dict[str, bytes]] = {"train": {}, "test": {}}
    for split, per_class in (("train", 2), ("test", 1)):
        for c in range(1, 197):
            for k in range(per_class):
                name = f"{len(images[split]) + 1:05d}.jpg"
                images[split][f"cars_{split}/{name}"] = jpeg(c * 3 + k)
                box = {"bbox_x1": 1.0, "bbox_y1": 1.0, "bbox_x2": 3.0, "bbox_y2": 3.0}
                rows[split].append({**box, "class": float(c), "fname": name})
    for split in ("train", "test"):
        write_tar(folder / f"cars_{split}.tgz", images[split])
    unlabelled_test = [{k: v for k, v in row.items() if k != "class"} for row in rows["test"]]
    write_tar(
        folder / "car_devkit.tgz",
        {
            "devkit/cars_train_annos.mat": mat({"annotations": struct_array(rows["train"])}),
            "devkit/cars_test_annos.mat": mat({"annotations": struct_array(unlabelled_test)}),
            "devkit/cars_meta.mat": mat(
                {"class_names": np.array([[f"Car {c}" for c in range(1, 197)]], object)}
            ),
        },
    )
    (folder / "cars_test_annos_withlabels.mat").write_bytes(mat({"annotations": struct_array(rows["test"])}))
    root = tmp_path / "fgvc"
    assert prepare(root, folder, "--datasets", "cars") == 0
    splits = read_splits(root, "stanford_cars")
    assert splits["test"] == {f"cars_test/{r['fname']}": int(r["class"]) for r in rows["test"]}
    assert splits["train"] | splits["val"] == {
        f"cars_train/{r['fname']}": int(r["class"]) for r in rows["train"]
    }
