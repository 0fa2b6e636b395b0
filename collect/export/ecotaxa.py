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
``object_depth_min``/``object_depth_max`` its depth in metres, empty when unknown."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
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
        row.sample_id or row.station,
        row.device,
        *(_number(v, 6) for v in (row.decimal_latitude, row.decimal_longitude)),
        *(_number(row.depth_m, 3) for _ in range(2)),
        *_object_values(row),
    ]


def _objects(rows: Iterable[IdentificationRow], skipped: list[int]) -> Iterator[IdentificationRow]:
    """The rows that are objects: a segmented frame without any is counted in skipped."""
    for row in rows:
        if row.objects_kept == 0:
            skipped[0] += 1
            continue
        yield row


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
    skipped = [0]
    with atomic(out) as tmp:
        n, without_image = _write_ecotaxa(_objects(rows, skipped), tmp)
    notes: tuple[str, ...] = ()
    if without_image:
        notes = (
            f"{without_image} object(s) have no archived image (img_file_name is empty); "
            "EcoTaxa imports an object with its image: keep images on the stations "
            "(archive mode all) or filter these out",
        )
    why = "frames in which the station found no objects (no object to import)"
    return ExportSummary(out, "ecotaxa", n, skipped[0], why if skipped[0] else "", notes)


FORMAT = ExportFormat("ecotaxa", ".tsv", write, "the TSV EcoTaxa imports (predicted categories)")
