"""Inline SVG charts for the dashboard: no JavaScript, no CDN, escaped text.

Colours are SVG presentation attributes rather than ``style`` attributes, so the
dashboard's Content-Security-Policy can forbid inline styles altogether.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape

__all__ = [
    "PALETTE",
    "ChartSeries",
    "bucket_range",
    "series_from_counts",
    "stacked_bars",
    "swatch",
]

# Colour-blind-safe qualitative palette (Okabe–Ito, then a few greys/extras).
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


@dataclass(frozen=True)
class ChartSeries:
    """One stacked series: a label, its colour, and a count per bucket."""

    name: str
    colour: str
    counts: tuple[int, ...]


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


def _nice_max(value: int) -> int:
    if value <= 5:
        return max(value, 1)
    magnitude = 10 ** (len(str(value)) - 1)
    for factor in (1, 2, 2.5, 5, 10):
        top = int(factor * magnitude)
        if top >= value:
            return top
    return value


def stacked_bars(
    buckets: Sequence[datetime],
    series: Sequence[ChartSeries],
    *,
    bucket_label: str = "%Y-%m-%d",
    width: int = 960,
    height: int = 280,
    title: str = "Identifications per label",
) -> str:
    """An accessible SVG stacked bar chart (``role="img"``, a title, a tooltip per bar)."""
    left, right, top, bottom = 48, 12, 16, 40
    plot_w = width - left - right
    plot_h = height - top - bottom
    n = max(len(buckets), 1)
    totals = [sum(s.counts[i] for s in series) for i in range(len(buckets))]
    y_max = _nice_max(max(totals, default=0))
    slot = plot_w / n
    bar_w = max(1.0, slot * 0.8)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
    ]
    for k in range(5):
        value = y_max * k / 4
        y = top + plot_h - plot_h * k / 4
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" '
            'stroke="#d9dee3" stroke-width="1"/>'
        )
        label = f"{value:.0f}" if value == int(value) else f"{value:.1f}"
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="#555">{label}</text>'
        )
    for i, bucket in enumerate(buckets):
        x = left + i * slot + (slot - bar_w) / 2
        base: float = top + plot_h
        when = bucket.strftime(bucket_label)
        for s in series:
            count = s.counts[i]
            if not count:
                continue
            h = plot_h * count / y_max
            base -= h
            parts.append(
                f'<rect x="{x:.1f}" y="{base:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                f'fill="{s.colour}"><title>{escape(when)} — {escape(s.name)}: {count}</title>'
                "</rect>"
            )
    ticks = sorted({0, n // 2, n - 1}) if buckets else []
    for i in ticks:
        x = left + i * slot + slot / 2
        parts.append(
            f'<text x="{x:.1f}" y="{height - bottom + 16}" text-anchor="middle" font-size="11" '
            f'fill="#555">{escape(buckets[i].strftime(bucket_label))}</text>'
        )
    parts.append(
        f'<line x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}" '
        'stroke="#888" stroke-width="1"/>'
    )
    if not buckets:
        parts.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" font-size="14" '
            'fill="#777">no identifications match</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def swatch(colour: str, size: int = 12) -> str:
    """A small coloured square for a legend (SVG, so no inline style is needed)."""
    return (
        f'<svg class="swatch" width="{size}" height="{size}" aria-hidden="true">'
        f'<rect width="{size}" height="{size}" rx="2" fill="{escape(colour)}"/></svg>'
    )
