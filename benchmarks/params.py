"""Trainable adapter parameters of LoRA and Lily on timm ViTs, in millions, head excluded (as papers report).

Every count comes from injecting the adapters into the real timm model, built on the meta device (no memory,
no weights): ``lily_lightning.vit.state.count_backbone_parameters`` (each shared Lily tensor once, as
``count_parameters``). Accuracy is not measured here, only cost.

    python benchmarks/params.py
    python benchmarks/params.py --models vit_base_patch16_224 --lily-ranks 16 32 --lily-experts 2 4 6
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lily_lightning import LilyConfig, LoRAConfig
from lily_lightning.vit.state import count_backbone_parameters

MODELS = {
    "vit_small_patch16_224": "ViT-S/16",
    "vit_base_patch16_224": "ViT-B/16",
    "vit_large_patch16_224": "ViT-L/16",
}


def configs(args: argparse.Namespace) -> list[tuple[str, LilyConfig | LoRAConfig | None]]:
    """(label, config) per table row, in order."""
    rows: list[tuple[str, LilyConfig | LoRAConfig | None]] = [("full fine-tuning", None)]
    lora_targets = tuple(args.lora_targets)
    for rank in args.lora_ranks:
        rows.append(
            (f"LoRA r={rank} on {','.join(lora_targets)}", LoRAConfig(rank=rank, targets=lora_targets))
        )
    for rank in args.lily_ranks:
        for experts in args.lily_experts:
            config = LilyConfig(rank=rank, num_experts=experts)
            rows.append((f"Lily r={rank} E={experts} on {','.join(config.targets)}", config))
    return rows


def table(args: argparse.Namespace) -> tuple[list[str], dict[tuple[str, str], int]]:
    """The markdown table lines and the raw counts keyed by (row label, model name)."""
    rows = configs(args)
    counts = {
        (label, model): count_backbone_parameters(model, config)
        for label, config in rows
        for model in args.models
    }
    width = max(len(label) for label, _ in rows)
    names = [MODELS.get(m, m) for m in args.models]
    lines = [
        "| " + " | ".join([f"{'method':<{width}}", *(f"{n:>9}" for n in names)]) + " |",
        "|" + "|".join(["-" * (width + 2), *("-" * max(10, len(n) + 1) + ":" for n in names)]) + "|",
    ]
    for label, _ in rows:
        cells = [
            f"{counts[label, m] / 1e6:>{max(9, len(n))}.3f}" for m, n in zip(args.models, names, strict=True)
        ]
        lines.append("| " + " | ".join([f"{label:<{width}}", *cells]) + " |")
    return lines, counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="timm model names (columns)")
    parser.add_argument("--lora-ranks", nargs="+", type=int, default=[4, 8, 16], help="LoRA ranks")
    parser.add_argument("--lora-targets", nargs="+", default=["q", "v"], help="LoRA sites")
    parser.add_argument("--lily-ranks", nargs="+", type=int, default=[8, 16, 32], help="Lily ranks r")
    parser.add_argument("--lily-experts", nargs="+", type=int, default=[2, 4, 6], help="Lily HP experts E")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print("# trainable parameters in millions, classifier head excluded; Lily: lp_stride = depth // E,")
    print("# sites k, v (rank r) and mlp (rank 2r), as the official ViT code\n")
    print("\n".join(table(args)[0]))


if __name__ == "__main__":
    main()
