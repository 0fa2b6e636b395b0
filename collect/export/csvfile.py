"""CSV: one row per identification, every column of the store (``top_k`` as JSON);
round-trips through :func:`read_csv`."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from fieldscope.collect.export.base import (
    BOOL_COLUMNS,
    CSV_COLUMNS,
    FLOAT_COLUMNS,
    INT_COLUMNS,
    TIME_COLUMNS,
    ExportFormat,
    ExportOptions,
    ExportSummary,
    escape_formula,
    unescape_formula,
    utc_text,
    write_counted,
)
from fieldscope.collect.store import IdentificationRow

__all__ = ["FORMAT", "read_csv", "write"]


def _csv_value(row: IdentificationRow, column: str) -> str:
    value = getattr(row, column)
    if value is None:
        return ""
    if column in BOOL_COLUMNS:
        value = "true" if value else "false"
    if column in TIME_COLUMNS:
        return utc_text(value)
    if column == "top_k":
        return json.dumps([{"label": label, "score": score} for label, score in value])
    if isinstance(value, float):
        return repr(value)
    if column in INT_COLUMNS:
        return str(value)
    return escape_formula(str(value))


def _write_csv(rows: Iterable[IdentificationRow], tmp: Path) -> int:
    n = 0
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow([_csv_value(row, c) for c in CSV_COLUMNS])
            n += 1
    return n


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Read a CSV export back with its types (None for empty cells, datetimes in UTC)."""
    out: list[dict[str, Any]] = []
    with path.open(encoding="utf-8", newline="") as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, Any] = {}
            for column in CSV_COLUMNS:
                text = raw[column]
                if text == "":
                    row[column] = None
                elif column in INT_COLUMNS:
                    row[column] = int(text)
                elif column in BOOL_COLUMNS:
                    row[column] = text == "true"
                elif column in FLOAT_COLUMNS:
                    row[column] = float(text)
                elif column in TIME_COLUMNS:
                    row[column] = datetime.fromisoformat(text.replace("Z", "+00:00"))
                elif column == "top_k":
                    row[column] = tuple((c["label"], float(c["score"])) for c in json.loads(text))
                else:
                    row[column] = unescape_formula(text)
            out.append(row)
    return out


def write(rows: Iterable[IdentificationRow], out: Path, options: ExportOptions) -> ExportSummary:
    """Every column of every row, as :func:`read_csv` reads it back."""
    return write_counted("csv", out, _write_csv, rows)


FORMAT = ExportFormat("csv", ".csv", write, "every column of the store, one row each")
