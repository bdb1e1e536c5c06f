"""A matplotlib ``Figure`` that Jupyter shows as a picture, for every figure the package draws."""

from __future__ import annotations

import io

from matplotlib.figure import Figure

DPI = 120  # of the saved PNGs and of the pictures Jupyter shows


class InlineFigure(Figure):
    """A ``Figure`` that Jupyter shows as a PNG, as a cell's value or through ``display(fig)``.

    IPython renders a plain ``Figure`` as a picture only once pyplot's inline backend has registered its
    formatter (at a notebook's first pyplot figure); a figure built without pyplot before that shows as text,
    ``<Figure size 940x480 with 4 Axes>``. ``_repr_png_`` is IPython's own hook, so this works in any
    frontend and with any backend (after the inline backend loads, its formatter draws the figure instead).
    """

    def _repr_png_(self) -> bytes:
        png = io.BytesIO()
        self.savefig(png, format="png", dpi=DPI)
        return png.getvalue()
