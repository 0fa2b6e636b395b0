"""The export formats: the one list of their names, and :func:`export`.

A format is a module of this package that declares ``write(rows, out, options)`` and a
``FORMAT`` entry (:class:`~fieldscope.collect.export.base.ExportFormat`);
:data:`EXPORTERS` lists the built-in ones and the command line offers exactly those.
To add one, write that module and add its ``FORMAT`` here. :data:`EXPORTERS` is
immutable: a test or a program with a format of its own passes
``EXPORTERS.adding(name, entry)`` to :func:`export`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from fieldscope.collect.export import csvfile, darwincore, ecotaxa, folders, parquet
from fieldscope.collect.export.base import ExportError, ExportFormat, ExportOptions, ExportSummary
from fieldscope.collect.store import Filters, IdentificationRow, Store
from fieldscope.edge.registry import Registry

__all__ = ["EXPORTERS", "FORMATS", "export"]

EXPORTERS: Registry[ExportFormat] = Registry(
    "export format",
    (
        (f.name, f)
        for f in (csvfile.FORMAT, parquet.FORMAT, darwincore.FORMAT, ecotaxa.FORMAT, folders.FORMAT)
    ),
)
FORMATS: tuple[str, ...] = EXPORTERS.names()


def _rows(
    store: Store, filters: Filters | None, progress: Callable[[int], None] | None
) -> Iterator[IdentificationRow]:
    """The matching rows, in the store's chunks; ``progress`` hears every 10,000th."""
    chosen = filters if filters is not None else Filters()
    for i, row in enumerate(store.iter_identifications(chosen), start=1):
        if progress is not None and i % 10_000 == 0:
            progress(i)
        yield row


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
    formats: Registry[ExportFormat] = EXPORTERS,
    archive: Path | None = None,
    not_a_taxon: bool = False,
) -> ExportSummary:
    """Write the identifications matching ``filters`` to ``out`` in format ``fmt``.

    ``id_prefix`` namespaces Darwin Core ``occurrenceID`` (``{prefix}:{device}:{seq}``;
    use your institution's, e.g. a URN, to make them globally unique);
    ``media_url_prefix`` turns archived image paths into URLs
    (``{prefix}/{station}/{device}/{day}/{file}``). ``formats`` is the registry to
    look ``fmt`` up in. ``archive`` (the copies of the stations' image archives) and
    ``not_a_taxon`` (a folder for those) are for ``folders``, which writes the
    reviewed identifications matching ``filters`` into the new folder ``out``.

    Raises:
        ExportError: unknown format (the message lists the known ones) or unwritable
            output.
        MissingDependencyError: Parquet without pyarrow.
    """
    chosen = formats.lookup(fmt, ExportError)
    out = Path(out)
    options = ExportOptions(
        id_prefix, media_url_prefix, dataset_name, archive=archive, not_a_taxon=not_a_taxon
    )
    if chosen.reviewed is not None:
        return chosen.reviewed(store.iter_reviewed(filters or Filters()), out, options)
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give a file name")
    return chosen.write(_rows(store, filters, progress), out, options)
