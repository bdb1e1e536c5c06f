"""The cost of ``sync_routing``: DDP training-step time with and without it, in one run.

Starts ``--processes`` local processes (gloo on 127.0.0.1, CPU; or NCCL with ``--device cuda``), wraps one
Lily ViT (batch routing, defaults) in torch's DistributedDataParallel and times a full training step
(forward, cross-entropy, backward with DDP's gradient all-reduce, AdamW step). The two settings share the
model, the data and the process group; only every Lily site's ``sync_routing`` flag is switched, in
interleaved repeats (on, off, off, on, ...), so machine noise falls on both alike. With sync, every
forward all-reduces an (E + 1)-vector per block and site (and its backward another): 2 x depth x sites
small collectives per step, on top of DDP's bucketed gradient all-reduce.

    python benchmarks/ddp_sync.py                      # 2 CPU processes, ViT-S/16 at 224 px, batch 8 each
    python benchmarks/ddp_sync.py --device cuda --processes 2 --batch-size 64
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lily_lightning import LilyConfig, inject
from lily_lightning.adapters.lily import LilyAdapter


def timed_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: tuple, device: str) -> float:
    images, labels = batch
    start = time.perf_counter()
    loss = F.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def worker(rank: int, args: argparse.Namespace, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=args.processes)
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=100, img_size=args.img_size)
    inject(model, LilyConfig())
    model.get_classifier().requires_grad_(True)
    sites = [m for m in model.modules() if isinstance(m, LilyAdapter)]
    ddp = DistributedDataParallel(model.to(device))
    optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(rank)
    images = torch.rand(args.batch_size, 3, args.img_size, args.img_size, generator=generator).to(device)
    batch = (images, torch.randint(0, 100, (args.batch_size,), generator=generator).to(device))

    times: dict[bool, list[float]] = {True: [], False: []}
    order = [True, False]
    for repeat in range(args.warmup + args.repeats):
        for sync in order:
            for site in sites:
                site.sync_routing = sync
            dist.barrier()
            step = timed_step(ddp, optimizer, batch, device)
            if repeat >= args.warmup:
                times[sync].append(step)
        order.reverse()
    # A step ends when the slowest process ends it: keep each step's slowest rank.
    slowest = {sync: torch.tensor(t, dtype=torch.float64) for sync, t in times.items()}
    for tensor in slowest.values():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    if rank == 0:
        results.update({sync: tensor.tolist() for sync, tensor in slowest.items()})
        results["collectives"] = 2 * len(sites) * len(sites[0].router)
    dist.destroy_process_group()


def table(results: dict, args: argparse.Namespace) -> str:
    lines = [
        f"{args.processes} processes x batch {args.batch_size}, {args.model} at {args.img_size} px, "
        f"Lily defaults (batch routing), {args.device}, {args.repeats} interleaved repeats "
        f"after {args.warmup} warm-up",
        "",
        "| sync_routing | ms/step (min) | median ms | routing all-reduces per step |",
        "|---|---|---|---|",
    ]
    for sync in (True, False):
        times = [1000 * t for t in results[sync]]
        count = results["collectives"] if sync else 0
        lines.append(
            f"| {'on' if sync else 'off'} | {min(times):.1f} | {statistics.median(times):.1f} | {count} |"
        )
    cost = statistics.median(results[True]) / statistics.median(results[False]) - 1
    lines.append(f"\nsync_routing costs {100 * cost:+.1f} % step time (ratio of medians)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm model name (random init)")
    parser.add_argument("--img-size", type=int, default=224, help="input resolution in pixels")
    parser.add_argument("--batch-size", type=int, default=8, help="images per process and step")
    parser.add_argument("--processes", type=int, default=2, help="DDP processes on this machine")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per process)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repeats")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats of each setting")
    args = parser.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(worker, (args, port, results), nprocs=args.processes)
    print(table(dict(results), args))


if __name__ == "__main__":
    main()
