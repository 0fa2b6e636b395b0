"""What an exported identification names: its label after review, and the taxon behind it.

Darwin Core and EcoTaxa need taxa, a station only knows labels. ``--taxa`` gives the
mapping (a ``taxa.csv``, or a bundle folder whose manifest carries one, see
:mod:`fieldscope.edge.taxa`); without it the labels are used as names, as before, and
the export says so. The label an export uses is the latest review's when an expert
reviewed the identification (:class:`Identified`), else the station's prediction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from fieldscope.collect.export.base import ExportError
from fieldscope.collect.store import NOT_A_TAXON, AnnotationRow, IdentificationRow
from fieldscope.edge.errors import FieldscopeError
from fieldscope.edge.taxa import Taxon, read_taxa, taxa_by_label

__all__ = ["Identified", "Naming", "identified", "load_taxa", "with_reviews"]

log = logging.getLogger(__name__)
_BATCH = 500


def load_taxa(path: Path) -> tuple[Taxon, ...]:
    """``--taxa``: a ``taxa.csv``, or a bundle folder whose manifest carries taxa.

    Raises:
        ExportError: the file is malformed (file:line), or the bundle has no taxa.
    """
    path = Path(path)
    try:
        if not path.is_dir():
            return read_taxa(path)
        from fieldscope.edge.bundle import read_bundle

        manifest = read_bundle(path).manifest
    except ExportError:
        raise
    except FieldscopeError as exc:
        raise ExportError(f"--taxa: {exc}") from None
    if not manifest.taxa:
        raise ExportError(
            f"--taxa {path}: the bundle's manifest carries no taxa (the model was trained "
            "without --taxa); give the taxa.csv itself"
        )
    return manifest.taxa


@dataclass(frozen=True)
class Identified:
    """An identification as an export sees it: the label it names (None: none), and
    whether an expert validated it (then ``reviewer`` and ``reviewed_at`` are set)."""

    label: str | None
    validated: bool = False
    reviewer: str = ""
    reviewed_at: datetime | None = None
    not_a_taxon: bool = False


def identified(row: IdentificationRow, review: AnnotationRow | None) -> Identified:
    """The latest review wins; unreviewed, a station's ``ok`` label stands (predicted)."""
    if review is None:
        labelled = row.status == "ok" and row.label is not None
        return Identified(row.label if labelled else None)
    if review.label == NOT_A_TAXON:
        return Identified(None, True, review.reviewer, review.reviewed_at, not_a_taxon=True)
    return Identified(review.label, True, review.reviewer, review.reviewed_at)


Latest = Callable[[Sequence[int]], Mapping[int, AnnotationRow]]


def with_reviews(
    rows: Iterable[IdentificationRow], lookup: Latest
) -> Iterator[tuple[IdentificationRow, AnnotationRow | None]]:
    """Each row with its latest review (``lookup``: ``Store.latest_annotations``), looked
    up in batches so a large export stays a few queries per thousand rows."""
    batch: list[IdentificationRow] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= _BATCH:
            yield from _pair(batch, lookup)
            batch = []
    if batch:
        yield from _pair(batch, lookup)


def _pair(
    batch: Sequence[IdentificationRow], lookup: Latest
) -> Iterator[tuple[IdentificationRow, AnnotationRow | None]]:
    reviews = lookup([r.id for r in batch])
    for row in batch:
        yield row, reviews.get(row.id)


@dataclass
class Naming:
    """Label -> taxon for one export; remembers the labels it had no taxon for."""

    taxa: Sequence[Taxon] | None = None
    _by_label: dict[str, Taxon] = field(init=False)
    _unmapped: set[str] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self._by_label = taxa_by_label(self.taxa or ())

    def taxon(self, label: str) -> Taxon | None:
        found = self._by_label.get(label)
        if found is None:
            self._unmapped.add(label)
        return found

    def is_taxon(self, label: str) -> bool:
        """False only where the taxa file says so (debris, bubbles)."""
        found = self.taxon(label)
        return True if found is None else found.is_taxon

    def name(self, label: str) -> str:
        """The scientific name, or the label itself where no taxon names it."""
        found = self.taxon(label)
        return found.scientific_name if found is not None and found.scientific_name else label

    def notes(self) -> tuple[str, ...]:
        """What the export's log should say about names."""
        if self.taxa is None:
            note = "no --taxa given: the labels are used as scientific names as they are"
        elif self._unmapped:
            missing = ", ".join(sorted(self._unmapped))
            note = f"labels without a row in the taxa file, used as names as they are: {missing}"
        else:
            return ()
        log.info("%s", note)
        return (note,)
