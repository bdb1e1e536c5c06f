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
EPOCHS = 3


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vtab")
    write_synthetic_vtab_task(
        root, "shapes", NUM_CLASSES, n_train800=48, n_val200=16, n_test=64, image_size=32
    )
    return root


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
    tmp_path: Path, data_root: Path, trained: Path
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
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    rng = random.Random(14)

    def start(*extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            command + list(extra), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def stop(process: subprocess.Popen, sig: signal.Signals) -> str:
        process.send_signal(sig)
        _, err = process.communicate(timeout=120)
        return err.decode()

    # 1. SIGKILL while the second epoch's save is half-written: the first epoch's file survives, whole.
    process = start()
    wait_for(lambda: last.is_file() and partial.is_file(), process)
    stop(process, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    assert torch.load(last, weights_only=True)["epoch"] == 0  # saved at the end of epoch 0

    # 2. Resumed, then SIGKILL at a random moment (start-up, training, validation or a save).
    process = start("--ckpt_path", "last")
    time.sleep(rng.uniform(2.0, 8.0))
    stop(process, signal.SIGKILL)

    # 3. Resumed, then Ctrl-C (SIGINT) at a random moment once an epoch has ended in this process.
    process = start("--ckpt_path", "last")
    saved = last.stat().st_mtime_ns
    wait_for(lambda: last.stat().st_mtime_ns != saved, process)
    time.sleep(rng.uniform(0.0, 1.5))
    err = stop(process, signal.SIGINT)
    assert process.returncode in (1, 130) and "Traceback" not in err, err[-2000:]
    torch.load(last, weights_only=True)  # still whole

    # 4. Resumed to the end: the same tensors, bit for bit, as the uninterrupted run.
    process = start("--ckpt_path", "last")
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err.decode()[-3000:]
    expected = trainable_tensors(last_checkpoint(trained))
    resumed = trainable_tensors(last)
    assert expected.keys() == resumed.keys()
    for key, tensor in expected.items():
        assert torch.equal(tensor, resumed[key]), key
