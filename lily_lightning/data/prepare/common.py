"""What `prepare vtab1k` and `prepare fgvc` share: is a task complete, and the closing `data check`."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.text import Text

from lily_lightning.data.check import check_tree
from lily_lightning.errors import UsageError


def is_complete(root: Path, name: str) -> bool:
    """True when ``data check`` passes on the task (the same code, its table not shown)."""
    quiet = Console(file=io.StringIO())
    try:
        return check_tree(root, name, console=quiet) == 0
    except UsageError:  # no folder for it yet
        return False


def closing_check(root: Path, names: Sequence[str], not_built: dict[str, str]) -> int:
    """Print why each task in ``not_built`` is missing, run ``data check`` on ``names``; the exit code."""
    console = Console(soft_wrap=True, highlight=False)
    code = check_tree(root, names, console=console) if names else 0
    for message in not_built.values():
        console.print(Text.assemble(("not built: ", "bold red"), message))
    if not_built:
        console.print(
            f"{len(not_built)} not built: {', '.join(not_built)}. Fix that and run the same command again."
        )
    return 1 if not_built else code
