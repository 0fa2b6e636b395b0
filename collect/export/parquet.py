"""Parquet (pyarrow): the store's columns with their types; ``top_k`` as a list of
``{label, score}`` structs and times as UTC timestamps."""

from __future__ import annotations

from collections.abc import Iterable
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
    write_counted,
)
from fieldscope.collect.store import IdentificationRow
from fieldscope.edge.errors import MissingDependencyError

__all__ = ["FORMAT", "write"]


def _write_parquet(rows: Iterable[IdentificationRow], tmp: Path, chunk: int = 10_000) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingDependencyError(
            "Parquet export needs pyarrow: pip install 'fieldscope[collect]' "
            "(or pip install pyarrow)"
        ) from exc
    timestamp = pa.timestamp("us", tz="UTC")
    types: dict[str, Any] = {c: pa.string() for c in CSV_COLUMNS}
    types.update({c: pa.int64() for c in INT_COLUMNS})
    types.update({c: pa.float64() for c in FLOAT_COLUMNS})
    types.update({c: pa.bool_() for c in BOOL_COLUMNS})
    types.update(dict.fromkeys(TIME_COLUMNS, timestamp))
    types["top_k"] = pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())]))
    schema = pa.schema([(c, types[c]) for c in CSV_COLUMNS])

    def table(batch: list[IdentificationRow]) -> Any:
        columns: dict[str, list[Any]] = {c: [] for c in CSV_COLUMNS}
        for row in batch:
            for c in CSV_COLUMNS:
                value = getattr(row, c)
                if c == "top_k":
                    value = [{"label": label, "score": score} for label, score in value]
                columns[c].append(value)
        return pa.table(columns, schema=schema)

    n = 0
    with pq.ParquetWriter(str(tmp), schema) as writer:
        batch: list[IdentificationRow] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= chunk:
                writer.write_table(table(batch))
                n += len(batch)
                batch = []
        if batch or n == 0:
            writer.write_table(table(batch))
            n += len(batch)
    return n


def write(rows: Iterable[IdentificationRow], out: Path, options: ExportOptions) -> ExportSummary:
    """Every column of every row, typed, in row groups of 10,000."""
    return write_counted("parquet", out, _write_parquet, rows)


FORMAT = ExportFormat("parquet", ".parquet", write, "the store's columns with their types")
