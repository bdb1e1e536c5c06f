"""Training-step cost of every PEFT method on one timm ViT, side by side in one run.

For one backbone (random init, nothing is downloaded) and one batch size, each row is timed as a full
training step: forward, cross-entropy, backward, AdamW step. The classifier head is trainable in every
row (as it is in every real fine-tuning run), so "trainable" counts the head too. Rows:

  floor         frozen backbone, no adapter; backward reaches the first block's input (the patch-embedding
                output, made to require grad): the least any adapter at every block can cost
  linear-probe  head only
  lora          our LoRA, r=8 on q and v
  lily-batch    our Lily, defaults, routing batch / sample / token
  full          every parameter
  peft-lora     HuggingFace PEFT's LoraConfig(r=8, lora_alpha=8) on `qkv`
  peft-lily     HuggingFace PEFT's LilyConfig(r=32, stride_A=3, num_B=4) on `qkv` and `fc2`, the closest
                config it can express to ours (it adapts whole modules: no k/v slices, no parallel MLP site)
  bitfit, vpt_shallow, vpt_deep, adapter, adaptformer, ssf, fact_tt, dora
                the visual-PEFT baselines (``--model.method`` names), each with its defaults

Noise (paired ratios): after a warm-up, each repeat times every row back to back (``--steps`` steps each,
their median), in an order rotated by one row per repeat, and takes each row's ratio to the reference row
*within that repeat*. Load that drifts over minutes then hits both sides of a ratio alike. The table shows
each row's median ms over repeats with its spread (max / min - 1), and the median of its per-repeat ratios
to ``lora`` and to ``floor`` with their interquartile range, and its peak memory over the floor's. Compare
figures of one run only.

Peak memory: each row runs again in a fresh subprocess (``--memory-repeats`` times, keeping the smallest):
the peak above what the process held right before its first step, i.e. activations, gradients, optimizer
state and workspace, not the weights. CPU: the resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs just before the first step; torch has no CPU allocator counter). CUDA:
torch.cuda.max_memory_allocated.

    python benchmarks/step_time.py                                   # CPU, ViT-B/16, batch 8
    python benchmarks/step_time.py --device cuda --amp bf16 --batch-size 64
    python benchmarks/step_time.py --rows lora lily-batch --profile  # torch.profiler, top kernels per row
    python benchmarks/step_time.py --quick                           # smoke run: tiny ViT, seconds
    python benchmarks/step_time.py --rows lora lily-batch --compile  # eager and torch.compile'd, paired
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lily_lightning import LilyConfig, LoRAConfig, inject
from lily_lightning.training.module import ViTClassifier, adapter_config

# The visual-PEFT baselines, each row named as ``--model.method`` and built with the config that takes.
METHOD_ROWS = ("bitfit", "vpt_shallow", "vpt_deep", "adapter", "adaptformer", "ssf", "fact_tt", "dora")

ROWS = (
    "floor",
    "linear-probe",
    "lora",
    "lily-batch",
    "lily-sample",
    "lily-token",
    "full",
    "peft-lora",
    "peft-lily",
    *METHOD_ROWS,
)
# --quick: vit_tiny at 32 px (12 blocks of width 192 on 4 patches), so a step takes milliseconds.
QUICK = {
    "model": "vit_tiny_patch16_224",
    "img_size": 32,
    "batch_size": 2,
    "num_classes": 5,
    "repeats": 2,
    "memory_repeats": 0,
}
EVAL_ROWS = ("floor", "lora", "lily-batch")  # eval throughput: frozen backbone, LoRA, Lily


@dataclass
class Row:
    name: str
    model: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    trainable: int


def _floor_forward(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """timm's forward with the graph cut at the first block's input, which alone requires grad."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        x = model.blocks(x.detach().requires_grad_())
        return model.forward_head(model.norm(x))

    return forward


def _peft_model(name: str, model: nn.Module) -> nn.Module:
    try:
        import peft
    except ImportError as error:
        raise SystemExit(f"row {name!r} needs peft: pip install 'lily_lightning[bench]'") from error
    if name == "peft-lora":
        config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"])
    else:
        config = peft.LilyConfig(r=32, stride_A=3, num_B=4, target_modules=["qkv", "fc2"])
    peft.get_peft_model(model, config)  # wraps the timm modules in place; we keep calling the timm model
    return model


COMPILED = "+compiled"


def row_names(args: argparse.Namespace) -> list[str]:
    """The rows to run: ``--rows``, then with ``--compile`` each again compiled (``lora+compiled``)."""
    return [*args.rows, *(f"{name}{COMPILED}" for name in args.rows if args.compile)]


def build_row(row: str, args: argparse.Namespace) -> Row:
    name = row.removesuffix(COMPILED)
    torch.manual_seed(0)
    model = timm.create_model(
        args.model, pretrained=False, num_classes=args.num_classes, img_size=args.img_size
    )
    if name == "full":
        model.requires_grad_(True)
    elif name.startswith("peft-"):
        model = _peft_model(name, model)
    elif name == "lora":
        inject(model, LoRAConfig(rank=8, targets=("q", "v")))
    elif name.startswith("lily-"):
        inject(model, LilyConfig(routing=name.removeprefix("lily-")))
    elif name in METHOD_ROWS:
        defaults = inspect.signature(ViTClassifier).parameters  # the CLI's defaults for each setting
        inject(model, adapter_config(name, {key: value.default for key, value in defaults.items()}))
    else:  # floor, linear-probe
        model.requires_grad_(False)
    model.get_classifier().requires_grad_(True)
    model.to(args.device).train()
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() yields shared tensors once
    if row.endswith(COMPILED):  # in place, as model.compile does; the floor's forward calls the blocks
        (model.blocks if name == "floor" else model).compile()
    forward = _floor_forward(model) if name == "floor" else model
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    return Row(row, model, forward, optimizer, sum(p.numel() for p in params))


def _autocast(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    if args.amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16)


def _sync(args: argparse.Namespace) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(row: Row, images: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace) -> None:
    with _autocast(args):
        loss = F.cross_entropy(row.forward(images), labels)
    loss.backward()
    row.optimizer.step()
    row.optimizer.zero_grad(set_to_none=True)


def timed_steps(fn: Callable[[], None], steps: int, args: argparse.Namespace) -> float:
    """Median seconds of ``steps`` calls of ``fn``."""
    times = []
    for _ in range(steps):
        _sync(args)
        start = time.perf_counter()
        fn()
        _sync(args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired(
    fns: dict[str, Callable[[], None]], args: argparse.Namespace, log: Callable[[str], None]
) -> dict[str, list[float]]:
    """Warm every row up, then repeats of all rows back to back, the order rotated by one each repeat.

    Entry ``i`` of every row's list comes from repeat ``i``, so ``times[a][i] / times[b][i]`` is a pair.
    """
    for name, fn in fns.items():
        for _ in range(args.warmup):
            fn()
        log(f"  warmed up {name}")
    results: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(timed_steps(fns[name], args.steps, args))
        log(f"  repeat {repeat + 1}/{args.repeats} done")
    return results


def pair_ratios(times: dict[str, list[float]], row: str, reference: str) -> list[float] | None:
    """``row``'s time over ``reference``'s within each repeat; None if either row was not run."""
    if row not in times or reference not in times:
        return None
    return [a / b for a, b in zip(times[row], times[reference], strict=True)]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); one value is its own quartiles."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    low, mid, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, mid, high


# --- peak memory, one fresh process per row ---------------------------------------------------------


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(name: str, args: argparse.Namespace) -> float:
    """Peak MB above the memory held right before the first step, over warm-up + one step."""
    row = build_row(name, args)
    images, labels = make_batch(args)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _rss_mb("VmRSS")
    for _ in range(max(args.warmup, 1) + 1):
        train_step(row, images, labels, args)
    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20 - before
    return _rss_mb("VmHWM") - before


def memory_in_subprocess(name: str, argv: list[str]) -> float:
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--memory-of", name]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory run of {name!r} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


# --- the run ------------------------------------------------------------------------------------------


def make_batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=generator)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=generator)
    return images.to(args.device), labels.to(args.device)


def header(args: argparse.Namespace) -> str:
    if args.device.startswith("cuda"):
        machine = torch.cuda.get_device_name(args.device)
    else:
        cpu = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            names = [
                ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")
            ]
            cpu = names[0].split(":", 1)[1].strip() if names else cpu
        machine = f"{cpu}, {os.cpu_count()} logical cores"
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = "not installed"
    return (
        f"# {args.model}, random init, {args.img_size} px, batch {args.batch_size}, "
        f"{args.num_classes} classes, amp {args.amp}, AdamW\n"
        f"# device {args.device}: {machine}; torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads; timm {timm.__version__}; peft {peft_version}; python {platform.python_version()}\n"
        f"# warm-up {args.warmup} step(s), {args.repeats} paired repeats (rotating order) x {args.steps} "
        "step(s); load average at start " + " ".join(f"{x:.1f}" for x in os.getloadavg())
    )


def _ratio_cell(ratios: list[float] | None) -> str:
    """Median per-pair ratio and its interquartile range, e.g. ``1.02 (1.00-1.04)``."""
    if ratios is None:
        return "-"
    low, mid, high = quartiles(ratios)
    return f"{mid:.2f} ({low:.2f}-{high:.2f})"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table, first column left-aligned and the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    )
    return [line(header), rule, *(line(r) for r in rows)]


def format_table(
    trainable: dict[str, int], times: dict[str, list[float]], memory: dict[str, float | None]
) -> list[str]:
    rows = []
    for name, ts in times.items():
        mem = memory.get(name)
        rows.append(
            [
                name,
                f"{trainable[name]:,}",
                f"{statistics.median(ts) * 1e3:.0f}",
                f"{max(ts) / min(ts) - 1:.0%}",
                "-" if mem is None else f"{mem:.0f}",
                _ratio_cell(pair_ratios(times, name, "lora")),
                _ratio_cell(pair_ratios(times, name, "floor")),
                "-" if mem is None or not memory.get("floor") else f"{mem / memory['floor']:.2f}",
            ]
        )
    header = [
        "row",
        "trainable",
        "median ms",
        "spread",
        "peak MB",
        "x lora (IQR)",
        "x floor (IQR)",
        "peak x floor",
    ]
    return markdown_table(header, rows)


# (label, row, reference row, limit): the targets; step ratios are paired medians.
STEP_TARGETS = (
    ("lily-batch step <= 1.03 x lora", "lily-batch", "lora", 1.03),
    ("lily-batch step <= 1.08 x floor", "lily-batch", "floor", 1.08),
    ("lily-batch step <= 1.00 x peft-lily", "lily-batch", "peft-lily", 1.00),
    ("lily-token step <= 1.15 x lily-batch", "lily-token", "lily-batch", 1.15),
    ("lora step <= 1.00 x peft-lora", "lora", "peft-lora", 1.00),
)
MEMORY_TARGETS = (
    ("lily-batch peak <= 1.10 x lora peak", "lily-batch", "lora", 1.10),
    ("lily-batch peak <= 1.00 x peft-lily peak", "lily-batch", "peft-lily", 1.00),
)


def format_targets(times: dict[str, list[float]], memory: dict[str, float | None]) -> list[str]:
    """The issue's targets, each as measured / limit and met or not; rows that were not run are skipped."""
    measured: list[tuple[str, float, float]] = []
    for label, row, reference, limit in STEP_TARGETS:
        ratios = pair_ratios(times, row, reference)
        if ratios is not None:
            measured.append((label, statistics.median(ratios), limit))
    for label, row, reference, limit in MEMORY_TARGETS:
        if memory.get(row) is not None and memory.get(reference):
            measured.append((label, memory[row] / memory[reference], limit))
    return [
        f"- {label}: {ratio:.3f} -> {'met' if ratio <= limit else 'NOT met'}"
        for label, ratio, limit in measured
    ]


def format_eval(throughput: dict[str, list[float]], batch_size: int) -> list[str]:
    rows = [
        [
            "backbone" if name == "floor" else name,
            f"{batch_size / statistics.median(ts):.1f}",
            f"{max(ts) / min(ts) - 1:.0%}",
            _ratio_cell(pair_ratios(throughput, name, "floor")),
        ]
        for name, ts in throughput.items()
    ]
    return markdown_table(["row", "median images/s", "spread", "time x backbone (IQR)"], rows)


def profile(
    rows: dict[str, Row], images: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace
) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    sort_by = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    for name, row in rows.items():
        train_step(row, images, labels, args)  # warm-up outside the trace
        with torch_profile(activities=activities) as prof:
            for _ in range(args.steps):
                train_step(row, images, labels, args)
        print(f"\n## profile of {name} ({args.steps} step(s))")
        print(prof.key_averages().table(sort_by=sort_by, row_limit=args.profile_rows))


def run(args: argparse.Namespace, argv: list[str], log: Callable[[str], None] = print) -> dict:
    """Build the rows, time them paired, measure memory and eval throughput; returns all figures."""
    rows = {}
    for name in row_names(args):
        rows[name] = build_row(name, args)
        log(f"  built {name}: {rows[name].trainable:,} trainable")
    images, labels = make_batch(args)
    if args.profile:
        profile(rows, images, labels, args)
        return {}

    step_fns = {name: (lambda row=row: train_step(row, images, labels, args)) for name, row in rows.items()}
    times = paired(step_fns, args, log)

    throughput: dict[str, list[float]] = {}
    eval_names = [name for name in EVAL_ROWS if name in rows] if args.eval else []
    if eval_names:

        def infer(model: nn.Module) -> None:
            with torch.inference_mode(), _autocast(args):
                model(images)

        for name in eval_names:
            rows[name].model.eval()
        throughput = paired({n: (lambda m=rows[n].model: infer(m)) for n in eval_names}, args, log)

    trainable = {name: row.trainable for name, row in rows.items()}
    rows.clear()  # free the models before the memory subprocesses run
    memory: dict[str, float | None] = {name: None for name in row_names(args)}
    if args.memory_repeats:
        # Eager rows only: in a compiled row's first steps, compilation's own memory would set the peak.
        for name in args.rows:
            memory[name] = min(memory_in_subprocess(name, argv) for _ in range(args.memory_repeats))
            log(f"  memory of {name}: {memory[name]:.0f} MB")
    return {"trainable": trainable, "times": times, "memory": memory, "throughput": throughput}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm model name (random init)")
    parser.add_argument("--img-size", type=int, default=224, help="input resolution in pixels")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step")
    parser.add_argument("--num-classes", type=int, default=100, help="classifier head width")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--amp", choices=("none", "bf16"), default="none", help="bf16 autocast (use on GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: usable cores)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="rows to run, in order")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per row before timing")
    parser.add_argument("--repeats", type=int, default=10, help="paired repeats of every row")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per row per repeat (median kept)")
    parser.add_argument(
        "--memory-repeats",
        type=int,
        default=1,
        help="fresh subprocesses per row for peak memory (smallest kept); 0 skips memory",
    )
    parser.add_argument("--no-eval", dest="eval", action="store_false", help="skip the eval throughput table")
    parser.add_argument(
        "--profile", action="store_true", help="print torch.profiler tables instead of timing"
    )
    parser.add_argument("--profile-rows", type=int, default=15, help="kernels listed per profiled row")
    parser.add_argument(
        "--compile", action="store_true", help="also time every row compiled in place (torch.compile)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny ViT at 32 px, 2 repeats, no memory runs"
    )
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: one memory run, JSON out
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**QUICK)  # defaults only: flags given explicitly still win
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    if args.memory_of:
        print(json.dumps({"peak_mb": measure_memory(args.memory_of, args)}))
        return
    print(header(args), flush=True)
    started = time.perf_counter()
    figures = run(args, argv, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if not figures:
        return
    print("\n## training step (forward + backward + AdamW step)\n")
    print("\n".join(format_table(figures["trainable"], figures["times"], figures["memory"])))
    if figures["throughput"]:
        print(f"\n## eval throughput (inference_mode, batch {args.batch_size})\n")
        print("\n".join(format_eval(figures["throughput"], args.batch_size)))
    targets = format_targets(figures["times"], figures["memory"])
    if targets:
        print("\n## targets (paired median step ratios; peak MB ratios)\n")
        print("\n".join(targets))
    print(f"\n# wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
