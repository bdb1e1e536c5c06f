"""Numbers that are what they say (issue 17 section 2): a diverged run stops and never replaces a good
checkpoint, best_of_evals counts only evaluations on the tested task's test split, a partial test is marked
partial, a result goes to the run that trained the checkpoint, and a setting given beside a checkpoint is
honoured or refused, never dropped."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import NUM_CLASSES
from test_cli import result_line, tiny_run_config

from lily_lightning import UsageError, ViTClassifier, VTAB1kDataModule
from lily_lightning.cli import main
from lily_lightning.data import write_synthetic_vtab_task
from lily_lightning.training.results import result_folder


def fitted(tmp_path_factory: pytest.TempPathFactory, data_root: Path, name: str, *overrides: str) -> Path:
    """The config of a finished 1-epoch, 2-step run (it validated once, at the epoch's end)."""
    config = tiny_run_config(tmp_path_factory.mktemp(name), data_root, epochs=1)
    assert main(["fit", "--config", str(config), "--trainer.limit_train_batches", "2", *overrides]) == 0
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """Validated on the test split (split_mode train800val200, the default): the official protocol."""
    return fitted(tmp_path_factory, data_root, "trained")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """Validated on val200 (split_mode train800_val200), a split the test never reads."""
    return fitted(tmp_path_factory, data_root, "tuned", "--data.split_mode", "train800_val200")


@pytest.fixture(scope="module")
def other_task_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second task, ``rings``, with as many classes as ``shapes``: a checkpoint of one fits the other."""
    root = tmp_path_factory.mktemp("other")
    write_synthetic_vtab_task(root, "rings", NUM_CLASSES, n_train800=8, n_val200=4, n_test=16, seed=1)
    return root


def checkpoint_of(config: Path) -> Path:
    return config.parent / "run" / "checkpoints" / "last.ckpt"


def result_file(config: Path) -> Path:
    return config.parent / "run" / "result.json"


def fresh_run_holding(tmp_path: Path, data_root: Path, config: Path) -> Path:
    """A new run folder whose checkpoints/last.ckpt is a copy of ``config``'s (which stays untouched)."""
    copy = tiny_run_config(tmp_path, data_root, epochs=1)
    checkpoint_of(copy).parent.mkdir(parents=True)
    shutil.copy(checkpoint_of(config), checkpoint_of(copy))
    return copy


def run_test(config: Path, *args: str) -> int:
    return main(["test", "--config", str(config), *args])


# -- a diverged run --------------------------------------------------------------------------------------


def test_diverged_fit_stops_with_one_message_and_keeps_the_good_checkpoint(
    tmp_path: Path, data_root: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A new run started in a folder that holds a good last.ckpt, at a learning rate that diverges.
    config = fresh_run_holding(tmp_path, data_root, trained)
    good = checkpoint_of(config).read_bytes()
    assert main(["fit", "--config", str(config), "--model.lr", "1e12", "--model.warmup_epochs", "0"]) == 2
    err = capsys.readouterr().err
    # NaN at step 2 of 4; there the cosine curve (no warm-up, one epoch) is half-way: (1e12 + 1e-4) / 2.
    assert "training diverged" in err and "at epoch 0, step 2, learning rate 5e+11 (model.lr 1e+12)" in err
    assert "lower --model.lr" in err and "Traceback" not in err
    assert checkpoint_of(config).read_bytes() == good


def test_saving_non_finite_tensors_is_refused_and_the_previous_file_stays(
    tmp_path: Path, data_root: Path, trained: Path
) -> None:
    # In Python, where no loss check stands in front of the save: one step, a good save, then a NaN weight.
    model = ViTClassifier.load_from_checkpoint(checkpoint_of(trained))
    data = VTAB1kDataModule(str(data_root), "shapes", batch_size=16, num_workers=0, image_size=32)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(model, data)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    good = path.read_bytes()
    with torch.no_grad():
        model.model.head.weight[0, 0] = float("nan")
    saved = len(torch.load(path, weights_only=False)["state_dict"])
    with pytest.raises(UsageError, match=rf"refusing to save a checkpoint: 1 of {saved} tensors hold NaN"):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == good


@pytest.fixture(scope="module")
def diverged_checkpoint(tmp_path_factory: pytest.TempPathFactory, trained: Path) -> Path:
    """``trained``'s checkpoint with three tensors spoilt: a NaN, an inf and a -inf."""
    checkpoint = torch.load(checkpoint_of(trained), weights_only=False)
    state = checkpoint["state_dict"]
    for name, value in zip(sorted(state)[:3], ("nan", "inf", "-inf"), strict=True):
        state[name].view(-1)[0] = float(value)
    path = tmp_path_factory.mktemp("diverged") / "diverged.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("command", ["validate", "test", "predict", "export"])
def test_checkpoint_with_non_finite_tensors_is_refused(
    command: str,
    tmp_path: Path,
    trained: Path,
    diverged_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "model.safetensors"
    extra = ["--out", str(out)] if command == "export" else []
    args = [command, "--config", str(trained), "--ckpt_path", str(diverged_checkpoint), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    tensors = len(torch.load(diverged_checkpoint, weights_only=False)["state_dict"])
    assert f"checkpoint {diverged_checkpoint} is unusable: 3 of {tensors} tensors hold NaN or inf" in err
    assert "RESULT" not in capsys.readouterr().out and not out.exists()


# -- best_of_evals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "note"),
    [
        ("validated on val200", "its validation ran on val200, not on the test split test"),
        ("tested on another task", "its validation ran on task shapes, this test is on rings"),
    ],
)
def test_best_of_evals_is_absent_unless_validation_ran_on_the_tested_split(
    case: str,
    note: str,
    trained: Path,
    tuned: Path,
    other_task_root: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    config, data = (tuned, []) if case == "validated on val200" else (trained, [])
    if case == "tested on another task":
        data = ["--data.root", str(other_task_root), "--data.name", "rings"]
    result_file(config).unlink(missing_ok=True)
    capsys.readouterr()
    assert run_test(config, "--ckpt_path", "last", *data) == 0
    line = result_line(capsys.readouterr().out)
    assert line["best_of_evals"] == "n/a" and line["top1"] == line["final"]
    assert f"best_of_evals=n/a: {note}" in caplog.text
    if case == "validated on val200":
        record = json.loads(result_file(config).read_text())
        assert record["best_of_evals"] is None and note in record["best_of_evals_note"]
    else:  # no result of the run that trained on shapes: it was not tested on shapes
        assert not result_file(config).exists()

    assert run_test(config, "--ckpt_path", "last", *data, "--model.report", "best_of_evals") == 2
    assert "so its best is no test accuracy" in capsys.readouterr().err


# -- partial tests ---------------------------------------------------------------------------------------


def test_partial_test_is_marked_partial_and_a_whole_one_is_not(
    data_root: Path, trained: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    test_images = len((data_root / "shapes" / "test.txt").read_text().splitlines())  # 64
    capsys.readouterr()
    # 2 batches of 16: half of the test split.
    half = ["--data.eval_batch_size", "16", "--trainer.limit_test_batches", "2"]
    assert run_test(trained, "--ckpt_path", "last", *half) == 0
    # A partial test is recorded apart from result.json (tests/test_records.py): the newest evaluation.
    newest = max(result_file(trained).parent.glob("evaluations/test-*.json"), key=lambda p: p.stat().st_mtime)
    line, record = result_line(capsys.readouterr().out), json.loads(newest.read_text())
    assert (line["images"], line["partial"]) == ("32", "true")
    assert (record["images"], record["partial"]) == (32, True)
    assert f"partial test: 32 of the {test_images} test images" in caplog.text

    assert run_test(trained, "--ckpt_path", "last") == 0
    line, record = result_line(capsys.readouterr().out), json.loads(result_file(trained).read_text())
    assert (line["images"], line["partial"]) == (str(test_images), "false")
    assert (record["images"], record["partial"]) == (test_images, False)


# -- whose result --------------------------------------------------------------------------------------------


def test_another_runs_checkpoint_is_that_runs_result_and_a_loose_one_nobodys(
    tmp_path: Path, data_root: Path, trained: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Tested from another run's config (its own run folder): the result is the checkpoint's run's.
    config = tiny_run_config(tmp_path / "other_run", data_root, epochs=1)
    result_file(trained).unlink(missing_ok=True)
    assert run_test(config, "--ckpt_path", str(checkpoint_of(trained))) == 0
    assert not result_file(config).exists()
    assert json.loads(result_file(trained).read_text())["task"] == "shapes"

    # A checkpoint copied out of any run folder belongs to no run: the RESULT line is all there is.
    loose = tmp_path / "copied.ckpt"
    shutil.copy(checkpoint_of(trained), loose)
    assert run_test(config, "--ckpt_path", str(loose)) == 0
    assert not result_file(config).exists()
    assert f"result.json not written: the checkpoint {loose} is not inside a run folder" in caplog.text


@pytest.mark.parametrize(
    ("checkpoint", "trained_task", "expected"),
    [
        (None, None, "runs/shapes/lily"),  # the model this process trained
        ("runs/shapes/lily/checkpoints/last.ckpt", "shapes", "runs/shapes/lily"),
        ("elsewhere/checkpoints/last.ckpt", "shapes", "elsewhere"),
        ("elsewhere/checkpoints/last.ckpt", "rings", None),
        ("elsewhere/last.ckpt", "shapes", None),
        ("runs/shapes/lily/checkpoints/last.ckpt", None, "runs/shapes/lily"),  # older: own run only
        ("elsewhere/checkpoints/last.ckpt", None, None),
    ],
)
def test_result_folder_is_the_run_that_trained_the_checkpoint_on_this_task(
    checkpoint: str | None, trained_task: str | None, expected: str | None
) -> None:
    folder, why = result_folder(Path("runs/shapes/lily"), checkpoint, trained_task, "shapes")
    assert folder == (None if expected is None else Path(expected))
    assert bool(why) == (expected is None)


# -- settings beside a checkpoint ------------------------------------------------------------------------


def fit_metric(config: Path, name: str) -> float:
    """The last value of ``name`` in the fit's CSV log (written by Lightning, not by the RESULT line)."""
    # The fit ran first in its run folder: version_0 (each later test adds a version).
    rows = list(csv.DictReader((config.parent / "run" / "csv" / "version_0" / "metrics.csv").open()))
    return float([row[name] for row in rows if row.get(name)][-1])


def test_report_given_beside_a_checkpoint_file_is_honoured(
    trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert (
        run_test(trained, "--ckpt_path", str(checkpoint_of(trained)), "--model.report", "best_of_evals") == 0
    )
    line = result_line(capsys.readouterr().out)
    assert line["report"] == "best_of_evals" and line["top1"] == line["best_of_evals"]
    # The best of the fit's one validation (on the test split) and this test.
    expected = max(float(line["final"]), fit_metric(trained, "val/acc_best"))
    assert float(line["best_of_evals"]) == pytest.approx(expected, abs=5e-5)


def test_weights_given_beside_a_checkpoint_file_are_the_ones_loaded(
    tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The checkpoint says "no weights file" (random backbone); the command names one, which does not exist.
    moved = tmp_path / "moved" / "backbone.pth"
    assert run_test(trained, "--ckpt_path", str(checkpoint_of(trained)), "--model.weights", str(moved)) == 2
    assert f"pretrained weights not found: {moved}" in capsys.readouterr().err


@pytest.mark.parametrize("ckpt_path", ["last", "file"])
def test_resuming_with_another_learning_rate_is_refused(
    ckpt_path: str, tmp_path: Path, data_root: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = fresh_run_holding(tmp_path, data_root, trained)
    checkpoint = checkpoint_of(config)
    before = checkpoint.read_bytes()
    given = "last" if ckpt_path == "last" else str(checkpoint)
    args = ["fit", "--config", str(config), "--trainer.max_epochs", "2", "--ckpt_path", given]
    assert main([*args, "--model.lr", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "model.lr: checkpoint has 0.003, config says 0.3" in err and "Traceback" not in err
    assert checkpoint.read_bytes() == before
