"""Exports of stored identifications: CSV, Parquet, Darwin Core and EcoTaxa TSV.

The field mapping of each format is documented in docs/collect.md. Every export reads
the store in chunks (constant memory however large the table) and writes to a
temporary file renamed into place, so a failed export never leaves half a file
under the name a script or a GBIF upload will pick up.

* **CSV**: one row per identification, every column of the store (``top_k`` as
  JSON); round-trips through :func:`read_csv`.
* **Parquet** (pyarrow): the same columns with their types; ``top_k`` as a list of
  ``{label, score}`` structs and times as UTC timestamps.
* **Darwin Core**: occurrence records (``basisOfRecord`` ``MachineObservation``) of
  the identifications with a label (status ``ok``). An uncertain or rejected capture
  names no taxon, so it is no occurrence; those are counted and left out. With an
  ``.zip`` output it is a Darwin Core Archive (``occurrence.txt`` plus ``meta.xml``).
* **EcoTaxa**: the TSV EcoTaxa imports — a header line, then a line of types
  (``[t]`` text, ``[f]`` number), one object per line. Labelled identifications are
  ``predicted`` in their category, so a person validates them in EcoTaxa; uncertain
  and rejected ones are left unclassified.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import secrets
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

from fieldscope.collect.store import RECORD_COLUMNS, Filters, IdentificationRow, Store
from fieldscope.edge.errors import FieldscopeError, MissingDependencyError

__all__ = [
    "CSV_COLUMNS",
    "DWC_TERMS",
    "ECOTAXA_COLUMNS",
    "FORMATS",
    "ExportError",
    "ExportSummary",
    "escape_formula",
    "export",
    "parse_time",
    "read_csv",
    "unescape_formula",
]

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("csv", "parquet", "darwin-core", "ecotaxa")

CSV_COLUMNS: tuple[str, ...] = RECORD_COLUMNS
_INT_COLUMNS = frozenset({"seq", "image_width", "image_height", "message_version"})
_FLOAT_COLUMNS = frozenset(
    {
        "score",
        "quality_sharpness",
        "quality_exposure",
        "capture_ms",
        "quality_ms",
        "preprocess_ms",
        "inference_ms",
        "total_ms",
    }
)
_TIME_COLUMNS = frozenset({"captured_at", "received_at"})

_DWC = "http://rs.tdwg.org/dwc/terms/"
DWC_TERMS: tuple[str, ...] = (
    "occurrenceID",
    "basisOfRecord",
    "occurrenceStatus",
    "eventDate",
    "scientificName",
    "identifiedBy",
    "dateIdentified",
    "identificationVerificationStatus",
    "identificationRemarks",
    "associatedMedia",
    "recordedBy",
    "locationID",
    "samplingProtocol",
    "datasetName",
)

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


class ExportError(FieldscopeError):
    """An export cannot be written (bad output path, unknown format, missing pyarrow)."""


@dataclass(frozen=True)
class ExportSummary:
    """What an export wrote: ``rows`` records to ``path``; ``skipped`` identifications
    matched the filters but have no place in the format (``skipped_why`` says why)."""

    path: Path
    format: str
    rows: int
    skipped: int = 0
    skipped_why: str = ""
    notes: tuple[str, ...] = ()


def parse_time(text: str, what: str = "time") -> datetime:
    """A command-line time: ``2026-11-23``, ``2026-11-23T18:00`` or with an offset/``Z``.

    A time without an offset is UTC, like everything the fleet publishes.
    """
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ExportError(
            f"{what} {text!r} is not a date or time; use e.g. 2026-11-23 or "
            "2026-11-23T18:00:00Z (UTC unless an offset is given)"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _utc_text(value: datetime) -> str:
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _new_file_beside(path: Path) -> Path:
    """A new, uniquely named empty file next to ``path``, created 0666 less the umask."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        except OSError as exc:
            raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from exc
        return tmp
    raise ExportError(f"cannot write {path}: no free temporary name in {path.parent}")


@contextlib.contextmanager
def _atomic(path: Path, binary: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed over it when the block succeeds. Missing
    folders are created; the file gets 0666 less the umask (0644 with umask 022), not
    mkstemp's 0600, because exports are for others to read (a web server, GBIF's IPT)."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(
            f"cannot write {path}: cannot create the folder {parent}: {exc.strerror or exc}"
        ) from exc
    tmp = _new_file_beside(path)
    try:
        yield tmp
        tmp.replace(path)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


# --- formula injection ----------------------------------------------------------------------------

# A cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets
# (OWASP "CSV injection"): a station's label ``=HYPERLINK(...)`` would run when a person
# opens the export. Such a text value is written with a leading single quote, which the
# spreadsheet shows as text and :func:`read_csv` removes again.
_FORMULA_START = frozenset("=+-@\t\r")


def escape_formula(text: str) -> str:
    """``text`` safe to open in a spreadsheet: prefixed with ``'`` when it (after any
    quotes it already starts with) begins with ``= + - @``, a tab or a carriage return,
    so :func:`unescape_formula` restores every value exactly."""
    if text.lstrip("'")[:1] in _FORMULA_START:
        return "'" + text
    return text


def unescape_formula(text: str) -> str:
    """The value :func:`escape_formula` was given."""
    if text.startswith("'") and text.lstrip("'")[:1] in _FORMULA_START:
        return text[1:]
    return text


# --- CSV ----------------------------------------------------------------------------------------


def _csv_value(row: IdentificationRow, column: str) -> str:
    value = getattr(row, column)
    if value is None:
        return ""
    if column in _TIME_COLUMNS:
        return _utc_text(value)
    if column == "top_k":
        return json.dumps([{"label": label, "score": score} for label, score in value])
    if isinstance(value, float):
        return repr(value)
    if column in _INT_COLUMNS:
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
                elif column in _INT_COLUMNS:
                    row[column] = int(text)
                elif column in _FLOAT_COLUMNS:
                    row[column] = float(text)
                elif column in _TIME_COLUMNS:
                    row[column] = datetime.fromisoformat(text.replace("Z", "+00:00"))
                elif column == "top_k":
                    row[column] = tuple((c["label"], float(c["score"])) for c in json.loads(text))
                else:
                    row[column] = unescape_formula(text)
            out.append(row)
    return out


# --- Parquet --------------------------------------------------------------------------------------


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
    types.update({c: pa.int64() for c in _INT_COLUMNS})
    types.update({c: pa.float64() for c in _FLOAT_COLUMNS})
    types.update(dict.fromkeys(_TIME_COLUMNS, timestamp))
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


# --- Darwin Core ----------------------------------------------------------------------------------


def _media(row: IdentificationRow, media_url_prefix: str | None) -> str:
    if row.archived_path is None:
        return ""
    if media_url_prefix is None:
        return row.archived_path
    parts = PurePosixPath(row.archived_path).parts[-2:]
    return "/".join([media_url_prefix.rstrip("/"), row.station, row.device, *parts])


def _dwc_record(
    row: IdentificationRow, id_prefix: str, media_url_prefix: str | None, dataset_name: str
) -> dict[str, str]:
    top = ", ".join(f"{label} {score:.3f}" for label, score in row.top_k)
    when = _utc_text(row.captured_at)
    return {
        "occurrenceID": f"{id_prefix}:{row.device}:{row.seq}",
        "basisOfRecord": "MachineObservation",
        "occurrenceStatus": "present",
        "eventDate": when,
        "scientificName": row.label or "",
        "identifiedBy": f"{row.model_name} {row.model_version} (fieldscope automated classifier)",
        "dateIdentified": when,
        "identificationVerificationStatus": "unverified",
        "identificationRemarks": (
            f"automated; score {row.score:.3f}; top-{len(row.top_k)}: {top}; "
            f"model sha256 {row.model_sha256}"
        ),
        "associatedMedia": _media(row, media_url_prefix),
        "recordedBy": f"fieldscope device {row.device}",
        "locationID": row.station,
        "samplingProtocol": "automated light microscopy, fieldscope station",
        "datasetName": dataset_name,
    }


def _meta_xml(delimiter: str) -> str:
    fields = "\n".join(
        f'    <field index="{i}" term="{_DWC}{term}"/>' for i, term in enumerate(DWC_TERMS)
    )
    tab = "\\t" if delimiter == "\t" else delimiter
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<archive xmlns="http://rs.tdwg.org/dwc/text/" metadata="">\n'
        f'  <core encoding="UTF-8" fieldsTerminatedBy="{tab}" linesTerminatedBy="\\n" '
        'fieldsEnclosedBy="" ignoreHeaderLines="1" '
        'rowType="http://rs.tdwg.org/dwc/terms/Occurrence">\n'
        "    <files><location>occurrence.txt</location></files>\n"
        '    <id index="0"/>\n'
        f"{fields}\n"
        "  </core>\n"
        "</archive>\n"
    )


def _clean_tsv(value: str) -> str:
    # Darwin Core text files here are unquoted: a tab or newline inside a value would
    # shift every following column, so they become spaces.
    return value.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def _write_dwc_table(records: Iterable[dict[str, str]], fh: TextIO, delimiter: str) -> int:
    n = 0
    if delimiter == ",":
        writer = csv.DictWriter(fh, fieldnames=DWC_TERMS, lineterminator="\n")
        writer.writeheader()
        for record in records:
            writer.writerow(record)
            n += 1
        return n
    fh.write("\t".join(DWC_TERMS) + "\n")
    for record in records:
        fh.write("\t".join(_clean_tsv(record[t]) for t in DWC_TERMS) + "\n")
        n += 1
    return n


# --- EcoTaxa --------------------------------------------------------------------------------------


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
                _clean_tsv(v) if kind == "[f]" else escape_formula(_clean_tsv(v))
                for v, (_, kind) in zip(_ecotaxa_values(row), ECOTAXA_COLUMNS, strict=True)
            )
            fh.write("\t".join(values) + "\n")
            n += 1
            without_image += row.archived_path is None
    return n, without_image


# --- entry point ----------------------------------------------------------------------------------


def export(
    store: Store,
    fmt: str,
    out: Path,
    filters: Filters | None = None,
    *,
    id_prefix: str = "fieldscope",
    media_url_prefix: str | None = None,
    dataset_name: str = "",
    progress: Callable[[int], None] | None = None,
) -> ExportSummary:
    """Write the identifications matching ``filters`` to ``out`` in format ``fmt``.

    ``id_prefix`` namespaces Darwin Core ``occurrenceID`` (``{prefix}:{device}:{seq}``;
    use your institution's, e.g. a URN, to make them globally unique);
    ``media_url_prefix`` turns archived image paths into URLs
    (``{prefix}/{station}/{device}/{day}/{file}``).

    Raises:
        ExportError: unknown format or unwritable output.
        MissingDependencyError: Parquet without pyarrow.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give a file name")

    def rows() -> Iterator[IdentificationRow]:
        chosen = filters if filters is not None else Filters()
        for i, row in enumerate(store.iter_identifications(chosen), start=1):
            if progress is not None and i % 10_000 == 0:
                progress(i)
            yield row

    if fmt == "csv":
        with _atomic(out) as tmp:
            n = _write_csv(rows(), tmp)
        return ExportSummary(out, fmt, n)
    if fmt == "parquet":
        with _atomic(out) as tmp:
            n = _write_parquet(rows(), tmp)
        return ExportSummary(out, fmt, n)
    if fmt == "ecotaxa":
        with _atomic(out) as tmp:
            n, without_image = _write_ecotaxa(rows(), tmp)
        notes: tuple[str, ...] = ()
        if without_image:
            notes = (
                f"{without_image} object(s) have no archived image (img_file_name is empty); "
                "EcoTaxa imports an object with its image: keep images on the stations "
                "(archive mode all) or filter these out",
            )
        return ExportSummary(out, fmt, n, notes=notes)
    # Darwin Core
    skipped = 0

    def records() -> Iterator[dict[str, str]]:
        nonlocal skipped
        for row in rows():
            if row.status != "ok" or row.label is None:
                skipped += 1
                continue
            yield _dwc_record(row, id_prefix, media_url_prefix, dataset_name)

    why = "uncertain or rejected captures name no taxon, so they are no occurrence"
    if out.suffix.lower() == ".zip":
        with _atomic(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            with (
                zf.open("occurrence.txt", "w") as raw,
                io.TextIOWrapper(raw, encoding="utf-8", newline="") as fh,
            ):
                n = _write_dwc_table(records(), fh, "\t")
            zf.writestr("meta.xml", _meta_xml("\t"))
        return ExportSummary(out, fmt, n, skipped, why if skipped else "")
    delimiter = "," if out.suffix.lower() == ".csv" else "\t"
    with _atomic(out) as tmp, tmp.open("w", encoding="utf-8", newline="") as text:
        n = _write_dwc_table(records(), text, delimiter)
    return ExportSummary(out, fmt, n, skipped, why if skipped else "")
