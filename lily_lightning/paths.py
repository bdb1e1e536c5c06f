"""``cache:`` paths: files from ``prepare demo``, named in checked-in configs wherever the cache lives."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

CACHE_ENV = "LILY_LIGHTNING_CACHE"
CACHE_SCHEME = "cache:"


def default_cache_dir() -> Path:
    """``$LILY_LIGHTNING_CACHE`` if set, else the platform's user cache dir for lily_lightning."""
    return Path(os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("lily_lightning")).expanduser()


def resolve_path(path: str | Path) -> Path:
    """Map ``cache:<relative path>`` into `default_cache_dir`; other paths come back with ``~`` expanded."""
    text = str(path)
    if text.startswith(CACHE_SCHEME):
        return default_cache_dir() / text[len(CACHE_SCHEME) :].lstrip("/")
    return Path(text).expanduser()


def shown_path(path: str | Path) -> str:
    """``path`` for a message: a relative one also as absolute, with the working directory it is under."""
    path = Path(path)
    if path.is_absolute():
        return str(path)
    return f"{path} (that is {path.absolute()}; the working directory is {Path.cwd()})"
