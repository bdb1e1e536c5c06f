"""`sweep` end to end on 3 generated tasks: runs, skips, resumes, lists a missing task; then `report`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import one_epoch_config

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
    weights = root / "test_vit.pth"
    torch.save(timm.create_model("test_vit", num_classes=0, img_size=32).state_dict(), weights)
    model = f"""  backbone: test_vit
  weights: {weights}
  lily: {{rank: 4, num_experts: 2}}
  lr: 3.0e-3
  warmup_epochs: 0.5"""
    config = one_epoch_config(root / "tiny.yaml", root / "data", "  log_every_n_steps: 1", model)
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
    # --recipes: the method's own optimiser after the base configs, before the task's data.
    dtd = configs / "vtab" / "dtd.yaml"
    assert run_configs([base], "dtd", "ssf", recipes=True) == [base, configs / "methods" / "ssf.yaml", dtd]
    assert run_configs([base], "dtd", "ssf") == [base, dtd]  # without: the base config's optimiser
    assert run_configs([base], "dtd", "lily", recipes=True) == [base, dtd]  # vit_vtab.yaml is Lily's


def test_recipes_give_each_method_its_papers_optimiser_and_name_those_without(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    from test_budget import InstantLauncher

    from lily_lightning.studies import sweep as sweep_module

    launcher = InstantLauncher()
    monkeypatch.setattr(sweep_module, "LocalLauncher", lambda *_: launcher)
    base = Path(__file__).parents[1] / "configs" / "vit_vtab.yaml"
    args = ["sweep", "--config", str(base), "--tasks", "dtd", "--methods", "lily", "ssf", "vpt_deep"]
    assert main([*args, "--runs-dir", str(tmp_path / "runs"), "--recipes"]) == 0
    assert "--recipes: no " in (out := capsys.readouterr().out) and "for lily: they train with" in out
    settings = {spec.method: spec.resolved for spec in launcher.launched}
    # ssf.yaml: SSF's official dtd script (lr 5e-3, wd 5e-5); vpt_deep.yaml: VPT's; lily: vit_vtab.yaml's.
    assert settings["ssf"]["model.lr"] == 5e-3 and settings["ssf"]["model.weight_decay"] == 5e-5
    assert settings["lily"]["model.lr"] == settings["vpt_deep"]["model.lr"] == 1e-3  # VPT keeps the AdamW lr
    assert main([*args, "--runs-dir", str(tmp_path / "shared")]) == 0  # no --recipes: one optimiser for all
    shared = {spec.method: spec.resolved for spec in launcher.launched[3:]}
    assert {run["model.lr"] for run in shared.values()} == {1e-3}


@pytest.mark.parametrize(
    "extra",
    [
        ["--data.name", "beta"],
        ["--data.init_args.name=beta"],
        ["--trainer.default_root_dir", "elsewhere"],
        ["--model.method", "lora"],
        ["--ckpt_path", "last"],
    ],
)
def test_per_run_keys_after_the_separator_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("trainer: {max_epochs: 1}\n")
    runs = tmp_path / "runs"
    args = ["sweep", "--config", str(config), "--tasks", "alpha", "gamma", "--runs-dir", str(runs)]
    assert main([*args, "--", "--trainer.max_steps", "2", *extra]) == 2
    err = capsys.readouterr().err
    assert extra[0] in err and "per run" in err and "Traceback" not in err
    assert not (runs / "alpha").exists()


def finished_run(run_dir: Path, task: str, **fields: object) -> Path:
    """A result.json as `test` writes it (4 classes, a 10-parameter head)."""
    record = {"task": task, "method": "lily", "trainable_params": 110, "head_params": 10, "top1": 0.5}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").write_text(json.dumps({**record, **fields}))
    return run_dir / "result.json"


def test_a_rerun_with_other_settings_says_so_and_retrains_only_with_rerun(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{init_args: {{root: {tmp_path / 'no_data'}}}}}\n")
    runs = tmp_path / "runs"
    args = ["sweep", "--config", str(config), "--tasks", "alpha", "--runs-dir", str(runs)]
    # A run recorded by a sweep with `-- --trainer.max_steps 2` (no data here: it stops at once), then
    # finished (its result.json, as `test` writes it).
    assert main([*args, "--", "--trainer.max_steps", "2"]) == 1
    result = finished_run(runs / "alpha" / "lily", "alpha")
    capsys.readouterr()

    assert main([*args, "--", "--trainer.max_steps", "3"]) == 1  # not skipped as finished: not run at all
    out = capsys.readouterr().out
    assert "alpha lily: not run:" in out and "trainer.max_steps: 2 -> 3" in out
    assert "--rerun" in out and "--runs-dir" in out and result.is_file()
    config.write_text(config.read_text() + "trainer: {max_epochs: 1}\n")  # an edited config is a change too
    assert main([*args, "--", "--trainer.max_steps", "2"]) == 1
    assert "trainer.max_epochs: (not set) -> 1" in capsys.readouterr().out

    # --rerun: the old result goes, and the run starts again (here it cannot: there is no data).
    assert main([*args, "--rerun", "--", "--trainer.max_steps", "3"]) == 1
    out = capsys.readouterr().out
    assert "starting again (--rerun)" in out and "alpha lily: not finished: error:" in out
    assert not result.exists()
    recorded = json.loads((runs / "alpha" / "lily" / "sweep_run.json").read_text())
    run_keys = ["--data.name", "alpha", "--model.method", "lily", "--trainer.default_root_dir"]
    # the exact arguments, beside the run: the per-run keys last, so nothing after -- can override them
    assert recorded["args"][-8:] == ["--trainer.max_steps", "3", *run_keys, str(runs / "alpha" / "lily")]
    assert [step[0] for step in recorded["steps"]] == ["fit", "test"]


def test_partial_and_unreadable_results_are_not_finished_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    method = "lily"
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{init_args: {{root: {tmp_path / 'no_data'}}}}}\n")
    runs = tmp_path / "runs"
    finished_run(runs / "partial" / method, "partial", partial=True, images=8)
    bad = {
        "empty": "",
        "corrupt": '{"task": "corrupt", "top1": 0.',
        "foreign": '["not", "a", "result"]',
        "other": '{"task": "other", "accuracy": 0.5}',
    }
    for task, text in bad.items():
        (runs / task / method).mkdir(parents=True)
        (runs / task / method / "result.json").write_text(text)
    tasks = ["partial", *bad]
    args = ["sweep", "--config", str(config), "--tasks", *tasks, "--runs-dir", str(runs)]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "partial lily: " in out and "is a partial test (8 images): evaluating again" in out
    for task in bad:
        warning = next(line for line in out.splitlines() if f"{task} lily: warning:" in line)
        assert str(runs / task / method / "result.json") in warning  # the file, named
    # none was taken as finished: each was run again (and, without data, did not finish)
    assert out.count("lily: not finished: error:") == len(tasks) and "Traceback" not in out
