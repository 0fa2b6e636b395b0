"""Exports read back with independent readers: csv, pyarrow, zipfile/ElementTree."""

from __future__ import annotations

import csv
import os
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import SAMPLE, SITE, received, store_holding

from fieldscope.collect.export import (
    CSV_COLUMNS,
    DWC_TERMS,
    ExportError,
    export,
    parse_time,
    read_csv,
)
from fieldscope.collect.samples import sample_identification
from fieldscope.collect.store import Filters, Store, open_store
from fieldscope.edge.message import Identification

BASE = datetime(2026, 11, 20, 6, 30, tzinfo=UTC)
# What a research group adds to the Darwin Core occurrence core before GBIF accepts it.
DWC_REQUIRED = ("occurrenceID", "basisOfRecord", "eventDate", "scientificName")


def messages() -> list[Identification]:
    return [
        sample_identification(0, device="a", station="s1", label="Amoeba", captured_at=BASE,
                              archived_path="/var/lib/fieldscope/archive/2026-11-20/a-0.png"),
        sample_identification(1, device="a", station="s1", label="Euglena, the green one",
                              captured_at=BASE + timedelta(hours=1)),
        sample_identification(2, device="a", station="s1", label=None, score=0.41,
                              captured_at=BASE + timedelta(hours=2)),
        sample_identification(0, device="b", station="s2", status="rejected",
                              captured_at=BASE + timedelta(days=1)),
        sample_identification(1, device="b", station="s2", label='Vorticella "bell"\tx',
                              captured_at=BASE + timedelta(days=1, hours=1)),
    ]  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with store_holding(tmp_path / "collect.sqlite", messages()) as reader:
        yield reader


def test_csv_round_trips(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "ids.csv"
    summary = export(store, "csv", out)
    assert summary.rows == 5
    rows = read_csv(out)
    originals = {(m.device, m.seq): m for m in messages()}
    assert len(rows) == 5
    for row in rows:
        m = originals[(row["device"], row["seq"])]
        assert row["station"] == m.station
        assert row["captured_at"] == m.captured_at
        assert row["status"] == m.status.value
        assert row["label"] == m.label
        assert row["score"] == m.score
        assert row["top_k"] == tuple((c.label, c.score) for c in m.top_k)
        assert row["model_sha256"] == m.model.sha256
        assert row["image_sha256"] == m.image.sha256
        assert row["archived_path"] == m.image.archived_path
        assert row["reason"] == m.reason
        assert row["total_ms"] == m.timings_ms.total
    # And any CSV reader sees the same header and the comma inside a label intact.
    with out.open(newline="", encoding="utf-8") as fh:
        plain = list(csv.reader(fh))
    assert tuple(plain[0]) == CSV_COLUMNS
    assert "Euglena, the green one" in [r[CSV_COLUMNS.index("label")] for r in plain[1:]]


def test_parquet_has_typed_columns(store: Store, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "ids.parquet"
    export(store, "parquet", out, Filters(stations=("s1",)))
    table = pq.read_table(out)
    assert table.num_rows == 3
    assert table.column_names == list(CSV_COLUMNS)
    assert str(table.schema.field("captured_at").type) == "timestamp[us, tz=UTC]"
    assert str(table.schema.field("seq").type) == "int64"
    first = table.to_pylist()[0]
    assert first["captured_at"] == BASE
    assert first["top_k"][0] == {"label": "Amoeba", "score": 0.91}


def test_darwin_core_has_the_required_terms(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "occurrence.txt"
    summary = export(store, "darwin-core", out, id_prefix="urn:example:fs")
    # The uncertain and the rejected capture name no taxon: no occurrence.
    assert (summary.rows, summary.skipped) == (3, 2)
    lines = out.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    assert tuple(header) == DWC_TERMS
    for term in (*DWC_REQUIRED, "identificationVerificationStatus", "identifiedBy",
                 "associatedMedia"):  # fmt: skip
        assert term in header
    records = [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]
    assert len(records) == 3
    for r in records:
        for term in DWC_REQUIRED:
            assert r[term], f"{term} is empty in {r}"
        assert r["basisOfRecord"] == "MachineObservation"
        assert r["identificationVerificationStatus"] == "unverified"
        assert datetime.fromisoformat(r["eventDate"].replace("Z", "+00:00")).tzinfo is not None
    ids = [r["occurrenceID"] for r in records]
    assert ids == ["urn:example:fs:a:0", "urn:example:fs:a:1", "urn:example:fs:b:1"]
    assert len(set(ids)) == 3
    # A tab inside a label cannot shift the columns of an unquoted text file.
    assert records[2]["scientificName"] == 'Vorticella "bell" x'
    assert records[0]["associatedMedia"].endswith("2026-11-20/a-0.png")


def test_darwin_core_archive_has_meta_xml_describing_the_columns(
    store: Store, tmp_path: Path
) -> None:
    out = tmp_path / "dwca.zip"
    export(store, "darwin-core", out, media_url_prefix="https://example.org/img/")
    with zipfile.ZipFile(out) as zf:
        assert set(zf.namelist()) == {"occurrence.txt", "meta.xml"}
        meta = ET.fromstring(zf.read("meta.xml"))
        text = zf.read("occurrence.txt").decode("utf-8")
    ns = {"d": "http://rs.tdwg.org/dwc/text/"}
    core = meta.find("d:core", ns)
    assert core is not None
    assert core.get("rowType") == "http://rs.tdwg.org/dwc/terms/Occurrence"
    terms = [f.get("term", "").rsplit("/", 1)[1] for f in core.findall("d:field", ns)]
    assert tuple(terms) == DWC_TERMS
    first = text.splitlines()[1].split("\t")
    assert first[DWC_TERMS.index("associatedMedia")] == (
        "https://example.org/img/s1/a/2026-11-20/a-0.png"
    )


def test_ecotaxa_tsv_has_its_two_header_lines(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "ecotaxa_fieldscope.tsv"
    summary = export(store, "ecotaxa", out, Filters(statuses=("ok", "uncertain")))
    assert summary.rows == 4
    assert summary.notes  # three of them have no archived image
    lines = out.read_text(encoding="utf-8-sig").splitlines()
    names = lines[0].split("\t")
    types = lines[1].split("\t")
    assert len(names) == len(types)
    assert all(t in ("[t]", "[f]") for t in types)
    for column in ("img_file_name", "object_id", "object_date", "object_time",
                   "object_annotation_category", "object_annotation_status"):  # fmt: skip
        assert column in names
    rows = [dict(zip(names, line.split("\t"), strict=True)) for line in lines[2:]]
    first = rows[0]
    assert first["object_id"] == "a_0"
    assert first["object_date"] == "20261120"
    assert first["object_time"] == "063000"
    assert first["object_annotation_category"] == "Amoeba"
    assert first["object_annotation_status"] == "predicted"
    assert first["img_file_name"] == "a-0.png"
    assert types[names.index("object_score")] == "[f]"
    uncertain = next(r for r in rows if r["object_fieldscope_status"] == "uncertain")
    assert uncertain["object_annotation_category"] == ""
    assert uncertain["object_annotation_status"] == ""


def test_export_errors_are_clear(store: Store, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown export format"):
        export(store, "xlsx", tmp_path / "x.xlsx")
    with pytest.raises(ExportError, match="is a folder"):
        export(store, "csv", tmp_path)
    with pytest.raises(ExportError, match="not a date"):
        parse_time("yesterday")
    assert parse_time("2026-11-20") == datetime(2026, 11, 20, tzinfo=UTC)
    assert parse_time("2026-11-20T08:00+02:00") == datetime(2026, 11, 20, 6, tzinfo=UTC)


@pytest.mark.parametrize("fmt", ["csv", "darwin-core"])
def test_exports_are_readable_by_others_and_make_their_folder(
    store: Store, tmp_path: Path, fmt: str
) -> None:
    """A web server or GBIF's IPT reads exports as another user: they follow the umask
    (0644 with 022), never mkstemp's 0600; a missing folder is created."""
    out = tmp_path / "exports" / "2026" / f"all.{fmt}"
    previous = os.umask(0o022)
    try:
        export(store, fmt, out)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left


def test_export_command_line(store: Store, tmp_path: Path) -> None:
    db = store.url.removeprefix("sqlite:///")
    out = tmp_path / "s2.csv"
    run = subprocess.run(
        [sys.executable, "-m", "fieldscope.cli", "collect", "export", "--db", db,
         "--format", "csv", "--out", str(out), "--station", "s2", "--since", "2026-11-21"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "wrote 2 csv record(s)" in run.stdout
    assert {r["device"] for r in read_csv(out)} == {"b"}
    bad = subprocess.run(
        [sys.executable, "-m", "fieldscope.cli", "collect", "export", "--db", db,
         "--format", "csv", "--out", str(out), "--since", "soon"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1
    assert "--since 'soon' is not a date" in bad.stderr


# --- a segmenting station's objects ---------------------------------------------------------


@pytest.fixture
def object_store(tmp_path: Path) -> Iterator[Store]:
    """Three objects of one frame, a frame without objects, a one-frame station's message."""
    from fieldscope.collect.samples import sample_objects

    sent = [*sample_objects(10, 3), *sample_objects(20, 0), sample_identification(30)]
    with store_holding(tmp_path / "objects.sqlite", sent) as reader:
        yield reader


def test_csv_and_parquet_carry_every_measurement(object_store: Store, tmp_path: Path) -> None:
    export(object_store, "csv", tmp_path / "o.csv")
    rows = {r["seq"]: r for r in read_csv(tmp_path / "o.csv")}
    second = rows[11]
    assert (second["object_index"], second["object_count"]) == (1, 3)
    assert (second["bbox_x"], second["bbox_width"]) == (40, 31)
    assert rows[10]["touches_border"] is True
    assert second["touches_border"] is False
    for column, value in (("area_px", 707), ("area_um2", 1590.75), ("esd_um", 45.0045),
                          ("perimeter_um", 141.3717), ("major_axis_um", 49.5),
                          ("minor_axis_um", 40.5), ("eccentricity", 0.574),
                          ("solidity", 0.97), ("mean_intensity", 81.0),
                          ("objects_found", 5), ("objects_kept", 3)):  # fmt: skip
        assert second[column] == value, column
    assert rows[20]["objects_kept"] == 0
    assert rows[30]["esd_um"] is None
    pq = pytest.importorskip("pyarrow.parquet")
    export(object_store, "parquet", tmp_path / "o.parquet")
    table = pq.read_table(tmp_path / "o.parquet")
    assert str(table.schema.field("esd_um").type) == "double"
    assert str(table.schema.field("object_index").type) == "int64"
    assert str(table.schema.field("touches_border").type) == "bool"
    by_seq = {r["seq"]: r for r in table.to_pylist()}
    assert by_seq[11]["esd_um"] == 45.0045
    assert by_seq[10]["touches_border"] is True


def test_exports_of_objects_carry_the_object_not_the_whole_frame(tmp_path: Path) -> None:
    """An object's row names its frame's image: the EcoTaxa bundle and the reviewed
    folders cut the object out (its box and 8 px), as the station classified it."""
    import cv2
    import msgspec
    import numpy as np

    from fieldscope.collect.samples import sample_objects

    day = "2026-11-20"
    sent = [
        msgspec.structs.replace(
            m, image=msgspec.structs.replace(m.image, archived_path=f"/a/{day}/f.png")
        )
        for m in sample_objects(10, 2)
    ]  # boxes (0, 30, 21, 21) and (40, 30, 31, 31) in a 640 x 480 frame
    frame_dir = tmp_path / "archive" / day
    frame_dir.mkdir(parents=True)
    assert cv2.imwrite(str(frame_dir / "f.png"), np.full((480, 640, 3), 200, np.uint8))
    db = tmp_path / "o.sqlite"
    with open_store(str(db)) as store:  # writable: the reviews are added here
        store.write([received(m) for m in sent])
        for row in store.iter_identifications():
            store.add_annotation(row.id, "Amoeba", "ana")
        export(store, "ecotaxa", tmp_path / "e.zip", archive=tmp_path / "archive")
        export(store, "folders", tmp_path / "reviewed", archive=tmp_path / "archive")
    with zipfile.ZipFile(tmp_path / "e.zip") as zf:
        shapes = sorted(
            cv2.imdecode(np.frombuffer(zf.read(n), np.uint8), cv2.IMREAD_COLOR).shape[:2]
            for n in zf.namelist()
            if n.startswith("images/")
        )
    assert shapes == [(37, 29), (47, 47)]  # the first clipped at the frame's left edge
    crops = sorted(cv2.imread(str(p)).shape[:2] for p in (tmp_path / "reviewed").rglob("*.png"))
    assert crops == shapes


def test_exported_objects_are_padded_like_the_station_pads_its_crops() -> None:
    from fieldscope.collect.archive import OBJECT_PAD_PX
    from fieldscope.edge.objects import ObjectsSettings

    assert ObjectsSettings().pad_px == OBJECT_PAD_PX


def test_ecotaxa_writes_its_object_features_in_pixels(object_store: Store, tmp_path: Path) -> None:
    out = tmp_path / "ecotaxa_objects.tsv"
    summary = export(object_store, "ecotaxa", out)
    assert summary.rows == 4  # three objects and the one-frame message
    assert summary.skipped == 1  # the frame without objects is no object
    assert "no objects" in summary.skipped_why
    lines = out.read_text(encoding="utf-8-sig").splitlines()
    names, types = lines[0].split("\t"), lines[1].split("\t")
    for column in ("object_area", "object_perim.", "object_major", "object_minor",
                   "object_equivalent_diameter", "object_eccentricity", "object_solidity",
                   "object_mean", "object_bx", "object_by", "object_width", "object_height",
                   "process_pixel"):  # fmt: skip
        assert types[names.index(column)] == "[f]", column
    rows = {
        r["object_id"]: r for r in (dict(zip(names, x.split("\t"), strict=True)) for x in lines[2:])
    }
    second = rows["scope-a_11"]
    assert second["object_area"] == "707"
    assert float(second["process_pixel"]) == pytest.approx(1.5)
    assert float(second["object_equivalent_diameter"]) == pytest.approx(30.0, abs=0.01)  # 2·r
    assert float(second["object_perim."]) == pytest.approx(2 * 3.14159265 * 15, abs=0.01)
    assert float(second["object_major"]) == pytest.approx(33.0)
    assert (second["object_bx"], second["object_width"]) == ("40", "31")
    assert second["object_eccentricity"] == "0.574"
    assert second["object_mean"] == "81"
    assert second["object_esd_um"] == "45.0045"
    assert rows["scope-a_10"]["object_touches_border"] == "1"
    assert rows["scope-a_30"]["object_area"] == ""  # a one-frame station's message


# --- site and sample ---------------------------------------------------------------------------


@pytest.fixture
def site_store(tmp_path: Path) -> Iterator[Store]:
    """A sample at a site under water, one at a site on land without a sample, and a
    message that carries neither (an older station)."""
    import msgspec

    from fieldscope.edge.site import Site

    land = Site(name="Roof tank", elevation_m=40.0, country_code="DE")
    sample = msgspec.structs.replace(SAMPLE, started_at=datetime(2026, 11, 20, 6, 0, tzinfo=UTC))
    sent = [
        msgspec.structs.replace(
            sample_identification(1, label="Amoeba", captured_at=BASE), site=SITE, sample=sample
        ),
        msgspec.structs.replace(
            sample_identification(2, label="Euglena", captured_at=BASE + timedelta(hours=1)),
            site=land,
        ),
        sample_identification(3, label="Amoeba", captured_at=BASE + timedelta(hours=2)),
    ]
    with store_holding(tmp_path / "site.sqlite", sent) as reader:
        yield reader


def test_export_of_one_sample_from_the_command_line(site_store: Store, tmp_path: Path) -> None:
    db = site_store.url.removeprefix("sqlite:///")
    out = tmp_path / "thau-a.csv"
    run = subprocess.run(
        [sys.executable, "-m", "fieldscope.cli", "collect", "export", "--db", db,
         "--format", "csv", "--out", str(out), "--sample", "thau-a"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert [(r["seq"], r["sample_id"]) for r in read_csv(out)] == [(1, "thau-a")]


def test_csv_and_parquet_carry_the_site_and_the_sample(site_store: Store, tmp_path: Path) -> None:
    export(site_store, "csv", tmp_path / "s.csv")
    rows = {r["seq"]: r for r in read_csv(tmp_path / "s.csv")}
    for column, value in (("site_name", "Etang de Thau, pontoon 3"), ("decimal_latitude", 43.4167),
                          ("decimal_longitude", 3.6), ("geodetic_datum", "WGS84"),
                          ("coordinate_uncertainty_m", 30.0), ("depth_m", 1.5),
                          ("country_code", "FR"), ("locality", "Bouzigues"),
                          ("sample_id", "thau-a"), ("sample_volume_l", 2.5),
                          ("sample_started_at", "2026-11-20T06:00:00.000000Z"),
                          ("sample_operator", "A. Martin"),
                          ("sample_notes", "net 20 µm")):  # fmt: skip
        assert rows[1][column] == value, column
    assert (rows[2]["elevation_m"], rows[2]["sample_id"]) == (40.0, None)
    assert (rows[3]["site_name"], rows[3]["decimal_latitude"]) == (None, None)
    pq = pytest.importorskip("pyarrow.parquet")
    export(site_store, "parquet", tmp_path / "s.parquet")
    table = pq.read_table(tmp_path / "s.parquet")
    assert str(table.schema.field("decimal_latitude").type) == "double"
    assert str(table.schema.field("sample_id").type) == "string"
    by_seq = {r["seq"]: r for r in table.to_pylist()}
    assert (by_seq[1]["decimal_longitude"], by_seq[1]["sample_id"]) == (3.6, "thau-a")
    assert by_seq[3]["depth_m"] is None


def test_darwin_core_places_each_occurrence_and_names_its_event(
    site_store: Store, tmp_path: Path
) -> None:
    out = tmp_path / "dwca.zip"
    export(site_store, "darwin-core", out)
    with zipfile.ZipFile(out) as zf:
        lines = zf.read("occurrence.txt").decode("utf-8").splitlines()
    header = lines[0].split("\t")
    assert tuple(header) == DWC_TERMS
    records = [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]
    water, land, plain = records
    assert (water["decimalLatitude"], water["decimalLongitude"]) == ("43.4167", "3.6")
    assert (water["geodeticDatum"], water["coordinateUncertaintyInMeters"]) == ("WGS84", "30.0")
    assert (water["countryCode"], water["locality"], water["eventID"]) == (
        "FR",
        "Bouzigues",
        "thau-a",
    )
    assert (water["minimumDepthInMeters"], water["maximumDepthInMeters"]) == ("1.5", "1.5")
    assert (water["sampleSizeValue"], water["sampleSizeUnit"]) == ("2.5", "litre")
    assert water["eventRemarks"] == "net 20 µm"
    assert water["recordedBy"] == "A. Martin | fieldscope device scope-a"
    assert (land["minimumElevationInMeters"], land["minimumDepthInMeters"]) == ("40.0", "")
    assert (land["locality"], land["decimalLatitude"], land["eventID"]) == ("Roof tank", "", "")
    assert plain["recordedBy"] == "fieldscope device scope-a"
    assert all(plain[t] == "" for t in DWC_TERMS[DWC_TERMS.index("eventID") :])


def test_ecotaxa_takes_the_sample_and_the_place(site_store: Store, tmp_path: Path) -> None:
    out = tmp_path / "ecotaxa.tsv"
    export(site_store, "ecotaxa", out)
    lines = out.read_text(encoding="utf-8-sig").splitlines()
    names, types = lines[0].split("\t"), lines[1].split("\t")
    for column in ("object_lat", "object_lon", "object_depth_min", "object_depth_max"):
        assert types[names.index(column)] == "[f]", column
    rows = [dict(zip(names, x.split("\t"), strict=True)) for x in lines[2:]]
    water, land, plain = rows
    assert (water["sample_id"], water["object_lat"], water["object_lon"]) == (
        "thau-a",
        "43.4167",
        "3.6",
    )
    assert (water["object_depth_min"], water["object_depth_max"]) == ("1.5", "1.5")
    assert (land["sample_id"], land["object_lat"], land["object_depth_min"]) == ("pond-3", "", "")
    assert plain["sample_id"] == "pond-3"  # no sample: the station, as before
