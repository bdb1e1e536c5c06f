"""Nothing lost, nothing faked: kills and Ctrl-C during `fit`, refused untrained evaluation, and one message
(exit 2, no traceback) for each mistake a user makes with checkpoints, configs and data."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_cli import NUM_CLASSES, tiny_run_config, trainable_tensors

from lily_lightning.cli import main
from lily_lightning.data import write_synthetic_vtab_task

TESTS = Path(__file__).parent
EPOCHS = 4  # the kills below leave at least one epoch to run when SIGINT is sent


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """The config of an uninterrupted EPOCHS-epoch run, already fitted (its checkpoint is the reference)."""
    config = tiny_run_config(tmp_path_factory.mktemp("whole"), data_root, epochs=EPOCHS)
    assert main(["fit", "--config", str(config)]) == 0
    return config


def last_checkpoint(config: Path) -> Path:
    return config.parent / "run" / "checkpoints" / "last.ckpt"


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"fit ended (exit {process.returncode}) before the moment to stop it"
        assert time.monotonic() < deadline, "timed out waiting for the fit subprocess"
        time.sleep(0.05)


def test_fit_killed_and_interrupted_at_random_resumes_bit_identical(
    tmp_path: Path, data_root: Path, trained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_run_config(tmp_path, data_root, epochs=EPOCHS)
    # Each save stalls 0.5 s half-way through its write, so a kill can land inside one.
    slow = tmp_path / "slow_save.yaml"
    slow.write_text(
        "trainer:\n  plugins:\n    - class_path: slow_checkpoint_io.SlowCheckpointIO\n"
        "      init_args: {stall_s: 0.5}\n"
    )
    last = last_checkpoint(config)
    partial = last.with_name(".last.ckpt.partial")
    command = [sys.executable, "-m", "lily_lightning", "fit", "--config", str(config), "--config", str(slow)]
    tests_first = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONFAULTHANDLER": "1", "PYTHONPATH": tests_first}
    rng = random.Random(14)

    def start(*extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            command + list(extra),
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            # A shell's background job inherits SIGINT ignored; Ctrl-C must reach this one.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )

    def stop(process: subprocess.Popen, sig: signal.Signals) -> str:
        process.send_signal(sig)
        try:
            _, err = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # say where it hangs: every thread's stack (PYTHONFAULTHANDLER)
            process.send_signal(signal.SIGABRT)
            _, err = process.communicate(timeout=60)
            raise AssertionError(f"no exit 120 s after {sig.name}:\n{err.decode()[-5000:]}") from None
        return err.decode()

    # 1. SIGKILL while the second epoch's save is half-written: the first epoch's file survives, whole.
    process = start()
    wait_for(lambda: last.is_file() and partial.is_file(), process)
    stop(process, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    assert torch.load(last, weights_only=True)["epoch"] == 0  # saved at the end of epoch 0

    # 2. Resumed, then SIGKILL at a random moment (start-up, training, validation or a save), at the latest
    # right after this process saved its first epoch (epoch 1): at most epochs 0 and 1 are done.
    process = start("--ckpt_path", "last")
    saved, kill_at = last.stat().st_mtime_ns, time.monotonic() + rng.uniform(2.0, 8.0)
    wait_for(lambda: time.monotonic() > kill_at or last.stat().st_mtime_ns != saved, process)
    stop(process, signal.SIGKILL)

    # 3. Resumed, then Ctrl-C (SIGINT) as soon as this process saved an epoch (epoch 1 or 2): on a quiet
    # machine a later moment could fall after the last epoch, when there is nothing left to interrupt.
    process = start("--ckpt_path", "last")
    saved = last.stat().st_mtime_ns
    wait_for(lambda: last.stat().st_mtime_ns != saved, process)
    assert torch.load(last, weights_only=True)["epoch"] <= EPOCHS - 2
    err = stop(process, signal.SIGINT)
    assert process.returncode in (1, 130) and "Traceback" not in err, err[-2000:]
    torch.load(last, weights_only=True)  # still whole

    # 4. Resumed to the end (in this process: nothing left to stop): the same tensors, bit for bit, as the
    # uninterrupted run.
    monkeypatch.chdir(tmp_path)
    assert main([*command[3:], "--ckpt_path", "last"]) == 0
    expected = trainable_tensors(last_checkpoint(trained))
    resumed = trainable_tensors(last)
    assert expected.keys() == resumed.keys()
    for key, tensor in expected.items():
        assert torch.equal(tensor, resumed[key]), key
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # overwritten, never versioned


# -- evaluation refuses an untrained model --


def refused(capsys: pytest.CaptureFixture[str], args: list[str], *expected: str) -> str:
    """Run the CLI in-process: exit 2, no traceback anywhere, one message naming the problem."""
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert err.count("error:") == 1
    for text in expected:
        assert text in err, err
    return err


@pytest.mark.parametrize("subcommand", ["test", "predict"])
def test_evaluation_without_checkpoint_is_refused(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str], subcommand: str
) -> None:
    config = tiny_run_config(tmp_path, data_root, epochs=1)
    run = config.parent / "run"
    refused(capsys, [subcommand, "--config", str(config)], f"`{subcommand}` needs a trained", str(run))
    # `last` with no run in this folder, and an unrelated older `last-v1.ckpt` beside it is not taken for it.
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last-v1.ckpt").write_bytes(b"an older run's file")
    refused(capsys, [subcommand, "--config", str(config), "--ckpt_path", "last"], "there is no", "last.ckpt")
    assert not (run / "predictions.csv").exists()


# -- checkpoint mistakes --


def test_unreadable_checkpoints_are_one_message(
    tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    test = ["test", "--config", str(trained), "--ckpt_path"]
    refused(capsys, [*test, str(tmp_path / "nothere.ckpt")], "does not exist")
    (tmp_path / "garbage.ckpt").write_text("not a checkpoint\n")
    refused(capsys, [*test, str(tmp_path / "garbage.ckpt")], "cannot be read", "garbage.ckpt")
    refused(capsys, [*test, str(tmp_path)], "is a folder, not a checkpoint file")


def test_truncated_last_checkpoint_is_one_message(
    tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(trained.read_text().replace(str(trained.parent / "run"), str(tmp_path / "run")))
    last = last_checkpoint(config)
    last.parent.mkdir(parents=True)
    last.write_bytes(
        last_checkpoint(trained).read_bytes()[:50_000]
    )  # as a kill during a plain write leaves it
    refused(capsys, ["fit", "--config", str(config), "--ckpt_path", "last"], "cannot be read", "truncated")


def test_checkpoint_with_other_settings_names_the_setting(
    tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    resume = ["fit", "--config", str(trained), "--ckpt_path", "last"]
    refused(capsys, [*resume, "--model.lily.rank", "8"], "model.lily.rank: checkpoint has 4, config says 8")

    # A 10-class checkpoint on this 4-class task: the head and the saved num_classes say 10.
    checkpoint = torch.load(last_checkpoint(trained), weights_only=True)
    checkpoint["hyper_parameters"]["num_classes"] = 10
    checkpoint["state_dict"]["model.head.weight"] = torch.zeros(10, 64)
    checkpoint["state_dict"]["model.head.bias"] = torch.zeros(10)
    torch.save(checkpoint, tmp_path / "ten.ckpt")
    test = ["test", "--config", str(trained), "--ckpt_path", str(tmp_path / "ten.ckpt")]
    refused(capsys, test, "model.num_classes: checkpoint has 10, config says 4", "another task")


# -- configuration and data mistakes --


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--model.backbone", "resnet18"], ["backbone 'resnet18' cannot be built as a ViT"]),
        (["--model.backbone", "vit_tinyy_patch16_224"], ["did you mean vit_tiny_patch16_224"]),
        (["--data.image_size", "64"], ["64 px images (data.image_size)", "32x32 (model.img_size)"]),
        (["--data.batch_size", "0"], ["data.batch_size must be at least 1, got 0"]),
        (["--trainer.accelerator", "gpu"], ["trainer cannot be set up", "gpu", "trainer.accelerator"]),
        (["--data.num_classes", "3"], ["labels outside [0, 3)", "data.num_classes=3 was given"]),
    ],
)
def test_config_mistakes_are_one_message(
    tmp_path: Path,
    data_root: Path,
    capsys: pytest.CaptureFixture[str],
    override: list[str],
    expected: list[str],
) -> None:
    if override[0] == "--trainer.accelerator" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = tiny_run_config(tmp_path, data_root, epochs=1)
    err = refused(capsys, ["fit", "--config", str(config), *override], *expected)
    assert "re-download" not in err


def test_empty_config_and_relative_missing_root_are_one_message(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    refused(capsys, ["fit", "--config", str(tmp_path / "empty.yaml")], "empty.yaml is empty", "YAML mapping")
    monkeypatch.chdir(tmp_path)
    config = tiny_run_config(tmp_path, data_root, epochs=1)
    refused(
        capsys,
        ["fit", "--config", str(config), "--data.root", "data/vtab-1k"],
        str(tmp_path / "data" / "vtab-1k"),
        f"the working directory is {tmp_path}",
    )


def test_data_error_inside_a_loader_worker_is_its_own_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = write_synthetic_vtab_task(tmp_path / "data", "shapes", NUM_CLASSES, 16, 4, 16, image_size=32)
    broken = task / "images" / "train800" / "00003.png"
    broken.write_bytes(broken.read_bytes()[:60])
    config = tiny_run_config(tmp_path, tmp_path / "data", epochs=1)
    workers = ["--data.num_workers", "2", "--data.cache_images", "false"]
    err = refused(capsys, ["fit", "--config", str(config), *workers], "Cannot decode image", str(broken))
    assert "DataLoader worker" not in err


def test_garbage_weights_file_says_what_is_wrong(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "weights.pth").write_text("not weights\n")
    config = tiny_run_config(tmp_path, data_root, epochs=1)
    args = ["fit", "--config", str(config), "--model.weights", str(tmp_path / "weights.pth")]
    err = refused(capsys, args, "damaged, truncated or not a PyTorch state dict")
    assert "weights_only" not in err


def test_label_typo_in_a_custom_task_is_logged_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from lily_lightning.data import VTAB1kDataModule

    task = write_synthetic_vtab_task(tmp_path, "mine", NUM_CLASSES, 8, 4, 8, image_size=8)
    lines = (task / "train800val200.txt").read_text().splitlines()
    lines[0] = lines[0].rsplit(maxsplit=1)[0] + " 9"  # a "9" typed for a class 0..3
    (task / "train800val200.txt").write_text("\n".join(lines) + "\n")
    with caplog.at_level("INFO", logger="lily_lightning"):
        assert VTAB1kDataModule(root=str(tmp_path), name="mine").num_classes == 10
    warning = next(r for r in caplog.records if r.levelname == "WARNING").getMessage()
    assert "num_classes=10 inferred" in warning and "not 0..9: 0, 1, 2, 3, 9" in warning


# -- `data check` refuses what `fit` refuses --


@pytest.mark.parametrize("damage", ["none", "no train800val200.txt", "empty train800val200.txt"])
def test_data_check_fails_exactly_where_fit_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    task = write_synthetic_vtab_task(tmp_path / "data", "shapes", NUM_CLASSES, 16, 4, 16, image_size=32)
    if damage == "no train800val200.txt":
        (task / "train800val200.txt").unlink()
    elif damage == "empty train800val200.txt":
        (task / "train800val200.txt").write_text("")
    config = tiny_run_config(tmp_path, tmp_path / "data", epochs=1)
    fit = main(["fit", "--config", str(config), "--trainer.fast_dev_run", "true"])
    check = main(["data", "check", "--root", str(tmp_path / "data")])
    assert (fit, check) == ((0, 0) if damage == "none" else (2, 1))
    if damage != "none":
        assert "train800val200.txt" in capsys.readouterr().out.replace("\n", "")  # Rich wraps at 80


def test_last_checkpoint_every_epoch_and_every_n_steps(tmp_path: Path) -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lily_lightning.training.checkpointing import AtomicCheckpointIO, LastCheckpoint

    saves: list[tuple[int, int]] = []

    class Recording(AtomicCheckpointIO):
        def save_checkpoint(self, checkpoint: dict, path: Path, storage_options: None = None) -> None:
            saves.append((checkpoint["epoch"], checkpoint["global_step"]))
            super().save_checkpoint(checkpoint, path, storage_options)

    trainer = Trainer(
        max_epochs=2,
        limit_train_batches=5,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[LastCheckpoint(tmp_path, every_n_train_steps=2)],
        plugins=[Recording()],
    )
    trainer.fit(BoringModel())
    # Steps 2, 4 | end of epoch 0 (step 5) | 6, 8, 10 | end of epoch 1 (step 10 again: it ends the epoch).
    assert saves == [(0, 2), (0, 4), (0, 5), (1, 6), (1, 8), (1, 10), (1, 10)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
