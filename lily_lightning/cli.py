"""``python -m lily_lightning``: LightningCLI for fit/validate/test/predict, plus ``prepare``, ``data``,
``sweep``, ``report`` and ``export``.

The Lightning subcommands take YAML configs (``--config``, layered left to right) and overrides such as
``--data.name dtd --model.lily.rank 16``; ``data.num_classes`` is linked into the model.
"""

from __future__ import annotations

import itertools
import logging
import sys

import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text

from .errors import UsageError, usage_message
from .paths import resolve_path, shown_path
from .training.lightning_cli import run_lightning

USAGE = """usage: python -m lily_lightning {fit,validate,test,predict} --config CONFIG.yaml [--key value ...]
       python -m lily_lightning predict --config CONFIG.yaml --ckpt_path CKPT --data.predict_path DIR_OR_GLOB
       python -m lily_lightning prepare demo [--cache-dir DIR] [--force]
       python -m lily_lightning prepare vtab1k --root DIR [--tasks TASK...] [--tfds-dir DIR] [--tfds-python P]
       python -m lily_lightning prepare fgvc --root DIR --from DOWNLOADS [--datasets NAME...] [--seed N]
       python -m lily_lightning data check --root ROOT [--name TASK]
       python -m lily_lightning sweep --config CONFIG.yaml --tasks vtab|fgvc|TASK... [--methods lily lora]
       python -m lily_lightning report RUNS_DIR [--out DIR]
       python -m lily_lightning export --config CONFIG.yaml --ckpt_path RUN.ckpt --out FILE [--force]"""


def _show_package_logs() -> None:
    """Our INFO lines (an inferred class count, cache building) reach the console, like Lightning's own."""
    logger = logging.getLogger("lily_lightning")
    if not logger.handlers:
        logger.addHandler(RichHandler(show_path=False, show_time=False))
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    _show_package_logs()
    try:
        if args[:1] == ["prepare"]:
            if args[1:2] == ["vtab1k"]:
                from .data.prepare.vtab1k_command import main as prepare_vtab1k_main

                return prepare_vtab1k_main(args[2:])
            if args[1:2] == ["fgvc"]:
                from .data.prepare.fgvc import main as prepare_fgvc_main

                return prepare_fgvc_main(args[2:])
            if args[1:2] != ["demo"]:
                raise UsageError(f"unknown `prepare` target {args[1:2]}; one of demo, vtab1k, fgvc\n{USAGE}")
            from .demo.prepare import main as prepare_demo_main

            return prepare_demo_main(args[2:])
        if args[:1] == ["data"]:
            if args[1:2] != ["check"]:
                raise UsageError(f"unknown `data` command {args[1:2]}; the one command is `check`\n{USAGE}")
            from .data.check import main as data_check_main

            return data_check_main(args[2:])
        if args[:1] == ["sweep"]:
            from .studies.sweep import main as sweep_main

            return sweep_main(args[1:])
        if args[:1] == ["report"]:
            from .studies.report import main as report_main

            return report_main(args[1:])
        check_config_files(args)
        if args[:1] == ["export"]:
            from .training.export_command import main as export_main

            return export_main(args[1:])
        # LightningCLI reads sys.argv itself when called from the command line.
        run_lightning(None if argv is None else args)
    except KeyboardInterrupt:
        # Ctrl-C before or after Lightning's own handler (which exits 1 itself): no stack trace either.
        _print_error("interrupted (Ctrl-C).")
        return 130
    except Exception as e:
        message = _user_message(e)
        if message is None:
            raise
        _print_error(message)
        return 2
    return 0


def _print_error(message: str) -> None:
    console = Console(stderr=True, soft_wrap=True, highlight=False)
    console.print("[bold red]error:[/bold red]", Text(message))


def _user_message(error: BaseException) -> str | None:
    """The one message for an error the user can fix, or None for a bug (shown with its traceback)."""
    usage_error = _find_usage_error(error)
    if usage_error is not None:
        return usage_message(usage_error)
    if isinstance(
        error, MisconfigurationException
    ):  # Lightning's word for a trainer setting that cannot work
        return (
            f"the trainer cannot be set up: {error}\nCheck trainer.accelerator, devices, strategy, precision "
            "(`--print_config` shows them); e.g. `--trainer.accelerator cpu` on a machine without a GPU."
        )
    return None


def check_config_files(args: list[str]) -> None:
    """Each ``--config`` file must be a YAML mapping (jsonargparse says "Unexpected config: " for an empty
    one)."""
    files = [value for flag, value in itertools.pairwise(args) if flag in ("--config", "-c")]
    files += [a.removeprefix("--config=") for a in args if a.startswith("--config=")]
    example = "a YAML mapping with trainer:, model: and data: sections, like configs/demo.yaml"
    for name in files:
        path = resolve_path(name)
        if not path.is_file():
            raise UsageError(f"config file {shown_path(path)} does not exist; --config takes {example}.")
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise UsageError(f"config file {path} is not valid YAML:\n{e}") from e
        if not isinstance(content, dict):
            what = "empty" if content is None else f"a YAML {type(content).__name__}, not a mapping"
            raise UsageError(f"config file {path} is {what}; --config takes {example}.")


def _find_usage_error(error: BaseException | None) -> UsageError | None:
    """The UsageError behind ``error``: jsonargparse re-raises errors from __init__ as its own ValueError."""
    while error is not None:
        if isinstance(error, UsageError):
            return error
        error = error.__cause__ or error.__context__
    return None
