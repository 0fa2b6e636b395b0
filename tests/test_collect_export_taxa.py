"""Darwin Core and EcoTaxa exports that import: taxa, reviews, EML, the EcoTaxa bundle.

Checked with the readers the receivers use where they are installable:
python-dwca-reader (with the EML parsed) for the Darwin Core Archive, pyecotaxa's
``read_tsv`` for the EcoTaxa TSV, plus EcoTaxa's own import rules written out below
(``ecotaxa_back``: ``BO/TSVFile.py`` and ``BO/Mappings.py``).
"""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from dwca import read as dwca_read
from helpers import received
from pyecotaxa import archive as pyecotaxa_archive

from fieldscope.cli.main import main
from fieldscope.collect.export import ExportError, export
from fieldscope.collect.export.ecotaxa import NOT_LIVING
from fieldscope.collect.export.eml import read_metadata
from fieldscope.collect.export.taxonomy import load_taxa
from fieldscope.collect.samples import sample_identification
from fieldscope.collect.store import NOT_A_TAXON, Store, open_store
from fieldscope.edge.bundle import MANIFEST_FILE, SIGNATURE_FILE
from fieldscope.edge.taxa import read_taxa

DAY = "2026-11-23"
DWC = "http://rs.tdwg.org/dwc/terms/"
TAXA = """label,scientificName,taxonRank,kingdom,aphiaID,gbifKey,is_taxon
Amoeba,Amoeba,genus,Protozoa,1,,true
Euglena,Euglena gracilis,species,Protozoa,,3247890,true
Paramecium,Paramecium,genus,Chromista,,,true
debris,detritus,,,,,false
"""
DATASET = """title = "Protists of pond 3"
licence = "CC-BY"
abstract = "Automated light-microscopy identifications, reviewed by experts."
[creator]
name = "Zoé Martin"
email = "zoe@example.org"
organisation = "Example Limnology Lab"
[contact]
name = "Ben Okafor"
email = "ben@example.org"
organisation = "Example Limnology Lab"
"""
ECOTAXA_PREFIXES = ("img_", "object_", "sample_", "acq_", "process_")
ECOTAXA_STATUSES = ("", "predicted", "validated", "dubious")


@pytest.fixture
def reviewed(tmp_path: Path) -> Iterator[tuple[Store, Path, dict[int, int]]]:
    """seq 0 Amoeba (a BMP), 1 Euglena validated (a 16-bit PNG), 2 uncertain validated
    as Paramecium, 3 Paramecium reviewed as not a taxon, 4 debris (no taxon), 5
    Vorticella (no row in taxa.csv, no image in the archive), 6 rejected."""
    db, archive = tmp_path / "c.sqlite", tmp_path / "archive"
    labels = ("Amoeba", "Euglena", None, "Paramecium", "debris", "Vorticella")
    suffix = {0: "bmp", 1: "png", 2: "tif"}
    sent = [
        sample_identification(
            s, label=label, archived_path=f"/var/lib/fs/archive/{DAY}/{s}.{suffix.get(s, 'png')}"
        )
        for s, label in enumerate(labels)
    ]
    sent.append(sample_identification(6, status="rejected"))
    with open_store(str(db)) as store:
        store.write([received(m) for m in sent])
        ids = {r.seq: r.id for r in store.iter_identifications()}
        store.add_annotation(ids[1], "Amoeba", "ana")
        store.add_annotation(ids[1], "Euglena", "Zoé")  # the latest review wins
        store.add_annotation(ids[2], "Paramecium", "ben")
        store.add_annotation(ids[3], NOT_A_TAXON, "ben")
    folder = archive / "pond-3" / "scope-a" / DAY
    folder.mkdir(parents=True)
    grey = np.arange(24 * 24, dtype=np.uint8).reshape(24, 24)
    assert cv2.imwrite(str(folder / "0.bmp"), cv2.merge([grey, grey, grey]))
    assert cv2.imwrite(str(folder / "1.png"), (grey.astype(np.uint16) * 256))
    assert cv2.imwrite(str(folder / "2.tif"), grey)
    for s in (3, 4):
        assert cv2.imwrite(str(folder / f"{s}.png"), grey)
    reader = open_store(str(db), create=False)
    yield reader, archive, ids
    reader.close()


def _files(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "taxa.csv").write_text(TAXA, encoding="utf-8")
    (tmp_path / "dataset.toml").write_text(DATASET, encoding="utf-8")
    return tmp_path / "taxa.csv", tmp_path / "dataset.toml"


# --- Darwin Core -----------------------------------------------------------------------


def test_darwin_core_archive_reads_with_its_eml_names_and_reviews(
    reviewed: tuple[Store, Path, dict[int, int]], tmp_path: Path
) -> None:
    store, _, ids = reviewed
    taxa_csv, dataset = _files(tmp_path)
    out = tmp_path / "dwca.zip"
    summary = export(
        store,
        "darwin-core",
        out,
        taxa=read_taxa(taxa_csv),
        metadata=read_metadata(dataset),
        media_base_url="https://collector.example.org/",
    )
    assert (summary.rows, summary.skipped) == (4, 3)
    assert "1 reviewed as not a taxon" in summary.skipped_why
    assert "1 their label is no taxon" in summary.skipped_why
    assert "1 uncertain or rejected" in summary.skipped_why
    assert any("Vorticella" in note for note in summary.notes)
    with dwca_read.DwCAReader(str(out)) as dwca:
        eml = dwca.metadata
        assert eml is not None
        assert eml.find("dataset/title").text == "Protists of pond 3"
        assert eml.find("dataset/creator/individualName/surName").text == "Martin"
        assert eml.find("dataset/creator/individualName/givenName").text == "Zoé"
        assert eml.find("dataset/contact/electronicMailAddress").text == "ben@example.org"
        rights = eml.find("dataset/intellectualRights/para/ulink")
        assert rights.get("url") == "http://creativecommons.org/licenses/by/4.0/legalcode"
        rows = {r.data[DWC + "occurrenceID"]: r.data for r in dwca}
    assert set(rows) == {f"fieldscope:scope-a:{s}" for s in (0, 1, 2, 5)}
    amoeba, euglena, validated, vorticella = (rows[f"fieldscope:scope-a:{s}"] for s in (0, 1, 2, 5))
    assert amoeba[DWC + "scientificName"] == "Amoeba"
    assert amoeba[DWC + "scientificNameID"] == "urn:lsid:marinespecies.org:taxname:1"
    assert (amoeba[DWC + "taxonRank"], amoeba[DWC + "kingdom"]) == ("genus", "Protozoa")
    assert amoeba[DWC + "identificationVerificationStatus"] == "unverified"
    assert "fieldscope automated classifier" in amoeba[DWC + "identifiedBy"]
    assert amoeba[DWC + "associatedMedia"] == f"https://collector.example.org/preview/{ids[0]}"
    assert euglena[DWC + "scientificName"] == "Euglena gracilis"
    assert euglena[DWC + "taxonID"] == "https://www.gbif.org/species/3247890"
    assert euglena[DWC + "identificationVerificationStatus"] == "verified"
    assert euglena[DWC + "identifiedBy"] == "Zoé"
    # The station was uncertain; the expert's label makes it an occurrence.
    assert validated[DWC + "scientificName"] == "Paramecium"
    assert validated[DWC + "identifiedBy"] == "ben"
    assert vorticella[DWC + "scientificName"] == "Vorticella"  # no taxon: the label
    assert vorticella[DWC + "taxonRank"] == ""


def test_media_url_for_an_image_only_the_collector_holds(tmp_path: Path) -> None:
    """A station that uploads images but archives none: the dashboard's /preview serves
    the uploaded copy, so associatedMedia points there too."""
    import msgspec

    sent = sample_identification(0, label="Amoeba")
    image = msgspec.structs.replace(sent.image, archived_path=None, upload_sha256="ab" * 32)
    with open_store(str(tmp_path / "c.sqlite")) as store:
        store.write([received(msgspec.structs.replace(sent, image=image))])
        (row_id,) = (r.id for r in store.iter_identifications())
        out = tmp_path / "dwca.zip"
        export(store, "darwin-core", out, media_base_url="https://c.example.org")
    with dwca_read.DwCAReader(str(out)) as dwca:
        (row,) = [r.data for r in dwca]
    assert row[DWC + "associatedMedia"] == f"https://c.example.org/preview/{row_id}"


def test_darwin_core_without_taxa_says_labels_are_names(
    reviewed: tuple[Store, Path, dict[int, int]], tmp_path: Path
) -> None:
    summary = export(reviewed[0], "darwin-core", tmp_path / "dwc.txt")
    assert summary.rows == 5  # debris too: nothing says it is no taxon
    assert any("no --taxa given" in note for note in summary.notes)
    with dwca_read.DwCAReader(str(_zip_of(tmp_path, summary.path))) as dwca:
        assert dwca.metadata is None
        names = {r.data[DWC + "scientificName"] for r in dwca}
    assert names == {"Amoeba", "Euglena", "Paramecium", "debris", "Vorticella"}


def _zip_of(tmp_path: Path, table: Path) -> Path:
    """A Darwin Core Archive around a bare table written by the same exporter."""
    from fieldscope.collect.export.darwincore import _meta_xml

    out = tmp_path / "wrapped.zip"
    with zipfile.ZipFile(out, "w") as zf:
        zf.write(table, "occurrence.txt")
        zf.writestr("meta.xml", _meta_xml("\t"))
    return out


def test_metadata_errors_name_every_missing_key(tmp_path: Path, reviewed: Any) -> None:
    path = tmp_path / "dataset.toml"
    path.write_text('title = "x"\nlicence = "CC-BY-SA"\n[creator]\nname = "A"\n')
    with pytest.raises(ExportError) as caught:
        read_metadata(path)
    text = str(caught.value)
    assert "abstract, creator.email, creator.organisation, contact.name" in text
    path.write_text(DATASET.replace('"CC-BY"', '"CC-BY-SA"'), encoding="utf-8")
    with pytest.raises(ExportError, match="licence 'CC-BY-SA' is not one GBIF accepts"):
        read_metadata(path)
    path.write_text(DATASET.replace('title = "', 'title = "\\u0001'), encoding="utf-8")
    with pytest.raises(ExportError, match="title hold control characters"):
        read_metadata(path)
    path.write_text(DATASET, encoding="utf-8")
    with pytest.raises(ExportError, match=r"give --out a \.zip"):
        export(reviewed[0], "darwin-core", tmp_path / "x.csv", metadata=read_metadata(path))


# --- EcoTaxa ------------------------------------------------------------------------------


def _check_ecotaxa_rules(raw: bytes) -> list[dict[str, str]]:
    """EcoTaxa's import rules for a TSV, as its importer applies them."""
    # Read as EcoTaxa reads: Latin-1, unless the file starts with a UTF-8 BOM.
    assert raw.startswith(b"\xef\xbb\xbf"), "without a BOM EcoTaxa reads Latin-1"
    text = raw.decode("utf-8-sig")
    lines = text.split("\n")
    assert lines[-1] == ""
    names, types = lines[0].split("\t"), lines[1].split("\t")
    assert len(set(names)) == len(names)
    assert all(n == n.strip().lower() and n.startswith(ECOTAXA_PREFIXES) for n in names)
    assert all(t in ("[t]", "[f]") for t in types)
    rows = [dict(zip(names, line.split("\t"), strict=True)) for line in lines[2:-1]]
    for row in rows:
        for name, kind in zip(names, types, strict=True):
            if kind == "[f]" and row[name]:
                float(row[name])
        assert row["object_annotation_status"] in ECOTAXA_STATUSES
        assert bool(row["object_annotation_status"]) == bool(row["object_annotation_category"])
        assert len(row["object_date"]) == 8
        assert len(row["object_time"]) == 6
    assert len({r["object_id"] for r in rows}) == len(rows)
    samples_of: dict[str, set[str]] = {}
    for row in rows:  # an acquisition belongs to one sample
        samples_of.setdefault(row["acq_id"], set()).add(row["sample_id"])
    assert all(len(s) == 1 for s in samples_of.values())
    return rows


def test_ecotaxa_zip_holds_the_tsv_and_png_or_jpeg_images(
    reviewed: tuple[Store, Path, dict[int, int]], tmp_path: Path
) -> None:
    store, archive, _ = reviewed
    taxa_csv, _ = _files(tmp_path)
    out = tmp_path / "pond.zip"
    summary = export(store, "ecotaxa", out, archive=archive, taxa=read_taxa(taxa_csv))
    assert summary.rows == 7
    assert any("1 image(s) not found in" in note for note in summary.notes)
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        assert "ecotaxa_pond.tsv" in names
        rows = _check_ecotaxa_rules(zf.read("ecotaxa_pond.tsv"))
        zf.extractall(tmp_path / "bundle")
    by_id = {r["object_id"]: r for r in rows}
    images = [r["img_file_name"] for r in rows if r["img_file_name"]]
    assert len(images) == 5  # seq 5 has none in the archive, the rejected one none at all
    assert all(name in names and name.endswith((".png", ".jpg")) for name in images)
    assert by_id["scope-a_0"]["img_file_name"] == "images/scope-a_0.png"  # BMP -> PNG
    assert by_id["scope-a_2"]["img_file_name"] == "images/scope-a_2.png"  # TIFF -> PNG
    decoded = cv2.imread(str(tmp_path / "bundle" / "images" / "scope-a_0.png"))
    assert decoded is not None
    assert decoded.shape == (24, 24, 3)
    assert by_id["scope-a_5"]["img_file_name"] == ""
    table = pyecotaxa_archive.read_tsv(tmp_path / "bundle" / "ecotaxa_pond.tsv")
    assert len(table) == 7
    status = dict(zip(table["object_id"], table["object_annotation_status"], strict=True))
    category = dict(zip(table["object_id"], table["object_annotation_category"], strict=True))
    person = dict(zip(table["object_id"], table["object_annotation_person_name"], strict=True))
    assert (status["scope-a_0"], category["scope-a_0"]) == ("predicted", "Amoeba")
    assert (status["scope-a_1"], category["scope-a_1"]) == ("validated", "Euglena gracilis")
    assert person["scope-a_1"] == "Zoé"  # intact through EcoTaxa's encoding rule
    assert (status["scope-a_2"], category["scope-a_2"]) == ("validated", "Paramecium")
    assert (status["scope-a_3"], category["scope-a_3"]) == ("validated", NOT_LIVING)
    assert (status["scope-a_4"], category["scope-a_4"]) == ("predicted", "detritus")
    assert (status["scope-a_5"], category["scope-a_5"]) == ("predicted", "Vorticella")
    assert table["object_lat"].dtype.kind == "f"
    assert set(table["acq_id"]) == {"pond-3_scope-a"}
    assert set(table["process_id"]) == {"protists-mnv2_1.2.0"}


# --- the command line, and taxa from a bundle -----------------------------------------------


def test_export_command_takes_taxa_from_a_bundle_and_metadata(
    reviewed: tuple[Store, Path, dict[int, int]],
    tmp_path: Path,
    tiny_bundles: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundles.v1, bundle)
    (bundle / SIGNATURE_FILE).unlink(missing_ok=True)
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    with pytest.raises(ExportError, match="carries no taxa"):
        load_taxa(bundle)
    first = tiny_bundles.labels[0]
    red = {"label": first, "scientific_name": "Rhodophyta", "taxon_rank": "phylum"}
    manifest["taxa"] = [{**red, "kingdom": "Plantae", "is_taxon": True}]
    manifest["schema_version"] = 4
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert [t.scientific_name for t in load_taxa(bundle)] == ["Rhodophyta"]
    _, dataset = _files(tmp_path)
    db = str(tmp_path / "c.sqlite")
    out = tmp_path / "dwca.zip"
    argv = ["collect", "export", "--db", db, "--format", "darwin-core", "--out", str(out)]
    argv += ["--taxa", str(bundle), "--metadata", str(dataset)]
    assert main([*argv, "--media-base-url", "http://c.example"]) == 0
    said = capsys.readouterr().out
    assert "wrote 5 darwin-core record(s)" in said
    assert "used as names as they are: Amoeba, Euglena, Paramecium, Vorticella, debris" in said
    with zipfile.ZipFile(out) as zf:
        assert 'metadata="eml.xml"' in zf.read("meta.xml").decode()
        assert b"Protists of pond 3" in zf.read("eml.xml")
    bad = tmp_path / "bad.toml"
    bad.write_text('title = "x"\n')
    assert main([*argv[:-1], str(bad)]) == 2
    assert "missing or empty key(s) licence, abstract" in capsys.readouterr().err
