"""`report`: the paper's tables from result files, checked against hand-computed means and counts."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from matplotlib.container import ErrorbarContainer

from lily_lightning.cli import main
from lily_lightning.data import FGVC_TASKS, VTAB_TASKS
from lily_lightning.studies.plots import results_bar_chart
from lily_lightning.training.results import write_result

# Hand-picked accuracies; the means below are worked out by hand from these numbers.
LILY_VTAB = {
    # natural: 0.6 + 0.7 + 0.8 + 0.9 + 0.6 + 0.7 + 0.8 = 5.1 -> 5.1 / 7 = 0.728571
    "cifar": 0.6, "caltech101": 0.7, "dtd": 0.8, "oxford_flowers102": 0.9,
    "oxford_iiit_pet": 0.6, "svhn": 0.7, "sun397": 0.8,
    # specialized: 0.8 + 0.9 + 0.87 + 0.75 = 3.32 -> 0.83
    "patch_camelyon": 0.8, "eurosat": 0.9, "resisc45": 0.87, "diabetic_retinopathy": 0.75,
    # structured: 0.5 + 0.6 + 0.4 + 0.3 + 0.5 + 0.6 + 0.7 + 0.2 = 3.8 -> 0.475
    "clevr_count": 0.5, "clevr_dist": 0.6, "dmlab": 0.4, "kitti": 0.3,
    "dsprites_loc": 0.5, "dsprites_ori": 0.6, "smallnorb_azi": 0.7, "smallnorb_ele": 0.2,
}  # fmt: skip
# mean over 19 tasks: (5.1 + 3.32 + 3.8) / 19 = 12.22 / 19 = 0.643158
# mean of the 3 group means: (0.728571 + 0.83 + 0.475) / 3 = 0.677857
LILY_EXPECTED_MD = {"Natural": "72.9", "Specialized": "83.0", "Structured": "47.5",
                    "Mean (19 tasks)": "64.3", "Mean (3 group means)": "67.8"}  # fmt: skip
LILY_EXPECTED_CSV = {"Natural": "72.86", "Specialized": "83.00", "Structured": "47.50",
                     "Mean (19 tasks)": "64.32", "Mean (3 group means)": "67.79"}  # fmt: skip
LORA_FGVC = {
    "cub": 0.85,
    "nabirds": 0.80,
    "oxford_flowers": 0.99,
    "stanford_dogs": 0.90,
    "stanford_cars": 0.86,
}
# FGVC mean: 4.40 / 5 = 0.88

# ViT-B/16 adapter sizes (tests/test_inject.py): Lily defaults 792,576; LoRA r=8 on q, v 294,912.
ADAPTER = {"lily": 792_576, "lora": 294_912}


def fake_run(runs: Path, task: str, method: str, top1: float, num_classes: int) -> None:
    head = 768 * num_classes + num_classes
    write_result(
        runs / task / method,
        {
            "task": task,
            "method": method,
            "trainable_params": ADAPTER[method] + head,
            "adapter_params": ADAPTER[method],
            "head_params": head,
            "top1": top1,
            "report": "final",
            "final": top1,
            "best_of_evals": top1,
        },
    )


def markdown_rows(text: str, section: str) -> dict[str, dict[str, str]]:
    """``{method: {column: cell}}`` of one ``## section`` table (bold marks removed)."""
    lines = text.split(f"## {section}\n", 1)[1].strip().split("\n\n")[0].splitlines()
    header = [c.strip().strip("*") for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, dict[str, str]], Path]:
    runs = tmp_path_factory.mktemp("runs")
    for task, top1 in LILY_VTAB.items():
        fake_run(runs, task, "lily", top1, VTAB_TASKS[task].num_classes)
        if task != "svhn":  # LoRA misses one natural task
            fake_run(runs, task, "lora", top1 - 0.1, VTAB_TASKS[task].num_classes)
    for task, top1 in LORA_FGVC.items():
        fake_run(runs, task, "lora", top1, FGVC_TASKS[task].num_classes)
        if task != "nabirds":  # Lily misses one FGVC task
            fake_run(runs, task, "lily", top1, FGVC_TASKS[task].num_classes)
    out = runs / "report"
    assert main(["report", str(runs), "--out", str(out)]) == 0
    with (out / "results.csv").open() as file:
        table = {row["method"]: row for row in csv.DictReader(file)}
    return (out / "results.md").read_text(), table, out


def test_group_and_overall_means_equal_hand_computed_values(report) -> None:
    markdown, table, _ = report
    lily = markdown_rows(markdown, "VTAB-1k")["lily"]
    assert {k: lily[k] for k in LILY_EXPECTED_MD} == LILY_EXPECTED_MD
    assert {k: table["lily"][k] for k in LILY_EXPECTED_CSV} == LILY_EXPECTED_CSV
    assert lily["dtd"] == "80.0" and lily["smallnorb_ele"] == "20.0"
    fgvc = markdown_rows(markdown, "FGVC")["lora"]
    assert fgvc["FGVC mean"] == "88.0"
    # FGVC's oxford_flowers is not VTAB's oxford_flowers102 (which has the alias "oxford_flowers")
    assert fgvc["oxford_flowers"] == "99.0" and lily["oxford_flowers102"] == "90.0"
    # both overall means are labelled as what they are
    assert "Mean (19 tasks)" in markdown and "Mean (3 group means)" in markdown


def test_parameter_column_is_millions_without_the_head(report) -> None:
    markdown, table, _ = report
    rows = markdown_rows(markdown, "VTAB-1k")
    assert rows["lily"]["params (M)"] == "0.793"  # 792,576, whatever each task's head
    assert rows["lora"]["params (M)"] == "0.295"  # 294,912
    assert table["lora"]["params_M"] == "0.295"


def test_missing_tasks_are_missing_never_zero(report) -> None:
    markdown, table, out = report
    lora = markdown_rows(markdown, "VTAB-1k")["lora"]
    assert lora["svhn"] == "-"
    # a mean needs all of its tasks; the other groups are complete
    assert lora["Natural"] == lora["Mean (19 tasks)"] == lora["Mean (3 group means)"] == "-"
    assert lora["Specialized"] != "-" and lora["dtd"] == "70.0"
    lily_fgvc = markdown_rows(markdown, "FGVC")["lily"]
    assert lily_fgvc["nabirds"] == "-" and lily_fgvc["FGVC mean"] == "-"
    assert table["lora"]["svhn"] == "" and table["lily"]["nabirds"] == ""
    assert (out / "results.png").stat().st_size > 10_000
    assert "no checkpoint" in markdown  # fake runs: the routing section says why there is no heatmap


def test_report_of_an_empty_folder_is_a_usage_error(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished run" in capsys.readouterr().err


def test_unreadable_and_partial_results_are_named_and_left_out(tmp_path: Path, capsys) -> None:
    fake_run(tmp_path, "dtd", "lily", 0.8, 47)
    fake_run(tmp_path, "eurosat", "lily", 0.9, 10)
    write_result(tmp_path / "svhn" / "lily", {**_record("svhn", 0.99), "partial": True, "images": 8})
    bad = {"cifar": "", "kitti": '{"task": "kitti", "top1": 0.', "dmlab": "[1, 2]", "sun397": '{"top1": 1}'}
    for task, text in bad.items():
        (tmp_path / task / "lily").mkdir(parents=True)
        (tmp_path / task / "lily" / "result.json").write_text(text)
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == len(bad) + 1 and "Traceback" not in err  # one line each
    for task in [*bad, "svhn"]:
        assert str(tmp_path / task / "lily" / "result.json") in err
    assert "partial test (8 images)" in err
    markdown = (tmp_path / "out" / "results.md").read_text()
    lily = markdown_rows(markdown, "VTAB-1k")["lily"]
    assert lily["dtd"] == "80.0" and lily["eurosat"] == "90.0" and lily["svhn"] == lily["cifar"] == "-"
    assert "## Not in the tables" in markdown and str(tmp_path / "svhn" / "lily" / "result.json") in markdown


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--routing-batches", "0"], "--routing-batches must be at least 1"),
        (["--out", "FILE"], "is a file"),
        (["--figure", "runs"], "is a folder; give the PNG file"),
    ],
)
def test_report_options_that_cannot_work_are_one_message(tmp_path: Path, capsys, extra, message) -> None:
    fake_run(tmp_path / "runs", "dtd", "lily", 0.8, 47)
    (tmp_path / "FILE").write_text("my notes")
    extra = [str(tmp_path / arg) if arg in ("FILE", "runs") else arg for arg in extra]
    assert main(["report", str(tmp_path / "runs"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert (tmp_path / "FILE").read_text() == "my notes"


def _record(task: str, top1: float, **fields: object) -> dict[str, object]:
    head = 768 * 10 + 10
    record = {"task": task, "method": "lily", "trainable_params": ADAPTER["lily"] + head, "head_params": head}
    return {**record, "top1": top1, "report": "final", **fields}


def test_rows_keep_backbones_and_protocols_apart_and_duplicates_are_named(tmp_path: Path, capsys) -> None:
    runs = tmp_path / "runs"
    base = {"backbone": "vit_base_patch16_224", "split_mode": "train800val200", "img_size": [224, 224]}
    write_result(runs / "dtd" / "lily", _record("dtd", 0.7, **base, seed=0))
    # the same folder name under another task folder: another backbone, another protocol, another input size
    write_result(runs / "eurosat" / "lily", _record("dtd", 0.6, **{**base, "backbone": "vit_small"}, seed=0))
    write_result(runs / "kitti" / "lily", _record("dtd", 0.4, **{**base, "report": "best_of_evals"}, seed=0))
    write_result(runs / "svhn" / "lily", _record("dtd", 0.3, **{**base, "img_size": [32, 32]}, seed=0))
    # two runs of dtd with one backbone, protocol and seed (0.5 and 0.375): neither may win silently
    write_result(runs / "cifar" / "lily", _record("cifar", 0.5, **base, seed=1))
    write_result(runs / "cifar_copy" / "lily", _record("cifar", 0.375, **base, seed=1))
    assert main(["report", str(runs), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    rows = markdown_rows((tmp_path / "out" / "results.md").read_text(), "VTAB-1k")
    dtd = sorted(row["dtd"] for row in rows.values())
    assert dtd == ["30.0", "40.0", "60.0", "70.0"]  # four rows, none merged
    assert {row["backbone"] for row in rows.values()} == {"vit_base_patch16_224", "vit_small"}
    assert {row["protocol"] for row in rows.values()} >= {
        "final, train800val200, 224px",
        "best_of_evals, train800val200, 224px",
        "final, train800val200, 32px",
    }
    assert sorted(row["cifar"] for row in rows.values()) == ["-", "-", "-", "dup"]
    duplicate = next(line for line in err.splitlines() if "duplicate" in line)
    assert "cifar/lily/result.json (top1=0.5000)" in duplicate
    assert "cifar_copy/lily/result.json (top1=0.3750)" in duplicate


# Three seeds per run; beta's Lily run of seed 2 is missing. Means and sample stds (n - 1) by hand:
#   lily alpha .70 .74 .72 -> 72.0 ± 2.0;  lora alpha .60 .66 .69 -> 65.0 ± sqrt(.0042 / 2) = 4.6
#   lily - lora alpha: .10 .08 .03 -> +7.0 ± sqrt(.0026 / 2) = 3.6
#   lily beta .50 .54 (n=2) -> 52.0 ± sqrt(.0008) = 2.8;  lora beta .40 .46 .43 -> 43.0 ± 3.0
#   lily - lora beta, paired seeds 0 and 1: .10 .08 -> +9.0 ± sqrt(.0002) = 1.4
SEEDED = {
    ("alpha", "lily"): [0.70, 0.74, 0.72],
    ("alpha", "lora"): [0.60, 0.66, 0.69],
    ("beta", "lily"): [0.50, 0.54],
    ("beta", "lora"): [0.40, 0.46, 0.43],
}
CHOICE = {"on": "val", "point": {"model.lr": "1e-3"}, "variant": "lr=1e-3", "val_top1": 0.8,
          "candidates": {"lr=1e-3": 0.8, "lr=0": 0.3}, "tied_with": []}  # fmt: skip


def test_spread_over_seeds_and_paired_differences_equal_hand_computed_values(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for (task, method), values in SEEDED.items():
        for seed, top1 in enumerate(values):
            record = {**_record(task, top1, seed=seed), "method": method}
            if method == "lily":
                record["selection"] = CHOICE
            write_result(runs / task / method / f"seed{seed}", record)
    (runs / "sweep_study.json").write_text('{"seeds": [0, 1, 2]}')
    assert main(["report", str(runs), "--out", str(tmp_path / "out"), "--routing-batches", "1"]) == 0
    markdown = (tmp_path / "out" / "results.md").read_text()
    rows = markdown_rows(markdown, "Other tasks")
    assert rows["lily"]["alpha"] == "72.0 ± 2.0 (n=3)" and rows["lora"]["alpha"] == "65.0 ± 4.6 (n=3)"
    assert rows["lily"]["beta"] == "52.0 ± 2.8 (n=2) †" and rows["lora"]["beta"] == "43.0 ± 3.0 (n=3)"
    assert rows["lily - lora"]["alpha"] == "+7.0 ± 3.6 (n=3)"
    assert rows["lily - lora"]["beta"] == "+9.0 ± 1.4 (n=2) †"
    assert "| alpha | lily | lr=1e-3 | 80.0 | lr=0: 30.0 |" in markdown  # the chosen hyper-parameters
    with (tmp_path / "out" / "results.csv").open() as file:
        table = {row["method"]: row for row in csv.DictReader(file)}
    assert (table["lora"]["alpha"], table["lora"]["alpha std"], table["lora"]["alpha n"]) == (
        "65.00",
        "4.58",
        "3",
    )
    assert (table["lily - lora"]["beta"], table["lily - lora"]["beta std"]) == ("9.00", "1.41")
    with (tmp_path / "out" / "results_seeds.csv").open() as file:
        assert len(list(csv.DictReader(file))) == sum(len(v) for v in SEEDED.values())


def test_bar_chart_error_bars_span_the_spread() -> None:
    fig = results_bar_chart({"lily": {"dtd": 0.72}}, ["dtd"], errors={"lily": {"dtd": 0.02}})
    (error_bar,) = [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    (segment,) = error_bar.lines[2][0].get_segments()
    assert [y for _, y in segment] == pytest.approx([70.0, 74.0])


def test_methods_table_sums_up_vtab_by_the_19_task_mean(report) -> None:
    markdown, _, _ = report
    methods = markdown_rows(markdown, "Methods: VTAB-1k")
    assert methods["lily"]["top-1: Mean (19 tasks)"] == "64.3"  # 12.22 / 19, as the table's mean column
    assert methods["lily"]["trainable params (head excluded)"] == "792,576"
    # LoRA misses svhn: no 19-task mean, so no paired difference there either
    assert methods["lora"]["top-1: Mean (19 tasks)"] == methods["lora"]["lily - method (paired seeds)"] == "-"
    assert "![accuracy vs trainable parameters](accuracy_vs_params.png)" in markdown  # Lily has all 19
