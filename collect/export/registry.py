"""The export formats: the one list of their names, and :func:`export`.

A format is a module of this package that declares ``write(rows, out, options)`` and a
``FORMAT`` entry (:class:`~fieldscope.collect.export.base.ExportFormat`);
:data:`EXPORTERS` lists the built-in ones and the command line offers exactly those.
To add one, write that module and add its ``FORMAT`` here. :data:`EXPORTERS` is
immutable: a test or a program with a format of its own passes
``EXPORTERS.adding(name, entry)`` to :func:`export`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from fieldscope.collect.export import csvfile, darwincore, ecotaxa, folders, parquet
from fieldscope.collect.export.base import ExportError, ExportFormat, ExportOptions, ExportSummary
from fieldscope.collect.export.eml import DatasetMetadata
from fieldscope.collect.export.taxonomy import with_reviews
from fieldscope.collect.store import Filters, IdentificationRow, Store
from fieldscope.edge.registry import Registry
from fieldscope.edge.taxa import Taxon

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
    taxa: Sequence[Taxon] | None = None,
    media_base_url: str | None = None,
    metadata: DatasetMetadata | None = None,
) -> ExportSummary:
    """Write the identifications matching ``filters`` to ``out`` in format ``fmt``.

    ``id_prefix``: Darwin Core ``occurrenceID`` is ``{prefix}:{device}:{seq}`` (use your
    institution's URN to make them unique); ``media_url_prefix`` turns archived paths
    into URLs ``{prefix}/{station}/{device}/{day}/{file}``, ``media_base_url`` (the
    dashboard) into ``{url}/preview/{id}``. ``archive``: the copies of the stations'
    image archives (``folders``, and the images of an ``ecotaxa`` .zip); ``not_a_taxon``:
    ``folders`` keeps those. ``taxa`` name the labels (None: labels are names),
    ``metadata`` is Darwin Core's EML; Darwin Core and EcoTaxa read the latest reviews.

    Raises:
        ExportError: unknown format (the message lists the known ones) or unwritable
            output.
        MissingDependencyError: Parquet without pyarrow.
    """
    chosen = formats.lookup(fmt, ExportError)
    out = Path(out)
    chosen_taxa = None if taxa is None else tuple(taxa)
    options = ExportOptions(id_prefix, media_url_prefix, dataset_name, archive, not_a_taxon)
    options = replace(options, taxa=chosen_taxa, media_base_url=media_base_url, metadata=metadata)
    if chosen.reviewed is not None:
        return chosen.reviewed(store.iter_reviewed(filters or Filters()), out, options)
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give a file name")
    if chosen.annotated is not None:
        rows = _rows(store, filters, progress)
        return chosen.annotated(with_reviews(rows, store.latest_annotations), out, options)
    return chosen.write(_rows(store, filters, progress), out, options)
