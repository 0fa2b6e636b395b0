"""EcoTaxa: the TSV EcoTaxa imports — a header line, then a line of types (``[t]``
text, ``[f]`` number), one object per line. Labelled identifications are
``predicted`` in their category, so a person validates them in EcoTaxa; uncertain and
rejected ones are left unclassified.

A segmenting station's objects carry EcoTaxa's (ZooProcess') object features, in pixels
as EcoTaxa expects them, with ``process_pixel`` the µm per pixel that turns them into
sizes: ``object_bx``/``object_by``/``object_width``/``object_height`` (the box),
``object_area``, ``object_perim.``, ``object_major``, ``object_minor``,
``object_equivalent_diameter`` (the ESD), ``object_eccentricity``, ``object_solidity``
and ``object_mean`` (mean grey level), plus ``object_esd_um`` and ``object_area_um2``
already in µm. A frame in which nothing was found is no object: it is left out (counted
as skipped).

``sample_id`` is the sample the station was on (the ``sample`` command), else the
station; ``object_lat``/``object_lon`` are the site's decimal degrees (WGS84) and
``object_depth_min``/``object_depth_max`` its depth in metres, empty when unknown.
``acq_id`` is the sample and the device (EcoTaxa refuses an acquisition shared between
samples), ``process_id`` the model that identified the object.

Categories: the latest review decides (:mod:`fieldscope.collect.export.taxonomy`). A
reviewed object is ``validated`` in the reviewer's label (``object_annotation_person_name``
and ``_date``/``_time`` of the review; "not a taxon" becomes EcoTaxa's ``not-living``),
an unreviewed labelled one ``predicted``; with ``--taxa`` the category is the label's
``scientificName``, which EcoTaxa matches against its taxonomy on import.

Encoding: EcoTaxa reads an import TSV as Latin-1 unless it starts with a UTF-8 byte
order mark (``ecotaxa_back``, ``BO/TSVFile.py``: ``open(..., encoding='latin_1')``, then
``utf-8-sig`` when the first three characters are the BOM), so the TSV is written as
UTF-8 *with* a BOM: ``µm`` and accented names arrive intact.

A ``.zip`` output is an import bundle: ``ecotaxa_<name>.tsv`` with the images beside it
in ``images/``, found in ``--archive`` as the ``folders`` export finds them; PNG and
JPEG are packed as they are, BMP and TIFF converted to PNG (OpenCV), since EcoTaxa takes
only those. ``img_file_name`` is filled for every object whose image was found."""

from __future__ import annotations

import io
import math
import shutil
import tempfile
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
    escape_formula,
    unreviewed,
)
from fieldscope.collect.export.ecotaxa_images import ImagePacker
from fieldscope.collect.export.taxonomy import Identified, Naming, identified
from fieldscope.collect.store import AnnotationRow, IdentificationRow

__all__ = ["ECOTAXA_COLUMNS", "FORMAT", "NOT_LIVING", "write", "write_annotated"]

# EcoTaxa's category for what is no organism (a review of "not a taxon").
NOT_LIVING = "not-living"
_BOM = "\ufeff"

ECOTAXA_COLUMNS: tuple[tuple[str, str], ...] = (
    ("img_file_name", "[t]"),
    ("object_id", "[t]"),
    ("object_date", "[t]"),
    ("object_time", "[t]"),
    ("object_annotation_category", "[t]"),
    ("object_annotation_status", "[t]"),
    ("object_annotation_person_name", "[t]"),
    ("object_annotation_date", "[t]"),
    ("object_annotation_time", "[t]"),
    ("object_fieldscope_label", "[t]"),
    ("object_score", "[f]"),
    ("object_fieldscope_status", "[t]"),
    ("object_model", "[t]"),
    ("object_image_sha256", "[t]"),
    ("sample_id", "[t]"),
    ("acq_id", "[t]"),
    ("process_id", "[t]"),
    ("object_lat", "[f]"),
    ("object_lon", "[f]"),
    ("object_depth_min", "[f]"),
    ("object_depth_max", "[f]"),
    # A segmenting station's object (empty for a one-frame station): pixels, and µm.
    ("object_frame_id", "[t]"),
    ("object_index", "[f]"),
    ("object_touches_border", "[f]"),
    ("object_bx", "[f]"),
    ("object_by", "[f]"),
    ("object_width", "[f]"),
    ("object_height", "[f]"),
    ("object_area", "[f]"),
    ("object_perim.", "[f]"),
    ("object_major", "[f]"),
    ("object_minor", "[f]"),
    ("object_equivalent_diameter", "[f]"),
    ("object_eccentricity", "[f]"),
    ("object_solidity", "[f]"),
    ("object_mean", "[f]"),
    ("object_area_um2", "[f]"),
    ("object_esd_um", "[f]"),
    ("process_pixel", "[f]"),
)
_OBJECT_FEATURES = 18  # the columns above from object_frame_id on


def _number(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}".rstrip("0").rstrip(".")


def _object_values(row: IdentificationRow) -> list[str]:
    """EcoTaxa's object features of the row (see the module docstring), or blanks."""
    if row.object_index is None or not row.area_px or row.area_um2 is None:
        return [""] * _OBJECT_FEATURES
    um_per_px = math.sqrt(row.area_um2 / row.area_px)

    def px(value: float | None) -> str:
        return "" if value is None else _number(value / um_per_px)

    return [
        row.frame_id or "",
        str(row.object_index),
        "1" if row.touches_border else "0",
        *(str(v) for v in (row.bbox_x, row.bbox_y, row.bbox_width, row.bbox_height)),
        str(row.area_px),
        px(row.perimeter_um),
        px(row.major_axis_um),
        px(row.minor_axis_um),
        px(row.esd_um),
        _number(row.eccentricity, 6),
        _number(row.solidity, 6),
        _number(row.mean_intensity, 3),
        _number(row.area_um2),
        _number(row.esd_um),
        _number(um_per_px, 6),
    ]


def _annotation(who: Identified, naming: Naming) -> list[str]:
    """Category, status, person, date and time of the annotation (see the module)."""
    if who.not_a_taxon:
        category = NOT_LIVING
    elif who.label is None:
        return ["", "", "", "", ""]
    else:
        category = naming.name(who.label)
    if not who.validated or who.reviewed_at is None:
        return [category, "predicted", "", "", ""]
    at = who.reviewed_at
    return [category, "validated", who.reviewer, at.strftime("%Y%m%d"), at.strftime("%H%M%S")]


def _ecotaxa_values(
    row: IdentificationRow, who: Identified, naming: Naming, image: str
) -> list[str]:
    when = row.captured_at
    sample = row.sample_id or row.station
    return [
        image,
        f"{row.device}_{row.seq}",
        when.strftime("%Y%m%d"),
        when.strftime("%H%M%S"),
        *_annotation(who, naming),
        row.label or "",
        "" if row.score is None else f"{row.score:.6f}",
        row.status,
        f"{row.model_name} {row.model_version}",
        row.image_sha256,
        sample,
        f"{sample}_{row.device}",
        f"{row.model_name}_{row.model_version}",
        *(_number(v, 6) for v in (row.decimal_latitude, row.decimal_longitude)),
        *(_number(row.depth_m, 3) for _ in range(2)),
        *_object_values(row),
    ]


def _objects(
    annotated: Iterable[tuple[IdentificationRow, AnnotationRow | None]], skipped: list[int]
) -> Iterator[tuple[IdentificationRow, AnnotationRow | None]]:
    """The rows that are objects: a segmented frame without any is counted in skipped."""
    for row, review in annotated:
        if row.objects_kept == 0:
            skipped[0] += 1
            continue
        yield row, review


def _header(fh: TextIO) -> None:
    fh.write(_BOM)
    fh.write("\t".join(name for name, _ in ECOTAXA_COLUMNS) + "\n")
    fh.write("\t".join(kind for _, kind in ECOTAXA_COLUMNS) + "\n")


def _write_ecotaxa(
    annotated: Iterable[tuple[IdentificationRow, AnnotationRow | None]],
    fh: TextIO,
    naming: Naming,
    images: ImagePacker | None,
) -> tuple[int, int]:
    n = without_image = 0
    _header(fh)
    for row, review in annotated:
        image = "" if images is None else images.add(row)
        if images is None and row.archived_path is not None:
            image = PurePosixPath(row.archived_path).name
        values = _ecotaxa_values(row, identified(row, review), naming, image)
        cells = (
            clean_tsv(v) if kind == "[f]" else escape_formula(clean_tsv(v))
            for v, (_, kind) in zip(values, ECOTAXA_COLUMNS, strict=True)
        )
        fh.write("\t".join(cells) + "\n")
        n += 1
        without_image += not image
    return n, without_image


def _write_zip(
    annotated: Iterable[tuple[IdentificationRow, AnnotationRow | None]],
    tmp: Path,
    out: Path,
    options: ExportOptions,
    naming: Naming,
) -> tuple[int, int, list[str]]:
    # The TSV is written aside while the images go into the zip (one writer at a time),
    # then copied in; a temporary file keeps a large export out of memory.
    with (
        zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf,
        tempfile.TemporaryFile(dir=tmp.parent) as table,
    ):
        images = ImagePacker(zf, options.archive)
        fh = io.TextIOWrapper(table, encoding="utf-8", newline="")
        n, without_image = _write_ecotaxa(annotated, fh, naming, images)
        fh.flush()
        table.seek(0)
        with zf.open(f"ecotaxa_{out.stem}.tsv", "w") as raw:
            shutil.copyfileobj(table, raw)
        fh.detach()
    return n, without_image, images.notes()


def write_annotated(
    annotated: Iterable[tuple[IdentificationRow, AnnotationRow | None]],
    out: Path,
    options: ExportOptions,
) -> ExportSummary:
    """Every object with its latest review; a ``.zip`` is a bundle with the images."""
    skipped = [0]
    naming = Naming(options.taxa)
    objects = _objects(annotated, skipped)
    notes: list[str] = []
    with atomic(out) as tmp:
        if out.suffix.lower() == ".zip":
            n, without_image, notes = _write_zip(objects, tmp, out, options, naming)
        else:
            with tmp.open("w", encoding="utf-8", newline="") as fh:
                n, without_image = _write_ecotaxa(objects, fh, naming, None)
    if without_image:
        notes.append(
            f"{without_image} object(s) have no image (img_file_name is empty); EcoTaxa "
            "imports an object with its image: keep images on the stations (archive mode "
            "all), give --archive with a .zip output, or filter these out"
        )
    why = "frames in which the station found no objects (no object to import)"
    return ExportSummary(
        out, "ecotaxa", n, skipped[0], why if skipped[0] else "", (*notes, *naming.notes())
    )


# Every row as an EcoTaxa object, without reviews (see :func:`write_annotated`).
write = unreviewed(write_annotated)


FORMAT = ExportFormat(
    "ecotaxa",
    ".zip",
    write,
    "EcoTaxa import: a .zip with the TSV and images (or a .tsv alone)",
    annotated=write_annotated,
)
