"""What each HTML page shows, computed from the store (the templates only lay it out)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from fieldscope.collect.charts import bucket_range, series_from_counts, stacked_bars
from fieldscope.collect.export import ExportError, parse_time
from fieldscope.collect.store import DeviceRow, Filters, IdentificationRow, Store, StoreError

__all__ = [
    "chart",
    "fleet_rows",
    "fmt_age",
    "fmt_time",
    "invalid_items",
    "page_filters",
    "parse_window",
    "row_item",
]


def fmt_time(value: datetime | None) -> str:
    if value is None:
        return "–"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_age(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "never"
    seconds = max(0.0, (now - value).total_seconds())
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def _fleet_row(
    d: DeviceRow,
    *,
    activity: tuple[int, datetime | None],
    missing: int,
    gaps: list[str],
    now: datetime,
    stale: timedelta,
) -> dict[str, Any]:
    hb = d.heartbeat or {}
    count, last = activity
    heard = d.heartbeat_received_at
    return {
        "device": d.device,
        "station": d.station,
        "status": d.status or "unknown",
        "status_since": fmt_age(d.status_at, now),
        "heartbeat_age": fmt_age(heard, now),
        "stale": heard is not None and now - heard > stale,
        "model": (f"{d.model_name} {d.model_version}" if d.model_name else "–"),
        "outbox": "–" if d.outbox_depth is None else d.outbox_depth,
        "fps": hb.get("fps"),
        "camera": (hb.get("camera") or {}).get("state", "–"),
        "temperature": hb.get("cpu_temperature_c"),
        "warnings": list(hb.get("warnings") or []),
        "count": count,
        "missing": missing,
        "gaps": ", ".join(gaps[:10]),
        "last_identification": fmt_age(last, now) if last else "never",
    }


def fleet_rows(store: Store, stale_after_s: float) -> dict[str, Any]:
    """The fleet page: a row per device and the totals above the table."""
    now = datetime.now(UTC)
    stale = timedelta(seconds=stale_after_s)
    devices = store.devices()
    activity = store.device_activity()
    missing = store.missing_counts()
    gaps: dict[str, list[str]] = {}
    for gap in store.gaps(limit=500):
        span = str(gap.first) if gap.first == gap.last else f"{gap.first}..{gap.last}"
        gaps.setdefault(gap.device, []).append(span)
    rows = [
        _fleet_row(
            d,
            activity=activity.get(d.device, (0, None)),
            missing=missing.get(d.device, 0),
            gaps=gaps.get(d.device, []),
            now=now,
            stale=stale,
        )
        for d in devices
    ]
    return {
        "devices": rows,
        "online": sum(1 for r in rows if r["status"] == "online"),
        "total": store.count(),
        "invalid": store.count_invalid(),
        "missing": sum(missing.values()),
        "now": fmt_time(now),
    }


def parse_window(
    since: str | None, until: str | None, names: tuple[str, str] = ("from", "to")
) -> tuple[datetime | None, datetime | None]:
    """The capture-time window of a query; a bare date ``until`` includes that day.

    Raises:
        ExportError: not a date or time, naming the parameter.
    """
    start = parse_time(since, names[0]) if since and since.strip() else None
    end = None
    if until and until.strip():
        end = parse_time(until, names[1])
        if len(until.strip()) == 10:  # a date: include that whole day
            end += timedelta(days=1)
    return start, end


def page_filters(query: Mapping[str, str]) -> tuple[Filters, list[str]]:
    """The identifications page's filters, and what was wrong with them (shown, not fatal)."""
    errors: list[str] = []

    def pick(name: str) -> tuple[str, ...]:
        return (query[name],) if query.get(name) else ()

    base = Filters(
        stations=pick("station"),
        devices=pick("device"),
        labels=pick("label"),
        statuses=pick("status"),
        samples=pick("sample"),
    )
    try:
        since, until = parse_window(query.get("since"), query.get("until"))
        return dataclasses.replace(base, since=since, until=until), errors
    except (ExportError, StoreError) as exc:
        errors.append(str(exc))
    return base, errors


def row_item(r: IdentificationRow, thumbs: bool) -> dict[str, Any]:
    """One row of the identifications table; ``thumbs``: the dashboard may have its image."""
    return {
        "id": r.id,
        "captured_at": r.captured_at,
        "device": r.device,
        "station": r.station,
        "seq": r.seq,
        "status": r.status,
        "label": r.label,
        "score": r.score,
        "top_k": r.top_k,
        "model": f"{r.model_name} {r.model_version}",
        "reason": r.reason,
        "thumb": f"/thumb/{r.id}" if thumbs else None,
    }


def chart(
    store: Store, filters: Filters, render: Callable[..., str] = stacked_bars
) -> tuple[str, list[tuple[int, str, int]], str]:
    """The chart's SVG, its legend (colour index, label, count) and the bucket (day/hour).

    ``render`` draws it: :func:`stacked_bars`, or a cached one (its arguments are
    hashable: tuples of datetimes and of frozen series)."""
    span = store.time_range(filters)
    if span is None:
        return render((), ()), [], "day"
    first, last = span
    hourly = last - first <= timedelta(days=3)
    bucket = "hour" if hourly else "day"
    step = timedelta(hours=1) if hourly else timedelta(days=1)

    def truncate(t: datetime) -> datetime:
        t = t.replace(minute=0, second=0, microsecond=0)
        return t if hourly else t.replace(hour=0)

    buckets = bucket_range(truncate(first), truncate(last), step)
    series = series_from_counts(store.label_counts(filters, bucket), buckets)
    svg = render(
        tuple(buckets),
        tuple(series),
        bucket_label="%m-%d %H:00" if hourly else "%Y-%m-%d",
        title=f"Identifications per label and {bucket}",
    )
    return svg, [(s.colour_index, s.name, sum(s.counts)) for s in series], bucket


def invalid_items(store: Store) -> dict[str, Any]:
    """The invalid-messages page: the latest 200, payloads cut at 600 characters."""
    items = [
        {
            "received_at": r.received_at,
            "topic": r.topic,
            "kind": r.kind or "–",
            "reason": r.reason,
            "payload": r.payload[:600].decode("utf-8", "replace")
            + ("…" if len(r.payload) > 600 else ""),
        }
        for r in store.invalid_messages(limit=200)
    ]
    return {"items": items, "count": store.count_invalid()}
