"""The taxonomy of a model's labels: ``taxa.csv``, read once and carried in the bundle.

A label is a class folder's name (``copepod_calanoid``); an export for GBIF or EcoTaxa
needs the taxon it stands for (``Calanoida``, order, Animalia, WoRMS AphiaID 1100). The
file is given to ``fieldscope train --taxa`` (recorded in the run), carried by
``convert`` into the manifest (``taxa``, schema version 4) and read by
``fieldscope collect export --taxa`` (the file or a bundle folder). A label whose
``is_taxon`` is false (debris, bubbles) is never a Darwin Core occurrence.

``taxa.csv`` is comma-separated UTF-8 (a BOM is accepted) with a header line; the
columns ``label``, ``scientificName``, ``taxonRank``, ``kingdom`` and ``is_taxon`` are
required, ``aphiaID`` (WoRMS) and ``gbifKey`` (the GBIF backbone's taxon key) optional;
column names are matched without regard to case, ``_`` or spaces. This module is part
of the edge only because the manifest holds the taxa; it needs nothing but the stdlib
and msgspec.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar

from msgspec import Meta

from fieldscope.edge.errors import BundleError, FieldscopeError
from fieldscope.edge.wire import WireStruct

__all__ = [
    "TAXA_COLUMNS",
    "TAXON_RANKS",
    "TaxaError",
    "Taxon",
    "check_labels",
    "read_taxa",
    "taxa_by_label",
]

# Darwin Core's recommended taxonRank vocabulary (lower case), the ranks in use for
# plankton and microscopy; anything else is a typo more often than a rank.
TAXON_RANKS: tuple[str, ...] = (
    "domain",
    "kingdom",
    "subkingdom",
    "infrakingdom",
    "phylum",
    "subphylum",
    "infraphylum",
    "superclass",
    "class",
    "subclass",
    "infraclass",
    "superorder",
    "order",
    "suborder",
    "infraorder",
    "superfamily",
    "family",
    "subfamily",
    "tribe",
    "genus",
    "subgenus",
    "species",
    "subspecies",
    "variety",
    "form",
)
REQUIRED_COLUMNS = ("label", "scientificName", "taxonRank", "kingdom", "is_taxon")
OPTIONAL_COLUMNS = ("aphiaID", "gbifKey")
TAXA_COLUMNS: tuple[str, ...] = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
_TRUE = frozenset({"true", "yes", "1", "y", "t"})
_FALSE = frozenset({"false", "no", "0", "n", "f"})
MAX_TAXA_BYTES = 4 * 1024 * 1024

Key = Annotated[int, Meta(ge=1, le=2**31 - 1)]
Name = Annotated[str, Meta(max_length=300)]


class TaxaError(FieldscopeError):
    """``taxa.csv`` cannot be used as given (the message names the file and line)."""


class Taxon(WireStruct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What one label stands for. ``is_taxon`` false: not an organism (debris, a bubble),
    so the name fields may be empty; true: ``scientific_name``, ``taxon_rank`` (one of
    :data:`TAXON_RANKS`) and ``kingdom`` are required."""

    _error: ClassVar[type[FieldscopeError]] = BundleError
    _prefix: ClassVar[str] = "manifest field "
    _where: ClassVar[str] = "taxa"
    _omit_none: ClassVar[frozenset[str]] = frozenset({"aphia_id", "gbif_key"})

    label: Annotated[str, Meta(min_length=1, max_length=300)]
    scientific_name: Name = ""
    taxon_rank: Name = ""
    kingdom: Name = ""
    aphia_id: Annotated[Key | None, Meta(description="WoRMS AphiaID")] = None
    gbif_key: Annotated[Key | None, Meta(description="GBIF backbone taxon key")] = None
    is_taxon: bool = True

    def problems(self) -> list[tuple[str, str]]:
        """A taxon names itself fully; its rank is a known one."""
        if not self.is_taxon:
            return []
        where = f"[{self.label!r}]"
        missing = [
            name
            for name, value in (
                ("scientificName", self.scientific_name),
                ("taxonRank", self.taxon_rank),
                ("kingdom", self.kingdom),
            )
            if not value.strip()
        ]
        if missing:
            return [(where, f"is_taxon is true but {', '.join(missing)} is empty")]
        if self.taxon_rank not in TAXON_RANKS:
            return [(where, f"unknown taxonRank {self.taxon_rank!r}; use one of {_ranks()}")]
        return []

    @property
    def scientific_name_id(self) -> str:
        """Darwin Core ``scientificNameID``: the WoRMS LSID, empty without an AphiaID."""
        if self.aphia_id is None:
            return ""
        return f"urn:lsid:marinespecies.org:taxname:{self.aphia_id}"


def _ranks() -> str:
    return ", ".join(TAXON_RANKS)


def _norm(name: str) -> str:
    return name.strip().lstrip("\ufeff").replace("_", "").replace(" ", "").lower()


def _columns(header: Sequence[str], where: str) -> dict[str, int]:
    """Index of each known column; a missing required one is an error naming them all."""
    wanted = {_norm(c): c for c in TAXA_COLUMNS}
    found: dict[str, int] = {}
    for i, name in enumerate(header):
        canonical = wanted.get(_norm(name))
        if canonical is not None:
            if canonical in found:
                raise TaxaError(f"{where}:1: column {canonical} appears twice")
            found[canonical] = i
    missing = [c for c in REQUIRED_COLUMNS if c not in found]
    if missing:
        raise TaxaError(
            f"{where}:1: missing column(s) {', '.join(missing)}; the header must name "
            f"{', '.join(REQUIRED_COLUMNS)} (optional: {', '.join(OPTIONAL_COLUMNS)})"
        )
    return found


def _flag(text: str, where: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise TaxaError(f"{where}: is_taxon must be true or false, got {text!r}")


def _key(text: str, column: str, where: str) -> int | None:
    value = text.strip()
    if not value:
        return None
    # isascii: "1100²" is a digit string to str.isdigit but not a number to int().
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) < 2**31:
        raise TaxaError(f"{where}: {column} must be a positive whole number, got {text!r}")
    return int(value)


def _taxon(cells: list[str], cols: Mapping[str, int], where: str) -> Taxon:
    def cell(name: str) -> str:
        i = cols.get(name)
        return "" if i is None or i >= len(cells) else cells[i].strip()

    try:
        return Taxon(
            label=cell("label"),
            scientific_name=cell("scientificName"),
            taxon_rank=cell("taxonRank").lower(),
            kingdom=cell("kingdom"),
            aphia_id=_key(cell("aphiaID"), "aphiaID", where),
            gbif_key=_key(cell("gbifKey"), "gbifKey", where),
            is_taxon=_flag(cell("is_taxon"), where),
        )
    except BundleError as exc:
        text = str(exc).removeprefix(Taxon._prefix).removeprefix("taxa")
        raise TaxaError(f"{where}: {text}") from None


def _text(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_TAXA_BYTES + 1)
    except OSError as exc:
        raise TaxaError(f"cannot read the taxa file {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_TAXA_BYTES:
        raise TaxaError(f"{path}: larger than {MAX_TAXA_BYTES} bytes; is it a taxa.csv?")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TaxaError(
            f"{path}: not UTF-8 ({exc.reason} at byte {exc.start}); save as UTF-8"
        ) from None


def parse_taxa(text: str, where: str) -> tuple[Taxon, ...]:
    """The taxa of a ``taxa.csv`` text; ``where`` names it in errors (``file:line``)."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        raise TaxaError(f"{where}: empty; the header must name {', '.join(REQUIRED_COLUMNS)}")
    cols = _columns(header, where)
    taxa: list[Taxon] = []
    first_line: dict[str, int] = {}
    for cells in reader:
        line = reader.line_num
        if not any(c.strip() for c in cells):
            continue
        taxon = _taxon(cells, cols, f"{where}:{line}")
        if taxon.label in first_line:
            raise TaxaError(
                f"{where}:{line}: duplicate label {taxon.label!r} (first on line "
                f"{first_line[taxon.label]}); give each label one row"
            )
        first_line[taxon.label] = line
        taxa.append(taxon)
    if not taxa:
        raise TaxaError(f"{where}: no rows after the header; list one row per label")
    return tuple(taxa)


def read_taxa(path: Path, labels: Sequence[str] | None = None) -> tuple[Taxon, ...]:
    """Read ``taxa.csv``; with ``labels`` (the model's classes) every row must name one.

    Raises:
        TaxaError: unreadable file, missing column, bad value, unknown rank, duplicate
            label, or a label the model does not have; the message says file and line.
    """
    taxa = parse_taxa(_text(Path(path)), str(path))
    if labels is not None:
        check_labels(taxa, labels, str(path))
    return taxa


def check_labels(taxa: Iterable[Taxon], labels: Sequence[str], where: str) -> list[str]:
    """Refuse taxa whose label is not one of ``labels``; return the labels without a taxon
    (an export uses those labels as names, which the caller may want to say)."""
    known = set(labels)
    mapped = {t.label for t in taxa}
    unknown = sorted(mapped - known)
    if unknown:
        raise TaxaError(
            f"{where}: label(s) not among the model's classes: {', '.join(unknown)} "
            f"(the classes are: {', '.join(labels)}); correct or remove those rows"
        )
    return [label for label in labels if label not in mapped]


def taxa_by_label(taxa: Iterable[Taxon]) -> dict[str, Taxon]:
    """Label -> taxon, for an export's lookups."""
    return {t.label: t for t in taxa}


def taxa_table(taxa: Iterable[Taxon]) -> list[dict[str, Any]]:
    """The JSON form (a run's ``taxa.json``, the manifest's ``taxa``)."""
    return [t.to_dict() for t in taxa]
