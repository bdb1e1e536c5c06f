"""Studies: seeds x grid with selection on validation, local parallel runs, one writer per run folder, SLURM
through submitit (fake SLURM commands that run the jobs here), and `sweep --status`."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import one_epoch_config

from lily_lightning.cli import main
from lily_lightning.data import write_synthetic_vtab_task
from lily_lightning.training.run_lock import LOCK_FILE, STALE_AFTER_S, RunLock, RunLocked

TESTS = Path(__file__).parent
TASKS = ["alpha", "beta", "gamma"]
# One clearly worse point: lr 0 trains nothing; 3e-2 lets LoRA learn in one step. 0.0 is 0 again: one point.
GRID = ["model.lr=3e-2,0,0.0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Three generated 4-class tasks (8 images per split) and a one-step config on timm's test_vit."""
    root = tmp_path_factory.mktemp("studies")
    for index, name in enumerate(TASKS):
        write_synthetic_vtab_task(root / "data", name, 4, n_train800=8, n_val200=8, n_test=8, seed=index)
    trainer = "  deterministic: true\n  logger: false\n  num_sanity_val_steps: 0"
    model = """  backbone: test_vit
  lily: {rank: 2, num_experts: 2}
  lora: {rank: 2, alpha: 2}
  lr: 3.0e-3
  warmup_epochs: 0
  min_lr: 0.0"""
    config = one_epoch_config(root / "tiny.yaml", root / "data", trainer, model)
    return config, root


def run_folders(runs: Path) -> list[str]:
    return sorted(p.parent.relative_to(runs).as_posix() for p in runs.rglob("sweep_run.json"))


def test_study_selects_on_validation_without_test_and_a_rerun_trains_nothing(
    setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, root = setup
    runs = tmp_path / "runs"
    args = ["sweep", "--config", str(config), "--tasks", *TASKS, "--methods", "lily", "lora"]
    args += ["--seeds", "0", "1", "--grid", *GRID, "--select-on", "val", "--parallel", "2"]
    # Validation during fit off (as configs/demo.yaml has it): the selection still scores the whole val split.
    args += ["--runs-dir", str(runs), "--", "--trainer.limit_val_batches", "0"]
    # 1. alpha's test list is withheld: its selection still completes; only its final runs cannot test.
    test_list = root / "data" / "alpha" / "test.txt"
    test_list.rename(test_list.with_suffix(".withheld"))
    try:
        assert main(args) == 1
    finally:
        test_list.with_suffix(".withheld").rename(test_list)
    out = capsys.readouterr().out
    for method in ("lily", "lora"):
        for variant in ("lr=3e-2", "lr=0"):
            assert (runs / "alpha" / method / "select" / variant / "seed0" / "validation.json").is_file()
        for seed in (0, 1):
            assert f"alpha {method} seed{seed}: not finished: error:" in out
    assert out.count(": not finished:") == 4  # only alpha's four final runs
    assert "--grid model.lr: 0.0 is the value 0 again" in out and "limit_val_batches is 0" in out
    for task in TASKS:  # every selection scored all 8 val200 images; the class count never read test.txt
        validation = json.loads(
            (runs / task / "lily" / "select" / "lr=0" / "seed0" / "validation.json").read_text()
        )
        assert validation["images"] == 8 and not validation.get("partial")
        log = (runs / task / "lily" / "select" / "lr=0" / "seed0" / "sweep_run.log").read_text()
        assert "largest label in train800.txt, val200.txt (labels" in " ".join(log.split())

    # 2. The same command again: only alpha's final runs train; 3. and again: nothing trains.
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count(": fit + ") == 4 and all(
        f"alpha {m} seed{s}: fit + test" in out for m in ("lily", "lora") for s in (0, 1)
    )
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob("*.json")}
    assert main(args) == 0
    out = capsys.readouterr().out
    assert ": fit + " not in out and out.count("skipped, finished before") == 24
    assert stamps == {p: p.stat().st_mtime_ns for p in runs.rglob("*.json")}

    # Every run folder once: 3 tasks x 2 methods x 2 points of selection (first seed), x 2 seeds final.
    expected = [f"{t}/{m}/seed{s}" for t in TASKS for m in ("lily", "lora") for s in (0, 1)]
    expected += [
        f"{t}/{m}/select/{v}/seed0" for t in TASKS for m in ("lily", "lora") for v in ("lr=0", "lr=3e-2")
    ]
    assert run_folders(runs) == sorted(expected)

    # The chosen point is the higher validation top-1 (the first in grid order on a tie), in every result.
    strictly_better = 0
    for task in TASKS:
        for method in ("lily", "lora"):
            scores = {
                value: json.loads(
                    (
                        runs / task / method / "select" / f"lr={value}" / "seed0" / "validation.json"
                    ).read_text()
                )["val_top1"]
                for value in ("3e-2", "0")
            }
            best = "3e-2" if scores["3e-2"] >= scores["0"] else "0"
            strictly_better += scores["3e-2"] > scores["0"]
            for seed in (0, 1):
                result = json.loads((runs / task / method / f"seed{seed}" / "result.json").read_text())
                assert result["selection"]["point"] == {"model.lr": best}
                assert result["selection"]["val_top1"] == scores[best] and result["seed"] == seed
                assert result["split_mode"] == "train800val200"
    assert strictly_better >= 3  # LoRA learns in one step on each task: lr 0 is clearly worse there


def test_two_sweeps_at_once_train_each_run_once(setup, tmp_path: Path) -> None:
    config, _ = setup
    runs = tmp_path / "runs"
    args = ["sweep", "--config", str(config), "--tasks", "alpha", "beta", "--methods", "lora"]
    args += ["--runs-dir", str(runs)]
    start = threading.Barrier(2)
    codes: list[int] = []

    def sweep() -> None:
        start.wait()
        codes.append(main(args))

    threads = [threading.Thread(target=sweep) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert codes == [0, 0]
    log = (runs / "sweep.log").read_text()
    for task in ("alpha", "beta"):
        assert log.count(f"{task} lora: fit + test") == 1
        assert (runs / task / "lora" / "result.json").is_file()
        assert not (runs / task / "lora" / LOCK_FILE).exists()


def test_fit_started_by_hand_refuses_a_held_run_folder(setup, tmp_path: Path, capsys) -> None:
    config, _ = setup
    run_dir = tmp_path / "run"
    with RunLock(run_dir):  # this process holds it, as a sweep's run would
        code = main(["fit", "--config", str(config), "--trainer.default_root_dir", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "is being trained by" in err and f"pid {os.getpid()}" in err
    assert socket.gethostname() in err and not (run_dir / "checkpoints").exists()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(timeout=60)
    return process.pid


@pytest.mark.parametrize(
    ("host", "pid", "job_id", "age_s", "stale"),
    [
        ("here", "dead", None, 0, True),  # its process is gone
        ("here", "alive", None, 0, False),
        ("elsewhere", 1, None, 0, False),  # another host, refreshed: still working
        ("elsewhere", 1, None, STALE_AFTER_S + 60, True),  # another host, not refreshed
        ("elsewhere", 1, "77_3", 0, True),  # this SLURM job before its requeue
    ],
)
def test_a_stale_lock_is_taken_over_with_a_warning(
    tmp_path: Path, monkeypatch, caplog, host, pid, job_id, age_s, stale
) -> None:
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    holder = {
        "host": socket.gethostname() if host == "here" else "node-elsewhere",
        "pid": dead_pid() if pid == "dead" else os.getpid() if pid == "alive" else pid,
        "job_id": job_id,
        "token": "theirs",
        "since": "earlier",
    }
    lock_file = tmp_path / LOCK_FILE
    lock_file.write_text(json.dumps(holder))
    os.utime(lock_file, (time.time() - age_s, time.time() - age_s))
    with caplog.at_level(logging.WARNING, logger="lily_lightning"):
        if stale:
            with RunLock(tmp_path) as lock:
                assert json.loads(lock_file.read_text())["token"] == lock.token != "theirs"
            assert "Taking over" in caplog.text and not lock_file.exists()
        else:
            with pytest.raises(RunLocked, match=f"pid {holder['pid']}"):
                RunLock(tmp_path).acquire()
            assert json.loads(lock_file.read_text())["token"] == "theirs"


def trainable(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


def test_slurm_array_requeued_mid_fit_resumes_to_the_same_tensors(
    setup, tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fake_slurm

    config, _ = setup
    fake_slurm.install(tmp_path / "bin", tmp_path / "slurm_state")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(tmp_path / "slurm_state"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    # Three epochs whose checkpoint saves each stall 1 s: time to signal the job while `fit` runs.
    slow = tmp_path / "slow.yaml"
    slow.write_text(
        "trainer:\n  max_epochs: 3\n  plugins:\n    - class_path: slow_checkpoint_io.SlowCheckpointIO\n"
        "      init_args: {stall_s: 1.0}\n"
    )
    runs = tmp_path / "runs"
    args = ["sweep", "--config", str(config), "--config", str(slow), "--tasks", "alpha"]
    args += ["--methods", "lily", "lora", "--runs-dir", str(runs), "--launcher", "slurm"]
    args += ["--slurm-partition", "gpu", "--slurm-time", "01:30:00", "--slurm-gpus-per-run", "1"]
    args += ["--slurm-array-parallelism", "1", "--slurm-extra", "account=lily", "qos=normal"]
    codes: list[int] = []
    sweep = threading.Thread(target=lambda: codes.append(main(args)))
    sweep.start()
    # Preempt the first task (lily) once its first epoch is saved, as SLURM does: signal its job step.
    lily = runs / "alpha" / "lily"
    deadline = time.monotonic() + 300
    while not (lily / "checkpoints" / "last.ckpt").is_file():
        assert time.monotonic() < deadline and sweep.is_alive()
        time.sleep(0.05)
    job_id = json.loads((lily / "slurm_job.json").read_text())["job_id"]
    subprocess.run(["scancel", job_id, "--signal", "USR2"], check=True, timeout=60)
    sweep.join(timeout=600)
    assert codes == [0]
    out = capsys.readouterr().out
    assert out.count("done top1=") == 2

    # The sbatch script submitit generated: one array of 2, one at a time, the options asked for.
    script = next((runs / "slurm").glob("*_submission.sh")).read_text()
    for line in (
        "#SBATCH --array=0-1%1",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=90",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --account=lily",
        "#SBATCH --qos=normal",
        "#SBATCH --signal=USR2@120",
    ):
        assert line in script
    # Requeued with the same job id, and resumed from its checkpoint ...
    log = (lily / "sweep_run.log").read_text()
    assert (
        log.count("python -m lily_lightning fit") == 2 and "--ckpt_path" in log.split("lily_lightning fit")[2]
    )
    assert "Restored all states from the checkpoint" in log
    # ... to the tensors of an uninterrupted run of the same arguments.
    recorded = json.loads((lily / "sweep_run.json").read_text())["args"]
    reference = tmp_path / "reference"
    assert main(["fit", *recorded, "--trainer.default_root_dir", str(reference)]) == 0
    expected, got = (
        trainable(reference / "checkpoints" / "last.ckpt"),
        trainable(lily / "checkpoints" / "last.ckpt"),
    )
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)

    # `sweep --status` says where each run stands, with its SLURM job; nothing is left in the queue.
    assert main(["sweep", "--status", str(runs)]) == 0
    status = capsys.readouterr().out
    assert (
        "alpha/lily: done (top1=" in status and f"SLURM job {job_id}" in status and "2 runs: 2 done" in status
    )
    assert subprocess.run(["squeue"], capture_output=True, text=True, check=True).stdout == ""
    # The same command again submits nothing.
    jobs_before = json.loads((tmp_path / "slurm_state" / "jobs.json").read_text())
    assert main(args) == 0
    assert "skipped, finished before" in capsys.readouterr().out
    assert json.loads((tmp_path / "slurm_state" / "jobs.json").read_text()) == jobs_before
