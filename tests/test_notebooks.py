"""The notebooks run top to bottom (as a user would run them in Jupyter), show their figures, write them."""

from __future__ import annotations

import base64
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
# The figures each notebook shows as pictures in Jupyter (image/png outputs): quickstart's four plots, the
# routing notebook's two heatmaps and two pyplot figures, the sweep report's two PNGs, own_images' confusion
# matrix and its labelled new images.
SHOWN = {"quickstart.ipynb": 4, "routing.ipynb": 4, "vtab_sweep.ipynb": 2, "own_images.ipynb": 2}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [
        o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"
    ]
    assert not errors
    shown = [
        base64.b64decode(o["data"]["image/png"])
        for cell in notebook.cells
        for o in cell.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert len(shown) == SHOWN[path.name]
    assert all(png.startswith(b"\x89PNG") and len(png) > 5_000 for png in shown), [len(p) for p in shown]
    # every figure is also written as a PNG: under figures/, or report/ for the sweep's report (the generated
    # data sets are PNGs too, elsewhere)
    pngs = sorted(png for folder in ("figures", "report") for png in (tmp_path / folder).glob("*.png"))
    assert pngs, "the notebook wrote no PNG"
    assert all(png.stat().st_size > 5_000 for png in pngs), [(p.name, p.stat().st_size) for p in pngs]
