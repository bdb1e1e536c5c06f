"""``python -m lily_lightning``: LightningCLI for fit/validate/test/predict, plus ``prepare``, ``data``,
``sweep``, ``report`` and ``export``; ``--help`` (or no command) lists them all.

The Lightning subcommands take YAML configs (``--config``, layered left to right) and overrides such as
``--data.name dtd --model.lily.rank 16``; ``data.num_classes`` is linked into the model.
"""

from __future__ import annotations

import importlib
import sys

from .console import exit_code, show_package_logs
from .errors import UsageError
from .training.lightning_cli import run_command

PROG = "python -m lily_lightning"
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
HELP_FLAGS = ("-h", "--help")


# Every command but the Lightning ones: (group, name) -> (one line for --help, the module whose main(args)
# runs it, imported when the command runs). A group of None is a top-level command; "prepare" and "data" are
# groups of commands.
COMMANDS: dict[tuple[str | None, str], tuple[str, str]] = {
    (None, "sweep"): (
        "fit + test many tasks, methods, seeds or grid points; rerun it to resume",
        "studies.sweep",
    ),
    (None, "report"): ("the paper's tables and figures from a runs folder's results", "studies.report"),
    (None, "export"): (
        "a trained run as one merged timm .safetensors file (--ckpt_path, --out)",
        "training.export_command",
    ),
    ("prepare", "demo"): ("the offline demo: DINOv2-S weights and MNIST digits", "demo.prepare"),
    ("prepare", "vtab1k"): (
        "build VTAB-1k's 19 tasks from TensorFlow Datasets",
        "data.prepare.vtab1k_command",
    ),
    ("prepare", "fgvc"): ("build the five FGVC datasets from their official archives", "data.prepare.fgvc"),
    ("data", "check"): ("check a VTAB-1k, FGVC or class-folder tree: sizes, labels, images", "data.check"),
}
LIGHTNING_SUMMARIES = {
    "fit": "train: --config CONFIG.yaml [--key value ...] (--ckpt_path last resumes)",
    "validate": "evaluate a checkpoint (--ckpt_path) on the validation split",
    "test": "test a checkpoint (--ckpt_path): the RESULT line, result.json, per-class accuracy",
    "predict": "predict the test split or new images (--data.predict_path): predictions.csv",
}


def command_list() -> str:
    """Every command with its one line, as ``--help`` and a missing command show it."""
    lines = [(name, LIGHTNING_SUMMARIES[name]) for name in LIGHTNING_COMMANDS]
    lines += [(" ".join(n for n in key if n), summary) for key, (summary, _) in COMMANDS.items()]
    width = max(len(name) for name, _ in lines)
    listed = "\n".join(f"  {name:<{width}}  {summary}" for name, summary in lines)
    return f"usage: {PROG} COMMAND [ARGS ...]   ({PROG} COMMAND --help: its options)\n\ncommands:\n{listed}"


def group_list(group: str) -> str:
    """A command group's commands (``prepare``: demo, vtab1k, fgvc), one line each."""
    listed = "\n".join(f"  {PROG} {group} {name:<8}  {summary}"
                       for (g, name), (summary, _) in COMMANDS.items() if g == group)  # fmt: skip
    usage = f"usage: {PROG} {group} COMMAND [ARGS ...]   ({PROG} {group} COMMAND --help: its options)"
    return f"{usage}\n{listed}"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    show_package_logs()
    return exit_code(lambda: _dispatch(args, from_sys_argv=argv is None))


def _dispatch(args: list[str], from_sys_argv: bool) -> int:
    first = args[0] if args else None
    if first in HELP_FLAGS:
        print(command_list())
        return 0
    if first is None:
        raise UsageError(f"no command given.\n{command_list()}")
    if first in LIGHTNING_COMMANDS or first.startswith("-"):
        # LightningCLI reads sys.argv itself when called from the command line.
        return run_command(None if from_sys_argv else args, config_args=args)
    if (None, first) in COMMANDS:
        return _run(COMMANDS[None, first][1], args[1:])
    groups = {group for group, _ in COMMANDS if group is not None}
    if first not in groups:
        raise UsageError(f"unknown command {first!r}.\n{command_list()}")
    second = args[1] if len(args) > 1 else None
    if second in HELP_FLAGS:
        print(group_list(first))
        return 0
    if (first, second) not in COMMANDS:
        what = f"unknown `{first}` command {second!r}" if second else f"`{first}` needs a command"
        raise UsageError(f"{what}.\n{group_list(first)}")
    return _run(COMMANDS[first, second][1], args[2:])


def _run(module: str, args: list[str]) -> int:
    return importlib.import_module(f"{__package__}.{module}").main(args)
