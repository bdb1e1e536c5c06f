"""Equal budgets (issue 25, item 6): one size knob per method, ``--model.budget N`` picks the knob value whose
trainable count is closest to N (counts written here from each paper's shapes), fixed-count methods refuse a
budget, and `sweep --budgets` / per-method grids plan their runs (issue 25, item 3)."""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import logging
import math
from pathlib import Path

import pytest
import timm
from tiny_vits import tiny_vit

from lily_lightning import UsageError, count_parameters, inject
from lily_lightning.adapters import SIZE_KNOBS, AdapterConfig, HFPeftConfig, fit_budget
from lily_lightning.cli import main
from lily_lightning.studies import sweep as sweep_module
from lily_lightning.studies.grid import Study, parse_grid
from lily_lightning.studies.runs import Outcome, RunSpec
from lily_lightning.studies.sweep import Sweep
from lily_lightning.training.module import ViTClassifier, adapter_config
from lily_lightning.vit.budget import sized_to_budget

# tiny_vit(): width 48, 4 blocks, MLP hidden 96, 8x8 patches.
WIDTH, DEPTH, HIDDEN = 48, 4, 96
EXPERTS = 4  # Lily's default E; its LPs are shared by depth // E blocks


def hand_count(method: str, size: int) -> int:
    """Trainable parameters of ``method`` at knob value ``size`` on tiny_vit(), from each paper's shapes."""
    d, depth, hidden = WIDTH, DEPTH, HIDDEN
    lora = depth * 2 * (d * size + size * d)  # q and v: A (d x r) and B (r x d) per block
    bottleneck = depth * (d * size + size + size * d + d)  # down and up, both with bias, per block
    if method == "lora":
        return lora
    if method == "dora":
        return lora + depth * 2 * d  # + a magnitude per output channel of q and v
    if method == "fact_tt":
        # U (d x r) and V (r x d) shared; per block r x r cores on q, k, v, proj, (h/d) r x r on fc1 and fc2.
        return 2 * d * size + depth * (4 + 2 * hidden // d) * size * size
    if method in ("adapter", "adaptformer"):
        return bottleneck
    if method == "vpt_shallow":
        return size * d
    if method == "vpt_deep":
        return depth * size * d
    assert method == "lily"
    lps = math.ceil(depth / (depth // EXPERTS))
    # k, v at rank r and the whole MLP at 2r: LPs (d -> r), a router per block (r -> E), E HP experts (r x d).
    return sum(lps * d * r + depth * r * EXPERTS + EXPERTS * r * d for r in (size, size, 2 * size))


def closest(method: str, budget: int) -> int:
    """The knob value whose hand count is closest to ``budget``, ties to the smaller: searched one by one."""
    return min(range(1, 3000), key=lambda size: (abs(hand_count(method, size) - budget), size))


def defaults(method: str) -> AdapterConfig:
    """The config ``method`` injects with the model's default settings."""
    settings = {name: p.default for name, p in inspect.signature(ViTClassifier).parameters.items()}
    return adapter_config(method, settings)


@pytest.mark.parametrize("method", [method for method in SIZE_KNOBS if method != "peft"])
@pytest.mark.parametrize("budget", [5_000, 31_000])
def test_the_budget_picks_the_closest_count_of_the_backbone_in_use(method: str, budget: int) -> None:
    backbone = tiny_vit()
    config, value, count = sized_to_budget(backbone, method, defaults(method), budget)
    assert value == closest(method, budget)
    assert count == hand_count(method, value)
    assert getattr(config, SIZE_KNOBS[method].field) == value
    # The count the injected model really has (not built on the meta device) is the one promised.
    assert count_parameters(inject(copy.deepcopy(backbone), config)) == count


# PEFT types on tiny_vit()'s qkv (d -> 3d) in each of its 4 blocks, counted from PEFT's layer shapes.
PEFT_COUNTS = {
    "LORA": ("r", lambda r: DEPTH * (WIDTH * r + r * 3 * WIDTH)),  # A (r x d) and B (3d x r)
    "LOHA": ("r", lambda r: DEPTH * 2 * (WIDTH * r + r * 3 * WIDTH)),  # two Hadamard-multiplied LoRA pairs
    "FOURIERFT": ("n_frequency", lambda n: DEPTH * n),  # n spectral coefficients per layer
}


@pytest.mark.parametrize("peft_type", list(PEFT_COUNTS))
@pytest.mark.parametrize("budget", [1_000, 9_000])
def test_a_budget_sizes_a_peft_config_by_its_types_size_field(peft_type: str, budget: int) -> None:
    field, count_of = PEFT_COUNTS[peft_type]
    backbone = tiny_vit()
    asked = HFPeftConfig({"peft_type": peft_type, "target_modules": ["qkv"]})
    config, value, count = sized_to_budget(backbone, "peft", asked, budget)
    assert value == min(range(1, 5000), key=lambda size: (abs(count_of(size) - budget), size))
    assert count == count_of(value) and config.settings[field] == value
    assert "r" not in asked.settings and "n_frequency" not in asked.settings  # the asked config is unchanged
    assert count_parameters(inject(copy.deepcopy(backbone), config)) == count  # the real layers agree
    assert all(p.device.type == "cpu" for p in backbone.parameters())  # counted on a meta copy


def test_a_peft_run_sized_by_budget_records_the_field_and_types_without_one_refuse() -> None:
    # vit_tiny: 12 blocks of width 192; PEFT LoRA on qkv trains 12 * (192 r + 576 r) = 9,216 per rank.
    lora = {"peft_type": "LORA", "target_modules": ["qkv"]}
    model = tiny_classifier(method="peft", peft=lora, budget=50_000)
    assert model.adapter_parameters == 46_080 and model.size == {"peft.r": 5}
    assert model.hparams.peft["r"] == 5 and model.hparams_initial.peft["r"] == 5  # checkpoints hold it
    assert tiny_classifier(method="peft", peft=lora).size == {"peft.r": 8}  # PEFT's default, made explicit
    oft = {"peft_type": "OFT", "r": 0, "oft_block_size": 16, "target_modules": ["qkv"]}
    assert tiny_classifier(method="peft", peft=oft).size is None
    with pytest.raises(UsageError) as refused:
        tiny_classifier(method="peft", peft=oft, budget=50_000)
    message = str(refused.value)
    assert "method peft_oft has no size knob" in message and "LORA (r)" in message, message
    assert "FOURIERFT (n_frequency)" in message


def test_the_search_takes_the_smaller_on_a_tie_and_stops_at_one() -> None:
    def tens(value: int) -> int:
        return 10 * value

    assert fit_budget(25, tens) == (2, 20)  # 20 and 30 are as close: the smaller
    assert fit_budget(26, tens) == (3, 30)
    assert fit_budget(3, tens) == (1, 10)  # below the smallest size: the smallest
    assert fit_budget(123_456, tens) == (12_346, 123_460)
    with pytest.raises(UsageError, match="positive"):
        fit_budget(0, tens)
    with pytest.raises(ValueError, match="does not grow"):
        fit_budget(100, lambda value: 7)


def tiny_classifier(**kwargs) -> ViTClassifier:
    return ViTClassifier("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=3, **kwargs)


def test_the_model_sizes_its_method_says_so_and_records_the_value(caplog: pytest.LogCaptureFixture) -> None:
    # vit_tiny: width 192, 12 blocks; LoRA on q, v: 2 * 12 * 2 * 192 = 9,216 per rank. 50,000 lies between
    # rank 5 (46,080; 3,920 short) and rank 6 (55,296; 5,296 over): rank 5, whatever the config's rank.
    with caplog.at_level(logging.INFO, logger="lily_lightning"):
        model = tiny_classifier(method="lora", budget=50_000)
    assert "budget 50,000: lora rank 5 -> 46,080 adapter parameters" in caplog.text
    assert model.adapter_parameters == 46_080
    assert model.hparams.budget == 50_000 and model.hparams.lora.rank == 5  # checkpoints hold the value
    assert model.hparams_initial.lora.rank == 5  # and so does hparams.yaml
    assert model.size == {"lora.rank": 5}
    assert tiny_classifier(method="vpt_deep").size == {"vpt.length": 10}  # no budget: the config's own


def test_methods_with_a_fixed_count_refuse_a_budget_naming_it() -> None:
    d, depth = 192, 12  # vit_tiny
    full = sum(
        p.numel() for p in timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32).parameters()
    )
    fixed = {
        # per block: norm1, qkv (3d), proj, norm2, fc1 (4d), fc2 biases; the patch embedding and final norm
        "bitfit": depth * 11 * d + 2 * d,
        # a scale and a shift after norm1, qkv, proj, norm2, fc1, fc2, the patch embedding and the final norm
        "ssf": depth * 2 * 11 * d + 2 * 2 * d,
        "linear_probe": 0,
        "full": full,
    }
    for method, count in fixed.items():
        with pytest.raises(UsageError) as refused:
            tiny_classifier(method=method, budget=10_000)
        assert f"method {method} has no size knob, it trains a fixed {count:,} parameters" in str(
            refused.value
        )


def study(
    methods: list[str], grid: list[str], budgets: list[int] | None, select_on: str | None = None
) -> Study:
    axes = parse_grid(grid)
    return Study(Path("runs"), lambda task, method: [], [], ["alpha"], methods, [0], axes, select_on, budgets)


def planned(specs) -> list[tuple[str, str | None]]:
    """(run folder, --model.budget) of each planned run."""
    return [(s.run_dir.as_posix(), dict(itertools.pairwise(s.args)).get("--model.budget")) for s in specs]


def test_budgets_plan_each_sized_method_per_budget_and_fixed_ones_once() -> None:
    plan = study(["lora", "bitfit"], ["model.lr=1e-3,1e-2"], [1000, 4000])
    plan.check()
    specs = plan.training_specs()
    assert planned(specs) == [
        ("runs/alpha/lora/budget=1000/lr=1e-3/seed0", "1000"),
        ("runs/alpha/lora/budget=1000/lr=1e-2/seed0", "1000"),
        ("runs/alpha/lora/budget=4000/lr=1e-3/seed0", "4000"),
        ("runs/alpha/lora/budget=4000/lr=1e-2/seed0", "4000"),
        ("runs/alpha/bitfit/lr=1e-3/seed0", None),
        ("runs/alpha/bitfit/lr=1e-2/seed0", None),
    ]
    # What a run means keeps the budgets apart; the same study planned again is the same runs.
    assert specs[0].resolved["model.budget"] == 1000 and specs[2].resolved["model.budget"] == 4000
    again = study(["lora", "bitfit"], ["model.lr=1e-3,1e-2"], [1000, 4000]).training_specs()
    assert [(s.run_dir, s.resolved) for s in again] == [(s.run_dir, s.resolved) for s in specs]
    assert specs[0].name == "alpha lora budget=1000 seed0 lr=1e-3"


def test_a_methods_own_grid_varies_only_its_runs_and_selects_per_method_and_budget() -> None:
    plan = study(["lily", "vpt_deep"], ["model.vpt.length=1,10,50", "model.lily.scale=1,10"], None, "val")
    plan.check()
    assert planned(plan.selection_specs()) == [
        ("runs/alpha/lily/select/lily.scale=1/seed0", None),
        ("runs/alpha/lily/select/lily.scale=10/seed0", None),
        ("runs/alpha/vpt_deep/select/vpt.length=1/seed0", None),
        ("runs/alpha/vpt_deep/select/vpt.length=10/seed0", None),
        ("runs/alpha/vpt_deep/select/vpt.length=50/seed0", None),
    ]
    sized = study(["adaptformer"], ["model.adaptformer.scale=0.1,1"], [500], "val")
    assert planned(sized.selection_specs()) == [
        ("runs/alpha/adaptformer/budget=500/select/adaptformer.scale=0.1/seed0", "500"),
        ("runs/alpha/adaptformer/budget=500/select/adaptformer.scale=1/seed0", "500"),
    ]
    choice = {"point": {"model.adaptformer.scale": "1"}}
    assert planned(sized.final_specs("alpha", "adaptformer", 500, choice)) == [
        ("runs/alpha/adaptformer/budget=500/seed0", "500")
    ]


@pytest.mark.parametrize(
    ("methods", "grid", "budgets", "message"),
    [
        (["lily", "lora"], ["model.vpt.length=1,10"], None, "a setting of vpt_shallow, vpt_deep only"),
        (["bitfit", "ssf"], [], [1000], "--methods bitfit ssf train a fixed count"),
        (["lora", "lily"], ["model.lora.rank=4,8"], [1000], "--budgets sets lora's rank"),
        (["lora"], ["model.budget=10,20"], None, "use --budgets"),
        (["lora"], [], [0], "positive parameter count"),
    ],
)
def test_plans_no_run_can_follow_are_refused_in_one_message(methods, grid, budgets, message) -> None:
    with pytest.raises(UsageError, match=message):
        study(methods, grid, budgets).check()


def test_sweep_takes_every_method_name_and_refuses_an_unknown_one(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("trainer: {max_epochs: 1}\n")
    args = ["sweep", "--config", str(config), "--tasks", "alpha", "--runs-dir", str(tmp_path / "runs")]
    assert main([*args, "--methods", "lily", "lorra"]) == 2
    err = capsys.readouterr().err
    assert "unknown method(s) lorra" in err and "vpt_deep" in err and "Traceback" not in err
    assert main([*args, "--methods", "bitfit", "--budgets", "1000"]) == 2
    assert "train a fixed count" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "alpha").exists()

    # A mix through the command line (runs 'finish' at once): the plan says bitfit runs once.
    launcher = InstantLauncher()
    monkeypatch.setattr(sweep_module, "LocalLauncher", lambda *_: launcher)
    assert main([*args, "--methods", "lora", "bitfit", "--budgets", "1000", "2000"]) == 0
    assert "sweep: bitfit: a fixed parameter count, run once, not per budget" in capsys.readouterr().out
    runs = [spec.run_dir.relative_to(tmp_path / "runs").as_posix() for spec in launcher.launched]
    assert runs == ["alpha/lora/budget=1000", "alpha/lora/budget=2000", "alpha/bitfit"]


def test_a_budget_run_records_its_budget_and_size_in_its_result(tmp_path: Path, data_root: Path) -> None:
    from test_cli import tiny_run_config

    config = tiny_run_config(tmp_path, data_root, epochs=1, method="lora")  # lora rank 2 in the file
    # test_vit (6 blocks, width 64), LoRA on q, v: 2 * 6 * 2 * 64 = 1,536 per rank; 5,000 lies between rank 3
    # (4,608; 392 short) and rank 4 (6,144; 1,144 over): rank 3.
    budget = ["--model.budget", "5000", "--trainer.limit_val_batches", "0"]
    assert main(["fit", "--config", str(config), *budget, "--trainer.limit_train_batches", "1"]) == 0
    # Resumed as a sweep resumes (the checkpoint's path): the file's rank 2 is the budget's to replace.
    last = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert main(["fit", "--config", str(config), *budget, "--ckpt_path", last]) == 0
    assert main(["test", "--config", str(config), *budget, "--ckpt_path", "last"]) == 0
    assert "  rank: 3\n" in next((tmp_path / "run" / "csv").glob("version_*/hparams.yaml")).read_text()
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["budget"] == 5_000 and result["size"] == {"lora.rank": 3}
    assert result["adapter_params"] == 4_608


class InstantLauncher:
    """Stands in for the local launcher: each run 'finishes' at once, writing what `validate` / `test` would;
    on validation, scale 1 wins at budget 500 and scale 0.1 at budget 2000."""

    def __init__(self) -> None:
        self.launched: list[RunSpec] = []

    def launch(self, jobs) -> list[Outcome]:
        for spec, _ in jobs:
            self.launched.append(spec)
            spec.run_dir.mkdir(parents=True, exist_ok=True)
            if spec.evaluate == "validate":
                wins = spec.point.get("model.adaptformer.scale") == ("1" if spec.budget == 500 else "0.1")
                record = {"task": spec.task, "val_top1": 0.9 if wins else 0.5}
                (spec.run_dir / "validation.json").write_text(json.dumps(record))
            else:
                record = {"task": spec.task, "top1": 0.7, "trainable_params": 10, "head_params": 2}
                (spec.run_dir / "result.json").write_text(json.dumps(record))
        return [Outcome(spec.name, "done", "") for spec, _ in jobs]


def test_selection_chooses_per_budget_and_a_rerun_launches_nothing(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    plan = study(["adaptformer", "ssf"], ["model.adaptformer.scale=0.1,1"], [500, 2000], "val")
    launcher = InstantLauncher()
    Sweep(plan, launcher, rerun=False).run()
    finals = {s.run_dir.as_posix(): s.selection["variant"] for s in launcher.launched if s.selection}
    assert finals == {
        "runs/alpha/adaptformer/budget=500/seed0": "adaptformer.scale=1",
        "runs/alpha/adaptformer/budget=2000/seed0": "adaptformer.scale=0.1",
        "runs/alpha/ssf/seed0": "",  # SSF has no grid axis of its own and no knob: one point, once
    }
    assert "alpha ssf: chose its one point (validation top-1 0.5000)" in capsys.readouterr().out
    rerun = InstantLauncher()
    Sweep(
        study(["adaptformer", "ssf"], ["model.adaptformer.scale=0.1,1"], [500, 2000], "val"), rerun, False
    ).run()
    assert rerun.launched == []
