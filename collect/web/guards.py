"""Checks before a write endpoint reads its request: the token, the body's size."""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException

from fieldscope.collect.web.pages import Pages

__all__ = ["authorize", "read_upload", "reviewer"]

# An upload up to this many times the limit is read (and dropped) before its 413.
DRAIN_FACTOR = 4


async def _drain(request: Request[Any, Any, Any], budget: int) -> None:
    """Receive and discard up to ``budget`` bytes of the body (memory stays flat)."""
    while budget > 0:
        message = await request.receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def authorize(request: Request[Any, Any, Any], pages: Pages, *, api_client: bool) -> None:
    """Let a write request through when no token file is set or it carries a token.

    Raises:
        HTTPException: 401 without credentials (a browser then asks for them), 403
            with wrong ones from an API client.
    """
    if pages.tokens is None:
        return
    _check(request, pages, api_client=api_client, what="uploads")


def reviewer(
    request: ASGIConnection[Any, Any, Any, Any], pages: Pages, *, api_client: bool
) -> str | None:
    """Who sends a review: the token's user (None for a bare token sent as Bearer).

    A review names its reviewer, so it always needs a login, with or without loopback.

    Raises:
        HTTPException: 403 when the dashboard has no ``--auth-file``; else as
            :func:`authorize`.
    """
    if pages.tokens is None:
        raise HTTPException(
            status_code=403,
            detail="reviews need a login, and this dashboard has none: start it with "
            "--auth-file FILE (lines of user:token; the user is the reviewer)",
        )
    return _check(request, pages, api_client=api_client, what="reviews")


def _check(
    request: ASGIConnection[Any, Any, Any, Any], pages: Pages, *, api_client: bool, what: str
) -> str | None:
    assert pages.tokens is not None
    result = pages.tokens.check(request.headers.get("authorization"))
    if result.ok:
        return result.user
    if result.presented and api_client:
        raise HTTPException(status_code=403, detail="the token is not accepted")
    challenge = 'Bearer realm="fieldscope"' if api_client else f'Basic realm="fieldscope {what}"'
    raise HTTPException(
        status_code=401,
        detail=f"{what} need a token: send Authorization: Bearer TOKEN "
        "(or log in with user and token)",
        headers={"WWW-Authenticate": challenge},
    )


async def read_upload(request: Request[Any, Any, Any], limit: int) -> bytes:
    """The request body, refused from its Content-Length when missing or over ``limit``.

    Raises:
        HTTPException: 411 or 413 (the connection is closed: the body is never read).
    """
    length = request.headers.get("content-length")
    close = {"Connection": "close"}
    if length is None or not length.isascii() or not length.isdigit():
        raise HTTPException(
            status_code=411, detail="The upload needs a Content-Length.", headers=close
        )
    if int(length) > limit:
        if int(length) <= DRAIN_FACTOR * limit:
            # Read and drop it, so that the client, still sending, gets the 413 rather
            # than a broken pipe; a far larger one is cut off unread.
            await _drain(request, int(length))
        raise HTTPException(
            status_code=413,
            detail=f"The upload is {int(length) / 1e6:.1f} MB; the limit is {limit / 1e6:.1f} MB.",
            headers=close,
        )
    return await request.body()
