"""How the command line talks: the package's log lines on the console, one message (no traceback) for each
error a user can fix, and the exit code (0 done, 2 a user error, 130 Ctrl-C, 141 output closed early)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from lightning.fabric.utilities.exceptions import MisconfigurationException
from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text

from .errors import UsageError, usage_message


def show_package_logs() -> None:
    """Our INFO lines (an inferred class count, cache building) reach the console, like Lightning's own."""
    logger = logging.getLogger("lily_lightning")
    if not logger.handlers:
        logger.addHandler(RichHandler(show_path=False, show_time=False))
        logger.setLevel(logging.INFO)


def exit_code(command: Callable[[], int | None]) -> int:
    """Run ``command``; a user error is its message on stderr and exit code 2, a bug keeps its traceback."""
    try:
        code = command() or 0
        sys.stdout.flush()  # inside the try: a reader that went away is met here, not at interpreter exit
        return code
    except KeyboardInterrupt:
        # Ctrl-C before or after Lightning's own handler (which exits 1 itself): no stack trace either.
        print_error("interrupted (Ctrl-C).")
        return 130
    except BrokenPipeError:
        # The reader went away (`--help | head`): end quietly, as a program stopped by SIGPIPE (128 + 13).
        # Python would otherwise fail again flushing stdout at exit; the Python docs advise pointing it at
        # devnull (library/signal.html, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        message = user_message(e)
        if message is None:
            raise
        print_error(message)
        return 2


def print_error(message: str) -> None:
    console = Console(stderr=True, soft_wrap=True, highlight=False)
    console.print("[bold red]error:[/bold red]", Text(message))


def user_message(error: BaseException) -> str | None:
    """The one message for an error the user can fix, or None for a bug (shown with its traceback)."""
    usage_error = find_usage_error(error)
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


def find_usage_error(error: BaseException | None) -> UsageError | None:
    """The UsageError behind ``error``: jsonargparse re-raises errors from __init__ as its own ValueError."""
    while error is not None:
        if isinstance(error, UsageError):
            return error
        error = error.__cause__ or error.__context__
    return None
