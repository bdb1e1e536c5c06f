"""Files that are never half-written: what a kill or Ctrl-C mid-write leaves is the previous file, or none."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from .errors import UsageError
from .paths import shown_path

# Why a write failed, for the failures a user fixes: free space, permissions, another location.
_WRITE_PROBLEMS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is used up",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
    errno.ENOTDIR: "part of that path is a file, not a folder",
    errno.EEXIST: "it is a file where a folder is needed",  # Path.mkdir(exist_ok=True) on a file
    errno.EISDIR: "it is a folder",
}
DEFAULT_WRITE_FIX = "Free space or make the folder writable (or write elsewhere), then run the command again."


@contextmanager
def explained_write_errors(path: Path, fix: str) -> Iterator[None]:
    """Inside it, an OSError a user can fix (disk full, no permission, a file where a folder belongs) becomes
    one ``UsageError`` naming the path, the reason and ``fix``; any other error passes unchanged."""
    try:
        yield
    except OSError as error:
        reason = _WRITE_PROBLEMS.get(error.errno)
        if reason is None:
            raise
        where = shown_path(error.filename if error.filename is not None else path)
        raise UsageError(f"cannot write {where}: {reason}. {fix}") from error


def check_writable_folder(folder: Path, fix: str) -> None:
    """Create ``folder`` if need be and a file in it: a location that cannot be written is one message before
    any work, not a traceback after it. (``os.access`` says yes to root for a read-only folder.)"""
    with explained_write_errors(folder, fix):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except FileNotFoundError as error:  # a parent that cannot hold new folders (/proc, a lost mount)
            where = shown_path(error.filename or folder)
            raise UsageError(f"cannot write {folder}: no folder can be created in {where}. {fix}") from error
        try:
            handle, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        except OSError as error:  # the message names the folder, not the file that could not be made in it
            raise OSError(error.errno, error.strerror, str(folder)) from error
        os.close(handle)
        os.unlink(probe)


def check_out_file(out: Path, force: bool, example: Path) -> None:
    """Refuse, before any work, an ``--out`` that is a folder (``example`` names a file in it), that exists
    (unless ``force``: the user asked to replace it), or whose folder cannot be written."""
    if out.is_dir():
        raise UsageError(f"--out {shown_path(out)} is a folder; name the file to write: --out {example}")
    if out.exists() and not force:
        raise UsageError(f"--out {out} exists: add --force to replace it, or choose another --out")
    check_writable_folder(out.parent, "Choose another --out.")


def _write_all(file: IO[bytes], data: memoryview) -> None:
    file.write(data)


def write_atomically(
    path: Path,
    data: bytes | memoryview,
    write: Callable[[IO[bytes], memoryview], None] = _write_all,
    per_process: bool = False,
    fix: str = DEFAULT_WRITE_FIX,
) -> Path:
    """Write ``data`` to ``path`` by way of a hidden ``.<name>.partial`` file beside it.

    The bytes reach the disk (fsync) before ``os.replace`` (atomic on POSIX and Windows) gives them the name.
    A writer killed mid-write leaves its partial file, which the next write to ``path`` reuses;
    ``per_process`` names it ``.<name>.<pid>.partial`` instead, for files that several processes may write
    at once (``prepare demo`` run twice). ``write`` stands in for ``file.write(data)`` (a test slows it
    down to kill a checkpoint save half-way). Created with the usual umask permissions. A full disk or an
    unwritable folder is a ``UsageError`` that ends with ``fix``; the previous file is left as it was.
    """
    suffix = f".{os.getpid()}.partial" if per_process else ".partial"
    partial = path.with_name(f".{path.name}{suffix}")
    with explained_write_errors(path, f"{fix} The previous {path.name}, if any, is unchanged."):
        path.parent.mkdir(parents=True, exist_ok=True)
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
