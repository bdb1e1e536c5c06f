"""`report` shows the field: every method's size and paired difference to Lily, and accuracy against size,
checked against hand-computed values from result.json files written by hand (no training)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import yaml
from matplotlib.colors import to_rgba
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from lily_lightning.cli import main
from lily_lightning.studies import report as report_module
from lily_lightning.training.results import write_result

HEAD = 768 * 10 + 10


def write_run(
    runs: Path, task: str, folder: str, method: str, seed: int, top1: float, **fields: object
) -> Path:
    """A finished run of ``method`` in ``runs/<task>/<folder>/seed<seed>`` with ``params`` trainable
    parameters besides the head (default 1,000)."""
    params = int(fields.pop("params", 1_000))  # type: ignore[call-overload]
    run_dir = runs / task / folder / f"seed{seed}"
    record = {"task": task, "method": method, "trainable_params": params + HEAD, "head_params": HEAD}
    write_result(run_dir, {**record, "top1": top1, "report": "final", "seed": seed, **fields})
    return run_dir


def markdown_rows(text: str, section: str) -> dict[str, dict[str, str]]:
    """``{first cell: {column: cell}}`` of the table under ``## section``."""
    lines = text.split(f"## {section}\n", 1)[1].strip().split("\n\n")[0].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {
        cells[0]: dict(zip(header, cells, strict=True))
        for line in lines[2:]
        if (cells := [c.strip() for c in line.strip("|").split("|")])
    }


# Task alpha. Lily .70 .74 .72 (seeds 0, 1, 2).
# dora = Lily - (.06, .02, .04): .64 .72 .68 -> differences .06 .02 .04: mean .04, sample std
#   sqrt((.02² + .02² + 0) / 2) = .02 -> "+4.0 ± 2.0 (n=3)".
# adaptformer has seeds 0, 1 and 3 (.75 .80 .99): only seeds 0 and 1 pair -> -.05 -.06: mean -.055,
#   std sqrt(2 * .005² / 1) = .00707 -> "-5.5 ± 0.7 (n=2)", fewer than 3 seeds: "†".
# my_new_method (a name no code knows), seed 0 only: .61 -> +.09 -> "+9.0 (n=1) †".
FIELD = {
    "lily": {0: 0.70, 1: 0.74, 2: 0.72},
    "dora": {0: 0.64, 1: 0.72, 2: 0.68},
    "adaptformer": {0: 0.75, 1: 0.80, 3: 0.99},
    "my_new_method": {0: 0.61},
}
PARAMS = {"lily": 792_576, "dora": 301_056, "adaptformer": 175_872, "my_new_method": 4_242}


def test_every_method_is_paired_with_lily_over_the_seeds_both_have(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for method, seeds in FIELD.items():
        for seed, top1 in seeds.items():
            write_run(runs, "alpha", method, method, seed, top1, params=PARAMS[method])
    (runs / "sweep_study.json").write_text('{"seeds": [0, 1, 2]}')
    assert main(["report", str(runs), "--out", str(tmp_path / "out")]) == 0
    markdown = (tmp_path / "out" / "results.md").read_text()
    rows = markdown_rows(markdown, "Other tasks")
    assert rows["lily - dora"]["alpha"] == "+4.0 ± 2.0 (n=3)"
    assert rows["lily - adaptformer"]["alpha"] == "-5.5 ± 0.7 (n=2) †"
    assert rows["lily - my_new_method"]["alpha"] == "+9.0 (n=1) †"
    assert rows["my_new_method"]["alpha"] == "61.0 (n=1) †"
    assert not any(label.startswith("dora -") or label.startswith("lily - lily") for label in rows)

    methods = markdown_rows(markdown, "Methods: Other tasks")
    assert set(methods) == set(FIELD)  # one line per method, none for the differences
    count = "trainable params (head excluded)"
    assert {m: methods[m][count] for m in FIELD} == {
        "lily": "792,576", "dora": "301,056", "adaptformer": "175,872", "my_new_method": "4,242"
    }  # fmt: skip
    versus = "lily - method (paired seeds)"
    assert methods["lily"][versus] == "reference"
    assert methods["dora"][versus] == "+4.0 ± 2.0 (n=3)"
    assert methods["adaptformer"]["top-1: alpha"] == "84.7 ± 12.7 (n=3)"  # 2.54 / 3; std sqrt(.032067 / 2)
    assert methods["adaptformer"][versus] == "-5.5 ± 0.7 (n=2) †"
    assert methods["dora"]["budget"] == "-"


def _saved_config(run_dir: Path, peft: dict[str, object]) -> None:
    """The config LightningCLI saves beside a run (only what the report reads of it)."""
    version = run_dir / "csv" / "version_0"
    version.mkdir(parents=True)
    config = {"model": {"method": "peft", "peft": peft}, "data": {"class_path": "x.Y", "init_args": {}}}
    (version / "config.yaml").write_text(yaml.safe_dump(config))


def test_runs_of_two_peft_types_get_rows_of_their_own(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed, top1 in ((0, 0.70), (1, 0.74)):
        write_run(runs, "alpha", "lily", "lily", seed, top1)
        # one folder name, one method name, two PEFT types: read from each run's saved config
        lora = write_run(runs, "alpha", "peft", "peft", seed, top1 - 0.10, params=294_912)
        _saved_config(lora, {"peft_type": "LORA", "r": 8, "target_modules": ["qkv"]})
        vera = write_run(runs, "beta", "peft", "peft", seed, top1 - 0.20, params=18_432)
        _saved_config(vera, {"peft_type": "VERA", "r": 256})
    assert main(["report", str(runs), "--out", str(tmp_path / "out")]) == 0
    markdown = (tmp_path / "out" / "results.md").read_text()
    rows = markdown_rows(markdown, "Other tasks")
    assert rows["peft:lora"]["alpha"] == "62.0 ± 2.8 (n=2)" and rows["peft:lora"]["beta"] == "-"
    assert rows["peft:vera"]["beta"] == "52.0 ± 2.8 (n=2)" and rows["peft:vera"]["alpha"] == "-"
    assert rows["lily - peft:lora"]["alpha"] == "+10.0 ± 0.0 (n=2)"  # .10 on both seeds
    methods = markdown_rows(markdown, "Methods: Other tasks")
    assert methods["peft:lora"]["trainable params (head excluded)"] == "294,912"
    assert methods["peft:vera"]["trainable params (head excluded)"] == "18,432"


# One task; (folder, method, budget, params, top-1 per seed). Means and sample stds by hand:
#   lily 72.0 ± 2.83, lora 63.0 ± 4.24, full 81.0 ± 1.41, lily_400k 71.0 ± 1.41, lora_400k 70.0 ± 0.0
FIGURE_RUNS = [
    ("lily", "lily", None, 792_576, (0.70, 0.74)),
    ("lora", "lora", None, 294_912, (0.60, 0.66)),
    ("full", "full", None, 85_798_656, (0.80, 0.82)),
    ("lily_400k", "lily", 400_000, 401_408, (0.70, 0.72)),
    ("lora_400k", "lora", 400_000, 405_504, (0.70, 0.70)),
]


def test_accuracy_vs_params_has_one_point_per_row_and_groups_equal_budgets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = tmp_path / "runs"
    for folder, method, budget, params, values in FIGURE_RUNS:
        for seed, top1 in enumerate(values):
            write_run(runs, "alpha", folder, method, seed, top1, params=params, budget=budget)
    drawn: list[Figure] = []
    draw = report_module.accuracy_vs_params
    monkeypatch.setattr(
        report_module, "accuracy_vs_params", lambda *a, **k: drawn.append(draw(*a, **k)) or drawn[-1]
    )
    readme_figure = tmp_path / "docs" / "field.png"
    assert main(["report", str(runs), "--out", str(tmp_path / "out"), "--figure", str(readme_figure)]) == 0
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "![accuracy vs trainable parameters](accuracy_vs_params.png)" in markdown
    assert (tmp_path / "out" / "accuracy_vs_params.png").stat().st_size > 10_000
    assert readme_figure.stat().st_size > 10_000  # the copy `--figure` asked for

    (ax,) = drawn[0].axes
    assert ax.get_xscale() == "log"
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    labels = {text.get_text(): text.xy for text in ax.texts if hasattr(text, "xy")}
    assert len(bars) == len(labels) == len(FIGURE_RUNS)  # one point per (method, variant)
    expected = {"lily": (792_576, 72.0), "lora": (294_912, 63.0), "full": (85_798_656, 81.0),
                "lily_400k": (401_408, 71.0), "lora_400k": (405_504, 70.0)}  # fmt: skip
    assert {label: (x, pytest.approx(y)) for label, (x, y) in labels.items()} == expected
    points = {(line.get_xdata()[0], line.get_ydata()[0]): line for line, *_ in bars}
    style = {
        label: (to_rgba(points[xy].get_color()), points[xy].get_marker()) for label, xy in labels.items()
    }
    assert style["lily_400k"] == style["lora_400k"]  # one budget: one colour, one marker
    assert style["lily"] == style["lora"] == style["full"] != style["lily_400k"]
    lily_bar = next(c for c in bars if c.lines[0].get_xdata()[0] == 792_576)
    (segment,) = lily_bar.lines[2][0].get_segments()
    assert [y for _, y in segment] == pytest.approx(
        [72 - 200 * math.sqrt(0.0002), 72 + 200 * math.sqrt(0.0002)]
    )
    guides = [line for line in ax.lines if list(line.get_xdata()) == [400_000, 400_000]]
    assert len(guides) == 1 and to_rgba(guides[0].get_color()) == style["lily_400k"][0]
    assert "budget 400k" in {text.get_text() for text in ax.texts}
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == ["own default size", "budget 400k: sized to equal counts"]
    methods = markdown_rows(markdown, "Methods: Other tasks")
    assert methods["lily_400k"]["budget"] == methods["lora_400k"]["budget"] == "400,000"
    assert methods["lily"]["budget"] == "-"


def test_accuracy_vs_params_labels_neither_overlap_nor_stray_from_their_points() -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from lily_lightning.studies.plots import ParamPoint, accuracy_vs_params

    # The README's comparison (docs/_static/accuracy_vs_params.png): lora and dora, adapter and adaptformer
    # sit almost on one another.
    measured = {"lily": (399_360, 92.5), "dora": (156_672, 90.0), "lora": (147_456, 89.8),
                "ssf": (102_912, 85.6), "adaptformer": (78_432, 84.7), "adapter": (78_432, 83.3),
                "bitfit": (51_456, 82.0), "fact_tt": (15_360, 79.2), "vpt_deep": (46_080, 68.5),
                "linear_probe": (0, 60.1), "vpt_shallow": (3_840, 49.5),
                "full": (21_536_640, 20.1)}  # fmt: skip
    points = [ParamPoint(name, params, top1 / 100, 0.01) for name, (params, top1) in measured.items()]
    figure = accuracy_vs_params({"mnist5k": points})
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    (ax,) = figure.axes
    labels = [text for text in ax.texts if hasattr(text, "xy")]
    assert len(labels) == len(measured)
    boxes = {text.get_text(): text.get_window_extent(renderer) for text in labels}
    for (a, box), (b, other) in itertools.combinations(boxes.items(), 2):
        assert not box.overlaps(other), (a, b)
    dpi = figure.dpi
    for text in labels:  # each label touches a square of 20 points around its own point
        x, y = ax.transData.transform(text.xy)
        near = Bbox.from_extents(x - 20 * dpi / 72, y - 20 * dpi / 72, x + 20 * dpi / 72, y + 20 * dpi / 72)
        assert boxes[text.get_text()].overlaps(near), text.get_text()
