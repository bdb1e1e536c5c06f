"""`sweep` end to end on 3 generated tasks: runs, skips, resumes, lists a missing task; then `report`."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from lily_lightning.cli import main
from lily_lightning.data import write_synthetic_vtab_task
from lily_lightning.studies.sweep import expand_tasks, run_configs
from lily_lightning.training.results import read_result

TASKS = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sweep")
    for index, name in enumerate(TASKS):
        write_synthetic_vtab_task(root / "data", name, 4, n_train800=16, n_val200=8, n_test=16, seed=index)
    # A backbone file (not `pretrained: false`), so `report` can rebuild each run's model for its heatmap.
    torch.manual_seed(0)
    weights = root / "vit_tiny.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32).state_dict(), weights)
    config = root / "tiny.yaml"
    config.write_text(
        f"""
seed_everything: 0
trainer:
  max_epochs: 1
  accelerator: cpu
  devices: 1
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
model:
  backbone: vit_tiny_patch16_224
  weights: {weights}
  pretrained: false
  img_size: 32
  lily: {{rank: 4, num_experts: 2}}
  drop_path_rate: 0.0
  lr: 3.0e-3
  warmup_epochs: 0.5
data:
  class_path: lily_lightning.data.VTAB1kDataModule
  init_args:
    root: {root / "data"}
    name: alpha
    batch_size: 8
    eval_batch_size: 16
    num_workers: 0
    image_size: 32
"""
    )
    return config, root / "runs"


def sweep(config: Path, runs: Path, tasks: list[str]) -> int:
    args = ["sweep", "--config", str(config), "--tasks", *tasks, "--runs-dir", str(runs)]
    return main([*args, "--", "--trainer.max_steps", "2"])


def test_sweep_runs_skips_resumes_and_lists_missing_data(setup, capsys: pytest.CaptureFixture[str]) -> None:
    config, runs = setup
    assert sweep(config, runs, [*TASKS[:2], "nowhere", TASKS[2]]) == 1  # one task could not run
    out = capsys.readouterr().out
    results = {task: read_result(runs / task / "lily") for task in TASKS}
    assert all(r is not None and r.task == task for task, r in results.items())
    assert "[3/4] nowhere lily: not finished" in out and "[4/4] gamma lily: done" in out  # went on past it
    assert "not finished: nowhere lily: error:" in out.split("sweep: 3 done, 0 skipped, 1 not finished")[1]
    assert "nowhere" in (runs / "sweep.log").read_text()

    # Second call: finished runs are skipped (their files untouched); an interrupted run (last.ckpt, no
    # result) resumes from its checkpoint - here at its end, so it only tests, and scores as before.
    stamps = {task: (runs / task / "lily" / "result.json").stat().st_mtime_ns for task in TASKS[:2]}
    (runs / "gamma" / "lily" / "result.json").unlink()
    assert sweep(config, runs, TASKS) == 0
    out = capsys.readouterr().out
    assert "[1/3] alpha lily: skipped" in out and "[2/3] beta lily: skipped" in out
    assert "[3/3] gamma lily: fit + test (resuming from checkpoints/last.ckpt)" in out
    assert stamps == {t: (runs / t / "lily" / "result.json").stat().st_mtime_ns for t in TASKS[:2]}
    assert (
        "Restored all states from the checkpoint" in (runs / "gamma" / "lily" / "sweep_run.log").read_text()
    )
    assert read_result(runs / "gamma" / "lily").top1 == results["gamma"].top1

    # The report of the sweep: the three tasks, and a routing heatmap per Lily run from its checkpoint.
    assert main(["report", str(runs), "--out", str(runs / "report"), "--routing-batches", "1"]) == 0
    report = (runs / "report" / "results.md").read_text()
    assert "| alpha | beta | gamma |" in report
    for task in TASKS:
        assert (runs / "report" / f"routing_{task}_lily.png").stat().st_size > 10_000


def test_task_lists_and_per_task_configs() -> None:
    assert len(expand_tasks(["vtab"])) == 19 and expand_tasks(["fgvc", "cub"])[-1] == "stanford_cars"
    assert expand_tasks(["cifar100", "dtd", "cifar", "mine"]) == ["cifar", "dtd", "mine"]
    configs = Path(__file__).parents[1] / "configs"
    base = configs / "vit_vtab.yaml"
    assert run_configs([base], "dtd", "lora") == [
        base,
        configs / "lora_vtab.yaml",
        configs / "vtab" / "dtd.yaml",
    ]
    # FGVC's oxford_flowers is not VTAB's oxford_flowers102, whose alias it also is
    assert run_configs([base], "oxford_flowers", "lily") == [base, configs / "fgvc" / "oxford_flowers.yaml"]
    assert run_configs([base], "mine", "lily") == [base]
