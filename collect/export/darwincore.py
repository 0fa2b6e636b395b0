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
notes as ``eventRemarks``. Terms a row has no value for are empty."""

from __future__ import annotations

import csv
import io
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import TextIO

from fieldscope.collect.export.base import (
    ExportFormat,
    ExportOptions,
    ExportSummary,
    atomic,
    clean_tsv,
    utc_text,
)
from fieldscope.collect.store import IdentificationRow

__all__ = ["DWC_TERMS", "FORMAT", "write"]

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


def _media(row: IdentificationRow, media_url_prefix: str | None) -> str:
    if row.archived_path is None:
        return ""
    if media_url_prefix is None:
        return row.archived_path
    parts = PurePosixPath(row.archived_path).parts[-2:]
    return "/".join([media_url_prefix.rstrip("/"), row.station, row.device, *parts])


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


def _dwc_record(
    row: IdentificationRow, id_prefix: str, media_url_prefix: str | None, dataset_name: str
) -> dict[str, str]:
    top = ", ".join(f"{label} {score:.3f}" for label, score in row.top_k)
    when = utc_text(row.captured_at)
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
        "recordedBy": " | ".join(
            filter(None, (row.sample_operator, f"fieldscope device {row.device}"))
        ),
        "locationID": row.station,
        "samplingProtocol": "automated light microscopy, fieldscope station",
        "datasetName": dataset_name,
        **_place_and_event(row),
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


_WHY_SKIPPED = "uncertain or rejected captures name no taxon, so they are no occurrence"


def write(rows: Iterable[IdentificationRow], out: Path, options: ExportOptions) -> ExportSummary:
    """The labelled rows as occurrences; the others are counted in ``skipped``."""
    skipped = 0

    def records() -> Iterator[dict[str, str]]:
        nonlocal skipped
        for row in rows:
            if row.status != "ok" or row.label is None:
                skipped += 1
                continue
            yield _dwc_record(
                row, options.id_prefix, options.media_url_prefix, options.dataset_name
            )

    if out.suffix.lower() == ".zip":
        with atomic(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            with (
                zf.open("occurrence.txt", "w") as raw,
                io.TextIOWrapper(raw, encoding="utf-8", newline="") as fh,
            ):
                n = _write_dwc_table(records(), fh, "\t")
            zf.writestr("meta.xml", _meta_xml("\t"))
    else:
        delimiter = "," if out.suffix.lower() == ".csv" else "\t"
        with atomic(out) as tmp, tmp.open("w", encoding="utf-8", newline="") as text:
            n = _write_dwc_table(records(), text, delimiter)
    return ExportSummary(out, "darwin-core", n, skipped, _WHY_SKIPPED if skipped else "")


FORMAT = ExportFormat(
    "darwin-core", ".zip", write, "occurrences of labelled identifications (GBIF)"
)
