"""The dashboard's chart: stacked bars per label and day (or hour), drawn by matplotlib.

matplotlib's SVG backend renders on the server (the Agg-free ``Figure`` API, no
display, no pyplot state shared between threads), so the page needs no JavaScript
and nothing from a CDN. The SVG is inlined into the page; because the dashboard's
Content-Security-Policy forbids inline styles, :func:`stacked_bars` turns
matplotlib's ``style`` attributes into SVG presentation attributes (``fill=``...),
drops its ``<style>`` element, and gives every bar a ``<title>`` (the tooltip) and the
class ``bar`` (``ElementTree`` post-processing, as in matplotlib's SVG tooltip example).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from xml.etree import ElementTree

__all__ = [
    "PALETTE",
    "ChartSeries",
    "add_title",
    "bucket_range",
    "finish_svg",
    "series_elements",
    "series_from_counts",
    "stacked_bars",
    "svg_root",
]

# Colour-blind-safe qualitative palette (Okabe–Ito, then a few greys/extras); the
# legend's swatches are the CSS classes .swatch-0 ... .swatch-9 of static/style.css.
PALETTE: tuple[str, ...] = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#F0E442",
    "#000000",
    "#999999",
    "#7F3C8D",
)
OTHER = "(other)"
_SVG_NS = "http://www.w3.org/2000/svg"
_XLINK_NS = "http://www.w3.org/1999/xlink"


@dataclass(frozen=True)
class ChartSeries:
    """One stacked series: a label, its colour, and a count per bucket."""

    name: str
    colour: str
    counts: tuple[int, ...]

    @property
    def colour_index(self) -> int:
        """The palette position, for the legend's CSS swatch class."""
        return PALETTE.index(self.colour)


def series_from_counts(
    counts: Sequence[tuple[datetime, str, int]], buckets: Sequence[datetime], max_series: int = 8
) -> list[ChartSeries]:
    """Group (bucket, label, n) rows into the largest ``max_series`` labels plus ``(other)``."""
    index = {b: i for i, b in enumerate(buckets)}
    totals: dict[str, int] = {}
    for _, name, n in counts:
        totals[name] = totals.get(name, 0) + n
    ranked = sorted(totals, key=lambda name: (-totals[name], name))
    kept = ranked if len(ranked) <= max_series + 1 else ranked[:max_series]
    grid: dict[str, list[int]] = {name: [0] * len(buckets) for name in kept}
    if len(ranked) > len(kept):
        grid[OTHER] = [0] * len(buckets)
    for bucket, name, n in counts:
        i = index.get(bucket)
        if i is None:
            continue
        grid[name if name in grid else OTHER][i] += n
    return [
        ChartSeries(name, PALETTE[i % len(PALETTE)], tuple(values))
        for i, (name, values) in enumerate(grid.items())
    ]


def bucket_range(first: datetime, last: datetime, step: timedelta) -> list[datetime]:
    """Every bucket start from ``first`` to ``last`` (both already truncated)."""
    out: list[datetime] = []
    current = first
    while current <= last and len(out) < 10_000:
        out.append(current)
        current += step
    return out


def _drawn(s: ChartSeries) -> list[tuple[int, int]]:
    """(bucket index, count) of the series' non-empty segments: those drawn."""
    return [(j, c) for j, c in enumerate(s.counts) if c]


def _axes(fig: Any) -> Any:
    """The plot area, styled like the page: light grid, no frame, grey ticks."""
    from matplotlib.ticker import MaxNLocator

    ax = fig.add_axes((0.05, 0.14, 0.94, 0.82))
    ax.spines[["top", "right", "left"]].set_visible(False)
    ax.grid(axis="y", color="#d9dee3", linewidth=1)
    ax.set_axisbelow(True)
    ax.tick_params(colors="#555555", labelsize=9, length=0)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    return ax


def _draw(
    buckets: Sequence[datetime],
    series: Sequence[ChartSeries],
    bucket_label: str,
    size: tuple[float, float],
) -> Any:
    """The matplotlib figure: one stacked bar per bucket, three date ticks."""
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    ax = _axes(fig)
    # One collection of rectangles per series, limits set up front: a patch per bar
    # with autoscaling costs several times more.
    totals = [sum(s.counts[j] for s in series) for j in range(len(buckets))]
    ax.set_ylim(0, max([1, *totals]) * 1.05)
    ax.set_autoscale_on(False)
    base = [0] * len(buckets)
    for i, s in enumerate(series):
        rectangles = [
            [(j - 0.4, base[j]), (j + 0.4, base[j]), (j + 0.4, base[j] + c), (j - 0.4, base[j] + c)]
            for j, c in _drawn(s)
        ]
        bars = PolyCollection(rectangles, facecolors=s.colour, linewidths=0)
        bars.set_gid(f"series-{i}")
        ax.add_collection(bars)
        base = [b + c for b, c in zip(base, s.counts, strict=True)]
    if buckets:
        n = len(buckets)
        ticks = sorted({0, n // 2, n - 1})
        ax.set_xticks(ticks, [buckets[t].strftime(bucket_label) for t in ticks])
        ax.set_xlim(-0.6, n - 0.4)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(
            0.5,
            0.5,
            "no identifications match",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="#777777",
            fontsize=12,
        )
    return fig


def _presentation_attributes(root: ElementTree.Element) -> None:
    """``style="fill: #x; stroke-width: 1"`` → ``fill="#x" stroke-width="1"`` (CSP-safe)."""
    for parent in root.iter():
        for child in list(parent):
            if child.tag == f"{{{_SVG_NS}}}style":
                parent.remove(child)
        style = parent.attrib.pop("style", None)
        if not style:
            continue
        for declaration in style.split(";"):
            name, sep, value = declaration.partition(":")
            if sep and name.strip() and name.strip() != "font":
                parent.set(name.strip(), value.strip())


def _annotate_bars(
    root: ElementTree.Element,
    buckets: Sequence[datetime],
    series: Sequence[ChartSeries],
    bucket_label: str,
) -> None:
    """Each bar: class ``bar`` and a ``<title>`` tooltip (bucket — label: count)."""
    for number, shapes in series_elements(root, "series"):
        s = series[number]
        for element, (j, count) in zip(shapes, _drawn(s), strict=True):
            add_title(element, f"{buckets[j].strftime(bucket_label)} — {s.name}: {count}")


def stacked_bars(
    buckets: Sequence[datetime],
    series: Sequence[ChartSeries],
    *,
    bucket_label: str = "%Y-%m-%d",
    width: int = 960,
    height: int = 280,
    title: str = "Identifications per label",
) -> str:
    """An accessible inline SVG stacked bar chart (``role="img"``, a title, a tooltip
    per bar) whose root has the class ``chart``; labels are escaped by ElementTree."""
    fig = _draw(buckets, series, bucket_label, (width / 100, height / 100))
    root = svg_root(fig)
    _annotate_bars(root, buckets, series, bucket_label)
    return finish_svg(root, title)


def svg_root(fig: Any) -> ElementTree.Element:
    """The matplotlib figure as an SVG tree that the dashboard's CSP allows (no
    ``<style>``, no ``style`` attributes), text kept as ``<text>``."""
    import matplotlib

    out = io.StringIO()
    # Text as <text> (searchable, read by screen readers, and smaller than glyph paths).
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(out, format="svg", metadata={"Date": None, "Creator": None})
    ElementTree.register_namespace("", _SVG_NS)
    ElementTree.register_namespace("xlink", _XLINK_NS)
    root = ElementTree.fromstring(out.getvalue())
    _presentation_attributes(root)
    return root


def finish_svg(root: ElementTree.Element, title: str, css_class: str = "chart") -> str:
    """The inline SVG text: class ``css_class``, ``role="img"``, a title for screen readers."""
    root.set("class", css_class)
    root.set("role", "img")
    root.set("aria-label", title)
    heading = ElementTree.Element(f"{{{_SVG_NS}}}title")
    heading.text = title
    root.insert(0, heading)
    return ElementTree.tostring(root, encoding="unicode")


def series_elements(root: ElementTree.Element, prefix: str) -> Iterator[tuple[int, list[Any]]]:
    """(number, drawn shapes) of each group whose ``gid`` is ``{prefix}-{number}``."""
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)$")
    for group in root.iter(f"{{{_SVG_NS}}}g"):
        match = pattern.match(group.get("id", ""))
        if match is not None:
            shapes = [e for e in group if e.tag in (f"{{{_SVG_NS}}}path", f"{{{_SVG_NS}}}use")]
            yield int(match.group(1)), shapes


def add_title(element: ElementTree.Element, text: str) -> None:
    """Give a drawn shape the class ``bar`` and a tooltip."""
    element.set("class", "bar")
    title = ElementTree.SubElement(element, f"{{{_SVG_NS}}}title")
    title.text = text
