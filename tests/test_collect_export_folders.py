"""``fieldscope collect export --format folders``: reviewed images as class folders."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import received

from fieldscope.cli.main import main
from fieldscope.collect.samples import sample_identification
from fieldscope.collect.store import NOT_A_TAXON, open_store
from fieldscope.train.data import discover


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((24, 24, 3), value, np.uint8))


@pytest.fixture
def reviewed(tmp_path: Path) -> tuple[Path, Path]:
    """A store of 6 identifications (all predicted Paramecium) and an archive copy
    holding the images of all but seq 4; seq 0..4 reviewed, seq 5 not."""
    db, archive = tmp_path / "c.sqlite", tmp_path / "archive"
    day = "2026-11-23"
    with open_store(str(db)) as store:
        store.write([
            received(sample_identification(s, archived_path=f"/var/lib/fs/archive/{day}/{s}.png"))
            for s in range(6)
        ])  # fmt: skip
        ids = {r.seq: r.id for r in store.iter_identifications()}
        for seq, label in ((0, "Euglena"), (1, "Euglena"), (2, "Paramecium"), (4, "Euglena")):
            store.add_annotation(ids[seq], label, "ana")
        store.add_annotation(ids[3], "Euglena", "ana")
        store.add_annotation(ids[3], NOT_A_TAXON, "ben")  # the latest review wins
    for s in (0, 1, 2, 3, 5):
        _png(archive / "pond-3" / "scope-a" / day / f"{s}.png", 40 * s)
    return db, archive


def _folders_export(db: Path, out: Path) -> list[str]:
    """The command line of a folders export of ``db`` into ``out`` (add --archive)."""
    return ["collect", "export", "--db", str(db), "--format", "folders", "--out", str(out)]


def _manifest(out: Path) -> dict[int, dict[str, str]]:
    with (out / "manifest.csv").open(encoding="utf-8", newline="") as fh:
        return {int(r["seq"]): r for r in csv.DictReader(fh)}


def test_folders_hold_the_validated_labels_and_a_manifest_of_what_is_missing(
    reviewed: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, archive = reviewed
    out = tmp_path / "field-set"
    argv = _folders_export(db, out)
    assert main([*argv, "--archive", str(archive)]) == 0
    said = capsys.readouterr().out
    assert "wrote 3 folders record(s)" in said
    assert "1 image(s) not found" in said
    assert "1 reviewed as not a taxon" in said
    # The reviewer's label, not the station's prediction (all were Paramecium).
    assert sorted(p.name for p in (out / "Euglena").iterdir()) == ["scope-a-0.png", "scope-a-1.png"]
    assert [p.name for p in (out / "Paramecium").iterdir()] == ["scope-a-2.png"]
    assert not (out / "_not_a_taxon").exists()
    rows = _manifest(out)
    assert sorted(rows) == [0, 1, 2, 3, 4]  # seq 5 is not reviewed
    assert (rows[0]["outcome"], rows[0]["file"], rows[0]["predicted_label"]) == (
        "written",
        "Euglena/scope-a-0.png",
        "Paramecium",
    )
    assert (rows[3]["outcome"], rows[3]["reviewer"]) == ("not_a_taxon", "ben")
    assert (rows[4]["outcome"], rows[4]["file"]) == ("missing", "")
    # What train reads: two classes.
    index = discover(out)
    assert index.labels == ("Euglena", "Paramecium")

    # An export never mixes with older files.
    assert main([*argv, "--archive", str(archive)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    kept = tmp_path / "with-rejects"
    assert main([*argv[:-1], str(kept), "--archive", str(archive), "--not-a-taxon-folder"]) == 0
    assert [p.name for p in (kept / "_not_a_taxon").iterdir()] == ["scope-a-3.png"]


def test_folders_need_the_archive(
    reviewed: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, _ = reviewed
    out = tmp_path / "x"
    argv = _folders_export(db, out)
    assert main(argv) == 2
    assert "give --archive DIR" in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x.")]  # no leftovers
