"""What every export format shares: the summary, errors, atomic writing, time and
formula handling, the store's column types, and the :class:`ExportFormat` entry.

A format is a module of this package with a ``write(rows, out, options)`` function
and a ``FORMAT`` entry; ``registry.py`` lists them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from fieldscope.collect.store import RECORD_COLUMNS, AnnotationRow, IdentificationRow
from fieldscope.collect.store.object_columns import (
    OBJECT_BOOL_COLUMNS,
    OBJECT_FLOAT_COLUMNS,
    OBJECT_INT_COLUMNS,
)
from fieldscope.collect.store.site_columns import SITE_FLOAT_COLUMNS
from fieldscope.edge.errors import FieldscopeError
from fieldscope.edge.taxa import Taxon

if TYPE_CHECKING:
    from fieldscope.collect.export.eml import DatasetMetadata

__all__ = [
    "BOOL_COLUMNS",
    "CSV_COLUMNS",
    "ExportError",
    "ExportFormat",
    "ExportOptions",
    "ExportSummary",
    "atomic",
    "clean_tsv",
    "escape_formula",
    "parse_time",
    "unescape_formula",
    "unreviewed",
    "utc_text",
    "write_counted",
]

CSV_COLUMNS: tuple[str, ...] = RECORD_COLUMNS
INT_COLUMNS = (
    frozenset({"seq", "image_width", "image_height", "message_version"}) | OBJECT_INT_COLUMNS
)
BOOL_COLUMNS = OBJECT_BOOL_COLUMNS
FLOAT_COLUMNS = frozenset(
    {
        "score",
        "quality_sharpness",
        "quality_exposure",
        "capture_ms",
        "quality_ms",
        "preprocess_ms",
        "inference_ms",
        "total_ms",
        *OBJECT_FLOAT_COLUMNS,
        *SITE_FLOAT_COLUMNS,
    }
)
TIME_COLUMNS = frozenset({"captured_at", "received_at"})


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


@dataclass(frozen=True)
class ExportOptions:
    """What the user may set beyond the format: Darwin Core's ``occurrenceID`` prefix,
    the URL prefix of archived images, the dataset's name, the image archive."""

    id_prefix: str = "fieldscope"
    media_url_prefix: str | None = None
    dataset_name: str = ""
    # The folders export: the copies of the stations' image archives, and whether the
    # captures reviewed as "not a taxon" get a folder of their own.
    archive: Path | None = None
    not_a_taxon: bool = False
    # Darwin Core and EcoTaxa: what each label stands for (None: labels are names), the
    # dashboard's address for image URLs, and the dataset's metadata (Darwin Core EML).
    taxa: tuple[Taxon, ...] | None = None
    media_base_url: str | None = None
    metadata: DatasetMetadata | None = None


# How a format writes rows (``write``), and rows each with its latest review, if any
# (``annotated``: Darwin Core, EcoTaxa).
RowWriter = Callable[[Iterable[IdentificationRow], Path, ExportOptions], ExportSummary]
AnnotatedWriter = Callable[
    [Iterable[tuple[IdentificationRow, AnnotationRow | None]], Path, ExportOptions],
    ExportSummary,
]


@dataclass(frozen=True)
class ExportFormat:
    """One export format as the registry knows it: ``write(rows, out, options)`` writes
    the rows to ``out`` (atomically) and says what it wrote; ``suffix`` is the usual
    file suffix (``.csv``), ``summary`` one line for help texts; ``reviewed``, when
    set, is used instead of ``write`` (see below)."""

    name: str
    suffix: str
    write: RowWriter
    summary: str = ""
    # A format of reviewed identifications gets each one with its latest review
    # (``Store.iter_reviewed``) instead, and writes a folder.
    reviewed: (
        Callable[
            [Iterable[tuple[IdentificationRow, AnnotationRow]], Path, ExportOptions], ExportSummary
        ]
        | None
    ) = None
    # A format that takes each row with its latest review, if any (Darwin Core, EcoTaxa).
    annotated: AnnotatedWriter | None = None


def unreviewed(annotated: AnnotatedWriter) -> RowWriter:
    """The ``write`` of a format that takes reviews (Darwin Core, EcoTaxa): its
    ``annotated`` writer given the rows without any review."""

    def write(
        rows: Iterable[IdentificationRow], out: Path, options: ExportOptions
    ) -> ExportSummary:
        return annotated(((row, None) for row in rows), out, options)

    return write


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


def utc_text(value: datetime) -> str:
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
def atomic(path: Path, binary: bool = False) -> Iterator[Path]:
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


def write_counted(
    name: str,
    out: Path,
    write_rows: Callable[[Iterable[IdentificationRow], Path], int],
    rows: Iterable[IdentificationRow],
) -> ExportSummary:
    """``write_rows(rows, tmp)`` into a temporary file renamed to ``out``; the summary
    of a format that writes every row (``write_rows`` returns how many)."""
    with atomic(out) as tmp:
        n = write_rows(rows, tmp)
    return ExportSummary(out, name, n)


def clean_tsv(value: str) -> str:
    """A value for an unquoted tab-separated file: a tab or newline inside it would
    shift every following column, so they become spaces."""
    return value.replace("\t", " ").replace("\r", " ").replace("\n", " ")
