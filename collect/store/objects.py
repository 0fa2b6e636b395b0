"""Counts and sizes of a segmenting station's objects: what the dashboard's Objects
page and ``/api/v1/objects/...`` show.

Decisions:

* **An object** is a row with ``object_index`` (one identification per object); an
  uncertain one counts under ``(uncertain)``, as in the other counts.
* **A frame** is a distinct ``(device, frame_id)``: every object message of a frame
  carries it, and so does the one ``rejected`` "no objects" message of an empty frame,
  so empty frames count too and objects per frame stay right. The frame's own counts
  (rejected by size...) ride on each of its messages: they are taken once per frame.
* **A label filter narrows the objects, never the frames**: objects per frame of a
  label is then its density in the sample.
* **Samples**: ``by`` groups by :data:`OBJECT_GROUPS` in one query, ``sample`` by the
  sample id the station stamped (the ``sample`` command), ``""`` for objects taken
  between samples; the ``samples`` filter picks one or more.
* **Sizes** are histograms of the ESD in µm with the same edges for every label (so the
  labels compare), counted by the database (a ``CASE`` over the edges, one scan, the same
  SQL in SQLite and PostgreSQL); the edges come from :func:`size_edges`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from fieldscope.collect.store.rows import Filters, StoreError, _Where

__all__ = [
    "OBJECT_GROUPS",
    "LabelObjects",
    "LabelSizes",
    "ObjectGroup",
    "ObjectStore",
    "SizeDistribution",
    "size_edges",
]

# What the objects can be grouped by, and the column each name reads.
OBJECT_GROUPS: tuple[str, ...] = ("station", "device", "sample")
_GROUP_COLUMNS = {"station": "station", "device": "device", "sample": "sample_id"}
MAX_BINS = 100
Scale = Literal["auto", "linear", "log"]
_NAME = "COALESCE(label, '(' || status || ')')"
# In this order: (name, expression over one frame's rows).
_FRAME_COUNTS = (
    ("objects", "COUNT(object_index)"),
    ("rejected_by_size", "MAX(objects_rejected_by_size)"),
    ("touching_border", "MAX(objects_touching_border)"),
    ("truncated", "MAX(objects_truncated)"),
)


class LabelObjects(msgspec.Struct, frozen=True, kw_only=True):
    """One label's objects: how many, per frame, and their ESD (µm)."""

    label: str
    objects: int
    per_frame: float | None
    esd_mean_um: float | None
    esd_min_um: float | None
    esd_max_um: float | None


class ObjectGroup(msgspec.Struct, frozen=True, kw_only=True):
    """The frames and objects of one group (``key``: its ``by`` values; empty when not
    grouped). ``frames`` includes ``frames_without_objects``; ``objects`` are those of
    the label filter; the frame counts (``rejected_by_size``...) are summed per frame."""

    key: dict[str, str]
    frames: int
    frames_without_objects: int
    objects: int
    objects_per_frame: float | None
    rejected_by_size: int
    touching_border: int
    truncated: int
    labels: list[LabelObjects]


class LabelSizes(msgspec.Struct, frozen=True, kw_only=True):
    """One label's objects per ESD bin (``counts[i]`` between ``edges_um[i]`` and ``[i+1]``)."""

    label: str
    objects: int
    counts: list[int]


class SizeDistribution(msgspec.Struct, frozen=True, kw_only=True):
    """ESD histograms per label on shared edges; bins are ``[a, b)``, the last ``[a, b]``."""

    scale: Literal["linear", "log"]
    edges_um: list[float]
    objects: int
    labels: list[LabelSizes]


def _nice_step(raw: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^k that is at least ``raw``."""
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * power >= raw * (1 - 1e-9))


def size_edges(
    low: float, high: float, bins: int = 20, scale: Scale = "auto"
) -> tuple[Literal["linear", "log"], list[float]]:
    """The scale used and about ``bins`` bin edges covering ``low``..``high`` (µm).

    ``auto`` is ``log`` when the sizes span a tenfold range or more (pollen and debris on
    one slide), else ``linear``; log needs positive sizes, otherwise linear is used.
    Linear edges are round numbers (steps of 1, 2, 2.5, 5 × 10^k); log edges are equal
    steps of 10^(1/n) with n bins per decade.
    """
    if not 1 <= bins <= MAX_BINS:
        raise StoreError(f"bins must be 1..{MAX_BINS}, got {bins}")
    if low > high or not (math.isfinite(low) and math.isfinite(high)):
        raise StoreError(f"size range {low}..{high} is not a range")
    log = low > 0 and (scale == "log" or (scale == "auto" and high / low >= 10))
    if log:
        per_decade = max(1, round(bins / max(math.log10(high / low), 1 / bins)))
        first = math.floor(math.log10(low) * per_decade)
        last = max(first + 1, math.ceil(math.log10(high) * per_decade))
        edges = [float(f"{10.0 ** (k / per_decade):.4g}") for k in range(first, last + 1)]
    else:
        step = _nice_step(max(high - low, abs(high) * 0.1, 1e-6) / bins)
        start = math.floor(low / step) * step
        count = max(1, math.ceil((high - start) / step - 1e-9))
        edges = [round(start + i * step, 9) for i in range(count + 1)]
    edges[0], edges[-1] = min(edges[0], low), max(edges[-1], high)
    return ("log" if log else "linear"), edges


class ObjectStore:
    """The object queries of :class:`~fieldscope.collect.store.Store` (a mixin)."""

    _absent: frozenset[str]

    if TYPE_CHECKING:  # provided by Store

        def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

        def _where(self, filters: Filters) -> _Where: ...

    def _objects_where(self, filters: Filters, clause: str, *, labels: bool) -> _Where:
        """``filters`` and ``clause``; the label filter (on ``(uncertain)`` too) only
        when ``labels``; status and score filters do not apply to objects."""
        base = dataclasses.replace(filters, labels=(), statuses=(), min_score=None, max_score=None)
        where = self._where(base)
        sql = where.sql + (" AND " if where.sql else " WHERE ") + clause
        params = list(where.params)
        if labels and filters.labels:
            sql += f" AND {_NAME} IN ({', '.join('?' for _ in filters.labels)})"
            params.extend(filters.labels)
        return _Where(sql, params)

    def _group_expr(self, name: str) -> str:
        """The SQL of one group name, named after it; a sample outside any sample (or an
        older database without the column) is ``''``."""
        column = _GROUP_COLUMNS[name]
        if name != "sample":
            return column
        return "''" if column in self._absent else f"COALESCE({column}, '')"

    def has_objects(self) -> bool:
        """Whether any segmenting station's frame is stored (the Objects page's question)."""
        if "frame_id" in self._absent:
            return False
        rows = self._query("SELECT 1 FROM identifications WHERE frame_id IS NOT NULL LIMIT 1")
        return bool(rows)

    def object_summary(
        self, filters: Filters = Filters(), by: Sequence[str] = ()
    ) -> list[ObjectGroup]:
        """Frames, objects and per-label counts and ESD per group of ``by`` (columns of
        :data:`OBJECT_GROUPS`; one group, keyed ``{}``, when empty), by group key."""
        unknown = [b for b in by if b not in OBJECT_GROUPS]
        if unknown:
            raise StoreError(f"objects group by {', '.join(OBJECT_GROUPS)}, not {unknown[0]!r}")
        group = list(dict.fromkeys(by))
        if "frame_id" in self._absent:
            return []
        frames = self._frame_counts(filters, group)
        labels = self._label_objects(filters, group)
        out = []
        for key, (n_frames, empty, *counts) in frames.items():
            named = labels.get(key, [])
            objects = sum(n for _, n, *_ in named)
            out.append(
                ObjectGroup(
                    key=dict(zip(group, key, strict=True)),
                    frames=n_frames,
                    frames_without_objects=empty,
                    objects=objects,
                    objects_per_frame=_ratio(objects, n_frames),
                    rejected_by_size=counts[1],
                    touching_border=counts[2],
                    truncated=counts[3],
                    labels=[
                        LabelObjects(
                            label=name,
                            objects=n,
                            per_frame=_ratio(n, n_frames),
                            esd_mean_um=mean,
                            esd_min_um=low,
                            esd_max_um=high,
                        )
                        for name, n, mean, low, high in named
                    ],
                )
            )
        return out

    def _frame_counts(self, filters: Filters, group: list[str]) -> dict[tuple[str, ...], list[int]]:
        """Per group: frames, frames without objects, then the sums of _FRAME_COUNTS."""
        names = list(dict.fromkeys([*group, "device"]))
        exprs = [self._group_expr(g) for g in names] + ["frame_id"]
        inner = ", ".join(f"{e} AS {n}" for e, n in zip(exprs, [*names, "frame_id"], strict=True))
        where = self._objects_where(filters, "frame_id IS NOT NULL", labels=False)
        counts = ", ".join(f"{expr} AS {name}" for name, expr in _FRAME_COUNTS)
        sums = ", ".join(f"SUM({name})" for name, _ in _FRAME_COUNTS)
        keys = ", ".join(group)
        sql = (
            f"SELECT {keys + ', ' if keys else ''}COUNT(*), "
            f"SUM(CASE WHEN objects = 0 THEN 1 ELSE 0 END), {sums} FROM ("
            f"SELECT {inner}, {counts} FROM identifications{where.sql} "
            f"GROUP BY {', '.join(exprs)}"
            f") AS frames{' GROUP BY ' + keys + ' ORDER BY ' + keys if keys else ''}"
        )
        out: dict[tuple[str, ...], list[int]] = {}
        for row in self._query(sql, where.params):
            values = [int(v or 0) for v in row[len(group) :]]
            if values[0]:
                out[tuple(str(v) for v in row[: len(group)])] = values
        return out

    def _label_objects(
        self, filters: Filters, group: list[str]
    ) -> dict[tuple[str, ...], list[tuple[str, int, float | None, float | None, float | None]]]:
        """Per group: (label, objects, ESD mean, min, max), most objects first."""
        where = self._objects_where(filters, "object_index IS NOT NULL", labels=True)
        keys = "".join(f"{self._group_expr(g)}, " for g in group)
        sql = (
            f"SELECT {keys}{_NAME} AS name, COUNT(*), AVG(esd_um), MIN(esd_um), MAX(esd_um) "
            f"FROM identifications{where.sql} GROUP BY {keys}{_NAME}"
        )
        out: dict[tuple[str, ...], list[Any]] = {}
        for row in self._query(sql, where.params):
            key = tuple(str(v) for v in row[: len(group)])
            name, n, *esd = row[len(group) :]
            out.setdefault(key, []).append(
                (str(name), int(n), *(None if v is None else float(v) for v in esd))
            )
        for named in out.values():
            named.sort(key=lambda item: (-item[1], item[0]))
        return out

    def size_distribution(
        self, filters: Filters = Filters(), *, bins: int = 20, scale: Scale = "auto"
    ) -> SizeDistribution:
        """The ESD histogram per label of the matching objects (see :func:`size_edges`)."""
        empty = SizeDistribution(scale="linear", edges_um=[], objects=0, labels=[])
        if "frame_id" in self._absent:
            return empty
        where = self._objects_where(
            filters, "object_index IS NOT NULL AND esd_um IS NOT NULL", labels=True
        )
        low, high = self._query(
            f"SELECT MIN(esd_um), MAX(esd_um) FROM identifications{where.sql}", where.params
        )[0]
        if low is None:
            return empty
        used, edges = size_edges(float(low), float(high), bins, scale)
        inner = edges[1:-1]
        case = " ".join(f"WHEN esd_um < ? THEN {i}" for i in range(len(inner)))
        expr = f"CASE {case} ELSE {len(inner)} END" if inner else "0"
        sql = (
            f"SELECT {_NAME} AS name, {expr} AS bin, COUNT(*) FROM identifications{where.sql} "
            "GROUP BY 1, 2"
        )
        grid: dict[str, list[int]] = {}
        for name, b, n in self._query(sql, [*inner, *where.params]):
            grid.setdefault(str(name), [0] * (len(edges) - 1))[int(b)] += int(n)
        labels = [
            LabelSizes(label=name, objects=sum(counts), counts=counts)
            for name, counts in sorted(grid.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
        ]
        return SizeDistribution(
            scale=used,
            edges_um=edges,
            objects=sum(s.objects for s in labels),
            labels=labels,
        )


def _ratio(n: int, d: int) -> float | None:
    return None if d == 0 else round(n / d, 4)
