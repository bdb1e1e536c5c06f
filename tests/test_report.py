"""`report`: the paper's tables from result files, checked against hand-computed means and counts."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from lily_lightning.cli import main
from lily_lightning.data import FGVC_TASKS, VTAB_TASKS
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
