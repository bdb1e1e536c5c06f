"""Smoke tests of benchmarks/: the tables come out with every row; no timing is asserted anywhere."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from lily_lightning.vit.state import count_backbone_parameters

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


step_time = _load("step_time")
params = _load("params")
sys.path.insert(0, str(BENCHMARKS))  # saved_tensors.py imports step_time as a sibling script
saved_tensors = _load("saved_tensors")

# vit_tiny at 32 px: 12 blocks of width 192 on 4 patches, so a step takes milliseconds.
TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch-size", "2", "--num-classes", "5"]


def _has_peft() -> bool:
    return importlib.util.find_spec("peft") is not None


def test_step_time_prints_every_row_and_the_eval_table(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [r for r in step_time.ROWS if _has_peft() or not r.startswith("peft-")]
    step_time.main(["--quick", "--rows", *rows])
    out = capsys.readouterr().out
    assert "torch" in out and "threads" in out  # the machine header
    table = out.split("## training step")[1].split("## eval throughput")[0]
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in lines[1:]] == rows
    evals = out.split("## eval throughput")[1].split("## targets")[0]
    assert all(f"| {name}" in evals for name in ("backbone", "lora", "lily-batch"))
    assert "lily-batch step <= 1.03 x lora" in out


def test_quick_sets_defaults_that_explicit_flags_override() -> None:
    quick = step_time.parse_args(["--quick"])
    assert (quick.model, quick.img_size, quick.repeats, quick.memory_repeats) == (TINY[1], 32, 2, 0)
    assert step_time.parse_args(["--quick", "--repeats", "5"]).repeats == 5
    assert step_time.parse_args([]).model == "vit_base_patch16_224"


def test_paired_ratios_cancel_a_drift_that_hits_both_rows() -> None:
    # The machine slows down 3x over the run; within each repeat, b takes 1.1 x a.
    times = {"a": [1.0, 2.0, 3.0], "b": [1.1, 2.2, 3.3]}
    assert step_time.pair_ratios(times, "b", "a") == pytest.approx([1.1, 1.1, 1.1])
    assert step_time.pair_ratios(times, "b", "missing") is None
    assert step_time.quartiles([4.0, 1.0, 3.0, 2.0, 5.0]) == (2.0, 3.0, 4.0)


def test_paired_rotates_the_order_of_the_rows() -> None:
    order: list[str] = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    args = step_time.parse_args(["--warmup", "0", "--repeats", "3"])
    times = step_time.paired(fns, args, log=lambda msg: None)
    assert order == list("abcbcacab") and all(len(ts) == 3 for ts in times.values())


def test_step_time_trainable_counts_are_the_adapters_plus_the_head() -> None:
    args = step_time.parse_args(TINY)
    dim, depth, head = 192, 12, 192 * 5 + 5
    assert step_time.build_row("floor", args).trainable == head
    assert step_time.build_row("linear-probe", args).trainable == head
    assert step_time.build_row("lora", args).trainable == depth * 2 * 8 * (dim + dim) + head
    if _has_peft():  # PEFT's LoRA r=8 on the fused qkv: the same count as ours on q and v
        assert step_time.build_row("peft-lora", args).trainable == depth * 8 * (dim + 3 * dim) + head


def test_step_time_memory_runs_in_a_fresh_process() -> None:
    peak = step_time.memory_in_subprocess("lora", [*TINY, "--warmup", "1"])
    assert peak > 0


def test_step_time_profile_prints_a_kernel_table(capsys: pytest.CaptureFixture[str]) -> None:
    step_time.main([*TINY, "--rows", "lily-token", "--profile", "--steps", "1"])
    out = capsys.readouterr().out
    assert "## profile of lily-token" in out and "aten::" in out


def test_targets_say_met_or_not_from_paired_medians() -> None:
    # Per-repeat ratios to lora: 1.02, 1.00, 1.10 -> median 1.02; to floor: 1.133, 1.111, 1.222 -> 1.133.
    times = {"lora": [1.0, 2.0, 1.0], "lily-batch": [1.02, 2.0, 1.1], "floor": [0.9, 1.8, 0.9]}
    lines = step_time.format_targets(times, {"lora": 100.0, "lily-batch": 120.0})
    assert "- lily-batch step <= 1.03 x lora: 1.020 -> met" in lines
    assert "- lily-batch step <= 1.08 x floor: 1.133 -> NOT met" in lines
    assert "- lily-batch peak <= 1.10 x lora peak: 1.200 -> NOT met" in lines
    assert not any("peft" in line for line in lines)  # rows that were not run are skipped


def test_saved_tensors_attributes_lora_and_lily_inputs_by_hand(capsys: pytest.CaptureFixture[str]) -> None:
    # vit_tiny at 32 px, batch 2: 12 blocks, 2 x 5 tokens x 192 floats. q's LoRA A saves norm1's output
    # once per block (v's A saves the same tensor: counted once); Lily's k LP likewise, and the mlp LP
    # saves norm2's output.
    args = step_time.parse_args(TINY)
    per_block = 2 * 5 * 192 * 4
    lora = saved_tensors.count("lora", args).by_module
    assert lora["adapters.q.lora_a.*"] == 12 * per_block and "adapters.v.lora_a.*" not in lora
    lily = saved_tensors.count("lily-batch", args).by_module
    assert lily["adapters.k.lp.*"] == lily["adapters.mlp.lp.*"] == 12 * per_block
    saved_tensors.main([*TINY, "--rows", "lora"])
    assert "| adapters.q.lora_a.* |" in capsys.readouterr().out


# --- params.py against hand-computed counts -------------------------------------------------------------

VITS = {
    "vit_small_patch16_224": (384, 12),
    "vit_base_patch16_224": (768, 12),
    "vit_large_patch16_224": (1024, 24),
}


def _lora_by_hand(dim: int, depth: int, rank: int) -> int:
    return depth * 2 * rank * (dim + dim)  # an (A, B) pair per block on q and on v


def _lily_by_hand(dim: int, depth: int, rank: int, experts: int) -> int:
    lps = math.ceil(depth / (depth // experts))  # one LP per depth // E blocks

    def site(r: int) -> int:  # LPs + the HP bank + a router per block
        return lps * dim * r + experts * r * dim + depth * r * experts

    return 2 * site(rank) + site(2 * rank)  # k and v at rank r, the mlp site at 2r


@pytest.mark.parametrize("model", VITS)
@pytest.mark.parametrize("rank", [4, 8, 16])
def test_params_lora_matches_hand_count(model: str, rank: int) -> None:
    assert count_backbone_parameters(model, params.LoRAConfig(rank=rank)) == _lora_by_hand(*VITS[model], rank)


@pytest.mark.parametrize("model", VITS)
@pytest.mark.parametrize(("rank", "experts"), [(8, 2), (16, 4), (32, 4), (32, 6)])
def test_params_lily_matches_hand_count(model: str, rank: int, experts: int) -> None:
    config = params.LilyConfig(rank=rank, num_experts=experts)
    assert count_backbone_parameters(model, config) == _lily_by_hand(*VITS[model], rank, experts)


def test_params_table_prints_the_vit_b_figures_of_the_tests(capsys: pytest.CaptureFixture[str]) -> None:
    # 294,912 and 792,576: the ViT-B/16 counts tests/test_inject.py computes by hand.
    assert _lora_by_hand(768, 12, 8) == 294_912 and _lily_by_hand(768, 12, 32, 4) == 792_576
    params.main(
        ["--models", "vit_base_patch16_224", "--lora-ranks", "8", "--lily-ranks", "32", "--lily-experts", "4"]
    )
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| ")
    }
    assert rows["LoRA r=8 on q,v"] == "0.295"
    assert rows["Lily r=32 E=4 on k,v,mlp"] == "0.793"
    assert rows["full fine-tuning"] == "85.799"  # 86,567,656 minus the 1000-class head's 769,000


def test_eval_throughput_prints_every_row_and_the_merge_target(capsys: pytest.CaptureFixture[str]) -> None:
    eval_throughput = _load("eval_throughput")
    best = eval_throughput.main([*TINY, "--warmup", "1", "--repeats", "1", "--steps", "1"])
    out = capsys.readouterr().out
    assert list(best) == list(eval_throughput.ROWS) and all(v > 0 for v in best.values())
    assert all(f"| {row}" in out for row in eval_throughput.ROWS)
    assert "target merged-kv >= 0.98 x backbone images/s" in out


def test_compile_adds_a_compiled_twin_of_every_row_without_compiling_the_eager_ones() -> None:
    args = step_time.parse_args([*TINY, "--rows", "floor", "lora", "--compile"])
    assert step_time.row_names(args) == ["floor", "lora", "floor+compiled", "lora+compiled"]
    compiled, eager = step_time.build_row("lora+compiled", args), step_time.build_row("lora", args)
    assert compiled.model._compiled_call_impl is not None and eager.model._compiled_call_impl is None
    assert step_time.build_row("floor+compiled", args).model.blocks._compiled_call_impl is not None
    assert compiled.trainable == eager.trainable
