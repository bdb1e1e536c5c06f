"""What a training step keeps alive for backward: saved tensors, by the module that saved them.

One forward of a timm ViT under ``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd saves
is attributed to the innermost module running at that moment and counted once per storage (a tensor
saved by two ops, or a view of one already saved, costs nothing more). Rows as in ``step_time.py``.
Deterministic (no timing), so one run on a loaded machine is as good as any.

    python benchmarks/saved_tensors.py                        # ViT-B/16, batch 8: floor, lora, lily-batch
    python benchmarks/saved_tensors.py --rows lily-batch --by-module 12
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_time import ROWS, build_row, make_batch, markdown_table


class SavedTensorCounter:
    """Bytes autograd saves during a forward, by module path, each storage counted once."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[str] = ["(top level)"]
        # Weights and buffers live anyway: a weight (or its transpose) saved by a matmul costs nothing.
        self.seen: set[int] = {
            t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]
        }
        self.by_module: dict[str, int] = defaultdict(int)
        self.total = 0
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(lambda m, a, n=name: self._enter(n)))
            self.handles.append(module.register_forward_hook(lambda m, a, o: self._leave()))

    def _enter(self, name: str) -> None:
        self.stack.append(name)

    def _leave(self) -> None:
        self.stack.pop()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.seen:
            self.seen.add(storage.data_ptr())
            self.by_module[_generic(self.stack[-1])] += storage.nbytes()
            self.total += storage.nbytes()
        return tensor

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _generic(path: str) -> str:
    """``blocks.3.attn.qkv.base`` -> ``blocks.*.attn.qkv.base``: one line per kind of module."""
    return ".".join("*" if part.isdigit() else part for part in path.split("."))


def count(name: str, args: argparse.Namespace) -> SavedTensorCounter:
    row = build_row(name, args)
    images, labels = make_batch(args)
    counter = SavedTensorCounter(row.model)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        loss = F.cross_entropy(row.forward(images), labels)
    loss.backward()
    counter.remove()
    return counter


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=["floor", "lora", "lily-batch"])
    parser.add_argument("--by-module", type=int, default=8, help="largest module kinds listed per row")
    args = parser.parse_args(argv)
    args.device = "cpu"
    counters = {name: count(name, args) for name in args.rows}
    reference = counters[args.rows[0]].total
    print(f"# {args.model}, {args.img_size} px, batch {args.batch_size}: saved-for-backward MB per step\n")
    table = [[name, f"{c.total / 2**20:.1f}", f"{c.total / reference:.3f}"] for name, c in counters.items()]
    print("\n".join(markdown_table(["row", "saved MB", f"x {args.rows[0]}"], table)))
    for name, counter in counters.items():
        print(f"\n## {name}: largest savers (module kind, summed over blocks)\n")
        largest = sorted(counter.by_module.items(), key=lambda kv: -kv[1])[: args.by_module]
        print("\n".join(markdown_table(["module", "MB"], [[m, f"{b / 2**20:.1f}"] for m, b in largest])))


if __name__ == "__main__":
    main()
