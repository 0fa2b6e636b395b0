"""Experts' reviews in the collector's store, on real SQLite and a real PostgreSQL."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import received
from test_collect_store import (
    new_database,
    postgres_server,  # noqa: F401  (the fixture)
)

from fieldscope.collect.samples import sample_identification
from fieldscope.collect.store import (
    NOT_A_TAXON,
    AnnotationError,
    Filters,
    Store,
    UnknownIdentificationError,
    open_store,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A new store on each database (PostgreSQL: the test server of test_collect_store)."""
    if request.param == "sqlite":
        url = str(tmp_path / "collect.sqlite")
    else:
        url = new_database(request.getfixturevalue("postgres_server"))
    with open_store(url) as s:
        yield s


def _ids(store: Store) -> dict[int, int]:
    """seq -> row id."""
    return {r.seq: r.id for r in store.iter_identifications()}


def test_annotations_keep_the_prediction_and_every_review(db: Store) -> None:
    db.write([received(sample_identification(s)) for s in range(3)])
    ids = _ids(db)
    first = db.add_annotation(ids[0], "Euglena", "ana", note="  flagellum visible ")
    second = db.add_annotation(ids[0], NOT_A_TAXON, "ben")
    db.add_annotation(ids[1], "Paramecium", "ana")
    assert first.note == "flagellum visible"
    assert first.reviewed_at.tzinfo is not None
    assert [(a.label, a.reviewer) for a in db.annotations(ids[0])] == [
        ("Euglena", "ana"),
        (NOT_A_TAXON, "ben"),
    ]
    assert db.annotations(ids[0])[1].id == second.id
    # The station's prediction stays as it was received.
    row = db.identification(ids[0])
    assert row is not None
    assert row.label == "Paramecium"
    assert db.review_status([ids[0], ids[1], ids[2]]) == {
        ids[0]: "not_a_taxon",  # the latest review wins
        ids[1]: "validated",
        ids[2]: "predicted",
    }
    reviewed = list(db.iter_reviewed())
    assert [(r.seq, a.label) for r, a in reviewed] == [(0, NOT_A_TAXON), (1, "Paramecium")]
    # The exports' look-up: the latest review of each, none for the unreviewed.
    latest = db.latest_annotations([ids[2], ids[0], ids[1], ids[0]])
    assert {i: (a.label, a.reviewer) for i, a in latest.items()} == {
        ids[0]: (NOT_A_TAXON, "ben"),
        ids[1]: ("Paramecium", "ana"),
    }
    assert latest[ids[0]].id == second.id
    assert db.latest_annotations([]) == {}


def test_bad_reviews_are_refused_with_clear_errors(db: Store) -> None:
    db.write([received(sample_identification(0))])
    (ident,) = _ids(db).values()
    with pytest.raises(UnknownIdentificationError, match="no identification with id 999"):
        db.add_annotation(999, "Euglena", "ana")
    with pytest.raises(AnnotationError, match="reviewer is empty"):
        db.add_annotation(ident, "Euglena", "  ")
    with pytest.raises(AnnotationError, match=r"unknown label 'Dragon'; known labels: .*Euglena"):
        db.add_annotation(ident, "Dragon", "ana")
    with pytest.raises(AnnotationError, match="note is longer"):
        db.add_annotation(ident, "Euglena", "ana", note="x" * 5000)
    assert db.annotations(ident) == []


def test_review_queue_uncertain_and_low_score_first_then_a_seeded_qc_sample(
    db: Store,
) -> None:
    messages = [sample_identification(s, score=0.95) for s in range(400)]
    messages += [sample_identification(400, label=None, score=0.4)]  # uncertain
    messages += [sample_identification(401, score=0.55)]  # accepted, but a low score
    messages += [sample_identification(402, status="rejected")]  # never reviewed
    messages += [sample_identification(403, label=None, score=0.3, device="scope-b")]
    db.write([received(m) for m in messages])
    items, total = db.review_queue(qc_share=0.05, seed=7, limit=1000)
    assert [(i.identification.seq, i.why) for i in items[:3]] == [
        (403, "uncertain"),
        (400, "uncertain"),
        (401, "low_score"),
    ]
    qc = [i for i in items if i.why == "quality_control"]
    assert 5 <= len(qc) <= 40  # about 5 % of 400
    assert total == len(items)
    again, _ = db.review_queue(qc_share=0.05, seed=7, limit=1000)
    assert [i.identification.id for i in again] == [i.identification.id for i in items]
    other, _ = db.review_queue(qc_share=0.05, seed=8, limit=1000)
    assert {i.identification.id for i in other[3:]} != {i.identification.id for i in qc}
    none, n = db.review_queue(qc_share=0.0, limit=1000)
    assert (n, len(none)) == (3, 3)
    # Paged, filtered, and a reviewed one leaves the queue.
    page, _ = db.review_queue(qc_share=0.05, seed=7, limit=2, offset=1)
    assert [i.identification.seq for i in page] == [400, 401]
    only_b, n = db.review_queue(Filters(devices=("scope-b",)))
    assert (n, only_b[0].identification.seq) == (1, 403)
    db.add_annotation(items[0].identification.id, "Euglena", "ana")
    after, n = db.review_queue(qc_share=0.05, seed=7, limit=1000)
    assert (n, after[0].identification.seq) == (total - 1, 400)
    later = datetime(2026, 11, 23, 18, 0, tzinfo=UTC) + timedelta(seconds=401)
    _, n = db.review_queue(Filters(since=later), qc_share=0.0)
    assert n == 1  # seq 401 only (403 is reviewed now)


def test_an_existing_database_gains_the_annotations_table(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    open_store(str(path)).close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE annotations")  # as a database from before reviews
    conn.commit()
    conn.close()
    with open_store(str(path), create=False) as reader:
        assert not reader.has_reviews()
        assert list(reader.iter_reviewed()) == []
        assert reader.annotations(1) == []
    with open_store(str(path)) as writer:
        writer.write([received(sample_identification(0))])
        (ident,) = _ids(writer).values()
        writer.add_annotation(ident, "Euglena", "ana")
    with open_store(str(path), create=False) as reader:
        assert reader.has_reviews()
        assert [a.label for a in reader.annotations(ident)] == ["Euglena"]
