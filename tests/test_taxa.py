"""taxa.csv: the reader's errors, the manifest's ``taxa``, the run's ``taxa.json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fieldscope.cli.main import main
from fieldscope.edge.bundle import Manifest
from fieldscope.edge.errors import BundleError
from fieldscope.edge.taxa import TaxaError, Taxon, read_taxa, taxa_table
from fieldscope.train.rundir import RunDir, write_json

WIRE = Path(__file__).parent / "data" / "wire"
HEADER = "label,scientificName,taxonRank,kingdom,aphiaID,gbifKey,is_taxon\n"
GOOD = (
    HEADER
    + "Alnus,Alnus,genus,Plantae,,2876213,true\n"
    + "Betula,Betula pendula,species,Plantae,,5331916,yes\n"
    + "Corylus,,,,,,false\n"
)


def _csv(tmp_path: Path, text: str, *, bom: bool = False) -> Path:
    path = tmp_path / "taxa.csv"
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return path


def test_a_taxa_file_is_read_with_its_keys_and_flags(tmp_path: Path) -> None:
    # A spreadsheet's BOM and other spellings of the header are taken.
    text = GOOD.replace("scientificName", "Scientific Name").replace("is_taxon", "IS_TAXON")
    taxa = read_taxa(_csv(tmp_path, text, bom=True), ["Alnus", "Betula", "Corylus"])
    alnus, betula, corylus = taxa
    assert (alnus.scientific_name, alnus.taxon_rank, alnus.kingdom) == ("Alnus", "genus", "Plantae")
    assert (alnus.gbif_key, alnus.aphia_id, alnus.scientific_name_id) == (2876213, None, "")
    assert betula.scientific_name == "Betula pendula"
    assert betula.is_taxon
    assert not corylus.is_taxon
    assert corylus.scientific_name == ""
    marine = Taxon(
        label="cop",
        scientific_name="Calanoida",
        taxon_rank="order",
        kingdom="Animalia",
        aphia_id=1100,
    )
    assert marine.scientific_name_id == "urn:lsid:marinespecies.org:taxname:1100"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("label,scientificName,kingdom\nA,A,Plantae\n",
         ":1: missing column(s) taxonRank, is_taxon"),
        (HEADER + "Alnus,Alnus,genus,Plantae,,,true\nAlnus,Alnus,genus,Plantae,,,true\n",
         ":3: duplicate label 'Alnus' (first on line 2)"),
        (HEADER + "Alnus,Alnus,genre,Plantae,,,true\n", ":2: ['Alnus'] unknown taxonRank 'genre'"),
        (HEADER + "Alnus,,genus,Plantae,,,true\n",
         ":2: ['Alnus'] is_taxon is true but scientificName"),
        (HEADER + "Alnus,Alnus,genus,Plantae,,,maybe\n", ":2: is_taxon must be true or false"),
        (HEADER + "Alnus,Alnus,genus,Plantae,12x,,true\n", ":2: aphiaID must be a positive whole"),
        (HEADER + "Alnus,Alnus,genus,Plantae,1100²,,true\n", ":2: aphiaID must be a positive"),
        (HEADER, ": no rows after the header"),
    ],
)  # fmt: skip
def test_a_bad_taxa_file_is_refused_naming_file_and_line(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = _csv(tmp_path, text)
    with pytest.raises(TaxaError) as caught:
        read_taxa(path)
    assert str(caught.value).startswith(str(path))
    assert expected in str(caught.value)


def test_labels_that_are_no_class_of_the_model_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TaxaError, match=r"not among the model's classes: Corylus"):
        read_taxa(_csv(tmp_path, GOOD), ["Alnus", "Betula"])


def test_the_manifest_carries_taxa_in_version_4_and_old_ones_still_load(tmp_path: Path) -> None:
    data = json.loads((WIRE / "manifest-v4.json").read_text())
    taxa = read_taxa(_csv(tmp_path, GOOD), data["labels"])
    data["taxa"] = taxa_table(taxa)
    manifest = Manifest.from_dict(data)
    assert manifest.taxa == taxa
    assert manifest.schema_version == 4
    again = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert again.taxa == taxa
    assert "aphia_id" not in manifest.to_dict()["taxa"][0]  # unknown keys are left out
    for version in (1, 2, 3, 4):  # the fixtures written before taxa existed
        old = Manifest.from_dict(json.loads((WIRE / f"manifest-v{version}.json").read_text()))
        assert old.taxa is None
        assert "taxa" not in old.to_dict()


def test_the_manifest_refuses_taxa_it_cannot_hold(tmp_path: Path) -> None:
    data = json.loads((WIRE / "manifest-v4.json").read_text())
    taxa = taxa_table(read_taxa(_csv(tmp_path, GOOD)))
    with pytest.raises(BundleError, match="taxa name labels the model does not have: Zea"):
        Manifest.from_dict({**data, "taxa": [*taxa[:2], {**taxa[2], "label": "Zea"}]})
    with pytest.raises(BundleError, match=r"unknown taxonRank 'clade'"):
        Manifest.from_dict({**data, "taxa": [{**taxa[0], "taxon_rank": "clade"}]})
    v3 = json.loads((WIRE / "manifest-v3.json").read_text())
    labels = v3["labels"]
    with pytest.raises(BundleError, match="taxa needs schema_version 4"):
        Manifest.from_dict({**v3, "taxa": [{"label": labels[0], "is_taxon": False}]})


def test_the_run_keeps_the_taxa_and_a_fold_reads_its_runs(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    assert run.read_taxa() is None
    taxa = read_taxa(_csv(tmp_path, GOOD))
    write_json(run.taxa_file, taxa_table(taxa))
    assert run.read_taxa() == taxa
    fold = run.fold(0)
    fold.path.mkdir()
    assert fold.read_taxa() == taxa
    run.taxa_file.write_text('[{"label": "Alnus", "taxon_rank": "genus"}]')
    with pytest.raises(Exception, match=r"taxa.json is damaged .*scientificName"):
        run.read_taxa()


def test_train_refuses_a_bad_taxa_file_before_loading_tensorflow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    for label in ("Alnus", "Betula"):
        (data / label).mkdir(parents=True)
    bad = _csv(tmp_path, HEADER + "Alnus,Alnus,genus,Plantae,,,treu\n")
    argv = ["train", str(data), "--out", str(tmp_path / "run"), "--taxa", str(bad)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: is_taxon must be true or false" in err
    assert not (tmp_path / "run").exists()
