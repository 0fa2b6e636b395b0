"""Experts' reviews of identifications: annotations, their status, the review queue.

An annotation never changes the identification it reviews (the station's prediction
stays as it was received); every review is kept, and the latest one (highest id)
decides the identification's review status:

* ``predicted``: nobody has reviewed it yet;
* ``validated``: an expert gave it a label (the prediction's or another known one);
* ``not_a_taxon``: an expert said it shows no organism (:data:`NOT_A_TAXON`).

The review queue lists identifications nobody has reviewed: the uncertain ones
(below the bundle's threshold: status ``uncertain``) and the low-score ones first,
lowest score first, then a seeded sample of confident ones for quality control.
An identification is in that sample when the first four hex digits of its image's
sha256, shifted by the seed, fall in the first ``qc_share`` of their range: the
sample is uniform, the same on every page and every run with the same seed.

The ``annotations`` table is its own (:data:`SQLITE_REVIEWS`, :data:`POSTGRES_REVIEWS`),
created ``IF NOT EXISTS`` whenever a store is opened for writing: an existing
database gains it when the collector or the dashboard next starts, and an older
fieldscope reading the database simply ignores it (so the schema version stays).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from fieldscope.collect.store.rows import _ROW_COLUMNS, Filters, IdentificationRow, StoreError
from fieldscope.collect.store.schema import in_dialect
from fieldscope.edge.errors import FieldscopeError

__all__ = [
    "NOT_A_TAXON",
    "POSTGRES_REVIEWS",
    "REVIEW_STATUSES",
    "SQLITE_REVIEWS",
    "AnnotationError",
    "AnnotationRow",
    "QueueItem",
    "ReviewStore",
    "UnknownIdentificationError",
]

# The label a reviewer gives a capture that shows no organism (debris, a bubble).
NOT_A_TAXON = "_not_a_taxon"
REVIEW_STATUSES = ("predicted", "validated", "not_a_taxon")
MAX_LABEL_CHARS = 200
MAX_REVIEWER_CHARS = 200
MAX_NOTE_CHARS = 2000
DEFAULT_QC_SHARE = 0.05
DEFAULT_LOW_SCORE = 0.6
_HASH_SPACE = 16**4
_ANNOTATION_COLUMNS = "id, identification_id, label, reviewer, reviewed_at, note"

_REVIEWS = """
CREATE TABLE IF NOT EXISTS annotations (
    id {id},
    identification_id {bigint} NOT NULL REFERENCES identifications (id),
    label TEXT NOT NULL,
    reviewer TEXT NOT NULL,
    reviewed_at {time} NOT NULL,
    note TEXT
);
CREATE INDEX IF NOT EXISTS annotations_identification ON annotations (identification_id, id);
"""
SQLITE_REVIEWS = in_dialect(_REVIEWS, "sqlite")
POSTGRES_REVIEWS = in_dialect(_REVIEWS, "postgres")


class AnnotationError(FieldscopeError):
    """A review cannot be stored as given (empty reviewer, unknown label, too long)."""


class UnknownIdentificationError(AnnotationError):
    """The review names an identification the store does not hold."""


class AnnotationRow(msgspec.Struct, frozen=True, kw_only=True):
    """One expert's review of one identification (the API returns it as it is)."""

    id: int
    identification_id: int
    label: str
    reviewer: str
    reviewed_at: datetime
    note: str | None


class QueueItem(msgspec.Struct, frozen=True, kw_only=True):
    """An identification waiting for review and why it is in the queue:
    ``uncertain``, ``low_score`` or ``quality_control`` (the confident sample)."""

    identification: IdentificationRow
    why: str


def _text(value: object, what: str, limit: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise AnnotationError(f"the review's {what} is empty; give a {what}")
    text = value.strip()
    if len(text) > limit:
        raise AnnotationError(f"the review's {what} has {len(text)} characters; at most {limit}")
    return text


def qc_ranges(share: float, seed: int) -> list[tuple[str, str]]:
    """The [low, high) ranges of 4-hex-digit image-hash prefixes in the QC sample."""
    if not 0.0 <= share <= 1.0:
        raise StoreError(f"the quality-control share must be 0..1, got {share}")
    width = round(share * _HASH_SPACE)
    start = (seed * 2654435761) % _HASH_SPACE
    spans = [(start, min(start + width, _HASH_SPACE))]
    if start + width > _HASH_SPACE:
        spans.append((0, start + width - _HASH_SPACE))
    # "g" sorts after every hex digit: the end of the range.
    return [(f"{lo:04x}", "g" if hi == _HASH_SPACE else f"{hi:04x}") for lo, hi in spans if hi > lo]


class ReviewStore:
    """The review half of :class:`~fieldscope.collect.store.Store` (a mixin; each
    dialect creates the table and sets :attr:`_review_table_sql`)."""

    url: str
    # A query counting the annotations table (0 or 1), in the dialect's catalogue.
    _review_table_sql: str = (
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'annotations'"
    )

    if TYPE_CHECKING:  # provided by Store and its dialects

        def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

        def _ts(self, value: datetime) -> Any: ...

        def _ts_out(self, value: Any) -> datetime: ...

        def _json_out(self, value: Any) -> Any: ...

        def _row(self, values: Sequence[Any]) -> IdentificationRow: ...

        def _where(self, filters: Filters) -> Any: ...

        def _write_one(self, sql: str, params: Sequence[Any]) -> Any: ...

    def has_reviews(self) -> bool:
        """Whether the database has the annotations table (a database no store of
        this version has written to yet has none: nothing is reviewed there)."""
        return bool(self._query(self._review_table_sql)[0][0])

    def _annotation(self, r: Sequence[Any]) -> AnnotationRow:
        return AnnotationRow(
            id=int(r[0]),
            identification_id=int(r[1]),
            label=str(r[2]),
            reviewer=str(r[3]),
            reviewed_at=self._ts_out(r[4]),
            note=r[5],
        )

    def known_labels(self, ident_id: int | None = None) -> set[str]:
        """Labels a reviewer may give: every stored label, the labels of the models the
        devices announced and ``ident_id``'s top-k (the API adds its loaded bundles')."""
        rows = self._query("SELECT DISTINCT label FROM identifications WHERE label IS NOT NULL")
        labels = {str(r[0]) for r in rows}
        if ident_id is not None:
            for (top_k,) in self._query(
                "SELECT top_k FROM identifications WHERE id = ?", [ident_id]
            ):
                labels.update(str(c["label"]) for c in self._json_out(top_k))
        for (info,) in self._query("SELECT model_info FROM devices WHERE model_info IS NOT NULL"):
            labels.update(str(x) for x in (self._json_out(info) or {}).get("labels", ()))
        return labels

    def _check_review(self, ident_id: int, label: str, known: Collection[str] | None) -> str:
        name = _text(label, "label", MAX_LABEL_CHARS)
        if not 0 <= ident_id < 2**63 or not self._query(
            "SELECT 1 FROM identifications WHERE id = ?", [ident_id]
        ):
            raise UnknownIdentificationError(f"no identification with id {ident_id}")
        labels = set(self.known_labels(ident_id) if known is None else known)
        if name != NOT_A_TAXON and name not in labels:
            raise AnnotationError(
                f"unknown label {name!r}; known labels: {', '.join(sorted(labels)) or 'none'} "
                f"(or {NOT_A_TAXON} for a capture that shows no organism)"
            )
        return name

    def add_annotation(
        self,
        ident_id: int,
        label: str,
        reviewer: str,
        *,
        note: str | None = None,
        known_labels: Collection[str] | None = None,
        at: datetime | None = None,
    ) -> AnnotationRow:
        """Store one review of ``ident_id``; earlier reviews and the prediction stay.

        ``known_labels``: the labels accepted besides :data:`NOT_A_TAXON` (default
        :meth:`known_labels`). Needs a store opened for writing.

        Raises:
            UnknownIdentificationError: no identification ``ident_id``.
            AnnotationError: empty reviewer or label, an unknown label (the message
                lists the known ones), a note that is too long.
        """
        who = _text(reviewer, "reviewer", MAX_REVIEWER_CHARS)
        text = None if note is None or not note.strip() else note.strip()
        if text is not None and len(text) > MAX_NOTE_CHARS:
            raise AnnotationError(f"the review's note is longer than {MAX_NOTE_CHARS} characters")
        name = self._check_review(ident_id, label, known_labels)
        when = (at or datetime.now(UTC)).astimezone(UTC)
        new_id = self._write_one(
            "INSERT INTO annotations (identification_id, label, reviewer, reviewed_at, note) "
            "VALUES (?, ?, ?, ?, ?) RETURNING id",
            [ident_id, name, who, self._ts(when), text],
        )
        return AnnotationRow(
            id=int(new_id),
            identification_id=ident_id,
            label=name,
            reviewer=who,
            reviewed_at=when,
            note=text,
        )

    def annotations(self, ident_id: int) -> list[AnnotationRow]:
        """Every review of ``ident_id``, oldest first (the last one decides its status)."""
        if not self.has_reviews():
            return []
        rows = self._query(
            f"SELECT {_ANNOTATION_COLUMNS} FROM annotations WHERE identification_id = ? "
            "ORDER BY id",
            [ident_id],
        )
        return [self._annotation(r) for r in rows]

    def review_status(self, ident_ids: Sequence[int]) -> dict[int, str]:
        """Per id: ``predicted``, ``validated`` or ``not_a_taxon`` (see the module)."""
        out = dict.fromkeys(ident_ids, "predicted")
        if not out or not self.has_reviews():
            return out
        ids = list(out)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            rows = self._query(
                "SELECT a.identification_id, a.label FROM annotations a WHERE a.id IN ("
                "SELECT MAX(id) FROM annotations WHERE identification_id IN "
                f"({marks}) GROUP BY identification_id)",
                chunk,
            )
            for ident, label in rows:
                out[int(ident)] = "not_a_taxon" if label == NOT_A_TAXON else "validated"
        return out

    def latest_annotations(self, ident_ids: Sequence[int]) -> dict[int, AnnotationRow]:
        """The latest review of each of ``ident_ids`` that has one (the exports: the
        latest review decides, as it decides the review status)."""
        out: dict[int, AnnotationRow] = {}
        if not ident_ids or not self.has_reviews():
            return out
        ids = list(dict.fromkeys(ident_ids))
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            rows = self._query(
                f"SELECT {_ANNOTATION_COLUMNS} FROM annotations WHERE id IN ("
                "SELECT MAX(id) FROM annotations WHERE identification_id IN "
                f"({marks}) GROUP BY identification_id)",
                chunk,
            )
            for r in rows:
                annotation = self._annotation(r)
                out[annotation.identification_id] = annotation
        return out

    def review_queue(
        self,
        filters: Filters = Filters(),
        *,
        qc_share: float = DEFAULT_QC_SHARE,
        seed: int = 0,
        low_score: float = DEFAULT_LOW_SCORE,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[QueueItem], int]:
        """Unreviewed identifications to review (see the module) and how many there are.

        ``filters`` narrow it (device, label, time...); rejected captures (no
        classification) are never in it. ``qc_share`` (0..1) of the confident ones
        (status ``ok``, score at least ``low_score``) are sampled, chosen by ``seed``.
        """
        where = self._where(filters)
        spans = qc_ranges(qc_share, seed)
        prefix = "lower(substr(image_sha256, 1, 4))"
        qc = " OR ".join(f"({prefix} >= ? AND {prefix} < ?)" for _ in spans) or "1 = 0"
        urgent = "(status = 'uncertain' OR score < ?)"
        reviewed = (
            " AND NOT EXISTS (SELECT 1 FROM annotations a "
            "WHERE a.identification_id = identifications.id)"
            if self.has_reviews()
            else ""
        )
        body = (
            f"FROM identifications{where.sql}{' AND' if where.sql else ' WHERE'} "
            f"status <> 'rejected'{reviewed} AND ({urgent} OR {qc})"
        )
        params = [*where.params, low_score, *(v for span in spans for v in span)]
        total = int(self._query(f"SELECT COUNT(*) {body}", params)[0][0])
        sql = (
            f"SELECT {', '.join(_ROW_COLUMNS)}, CASE WHEN status = 'uncertain' THEN 'uncertain' "
            f"WHEN score < ? THEN 'low_score' ELSE 'quality_control' END {body} "
            f"ORDER BY CASE WHEN {urgent} THEN 0 ELSE 1 END, score, id LIMIT ? OFFSET ?"
        )
        rows = self._query(sql, [low_score, *params, low_score, limit, offset])
        items = [QueueItem(identification=self._row(r[:-1]), why=str(r[-1])) for r in rows]
        return items, total

    def iter_reviewed(
        self, filters: Filters = Filters()
    ) -> Iterator[tuple[IdentificationRow, AnnotationRow]]:
        """Each reviewed identification matching ``filters`` with its latest review,
        oldest capture first (the ``folders`` export)."""
        if not self.has_reviews():
            return
        where = self._where(filters)
        sql = (
            f"SELECT {', '.join('i.' + c for c in _ROW_COLUMNS)}, "
            f"{', '.join('a.' + c.strip() for c in _ANNOTATION_COLUMNS.split(','))} "
            f"FROM (SELECT * FROM identifications{where.sql}) AS i "
            "JOIN annotations a ON a.identification_id = i.id "
            "WHERE a.id = (SELECT MAX(id) FROM annotations WHERE identification_id = i.id) "
            "ORDER BY i.captured_at, i.id"
        )
        n = len(_ROW_COLUMNS)
        for r in self._query(sql, where.params):
            yield self._row(r[:n]), self._annotation(r[n:])
