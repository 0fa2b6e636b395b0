"""``/api/v1`` for experts' reviews: the review queue and each identification's annotations.

Reading needs no login, like the rest of the API; ``POST`` of an annotation always
does (the review names its reviewer: the user of the token, see
:func:`~fieldscope.collect.web.guards.reviewer`). A review never changes the
identification: it is stored beside it, and the latest one decides its status
(``predicted``, ``validated``, ``not_a_taxon``). See docs/collect.md.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, Router, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.exceptions import HTTPException
from litestar.handlers.base import BaseRouteHandler
from litestar.params import JSONBody, PathParameter, QueryParameter

from fieldscope.collect.store import (
    AnnotationError,
    AnnotationRow,
    Filters,
    QueueItem,
    Store,
    UnknownIdentificationError,
)
from fieldscope.collect.web.api import provide_filters
from fieldscope.collect.web.guards import reviewer
from fieldscope.collect.web.pages import Pages
from fieldscope.collect.web.settings import API_LIMIT, API_MAX_LIMIT

__all__ = ["REVIEW_QC_SHARE", "known_labels", "router"]

# The share of confident identifications sampled into the queue for quality control.
REVIEW_QC_SHARE = 0.05
_MAX_ID = 2**63 - 1


class ReviewQueue(msgspec.Struct, frozen=True, kw_only=True):
    """Unreviewed identifications, uncertain and low-score ones first, then a seeded
    ``qc_share`` sample of confident ones (``why``: ``uncertain``, ``low_score``,
    ``quality_control``). A review removes its identification from the queue, so a
    client that reviews as it goes asks for ``offset=0`` again."""

    items: list[QueueItem]
    total: int
    limit: int
    offset: int
    qc_share: float
    seed: int


class Annotations(msgspec.Struct, frozen=True, kw_only=True):
    """Every review of one identification, oldest first; ``status`` from the latest."""

    identification_id: int
    status: str
    annotations: list[AnnotationRow]


class NewAnnotation(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One review: a known label or ``_not_a_taxon``; ``reviewer`` only counts when the
    token names no user (a one-token ``--auth-file``)."""

    label: str
    note: str | None = None
    reviewer: str | None = None


def known_labels(pages: Pages, store: Store, ident: int | None = None) -> set[str]:
    """The labels a reviewer may give: the store's (see ``Store.known_labels``) and
    those of the bundles the dashboard loaded."""
    labels = store.known_labels(ident)
    for model in pages.models:
        labels.update(model.bundle.manifest.labels)
    return labels


async def review_login(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """A guard: runs before the body is read, so a stranger gets 401/403, never a 400."""
    pages: Pages = connection.app.state.pages
    user = reviewer(connection, pages, api_client=True)
    connection.state.reviewer = user


@get("/review/queue", sync_to_thread=True)
def review_queue(
    *,
    state: State,
    filters: NamedDependency[Filters],
    limit: Annotated[int, QueryParameter(ge=1, le=API_MAX_LIMIT)] = API_LIMIT,
    offset: Annotated[int, QueryParameter(ge=0, le=10**9)] = 0,
    qc_share: Annotated[float, QueryParameter(ge=0.0, le=1.0)] = REVIEW_QC_SHARE,
    seed: Annotated[int, QueryParameter(ge=0, le=2**31)] = 0,
) -> ReviewQueue:
    """What to review next (filterable like ``/identifications``), ``limit`` per page."""
    pages: Pages = state.pages
    with pages.store() as store:
        items, total = store.review_queue(
            filters, qc_share=qc_share, seed=seed, limit=limit, offset=offset
        )
    return ReviewQueue(
        items=items, total=total, limit=limit, offset=offset, qc_share=qc_share, seed=seed
    )


def _annotations(store: Store, ident: int) -> Annotations:
    if not 0 <= ident <= _MAX_ID or store.identification(ident) is None:
        raise HTTPException(status_code=404, detail=f"no identification with id {ident}")
    return Annotations(
        identification_id=ident,
        status=store.review_status([ident])[ident],
        annotations=store.annotations(ident),
    )


@get("/identifications/{ident:int}/annotations", sync_to_thread=True)
def list_annotations(state: State, ident: Annotated[int, PathParameter()]) -> Annotations:
    """Every review of identification ``ident`` and its review status."""
    pages: Pages = state.pages
    with pages.store() as store:
        return _annotations(store, ident)


@post(
    "/identifications/{ident:int}/annotations",
    sync_to_thread=True,
    status_code=201,
    guards=[review_login],
)
def add_annotation(
    request: Request[Any, Any, Any],
    state: State,
    ident: Annotated[int, PathParameter()],
    data: JSONBody[NewAnnotation],
) -> AnnotationRow:
    """Review identification ``ident``: ``label`` is one of the known labels or
    ``_not_a_taxon``. Always needs ``Authorization: Bearer TOKEN``; the token's user
    is the reviewer. 400 for an unknown label (the error lists the known ones)."""
    pages: Pages = state.pages
    who = getattr(request.state, "reviewer", None) or data.reviewer
    if not who:
        raise HTTPException(
            status_code=400,
            detail='the token names no user: give "reviewer" in the body, or use '
            "user:token lines in --auth-file",
        )
    with pages.writable_store() as store:
        if not 0 <= ident <= _MAX_ID or store.identification(ident) is None:
            raise HTTPException(status_code=404, detail=f"no identification with id {ident}")
        labels = known_labels(pages, store, ident)
        try:
            return store.add_annotation(ident, data.label, who, note=data.note, known_labels=labels)
        except UnknownIdentificationError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc
        except AnnotationError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc


router = Router(
    path="/api/v1",
    route_handlers=[review_queue, list_annotations, add_annotation],
    dependencies={"filters": Provide(provide_filters, sync_to_thread=False)},
)
