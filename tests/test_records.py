"""A record you can trust (issue 24, sections 1 and 2): result.json is only ever the complete test of its
run's own checkpoint under its own settings; partial and foreign evaluations get files of their own; a new
`fit` sets the earlier run's outputs aside; report counts only results of the current checkpoint; an integer
limit_*_batches means batches; a second predict and an export without a suffix replace or mislead nothing."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from test_cli import result_line, tiny_run_config

from lily_lightning.cli import main
from lily_lightning.training.results import StaleResult, collect_results, read_result

TEST_IMAGES = 64  # conftest's data_root: shapes has 64 test images


def run_dir(config: Path) -> Path:
    return config.parent / "run"


def checkpoint_of(config: Path) -> Path:
    return run_dir(config) / "checkpoints" / "last.ckpt"


def evaluations(folder: Path, kind: str) -> list[Path]:
    return sorted((folder / "evaluations").glob(f"{kind}-*.json"))


@pytest.fixture(scope="module")
def tested(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """A 2-step run, tested whole (one batch of 64) and validated whole; read-only for the tests below."""
    config = tiny_run_config(tmp_path_factory.mktemp("tested"), data_root, epochs=1)
    assert main(["fit", "--config", str(config), "--trainer.limit_train_batches", "2"]) == 0
    assert main(["test", "--config", str(config), "--ckpt_path", "last"]) == 0
    assert main(["validate", "--config", str(config), "--ckpt_path", "last"]) == 0
    return config


def test_result_records_what_produced_it(tested: Path) -> None:
    record = json.loads((run_dir(tested) / "result.json").read_text())
    digest = hashlib.sha256(checkpoint_of(tested).read_bytes()).hexdigest()
    assert record["checkpoint_sha256"] == digest
    assert (record["epoch"], record["global_step"]) == (0, 2)  # saved at the end of epoch 0, step 2
    assert (record["precision"], record["eval_routing"], record["eval_batch_size"]) == (
        "32-true",
        "batch",
        64,
    )
    assert (record["images"], record["partial"], record["split"]) == (TEST_IMAGES, False, ["test"])


def test_a_partial_test_never_replaces_the_complete_result(
    tested: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    complete = (run_dir(tested) / "result.json").read_bytes()
    before = evaluations(run_dir(tested), "test")
    capsys.readouterr()
    smoke = ["--trainer.limit_test_batches", "2", "--data.eval_batch_size", "4"]
    assert main(["test", "--config", str(tested), "--ckpt_path", "last", *smoke]) == 0
    line = result_line(capsys.readouterr().out)
    assert (run_dir(tested) / "result.json").read_bytes() == complete
    (partial,) = set(evaluations(run_dir(tested), "test")) - set(before)
    record = json.loads(partial.read_text())
    assert (record["images"], record["partial"], record["eval_batch_size"]) == (8, True, 4)
    assert f"{record['top1']:.4f}" == line["top1"] and line["images"] == "8"
    assert str(partial) in caplog.text
    assert partial.with_name(f"{partial.stem}-confusion_matrix.csv").is_file()


def test_an_integer_limit_means_that_many_batches(tested: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    one_batch = ["--trainer.limit_test_batches", "1", "--data.eval_batch_size", "4"]
    assert main(["test", "--config", str(tested), "--ckpt_path", "last", *one_batch]) == 0
    line = result_line(capsys.readouterr().out)
    assert (line["images"], line["partial"]) == ("4", "true")


def test_another_configs_test_with_other_settings_is_no_result_of_the_run(
    tmp_path: Path, data_root: Path, tested: Path, caplog: pytest.LogCaptureFixture
) -> None:
    complete = (run_dir(tested) / "result.json").read_bytes()
    other = tiny_run_config(tmp_path, data_root, epochs=1)
    routing = ["--model.lily.eval_routing", "running", "--data.eval_batch_size", "16"]
    assert main(["test", "--config", str(other), "--ckpt_path", str(checkpoint_of(tested)), *routing]) == 0
    assert (run_dir(tested) / "result.json").read_bytes() == complete
    assert not (run_dir(other) / "result.json").exists()
    records = [json.loads(path.read_text()) for path in evaluations(run_dir(tested), "test")]
    foreign = [r for r in records if r["eval_routing"] == "running"]
    assert [(r["eval_batch_size"], r["images"], r["partial"]) for r in foreign] == [(16, TEST_IMAGES, False)]
    assert "eval_routing running (its run's: batch)" in caplog.text


def test_a_partial_validation_never_replaces_the_complete_one(tested: Path) -> None:
    complete = (run_dir(tested) / "validation.json").read_bytes()
    assert json.loads(complete)["partial"] is False
    assert (
        main(
            [
                "validate",
                "--config",
                str(tested),
                "--ckpt_path",
                "last",
                "--trainer.limit_val_batches",
                "1",
                "--data.eval_batch_size",
                "4",
            ]
        )
        == 0
    )
    assert (run_dir(tested) / "validation.json").read_bytes() == complete
    (record,) = [json.loads(path.read_text()) for path in evaluations(run_dir(tested), "validate")]
    assert (record["images"], record["partial"]) == (4, True)


def test_report_counts_only_a_result_of_the_current_checkpoint(tmp_path: Path, tested: Path) -> None:
    copy = tmp_path / "runs" / "shapes" / "lily"
    (copy / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir(tested) / "result.json", copy / "result.json")
    shutil.copy(checkpoint_of(tested), copy / "checkpoints" / "last.ckpt")
    assert [r.run_dir for r in collect_results(tmp_path / "runs", pytest.fail)] == [copy]

    with (copy / "checkpoints" / "last.ckpt").open("ab") as f:  # trained on since: another file
        f.write(b"another epoch")
    warnings: list[str] = []
    assert collect_results(tmp_path / "runs", warnings.append) == []
    assert len(warnings) == 1 and "result.json is the result of an earlier version" in warnings[0]
    with pytest.raises(StaleResult):  # what `sweep` reads: a stale result is no finished run
        read_result(copy)


def test_a_new_fit_sets_the_earlier_runs_outputs_aside(
    tmp_path: Path, data_root: Path, tested: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tiny_run_config(tmp_path, data_root, epochs=1)
    outputs = ["result.json", "validation.json", "confusion_matrix.csv"]
    run_dir(config).mkdir()
    for name in outputs:
        shutil.copy(run_dir(tested) / name, run_dir(config) / name)
    (run_dir(config) / "evaluations").mkdir()
    (run_dir(config) / "evaluations" / "test-1.json").write_text("{}")
    (run_dir(config) / "predictions.csv").write_text("index,file,label,class,confidence\n")
    outputs += ["evaluations", "predictions.csv"]
    assert main(["fit", "--config", str(config), "--trainer.limit_train_batches", "1"]) == 0
    (previous,) = (run_dir(config) / "previous").iterdir()
    for name in outputs:
        assert not (run_dir(config) / name).exists()
        assert (previous / name).exists()
    assert (previous / "result.json").read_bytes() == (run_dir(tested) / "result.json").read_bytes()
    assert str(previous) in caplog.text


def test_a_second_predict_keeps_the_first_and_out_is_never_replaced_unasked(
    tmp_path: Path, tested: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one_batch = ["--trainer.limit_predict_batches", "1", "--data.eval_batch_size", "4"]
    predict = ["predict", "--config", str(tested), "--ckpt_path", "last", *one_batch]
    first, second = run_dir(tested) / "predictions.csv", run_dir(tested) / "predictions-2.csv"
    assert main(predict) == 0
    kept = first.read_bytes()
    assert main([*predict, "--model.predict_top_k", "2"]) == 0
    assert first.read_bytes() == kept and len(kept.splitlines()) == 1 + 4
    assert second.read_text().splitlines()[0].endswith("label_2,class_2,confidence_2")
    assert f"written to {second}" in capsys.readouterr().out

    out = tmp_path / "mine.csv"
    out.write_text("keep me\n")
    assert main([*predict, "--out", str(out)]) == 2
    assert "exists: add --force" in capsys.readouterr().err and out.read_text() == "keep me\n"
    assert main([*predict, "--out", str(out), "--force"]) == 0
    assert len(out.read_text().splitlines()) == 1 + 4


def test_export_refuses_a_name_timm_would_read_as_a_pickle(
    tmp_path: Path, tested: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "noext"
    export = ["export", "--config", str(tested), "--ckpt_path", str(checkpoint_of(tested)), "--out", str(out)]
    assert main([*export, "--model.lily.eval_routing", "running"]) == 2
    assert f"Use --out {out}.safetensors" in capsys.readouterr().err
    assert not out.exists()
