"""``/api/v1``: the collector's data as JSON, and classifying an upload.

Response models are ``msgspec.Struct`` classes (Litestar serialises them and derives
the OpenAPI document at ``/api/v1/openapi.json`` from them). Errors are
``{"status": N, "error": "..."}`` naming the bad parameter. Paging is by cursor:
``next_cursor`` of a page, passed back as ``cursor``, continues after its last row
however many rows arrive meanwhile; ``limit`` is at most 500.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import anyio.to_thread
import msgspec
from litestar import Request, Router, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.exceptions import HTTPException
from litestar.params import PathParameter, QueryParameter

from fieldscope.collect.export import ExportError
from fieldscope.collect.store import DeviceRow, Filters, IdentificationRow, StoreError
from fieldscope.collect.web import views
from fieldscope.collect.web.guards import authorize, read_upload
from fieldscope.collect.web.pages import Pages
from fieldscope.collect.web.settings import API_LIMIT, API_MAX_LIMIT
from fieldscope.edge.errors import FieldscopeError

__all__ = ["router"]

Score = Annotated[float | None, QueryParameter(ge=0.0, le=1.0, description="0..1")]
Names = Annotated[list[str] | None, QueryParameter(description="repeatable")]
Samples = Annotated[
    list[str] | None, QueryParameter(description="sample id (the sample command's id)")
]
Since = Annotated[str | None, QueryParameter(description="date or ISO time, UTC")]
Until = Annotated[str | None, QueryParameter(description="exclusive; a date includes it")]
Limit = Annotated[int, QueryParameter(ge=1, le=API_MAX_LIMIT, description=f"1..{API_MAX_LIMIT}")]


class Candidate(msgspec.Struct, frozen=True):
    label: str
    score: float


class IdentificationPage(msgspec.Struct, frozen=True, kw_only=True):
    """Newest capture first; ``next_cursor`` is None on the last page."""

    items: list[IdentificationRow]
    total: int
    limit: int
    next_cursor: str | None


class Device(DeviceRow, frozen=True, kw_only=True):
    """A device as the collector last heard of it, with what it stored and lost."""

    stale: bool
    identifications: int
    last_capture: datetime | None
    missing: int


class Devices(msgspec.Struct, frozen=True):
    devices: list[Device]


class Count(msgspec.Struct, frozen=True):
    key: str
    count: int


class Counts(msgspec.Struct, frozen=True, kw_only=True):
    """Counts of matching identifications per ``by`` (an uncertain or rejected one
    counts as ``(uncertain)``/``(rejected)`` per label; days are UTC)."""

    by: str
    total: int
    counts: list[Count]


class Model(msgspec.Struct, frozen=True, kw_only=True):
    """A bundle the dashboard classifies uploads with (``index`` is the form's ``model``)."""

    index: int
    name: str
    version: str
    sha256: str
    labels: list[str]
    threshold: float


class Models(msgspec.Struct, frozen=True):
    models: list[Model]


class Classification(msgspec.Struct, frozen=True, kw_only=True):
    """An uploaded image classified as a station would (preprocessing, model, threshold)."""

    filename: str
    model: str
    model_index: int
    status: str
    label: str | None
    score: float
    threshold: float
    top_k: list[Candidate]
    width: int
    height: int
    inference_ms: float
    total_ms: float


def bad_request(parameter: str, message: str) -> HTTPException:
    return HTTPException(status_code=400, detail=f"query parameter {parameter}: {message}")


def provide_filters(
    *,
    device: Names = None,
    station: Names = None,
    label: Names = None,
    status: Names = None,
    sample: Samples = None,
    since: Since = None,
    until: Until = None,
    min_score: Score = None,
    max_score: Score = None,
) -> Filters:
    """The filters every listing takes; a bad one is a 400 naming it."""
    try:
        start, end = views.parse_window(since, until, ("since", "until"))
    except ExportError as exc:
        raise bad_request("since" if "since" in str(exc)[:6] else "until", str(exc)) from exc
    if min_score is not None and max_score is not None and min_score > max_score:
        raise bad_request("min_score", f"{min_score} is above max_score {max_score}")
    try:
        return Filters(
            stations=tuple(station or ()),
            devices=tuple(device or ()),
            labels=tuple(label or ()),
            statuses=tuple(status or ()),
            samples=tuple(sample or ()),
            since=start,
            until=end,
            min_score=min_score,
            max_score=max_score,
        )
    except StoreError as exc:
        raise bad_request("since", str(exc)) from exc


def encode_cursor(row: IdentificationRow) -> str:
    text = f"{row.captured_at.isoformat()}|{row.id}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    """The (captured_at, id) a page ended at.

    Raises:
        HTTPException: 400, not a cursor this API gave out.
    """
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        when, _, ident = text.partition("|")
        captured_at, row_id = datetime.fromisoformat(when), int(ident)
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise bad_request("cursor", "not a cursor from next_cursor of a page") from exc
    if captured_at.tzinfo is None or not 0 <= row_id < 2**63:
        raise bad_request("cursor", "not a cursor from next_cursor of a page")
    return captured_at, row_id


@get("/identifications", sync_to_thread=True)
def list_identifications(
    state: State,
    filters: NamedDependency[Filters],
    limit: Limit = API_LIMIT,
    cursor: Annotated[str | None, QueryParameter(description="next_cursor of a page")] = None,
) -> IdentificationPage:
    """Matching identifications, newest capture first, ``limit`` per page."""
    pages: Pages = state.pages
    after = None if cursor is None else decode_cursor(cursor)
    with pages.store() as store:
        total = store.count(filters)
        rows = store.identifications(filters, limit=limit + 1, before=after)
    more = len(rows) > limit
    rows = rows[:limit]
    return IdentificationPage(
        items=rows,
        total=total,
        limit=limit,
        next_cursor=encode_cursor(rows[-1]) if more else None,
    )


@get("/identifications/{ident:int}", sync_to_thread=True)
def one_identification(state: State, ident: Annotated[int, PathParameter()]) -> IdentificationRow:
    """One identification by its ``id``."""
    pages: Pages = state.pages
    with pages.store() as store:
        row = store.identification(ident) if 0 <= ident < 2**63 else None
    if row is None:
        raise HTTPException(status_code=404, detail=f"no identification with id {ident}")
    return row


@get("/devices", sync_to_thread=True)
def list_devices(state: State) -> Devices:
    """Every device heard of, by station then name."""
    pages: Pages = state.pages
    with pages.store() as store:
        rows = store.devices()
        activity = store.device_activity()
        missing = store.missing_counts()
    now = datetime.now(UTC)
    stale = timedelta(seconds=pages.settings.stale_after_s)
    return Devices(
        [
            Device(
                **msgspec.structs.asdict(d),
                stale=d.heartbeat_received_at is not None and now - d.heartbeat_received_at > stale,
                identifications=activity.get(d.device, (0, None))[0],
                last_capture=activity.get(d.device, (0, None))[1],
                missing=missing.get(d.device, 0),
            )
            for d in rows
        ]
    )


@get("/counts", sync_to_thread=True)
def counts(
    state: State,
    filters: NamedDependency[Filters],
    by: Annotated[Literal["label", "device", "day"], QueryParameter()] = "label",
) -> Counts:
    """How many identifications match, per label, device or UTC day."""
    pages: Pages = state.pages
    with pages.store() as store:
        groups = store.group_counts(filters, by)
    return Counts(by=by, total=sum(n for _, n in groups), counts=[Count(k, n) for k, n in groups])


@get("/models", sync_to_thread=False)
def models(state: State) -> Models:
    """The bundles that ``POST /api/v1/classify`` can use."""
    pages: Pages = state.pages
    return Models(
        [
            Model(
                index=i,
                name=m.bundle.manifest.model_name,
                version=m.bundle.manifest.model_version,
                sha256=m.bundle.sha256,
                labels=list(m.bundle.manifest.labels),
                threshold=m.classifier.threshold,
            )
            for i, m in enumerate(pages.models)
        ]
    )


@post("/classify", status_code=200)
async def classify(request: Request[Any, Any, Any], state: State) -> Classification:
    """Classify the multipart field ``image`` with the model numbered by field ``model``
    (default 0). Needs ``Authorization: Bearer TOKEN`` when the dashboard has --auth-file."""
    pages: Pages = state.pages
    authorize(request, pages, api_client=True)
    if not pages.models:
        raise HTTPException(status_code=409, detail="no model is loaded: start with --bundle DIR")
    body = await read_upload(request, pages.settings.max_upload_bytes)
    content_type = request.headers.get("content-type", "")
    try:
        result = await anyio.to_thread.run_sync(
            lambda: pages.classify(content_type, body, previews=False)
        )
    except FieldscopeError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from exc
    result["status"] = str(getattr(result["status"], "value", result["status"]))
    result["top_k"] = [Candidate(c["label"], c["score"]) for c in result["top_k"]]
    fields = set(Classification.__struct_fields__)
    return Classification(**{k: v for k, v in result.items() if k in fields})


router = Router(
    path="/api/v1",
    route_handlers=[
        list_identifications,
        one_identification,
        list_devices,
        counts,
        models,
        classify,
    ],
    dependencies={"filters": Provide(provide_filters, sync_to_thread=False)},
)
