"""The fixed style of the report's figures, and the helpers every figure uses.

Split from :mod:`fieldscope.train.plots` (training and data figures) and
:mod:`fieldscope.train.plots_eval` (evaluation figures), which both draw through
:func:`_figure`: a ``matplotlib.figure.Figure`` on an Agg canvas, never ``pyplot``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import style as mpl_style
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["DPI"]

DPI = 100
# Above this many classes the cells are too small for numbers; the colours still read.
_MAX_ANNOTATED_CLASSES = 30
_STYLE: dict[str, Any] = {
    "font.family": "DejaVu Sans",  # ships with matplotlib: same glyphs on every machine
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 9,
    "legend.framealpha": 0.85,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "savefig.facecolor": "white",
    "image.cmap": "Blues",
}
_TRAIN_COLOR = "#1f77b4"
_VAL_COLOR = "#ff7f0e"
_MARK_COLOR = "#d62728"


@contextmanager
def _figure(path: Path | str, width: float, height: float) -> Iterator[Figure]:
    """A figure in the fixed style, saved as PNG at ``path`` when the block ends cleanly."""
    out = Path(path)
    with mpl_style.context(["default", _STYLE]):
        fig = Figure(figsize=(width, height), layout="constrained")
        FigureCanvasAgg(fig)
        yield fig
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png", dpi=DPI, metadata={"Software": None})


def _short(text: str, limit: int = 28) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _tick_fontsize(n: int) -> float:
    return float(np.clip(160 / max(n, 1), 6, 10))


def _class_ticks(ax: Any, names: Sequence[str], *, axis: str) -> None:
    """Class names as tick labels, rotated when there are many or they are long."""
    n = len(names)
    positions = np.arange(n)
    labels = [_short(name) for name in names]
    size = _tick_fontsize(n)
    if axis == "x":
        rotate = n > 6 or max(len(label) for label in labels) > 10
        ax.set_xticks(positions)
        ax.set_xticklabels(
            labels,
            rotation=45 if rotate else 0,
            ha="right" if rotate else "center",
            rotation_mode="anchor",
            fontsize=size,
        )
    else:
        ax.set_yticks(positions)
        ax.set_yticklabels(labels, fontsize=size)
