"""Top-1 of a model written by ``python -m lily_lightning export``, run on a device, optionally under bf16.

Reads a VTAB-1k-layout task's test images as ``test`` does (the same data module and order), feeds the
exported timm model the normalised input its metadata names, and prints ``EXPORT top1=... images=...``.
With ``--expect`` (the ``test`` RESULT of the unmerged model with ``eval_routing: running``) it exits 1 when
the two differ by more than ``--tolerance``: merging changes only the rounding, so only images on a decision
boundary may flip. ``benchmarks/gpu_check.sh`` runs it.

    python benchmarks/export_check.py runs/gpu_check/demo.safetensors --root cache:demo/vtab-1k \\
        --name mnist5k --image-size 112 --device cuda --amp bf16 --expect 0.9670
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lily_lightning.data import VTAB1kDataModule
from lily_lightning.vit.export import load_exported


def export_top1(args: argparse.Namespace) -> tuple[float, int]:
    """(top-1, images) of the exported model on the first ``args.images`` test images (all if 0)."""
    model = load_exported(args.export).to(args.device)
    with safe_open(str(args.export), "pt") as f:
        metadata = f.metadata()
    mean, std = (
        torch.tensor(json.loads(metadata[key]), device=args.device).view(1, 3, 1, 1)
        for key in ("input_mean", "input_std")
    )
    data = VTAB1kDataModule(
        args.root, args.name, eval_batch_size=args.batch_size, num_workers=0, image_size=args.image_size
    )
    data.setup("test")
    correct = seen = 0
    device_type = torch.device(args.device).type
    with torch.inference_mode(), torch.autocast(device_type, torch.bfloat16, enabled=args.amp == "bf16"):
        for images, labels in data.test_dataloader():
            if args.images:
                images, labels = images[: args.images - seen], labels[: args.images - seen]
            images, labels = images.to(args.device), labels.to(args.device)
            logits = model((images - mean) / std)
            correct += int((logits.argmax(-1) == labels).sum())
            seen += len(labels)
            if seen == args.images:
                break
    return correct / seen, seen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("export", type=Path, help="the .safetensors file `export` wrote")
    parser.add_argument("--root", required=True, help="the VTAB-1k root (cache: paths are expanded)")
    parser.add_argument("--name", required=True, help="the task folder under the root")
    parser.add_argument("--image-size", type=int, required=True, help="the model's input size in pixels")
    parser.add_argument("--images", type=int, default=0, help="only the first N test images (0: all)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--amp", choices=("none", "bf16"), default="none", help="bf16 autocast")
    parser.add_argument("--expect", type=float, help="the unmerged model's top-1 to compare with")
    parser.add_argument("--tolerance", type=float, default=0.01, help="largest allowed |top-1 - expect|")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    top1, images = export_top1(args)
    print(f"EXPORT top1={top1:.4f} images={images} device={args.device} amp={args.amp}", flush=True)
    if args.expect is not None and abs(top1 - args.expect) > args.tolerance:
        print(f"export_check: top-1 {top1:.4f} is not the unmerged {args.expect:.4f} +- {args.tolerance}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
