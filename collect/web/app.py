"""The ASGI application: the HTML pages and ``/api/v1`` on Litestar.

Safe by default: every response carries a Content-Security-Policy that forbids
scripts and inline styles, ``nosniff``, no referrer, no framing, ``no-store``; errors
are an HTML page for a person and JSON under ``/api/``; an upload is refused from
its ``Content-Length`` before its body is read; write endpoints need a token from
``--auth-file`` when one is given (see :mod:`fieldscope.collect.web.auth`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Annotated, Any, cast

import anyio.to_thread
from litestar import Litestar, Request, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.params import PathParameter

from fieldscope.collect.store import StoreError
from fieldscope.collect.web import api, objects_api, review_api
from fieldscope.collect.web.files import MAX_ROW_ID, ROW_ID, static_file, thumbnail_jpeg
from fieldscope.collect.web.guards import authorize, read_upload
from fieldscope.collect.web.objects_page import objects_page
from fieldscope.collect.web.pages import Pages, html
from fieldscope.collect.web.review_page import review_form, review_submit
from fieldscope.collect.web.settings import PREVIEW_SIDE, THUMB_SIDE

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

SECURITY_HEADERS = (
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        b"base-uri 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
)
_Scope = MutableMapping[str, Any]
_ASGI = Callable[[_Scope, Any, Any], Awaitable[None]]


def pages_of(state: State) -> Pages:
    pages: Pages = state.pages
    return pages


@get("/", include_in_schema=False, sync_to_thread=True)
def fleet(state: State) -> Response[bytes]:
    return pages_of(state).fleet_page()


@get("/identifications", include_in_schema=False, sync_to_thread=True)
def identifications(request: Request[Any, Any, Any], state: State) -> Response[bytes]:
    query = dict(request.query_params.items())
    return pages_of(state).identifications_page(query)


@get("/invalid", include_in_schema=False, sync_to_thread=True)
def invalid(state: State) -> Response[bytes]:
    return pages_of(state).invalid_page()


@get("/upload", include_in_schema=False, sync_to_thread=False)
def upload_form(request: Request[Any, Any, Any], state: State) -> Response[bytes]:
    authorize(request, pages_of(state), api_client=False)
    return pages_of(state).upload_page()


@post("/upload", include_in_schema=False, status_code=200)
async def upload(request: Request[Any, Any, Any], state: State) -> Response[bytes]:
    pages = pages_of(state)
    authorize(request, pages, api_client=False)
    body = await read_upload(request, pages.settings.max_upload_bytes)
    content_type = request.headers.get("content-type", "")
    return await anyio.to_thread.run_sync(pages.upload_result, content_type, body)


@get("/healthz", include_in_schema=False, sync_to_thread=False)
def healthz() -> Response[bytes]:
    return Response(b"ok\n", media_type="text/plain")


def _archived_jpeg(pages: Pages, ident: str, side: int, what: str) -> Response[bytes]:
    settings = pages.settings
    no_images = settings.archive is None and settings.images is None
    if no_images or not ROW_ID.fullmatch(ident) or int(ident) > MAX_ROW_ID:
        return pages.error_page(HTTPStatus.NOT_FOUND, f"No such {what}.")
    with pages.store() as store:
        row = store.identification(int(ident))
    jpeg = thumbnail_jpeg(settings, row, side)
    if isinstance(jpeg, str):
        return pages.error_page(HTTPStatus.NOT_FOUND, jpeg)
    return Response(jpeg, media_type="image/jpeg")


@get("/thumb/{ident:str}", include_in_schema=False, sync_to_thread=True)
def thumb(ident: Annotated[str, PathParameter()], state: State) -> Response[bytes]:
    return _archived_jpeg(pages_of(state), ident, THUMB_SIDE, "thumbnail")


@get("/preview/{ident:str}", include_in_schema=False, sync_to_thread=True)
def preview(ident: Annotated[str, PathParameter()], state: State) -> Response[bytes]:
    """The archived image large enough to judge (the review page)."""
    return _archived_jpeg(pages_of(state), ident, PREVIEW_SIDE, "image")


@get("/static/{name:str}", include_in_schema=False, sync_to_thread=False)
def static(name: Annotated[str, PathParameter()], state: State) -> Response[bytes]:
    found = static_file(name)
    if found is None:
        return pages_of(state).error_page(HTTPStatus.NOT_FOUND, "No such file.")
    return Response(found[0], media_type=found[1])


@get("/api/v1/openapi.json", include_in_schema=False, sync_to_thread=False)
def openapi_json(request: Request[Any, Any, Any]) -> Response[Any]:
    """The OpenAPI 3 document of /api/v1 (no schema UI: those need a CDN)."""
    return Response(request.app.openapi_schema.to_schema(), media_type="application/json")


def _source(source: Any) -> str:
    """``ParamType.QUERY`` (an enum in the error's extra) → ``query``."""
    return str(getattr(source, "value", source or "query"))


def _message(request: Request[Any, Any, Any], exc: Exception) -> tuple[int, str]:
    """The status and a person-readable message for an exception a handler raised."""
    if isinstance(exc, ValidationException):
        problems = [
            f"{_source(e.get('source'))} parameter {e.get('key')}: {e.get('message')}"
            for e in (exc.extra if isinstance(exc.extra, list) else [])
            if isinstance(e, dict)
        ]
        return 400, "; ".join(problems) or str(exc.detail)
    if isinstance(exc, HTTPException):
        if exc.status_code == 404 and exc.detail in ("", "Not Found"):
            return 404, f"No page at {request.url.path}."
        if exc.status_code == 413 and "limit" not in exc.detail:
            limit = pages_of(request.app.state).settings.max_upload_bytes
            return 413, f"The upload is too large; the limit is {limit / 1e6:.1f} MB."
        return exc.status_code, exc.detail
    if isinstance(exc, StoreError):
        logger.error("%s", exc)
        return 503, str(exc)
    logger.error("error answering %s %s", request.method, request.url.path, exc_info=exc)
    return 500, "Something went wrong; see the log."


def on_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """JSON ``{"status", "error"}`` under /api/, the error page elsewhere."""
    status, message = _message(request, exc)
    headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else {}
    if request.url.path.startswith("/api/"):
        return Response({"status": status, "error": message}, status_code=status, headers=headers)
    try:
        return pages_of(request.app.state).error_page(status, message, headers)
    except Exception:  # the template itself failed: still answer
        logger.exception("cannot render the error page")
        return html(status, f"<h1>{status}</h1><p>Something went wrong; see the log.</p>")


def with_security_headers(app: _ASGI) -> _ASGI:
    """Wrap the whole app (404s from routing included) so every response is covered;
    a HEAD request is answered as its GET, without the body."""

    async def wrapped(scope: _Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        head = scope["method"] == "HEAD"
        if head:
            scope = {**scope, "method": "GET"}

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                names = {n for n, _ in SECURITY_HEADERS}
                kept = [(n, v) for n, v in message.get("headers", []) if n.lower() not in names]
                message["headers"] = [*kept, *SECURITY_HEADERS]
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await app(scope, receive, send_with_headers)

    return wrapped


def create_app(pages: Pages) -> _ASGI:
    """The dashboard as an ASGI callable (for uvicorn, or any ASGI server)."""
    app = Litestar(
        route_handlers=[
            fleet,
            identifications,
            objects_page,
            invalid,
            upload_form,
            upload,
            review_form,
            review_submit,
            healthz,
            thumb,
            preview,
            static,
            openapi_json,
            api.router,
            review_api.router,
            objects_api.router,
        ],
        state=State({"pages": pages}),
        exception_handlers={Exception: on_error},
        openapi_config=OpenAPIConfig(
            title="fieldscope collector API",
            version="1",
            description="What the collector stored, classifying an upload, and experts' "
            "reviews. Write endpoints need `Authorization: Bearer TOKEN` when the dashboard "
            "runs with --auth-file; posting a review always does.",
            # Litestar also serves it (and a 404 for anything else) under this path;
            # /api/v1/openapi.json is the handler openapi_json below.
            path="/api/v1/openapi",
            render_plugins=[JsonRenderPlugin()],
        ),
        request_max_body_size=pages.settings.max_upload_bytes + 64 * 1024,
        debug=False,
        # The process logs as its command line configured it (cli/main.py); Litestar's
        # default would add its own INFO handler to the root logger.
        logging_config=None,
    )
    return with_security_headers(cast(_ASGI, app))
