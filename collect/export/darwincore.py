"""Darwin Core: occurrence records (``basisOfRecord`` ``MachineObservation``) of the
identifications with a label (status ``ok``). An uncertain or rejected capture names
no taxon, so it is no occurrence; those are counted and left out. An ``.zip`` output
is a Darwin Core Archive (``occurrence.txt`` plus ``meta.xml``), a ``.csv`` one is
comma-separated, anything else tab-separated.

Where a station has a ``[site]`` and a sample was running, each occurrence carries them:
``decimalLatitude``/``decimalLongitude`` with ``geodeticDatum`` and
``coordinateUncertaintyInMeters``, ``countryCode``, ``locality`` (the site's locality,
else its name), the depth as ``minimumDepthInMeters`` = ``maximumDepthInMeters`` (or the
elevation as ``minimum``/``maximumElevationInMeters``), the sample as ``eventID`` with
its volume as ``sampleSizeValue`` in ``litre``, its operator in ``recordedBy`` and its
notes as ``eventRemarks``. Terms a row has no value for are empty.

Names: with ``--taxa`` (:mod:`fieldscope.collect.export.taxonomy`) a label becomes its
``scientificName`` with ``taxonRank`` and ``kingdom``, ``scientificNameID`` the WoRMS
LSID (``urn:lsid:marinespecies.org:taxname:<AphiaID>``) and ``taxonID`` the GBIF
backbone's species URL (``https://www.gbif.org/species/<key>``); a label whose row says
``is_taxon`` false is never an occurrence. Without taxa the label is the name.

Reviews: the latest review of an identification decides. A validated one is
``identificationVerificationStatus`` ``verified``, ``identifiedBy`` the reviewer and
``dateIdentified`` the review's time, and its label counts even where the station was
uncertain; one reviewed as "not a taxon" is no occurrence. Unreviewed ones are
``unverified``, identified by the model. ``associatedMedia`` is the dashboard's image
URL (``{media_base_url}/preview/{id}``) when ``--media-base-url`` is given.

A ``.zip`` with ``--metadata`` carries ``eml.xml`` (:mod:`fieldscope.collect.export.eml`),
named by ``meta.xml``'s ``metadata`` attribute."""

from __future__ import annotations

import csv
import io
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import TextIO

from fieldscope.collect.export.base import (
    ExportError,
    ExportFormat,
    ExportOptions,
    ExportSummary,
    atomic,
    clean_tsv,
    unreviewed,
    utc_text,
)
from fieldscope.collect.export.eml import eml_xml
from fieldscope.collect.export.taxonomy import Identified, Naming, identified
from fieldscope.collect.store import AnnotationRow, IdentificationRow

__all__ = ["DWC_TERMS", "FORMAT", "write", "write_annotated"]

_DWC = "http://rs.tdwg.org/dwc/terms/"
_GBIF_SPECIES = "https://www.gbif.org/species/"
DWC_TERMS: tuple[str, ...] = (
    "occurrenceID",
    "basisOfRecord",
    "occurrenceStatus",
    "eventDate",
    "scientificName",
    "scientificNameID",
    "taxonID",
    "taxonRank",
    "kingdom",
    "identifiedBy",
    "dateIdentified",
    "identificationVerificationStatus",
    "identificationRemarks",
    "associatedMedia",
    "recordedBy",
    "locationID",
    "samplingProtocol",
    "datasetName",
    "eventID",
    "decimalLatitude",
    "decimalLongitude",
    "geodeticDatum",
    "coordinateUncertaintyInMeters",
    "countryCode",
    "locality",
    "minimumDepthInMeters",
    "maximumDepthInMeters",
    "minimumElevationInMeters",
    "maximumElevationInMeters",
    "sampleSizeValue",
    "sampleSizeUnit",
    "eventRemarks",
)


def _media(row: IdentificationRow, options: ExportOptions) -> str:
    # The dashboard's /preview serves the uploaded copy (upload_sha256) or the archive's.
    if options.media_base_url and (row.archived_path or row.upload_sha256):
        return f"{options.media_base_url.rstrip('/')}/preview/{row.id}"
    if row.archived_path is None:
        return ""
    if options.media_url_prefix is None:
        return row.archived_path
    parts = PurePosixPath(row.archived_path).parts[-2:]
    return "/".join([options.media_url_prefix.rstrip("/"), row.station, row.device, *parts])


def _text(value: float | str | None) -> str:
    return "" if value is None else str(value)


def _place_and_event(row: IdentificationRow) -> dict[str, str]:
    """The site and sample terms (see the module docstring); empty where unknown."""
    depth, elevation = _text(row.depth_m), _text(row.elevation_m)
    return {
        "eventID": _text(row.sample_id),
        "decimalLatitude": _text(row.decimal_latitude),
        "decimalLongitude": _text(row.decimal_longitude),
        "geodeticDatum": _text(row.geodetic_datum),
        "coordinateUncertaintyInMeters": _text(row.coordinate_uncertainty_m),
        "countryCode": _text(row.country_code),
        "locality": _text(row.locality or row.site_name),
        "minimumDepthInMeters": depth,
        "maximumDepthInMeters": depth,
        "minimumElevationInMeters": elevation,
        "maximumElevationInMeters": elevation,
        "sampleSizeValue": _text(row.sample_volume_l),
        "sampleSizeUnit": "" if row.sample_volume_l is None else "litre",
        "eventRemarks": _text(row.sample_notes),
    }


def _names(label: str, naming: Naming) -> dict[str, str]:
    """The taxon terms of ``label`` (the label itself as the name where no taxon)."""
    taxon = naming.taxon(label)
    if taxon is None:
        return {"scientificName": label}
    return {
        "scientificName": taxon.scientific_name or label,
        "scientificNameID": taxon.scientific_name_id,
        "taxonID": "" if taxon.gbif_key is None else f"{_GBIF_SPECIES}{taxon.gbif_key}",
        "taxonRank": taxon.taxon_rank,
        "kingdom": taxon.kingdom,
    }


def _identification(row: IdentificationRow, who: Identified) -> dict[str, str]:
    """Who identified it, when, how sure (the review, else the model)."""
    top = ", ".join(f"{label} {score:.3f}" for label, score in row.top_k)
    score = "" if row.score is None else f"score {row.score:.3f}; "
    automated = (
        f"automated: {row.label or row.status}; {score}top-{len(row.top_k)}: {top}; "
        f"model {row.model_name} {row.model_version} sha256 {row.model_sha256}"
    )
    if who.validated and who.reviewed_at is not None:
        return {
            "identifiedBy": who.reviewer,
            "dateIdentified": utc_text(who.reviewed_at),
            "identificationVerificationStatus": "verified",
            "identificationRemarks": f"validated by {who.reviewer}; {automated}",
        }
    return {
        "identifiedBy": f"{row.model_name} {row.model_version} (fieldscope automated classifier)",
        "dateIdentified": utc_text(row.captured_at),
        "identificationVerificationStatus": "unverified",
        "identificationRemarks": automated,
    }


def _dwc_record(
    row: IdentificationRow, who: Identified, naming: Naming, options: ExportOptions
) -> dict[str, str]:
    assert who.label is not None
    record = dict.fromkeys(DWC_TERMS, "")
    record.update(
        {
            "occurrenceID": f"{options.id_prefix}:{row.device}:{row.seq}",
            "basisOfRecord": "MachineObservation",
            "occurrenceStatus": "present",
            "eventDate": utc_text(row.captured_at),
            **_names(who.label, naming),
            **_identification(row, who),
            "associatedMedia": _media(row, options),
            "recordedBy": " | ".join(
                filter(None, (row.sample_operator, f"fieldscope device {row.device}"))
            ),
            "locationID": row.station,
            "samplingProtocol": "automated light microscopy, fieldscope station",
            "datasetName": options.dataset_name,
            **_place_and_event(row),
        }
    )
    return record


def _meta_xml(delimiter: str, metadata: str = "") -> str:
    fields = "\n".join(
        f'    <field index="{i}" term="{_DWC}{term}"/>' for i, term in enumerate(DWC_TERMS)
    )
    tab = "\\t" if delimiter == "\t" else delimiter
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<archive xmlns="http://rs.tdwg.org/dwc/text/" metadata="{metadata}">\n'
        f'  <core encoding="UTF-8" fieldsTerminatedBy="{tab}" linesTerminatedBy="\\n" '
        'fieldsEnclosedBy="" ignoreHeaderLines="1" '
        'rowType="http://rs.tdwg.org/dwc/terms/Occurrence">\n'
        "    <files><location>occurrence.txt</location></files>\n"
        '    <id index="0"/>\n'
        f"{fields}\n"
        "  </core>\n"
        "</archive>\n"
    )


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
        fh.write("\t".join(clean_tsv(record[t]) for t in DWC_TERMS) + "\n")
        n += 1
    return n


_WHY = {
    "no_label": "uncertain or rejected captures nobody validated name no taxon",
    "reviewed_not_a_taxon": "reviewed as not a taxon",
    "not_a_taxon": "their label is no taxon (is_taxon false in the taxa file)",
}


def _records(
    annotated: Iterable[tuple[IdentificationRow, AnnotationRow | None]],
    options: ExportOptions,
    naming: Naming,
    skipped: Counter[str],
) -> Iterator[dict[str, str]]:
    """The occurrences; what is none is counted in ``skipped`` by reason."""
    for row, review in annotated:
        who = identified(row, review)
        if who.label is None:
            skipped["reviewed_not_a_taxon" if who.not_a_taxon else "no_label"] += 1
        elif not naming.is_taxon(who.label):
            skipped["not_a_taxon"] += 1
        else:
            yield _dwc_record(row, who, naming, options)


def _write_zip(records: Iterator[dict[str, str]], tmp: Path, options: ExportOptions) -> int:
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        with (
            zf.open("occurrence.txt", "w") as raw,
            io.TextIOWrapper(raw, encoding="utf-8", newline="") as fh,
        ):
            n = _write_dwc_table(records, fh, "\t")
        if options.metadata is not None:
            zf.writestr("eml.xml", eml_xml(options.metadata))
        zf.writestr("meta.xml", _meta_xml("\t", "eml.xml" if options.metadata else ""))
    return n


def write_annotated(
    annotated: Iterable[tuple[IdentificationRow, AnnotationRow | None]],
    out: Path,
    options: ExportOptions,
) -> ExportSummary:
    """The rows that name a taxon as occurrences; the others are counted in ``skipped``.

    Raises:
        ExportError: ``--metadata`` with an output that is no ``.zip`` (only an archive
            holds eml.xml), or the file cannot be written.
    """
    naming = Naming(options.taxa)
    skipped: Counter[str] = Counter()
    records = _records(annotated, options, naming, skipped)
    if out.suffix.lower() == ".zip":
        with atomic(out) as tmp:
            n = _write_zip(records, tmp, options)
    else:
        if options.metadata is not None:
            raise ExportError(
                f"--metadata goes into a Darwin Core Archive: give --out a .zip, not {out.name}"
            )
        delimiter = "," if out.suffix.lower() == ".csv" else "\t"
        with atomic(out) as tmp, tmp.open("w", encoding="utf-8", newline="") as text:
            n = _write_dwc_table(records, text, delimiter)
    why = "; ".join(f"{count} {_WHY[k]}" for k, count in sorted(skipped.items()))
    return ExportSummary(out, "darwin-core", n, sum(skipped.values()), why, naming.notes())


# The rows as occurrences, without reviews (see :func:`write_annotated`).
write = unreviewed(write_annotated)


FORMAT = ExportFormat(
    "darwin-core",
    ".zip",
    write,
    "occurrences of labelled identifications (GBIF)",
    annotated=write_annotated,
)
