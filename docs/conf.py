"""Sphinx configuration of the lily_lightning documentation site (`./scripts/docs` builds it into site/)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(REPO))  # autodoc documents this checkout's package, not another installed copy

project = "lily_lightning"
author = "the lily_lightning authors"
copyright = "the lily_lightning authors, Apache-2.0"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "lily_docs",
]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = [
    "**.ipynb_checkpoints",
    "_build",
    "reference/generated",
]  # included by the reference pages
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = "lily_lightning"
html_static_path = ["_static"]
html_show_sourcelink = False

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Broken cross-references are errors (the build runs with -W). Types from the libraries we build on have no
# inventory offline (no intersphinx: the build needs no network), so they are the one exception.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|timm|lightning|L|nn|PIL|np|numpy|matplotlib|jsonargparse|pathlib|collections)\b.*"),
    (r"py:.*", r"(Tensor|Module|Path|Figure|Image|Literal|Callable|Iterable|Iterator|Sequence|Mapping)"),
    (r"py:.*", r"(Routing|EvalRouting|Method|Normalize|Report|SplitMode|Transform|Any|optional)"),
]

# The tutorials are the notebooks of notebooks/, executed for the build (never committed with outputs).
# LILY_DOCS_NOTEBOOKS names a folder of notebooks executed already (tests/test_docs.py runs them once and
# checks them): those are rendered as they are, without running them again.
executed = os.environ.get("LILY_DOCS_NOTEBOOKS")
notebook_source = Path(executed) if executed else REPO / "notebooks"
rendered = DOCS / "tutorials" / "notebooks"
rendered.mkdir(parents=True, exist_ok=True)
wanted = {notebook.name: notebook for notebook in notebook_source.glob("*.ipynb")}
for stale in rendered.glob("*.ipynb"):
    if stale.name not in wanted:
        stale.unlink()
for name, notebook in wanted.items():
    target = rendered / name
    if not target.exists() or target.read_bytes() != notebook.read_bytes():  # unchanged: not read again
        shutil.copyfile(notebook, target)

nb_execution_mode = "off" if executed else "cache"
nb_execution_cache_path = str(REPO / "site" / ".jupyter_cache")  # re-executes only notebooks that changed
nb_execution_timeout = 1800
nb_execution_raise_on_error = True
nb_execution_in_temp = True  # each notebook writes its runs and figures into a folder of its own
nb_execution_show_tb = True
nb_merge_streams = True
nb_output_stderr = "remove"  # library warnings and tips; an error still stops the build
