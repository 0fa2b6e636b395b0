"""``/review``: the experts' review page, one identification at a time, no JavaScript.

Keyboard-fast with the browser's access keys (Alt+key in Chromium and Firefox on
Linux and Windows, Ctrl+Option+key in Safari): ``1``..``k`` the top-k labels, ``n``
"not a taxon", ``s`` skip; any known label from the list. Each answer is a form POST
that stores the annotation and redirects (303) to the page again, which then shows
the next item of the queue (the reviewed one has left it). A skip only moves on.
Both need a login (HTTP Basic with a token of ``--auth-file``; the user is the
reviewer), since a review names its reviewer.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import anyio.to_thread
from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException

from fieldscope.collect.store import NOT_A_TAXON, AnnotationError, QueueItem
from fieldscope.collect.web import views
from fieldscope.collect.web.files import shows_image
from fieldscope.collect.web.guards import read_upload, reviewer
from fieldscope.collect.web.pages import Pages
from fieldscope.collect.web.review_api import REVIEW_QC_SHARE, known_labels

__all__ = ["review_form", "review_submit"]

# The filters and the position the page keeps from one item to the next.
KEPT = ("device", "station", "label", "since", "until", "n")
MAX_FORM_BYTES = 16 * 1024
MAX_POSITION = 10**6


def _position(text: str | None) -> int:
    value = (text or "0").strip()
    if not value.isascii() or not value.isdigit() or len(value) > 7:
        return 0
    return min(int(value), MAX_POSITION)


def _item_context(pages: Pages, item: QueueItem, labels: set[str]) -> dict[str, Any]:
    row = item.identification
    keys = [str(k) for k in range(1, 10)]
    return {
        "id": row.id,
        "why": item.why,
        "device": row.device,
        "station": row.station,
        "seq": row.seq,
        "captured_at": row.captured_at,
        "status": row.status,
        "label": row.label,
        "score": row.score,
        "model": f"{row.model_name} {row.model_version}",
        "top_k": [
            {"key": keys[i], "label": label, "score": score}
            for i, (label, score) in enumerate(row.top_k[:9])
        ],
        "image": f"/preview/{row.id}" if shows_image(pages.settings, row) else None,
        "labels": sorted(labels),
    }


def render_review(
    pages: Pages, query: Mapping[str, str], user: str | None, error: str | None = None
) -> Response[bytes]:
    """The page for the item at position ``n`` of the (filtered) queue."""
    filters, errors = views.page_filters(query)
    position = _position(query.get("n"))
    with pages.store() as store:
        items, total = store.review_queue(
            filters, qc_share=REVIEW_QC_SHARE, limit=1, offset=position
        )
        labels = known_labels(pages, store, items[0].identification.id) if items else set()
    kept = {k: query[k] for k in KEPT if query.get(k) and k != "n"}
    return pages.render(
        "review.html",
        HTTPStatus.BAD_REQUEST if error else HTTPStatus.OK,
        page="review",
        item=_item_context(pages, items[0], labels) if items else None,
        total=total,
        position=position,
        kept=kept,
        n=position,
        skip_url="?" + urlencode({**kept, "n": position + 1}),
        start_url="?" + urlencode(kept),
        errors=errors,
        error=error,
        saved=query.get("saved", "")[:40],
        user=user,
        not_a_taxon=NOT_A_TAXON,
        query=query,
    )


def _same_origin(request: Request[Any, Any, Any]) -> bool:
    """Refuse a form POST from another site's page, which could otherwise post reviews
    with the login the browser remembers. Browsers say where a request comes from in
    ``Sec-Fetch-Site``; older ones only in ``Origin`` (``null`` here, since every page
    is sent with ``Referrer-Policy: no-referrer``)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return True
    return urlsplit(origin).netloc == request.headers.get("host", "")


# Both handlers of /review are async: Litestar 2.25 mixes up a sync_to_thread handler
# and an async one on the same path (the sync one's coroutine is never awaited).
@get("/review", include_in_schema=False)
async def review_form(request: Request[Any, Any, Any], state: State) -> Response[bytes]:
    pages: Pages = state.pages
    user = reviewer(request, pages, api_client=False)
    query = dict(request.query_params.items())
    return await anyio.to_thread.run_sync(render_review, pages, query, user)


def _store_review(pages: Pages, form: dict[str, str], user: str) -> str | None:
    """Store the form's review; the error to show, or None."""
    ident_text = form.get("ident", "")
    label = form.get("answer") or form.get("other") or ""
    if not ident_text.isascii() or not ident_text.isdigit() or len(ident_text) > 19:
        return "the form names no identification; reload the page"
    with pages.writable_store() as store:
        try:
            store.add_annotation(
                int(ident_text),
                label,
                user,
                known_labels=known_labels(pages, store, int(ident_text)),
            )
        except AnnotationError as exc:
            return str(exc)
    return None


@post("/review", include_in_schema=False, status_code=303)
async def review_submit(request: Request[Any, Any, Any], state: State) -> Response[bytes]:
    pages: Pages = state.pages
    user = reviewer(request, pages, api_client=False)
    if not _same_origin(request):
        raise HTTPException(status_code=403, detail="a review must come from this dashboard's page")
    body = await read_upload(request, MAX_FORM_BYTES)
    form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=False))
    if user:
        error = await anyio.to_thread.run_sync(_store_review, pages, form, user)
    else:
        error = "log in with your name as the user name: it is the reviewer of the review"
    kept = {k: form[k] for k in KEPT if form.get(k)}
    if error is not None:
        return await anyio.to_thread.run_sync(render_review, pages, kept, user, error)
    target = "/review?" + urlencode({**kept, "saved": form.get("ident", "")})
    return Response(b"", status_code=303, headers={"Location": target})
