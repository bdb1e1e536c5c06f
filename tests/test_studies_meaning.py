"""Studies keyed by what settings mean, not by how they are spelt (issue 24, part 3): a moved or `cd`-ed
sweep matches its finished runs, `report` keeps seeds trained with other settings apart, grid values are read
with their key's type, a selection validates the whole val split, the class count never reads the test list,
and an interrupted sweep says how to resume it."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from lily_lightning.cli import main
from lily_lightning.data import VTAB1kDataModule, write_synthetic_vtab_task
from lily_lightning.errors import UsageError
from lily_lightning.studies import runs as runs_module
from lily_lightning.studies.grid import Study, parse_grid
from lily_lightning.studies.grid_values import typed_axes
from lily_lightning.studies.report import write_report
from lily_lightning.studies.runs import ChildRunner, RunSpec, execute, other_settings

RESULT = {"method": "lily", "backbone": "vit_tiny", "trainable_params": 110, "head_params": 10}


def write_result(run_dir: Path, task: str, top1: float, seed: int) -> None:
    """A complete result.json as `test` writes it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {**RESULT, "task": task, "top1": top1, "seed": seed, "images": 64, "partial": False}
    (run_dir / "result.json").write_text(json.dumps(record))


class FinishingRunner:
    """Stands in for the child process: the run 'finishes' by writing a result, as `test` would."""

    def run(self, steps: list[list[str]], log: Path, env: dict[str, str], lock: object) -> int:
        write_result(log.parent, "alpha", 0.5, 0)
        return 0


def study(runs_dir: Path, config: Path, extra: list[str]) -> Study:
    return Study(runs_dir, lambda task, method: [config], extra, ["alpha"], ["lily"], [0], [], None)


CONFIG = """# a study's base config
trainer:
  max_epochs: 1
model:
  lr: 1.0e-3
data:
  class_path: lily_lightning.data.VTAB1kDataModule
  init_args: {root: data, batch_size: 8}
"""


def test_a_moved_or_cd_sweep_matches_its_finished_runs_and_names_a_real_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "configs" / "c.yaml").write_text(CONFIG)
    monkeypatch.chdir(project)
    # 1. The first sweep: relative --config and --runs-dir; its run finishes and records its settings.
    first = study(Path("runs"), Path("configs/c.yaml"), ["--model.weight_decay", "1e-4"])
    spec = first.training_specs()[0]
    execute(spec, False, FinishingRunner(), {}, print)  # type: ignore[arg-type]
    assert (project / "runs" / "alpha" / "lily" / "seed0" / "sweep_run.json").is_file()

    # 2. The runs folder moved to shared storage, the same sweep run from elsewhere with absolute paths
    # and another spelling of the same value (1e-4 = 0.0001): the same settings, so not "other settings".
    shared = tmp_path / "shared" / "runs"
    shutil.move(project / "runs", shared)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = project / "configs" / "c.yaml"
    again = study(shared, config, ["--model.weight_decay=0.0001"]).training_specs()[0]
    assert other_settings(again) is None
    config.write_text(CONFIG.replace("# a study's base config", "# reworded comment, same settings"))
    assert other_settings(study(shared, config, ["--model.weight_decay=0.0001"]).training_specs()[0]) is None

    # 3. A real change: the config's content, named by key with both values.
    config.write_text(CONFIG.replace("max_epochs: 1", "max_epochs: 4"))
    change = other_settings(study(shared, config, ["--model.weight_decay=0.0001"]).training_specs()[0])
    assert change == "trainer.max_epochs: 1 -> 4"


def test_an_old_record_is_read_by_its_arguments_and_config_contents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep_run.json from before settings were recorded: argument text and config digests by path."""
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "c.yaml"
    config.write_text(CONFIG)
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "alpha" / "lily" / "seed0"
    write_result(run_dir, "alpha", 0.5, 0)
    digest = runs_module.file_digest(config)
    old_args = ["--config", "configs/c.yaml", "--model.lr", "1e-3", "--data.name", "alpha"]
    old_args += ["--model.method", "lily", "--seed_everything", "0"]
    old_args += ["--trainer.default_root_dir", "runs/alpha/lily/seed0"]
    old = {"args": old_args, "configs": {"configs/c.yaml": digest}, "steps": [], "selection": None}
    (run_dir / "sweep_run.json").write_text(json.dumps(old))
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "runs", moved)
    monkeypatch.chdir(moved)

    def change(extra: list[str]) -> str | None:
        return other_settings(study(moved, config, extra).training_specs()[0])

    assert change(["--model.lr", "0.001"]) is None  # absolute paths, moved folder, 1e-3 spelt 0.001
    assert change(["--model.lr", "5e-4"]) == "model.lr: 0.001 -> 0.0005"
    config.write_text(CONFIG + "seed_everything: 1\n")  # its content changed: the old record cannot tell how
    assert str(change(["--model.lr", "0.001"])).startswith("config files (digests): ")


def test_report_keeps_seeds_with_other_settings_apart_and_names_the_key(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    base = {"data.name": "dtd", "model.lr": 0.001, "model.method": "lily"}
    # dtd: seeds 0 and 1 trained 1 epoch, seed 2 trained 4 (today: one cell, 48.0 ± 10.6 (n=3)).
    for seed, (top1, epochs) in enumerate([(0.40, 1), (0.44, 1), (0.60, 4)]):
        run_dir = runs / "dtd" / "lily" / f"seed{seed}"
        write_result(run_dir, "dtd", top1, seed)
        settings = {**base, "seed_everything": seed, "trainer.max_epochs": epochs}
        (run_dir / "sweep_run.json").write_text(json.dumps({"settings": settings, "args": [], "configs": {}}))
    # eurosat: two seeds with old records that differ only in the seed and the run folder: one cell.
    for seed, top1 in enumerate([0.70, 0.80]):
        run_dir = runs / "eurosat" / "lily" / f"seed{seed}"
        write_result(run_dir, "eurosat", top1, seed)
        args = ["--config", "c.yaml", "--seed_everything", str(seed)]
        args += ["--trainer.default_root_dir", str(run_dir)]
        (run_dir / "sweep_run.json").write_text(json.dumps({"args": args, "configs": {"c.yaml": "ab12"}}))
    warnings: list[str] = []
    report = write_report(runs, tmp_path / "out", warn=warnings.append).read_text()

    rows = {row["method"]: row for row in csv.DictReader((tmp_path / "out" / "results.csv").open())}
    # Hand-computed: mean(40, 44) = 42.00, sample std = 2.83; the 4-epoch seed alone: 60.00.
    assert (rows["lily"]["dtd"], rows["lily"]["dtd std"], rows["lily"]["dtd n"]) == ("42.00", "2.83", "2")
    apart = rows["lily [trainer.max_epochs=4]"]
    assert (apart["dtd"], apart["dtd std"], apart["dtd n"]) == ("60.00", "", "1")
    assert (rows["lily"]["eurosat"], rows["lily"]["eurosat std"]) == ("75.00", "7.07")  # mean(70, 80)
    assert apart["eurosat"] == ""
    assert "| lily [trainer.max_epochs=4] |" in report
    said = [w for w in warnings if "shown apart" in w]
    assert len(said) == 1 and "trainer.max_epochs" in said[0] and "dtd" in said[0]
    assert "dtd/lily/seed2" in said[0] and "seed_everything" not in said[0]


def test_grid_values_are_read_with_their_keys_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "c.yaml").write_text(CONFIG)
    runs = tmp_path / "runs"
    # A value that is no int: one message naming the key, the value and the type; nothing runs.
    grid = ["--grid", "trainer.max_epochs=1,x", "--runs-dir", str(runs)]
    assert main(["sweep", "--config", str(tmp_path / "c.yaml"), "--tasks", "alpha", *grid]) == 2
    err = capsys.readouterr().err
    assert "trainer.max_epochs" in err and "'x'" in err and "Optional[int]" in err and not runs.exists()
    # 1e-3 and 0.001 are one point (trained once, and said: the selection sweep below shows it end to end);
    # 1 and 1.0 are one float; a data module's key is typed by the class_path the configs name.
    settings = {"data.class_path": "lily_lightning.data.VTAB1kDataModule"}
    grid = ["model.lr=1e-3,0.001,5e-4", "model.lily.scale=1,1.0", "data.batch_size=8,16"]
    axes, notes = typed_axes(parse_grid(grid), settings)
    assert [axis.values for axis in axes] == [("1e-3", "5e-4"), ("1",), ("8", "16")]
    assert len(notes) == 2 and "0.001 is the value 1e-3 again" in notes[0]
    with pytest.raises(UsageError, match=r"data.batch_size: '8.5' is not a valid value: .* takes int"):
        typed_axes(parse_grid(["data.batch_size=8,8.5"]), settings)


def test_the_class_count_of_a_tuning_run_never_reads_the_test_list(tmp_path: Path) -> None:
    task = write_synthetic_vtab_task(tmp_path, "gap", 3, n_train800=6, n_val200=3, n_test=3)
    first = (task / "test.txt").read_text().splitlines()[0].split()[0]
    shutil.copy(task / first, task / "images" / "test" / "extra.png")
    with (task / "test.txt").open("a") as test_list:
        test_list.write("images/test/extra.png 7\n")  # a label train and val never have
    assert VTAB1kDataModule(str(tmp_path), "gap", split_mode="train800_val200").num_classes == 3
    (task / "test.txt").unlink()
    assert VTAB1kDataModule(str(tmp_path), "gap", split_mode="train800_val200").num_classes == 3


def interrupted_fit(step: list[str]) -> int:
    """`fit` hit by Ctrl-C, as Lightning ends it: its own resume advice, then exit code 1."""
    if step[0] != "fit":
        return 0
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)
    except KeyboardInterrupt:
        print("Interrupted in epoch 0; Resume with the same command plus `--ckpt_path last`.", flush=True)
        sys.exit(1)
    return 0


def test_an_interrupted_sweep_run_says_to_rerun_the_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runs_module, "run_command", interrupted_fit)
    spec = RunSpec("alpha", "lily", tmp_path / "run", ("--data.name", "alpha"), {})
    (tmp_path / "run").mkdir()
    lines: list[str] = []
    outcome = execute(spec, False, ChildRunner(multiprocessing.get_context("fork")), {}, lines.append)
    assert outcome.status == "failed" and "rerun the same sweep command" in outcome.message
    assert "rerun the same sweep command" in lines[-1] and "--ckpt_path" not in lines[-1]
