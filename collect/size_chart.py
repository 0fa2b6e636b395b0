"""The Objects page's chart: the size (ESD, µm) distribution of each label, drawn by
matplotlib as one inline SVG, made CSP-safe as in :mod:`fieldscope.collect.charts`.

One panel per label, stacked, on one shared x axis (the store bins every label on the
same edges, so the panels compare at a glance); the x axis is logarithmic when the
edges are (sizes over a tenfold range or more). Every bar has the class ``bar`` and a
tooltip (label, bin in µm, objects). The arguments are hashable, so the dashboard can
cache the drawing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fieldscope.collect.charts import PALETTE, add_title, finish_svg, series_elements, svg_root

__all__ = ["MAX_PANELS", "size_histograms"]

# Labels beyond these many largest are drawn together as "(other)".
MAX_PANELS = 8
_PANEL_HEIGHT = 1.1  # inches (100 px)


def _panels(
    series: Sequence[tuple[str, Sequence[int]]],
) -> list[tuple[str, tuple[int, ...]]]:
    """The largest ``MAX_PANELS`` labels, then ``(other)`` with the rest summed."""
    panels = [(name, tuple(counts)) for name, counts in series]
    if len(panels) <= MAX_PANELS + 1:
        return panels
    rest = panels[MAX_PANELS:]
    other = tuple(sum(column) for column in zip(*(c for _, c in rest), strict=True))
    return [*panels[:MAX_PANELS], ("(other)", other)]


def _bars(edges: Sequence[float], counts: Sequence[int]) -> list[tuple[int, list[Any]]]:
    """(bin, rectangle) of each non-empty bin."""
    return [
        (i, [(edges[i], 0), (edges[i + 1], 0), (edges[i + 1], n), (edges[i], n)])
        for i, n in enumerate(counts)
        if n
    ]


def _draw(edges: Sequence[float], panels: list[tuple[str, tuple[int, ...]]], log: bool) -> Any:
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

    fig = Figure(figsize=(9.6, 0.75 + _PANEL_HEIGHT * len(panels)), dpi=100)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    fig.subplots_adjust(left=0.07, right=0.99, top=1 - 0.3 / fig.get_figheight(),
                        bottom=0.45 / fig.get_figheight(), hspace=0.45)  # fmt: skip
    for number, (ax, (name, counts)) in enumerate(zip(axes, panels, strict=True)):
        bars = PolyCollection(
            [r for _, r in _bars(edges, counts)],
            facecolors=PALETTE[number % len(PALETTE)],
            linewidths=0,
        )
        bars.set_gid(f"sizes-{number}")
        ax.add_collection(bars)
        ax.set_ylim(0, max([1, *counts]) * 1.1)
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(which="both", colors="#555555", labelsize=8, length=2)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=2, integer=True))
        ax.set_title(f"{name} ({sum(counts)})", loc="left", fontsize=9, color="#333333")
    last = axes[-1]
    if log:  # ticks at 1, 2, 5 × 10^k, written as plain numbers
        last.set_xscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        last.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        last.xaxis.set_major_formatter(plain)
        last.xaxis.set_minor_formatter(plain)
    last.set_xlim(edges[0], edges[-1])
    last.set_xlabel("ESD (µm)", fontsize=9, color="#333333")
    return fig


def size_histograms(
    edges: tuple[float, ...],
    series: tuple[tuple[str, tuple[int, ...]], ...],
    *,
    log: bool = False,
    title: str = "Size distribution per label (ESD, µm)",
) -> str:
    """An inline SVG (class ``chart sizes``) of ``series`` = (label, counts per bin)."""
    panels = _panels(series)
    if not panels or len(edges) < 2:
        return ""
    root = svg_root(_draw(edges, panels, log))
    for number, shapes in series_elements(root, "sizes"):
        name, counts = panels[number]
        for element, (i, _) in zip(shapes, _bars(edges, counts), strict=True):
            add_title(element, f"{name}: {edges[i]:.3g}–{edges[i + 1]:.3g} µm: {counts[i]} objects")
    return finish_svg(root, title, "chart sizes")
