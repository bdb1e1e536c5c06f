"""Smoke tests of benchmarks/: the tables come out with every row; no timing is asserted anywhere."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


step_time = _load("step_time")
params = _load("params")

# vit_tiny at 32 px: 12 blocks of width 192 on 4 patches, so a step takes milliseconds.
TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch-size", "2", "--num-classes", "5"]
TINY_RUN = [*TINY, "--warmup", "1", "--repeats", "1", "--steps", "1"]


def _has_peft() -> bool:
    return importlib.util.find_spec("peft") is not None


def test_step_time_prints_every_row_and_the_eval_table(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [r for r in step_time.ROWS if _has_peft() or not r.startswith("peft-")]
    step_time.main([*TINY_RUN, "--memory-repeats", "0", "--rows", *rows])
    out = capsys.readouterr().out
    assert "torch" in out and "threads" in out  # the machine header
    table = out.split("## training step")[1].split("## eval throughput")[0]
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in lines[1:]] == rows
    evals = out.split("## eval throughput")[1].split("## targets")[0]
    assert all(f"| {name}" in evals for name in ("backbone", "lora", "lily-batch"))
    assert "lily-batch step <= 1.05 x lora" in out


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


def test_targets_say_met_or_not() -> None:
    times = {"lora": [1.0], "lily-batch": [1.04, 1.2], "floor": [0.9]}
    lines = step_time.format_targets(times, {"lora": 100.0, "lily-batch": 120.0})
    assert "- lily-batch step <= 1.05 x lora: 1.040 -> met" in lines
    assert "- lily-batch step <= 1.08 x floor: 1.156 -> NOT met" in lines
    assert "- lily-batch peak <= 1.10 x lora peak: 1.200 -> NOT met" in lines
    assert not any("peft" in line for line in lines)  # rows that were not run are skipped


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
    assert params.count(model, params.LoRAConfig(rank=rank)) == _lora_by_hand(*VITS[model], rank)


@pytest.mark.parametrize("model", VITS)
@pytest.mark.parametrize(("rank", "experts"), [(8, 2), (16, 4), (32, 4), (32, 6)])
def test_params_lily_matches_hand_count(model: str, rank: int, experts: int) -> None:
    config = params.LilyConfig(rank=rank, num_experts=experts)
    assert params.count(model, config) == _lily_by_hand(*VITS[model], rank, experts)


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
    best = eval_throughput.main([*TINY_RUN])
    out = capsys.readouterr().out
    assert list(best) == list(eval_throughput.ROWS) and all(v > 0 for v in best.values())
    assert all(f"| {row}" in out for row in eval_throughput.ROWS)
    assert "target merged-kv >= 0.98 x backbone images/s" in out
