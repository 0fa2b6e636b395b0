"""EcoTaxa: the TSV EcoTaxa imports — a header line, then a line of types (``[t]``
text, ``[f]`` number), one object per line. Labelled identifications are
``predicted`` in their category, so a person validates them in EcoTaxa; uncertain and
rejected ones are left unclassified."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from fieldscope.collect.export.base import (
    ExportFormat,
    ExportOptions,
    ExportSummary,
    atomic,
    clean_tsv,
    escape_formula,
)
from fieldscope.collect.store import IdentificationRow

__all__ = ["ECOTAXA_COLUMNS", "FORMAT", "write"]

ECOTAXA_COLUMNS: tuple[tuple[str, str], ...] = (
    ("img_file_name", "[t]"),
    ("object_id", "[t]"),
    ("object_date", "[t]"),
    ("object_time", "[t]"),
    ("object_annotation_category", "[t]"),
    ("object_annotation_status", "[t]"),
    ("object_score", "[f]"),
    ("object_fieldscope_status", "[t]"),
    ("object_model", "[t]"),
    ("object_image_sha256", "[t]"),
    ("sample_id", "[t]"),
    ("acq_id", "[t]"),
)


def _ecotaxa_values(row: IdentificationRow) -> list[str]:
    labelled = row.status == "ok" and row.label is not None
    when = row.captured_at
    return [
        "" if row.archived_path is None else PurePosixPath(row.archived_path).name,
        f"{row.device}_{row.seq}",
        when.strftime("%Y%m%d"),
        when.strftime("%H%M%S"),
        row.label if labelled and row.label else "",
        "predicted" if labelled else "",
        "" if row.score is None else f"{row.score:.6f}",
        row.status,
        f"{row.model_name} {row.model_version}",
        row.image_sha256,
        row.station,
        row.device,
    ]


def _write_ecotaxa(rows: Iterable[IdentificationRow], tmp: Path) -> tuple[int, int]:
    n = without_image = 0
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        fh.write("\t".join(name for name, _ in ECOTAXA_COLUMNS) + "\n")
        fh.write("\t".join(kind for _, kind in ECOTAXA_COLUMNS) + "\n")
        for row in rows:
            values = (
                clean_tsv(v) if kind == "[f]" else escape_formula(clean_tsv(v))
                for v, (_, kind) in zip(_ecotaxa_values(row), ECOTAXA_COLUMNS, strict=True)
            )
            fh.write("\t".join(values) + "\n")
            n += 1
            without_image += row.archived_path is None
    return n, without_image


def write(rows: Iterable[IdentificationRow], out: Path, options: ExportOptions) -> ExportSummary:
    """Every row as an EcoTaxa object; notes how many have no archived image."""
    with atomic(out) as tmp:
        n, without_image = _write_ecotaxa(rows, tmp)
    notes: tuple[str, ...] = ()
    if without_image:
        notes = (
            f"{without_image} object(s) have no archived image (img_file_name is empty); "
            "EcoTaxa imports an object with its image: keep images on the stations "
            "(archive mode all) or filter these out",
        )
    return ExportSummary(out, "ecotaxa", n, notes=notes)


FORMAT = ExportFormat("ecotaxa", ".tsv", write, "the TSV EcoTaxa imports (predicted categories)")
