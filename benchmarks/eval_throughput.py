"""Eval throughput of merged Lily against the frozen backbone, side by side in one run.

For one backbone (random init, nothing is downloaded; default: the demo's DINOv2-S at 112 px) and one
batch size, each row times an eval forward pass under ``torch.inference_mode``. Rows:

  backbone     the frozen timm ViT, no adapter
  lily         Lily on k, v and the MLP (the defaults), unmerged, eval_routing running
  lily-kv      Lily on k and v only, unmerged, eval_routing running
  merged-kv    lily-kv after lily_lightning.vit.merge: k and v folded into qkv, no branch left
  merged       lily after merge: k and v folded, the mlp site (ReLU) still a side branch

GFLOP/batch counts one forward pass with torch's FlopCounterMode (matmuls and convolutions: the
machine-independent side of the cost). Target: merged-kv within 2% of the backbone (images/s >= 0.98 x).
Noise: step_time's paired repeats (every row once per repeat, the order rotated by one each repeat);
each repeat times ``--steps`` batches and keeps their median; the table shows the best repeat, the median
repeat and the spread (max / min - 1).

    python benchmarks/eval_throughput.py                      # CPU, DINOv2-S at 112 px, batch 32
    python benchmarks/eval_throughput.py --device cuda --batch-size 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_time import header, markdown_table, paired

from lily_lightning import LilyConfig, inject, merge

ROWS = ("backbone", "lily", "lily-kv", "merged-kv", "merged")
TARGET = 0.98  # merged-kv images/s >= TARGET x backbone images/s


def build_row(name: str, args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        args.model, pretrained=False, num_classes=args.num_classes, img_size=args.img_size
    )
    if name != "backbone":
        targets = ("k", "v") if name.endswith("kv") else ("k", "v", "mlp")
        inject(model, LilyConfig(targets=targets, eval_routing="running"))
        with torch.no_grad():  # trained-like weights: HP starts at zero, which a real run moves away from
            for adapter in model.adapters.values():
                adapter.hp.normal_(std=0.02)
        if name.startswith("merged"):
            merge(model.eval())  # merging is for inference: lily_lightning refuses it in train mode
    return model.to(args.device).eval()


def gflops(model: nn.Module, images: torch.Tensor) -> float:
    """FLOPs of one forward pass (torch's FlopCounterMode): the machine-independent side of the cost."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(images)
    return counter.get_total_flops() / 1e9


def _forward(model: nn.Module, images: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            model(images)

    return run


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    # step_time's header, less its first line (which describes a training step)
    machine = header(args).split("\n", 1)[1]
    print(f"# {args.model}, random init, {args.img_size} px, batch {args.batch_size}, fp32 eval\n{machine}")
    images = torch.rand(args.batch_size, 3, args.img_size, args.img_size, device=args.device)
    models = {name: build_row(name, args) for name in args.rows}
    flops = {name: gflops(model, images) for name, model in models.items()}
    fns = {name: _forward(model, images) for name, model in models.items()}
    seconds = paired(fns, args, lambda line: print(line, file=sys.stderr, flush=True))
    best = {name: args.batch_size / min(times) for name, times in seconds.items()}
    rows = []
    for name, times in seconds.items():
        ratio = f"{best[name] / best['backbone']:.3f}" if "backbone" in best else "-"
        median = args.batch_size / statistics.median(times)
        spread = f"{max(times) / min(times) - 1:.0%}"
        rows.append([name, f"{best[name]:.1f}", f"{median:.1f}", spread, ratio, f"{flops[name]:.2f}"])
    print(f"\n## eval throughput ({args.model}, {args.img_size} px, batch {args.batch_size})\n")
    columns = ["row", "images/s", "median images/s", "spread", "x backbone", "GFLOP/batch"]
    print("\n".join(markdown_table(columns, rows)))
    if "backbone" in best and "merged-kv" in best:
        ratio = best["merged-kv"] / best["backbone"]
        verdict = "met" if ratio >= TARGET else "not met"
        print(f"\ntarget merged-kv >= {TARGET} x backbone images/s: {ratio:.3f} -> {verdict}")
    return best


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_small_patch14_dinov2")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches per row")
    parser.add_argument("--repeats", type=int, default=6, help="paired repeats of every row")
    parser.add_argument("--steps", type=int, default=3, help="timed batches per repeat (their median counts)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    args = parser.parse_args(argv)
    args.amp = "none"  # read by step_time's header
    return args


if __name__ == "__main__":
    main()
