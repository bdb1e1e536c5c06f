"""Files that are never half-written: what a kill or Ctrl-C mid-write leaves is the previous file, or none."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO


def _write_all(file: IO[bytes], data: memoryview) -> None:
    file.write(data)


def write_atomically(
    path: Path,
    data: bytes | memoryview,
    write: Callable[[IO[bytes], memoryview], None] = _write_all,
    per_process: bool = False,
) -> Path:
    """Write ``data`` to ``path`` by way of a hidden ``.<name>.partial`` file beside it.

    The bytes reach the disk (fsync) before ``os.replace`` (atomic on POSIX and Windows) gives them the name.
    A writer killed mid-write leaves its partial file, which the next write to ``path`` reuses;
    ``per_process`` names it ``.<name>.<pid>.partial`` instead, for files that several processes may write
    at once (``prepare demo`` run twice). ``write`` stands in for ``file.write(data)`` (a test slows it
    down to kill a checkpoint save half-way). Created with the usual umask permissions.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = f".{os.getpid()}.partial" if per_process else ".partial"
    partial = path.with_name(f".{path.name}{suffix}")
    try:
        with partial.open("wb") as file:
            write(file, memoryview(data))
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path
