"""The dashboard's state shared by every request, and the HTML pages it answers.

Reads only: each request opens its own read-only store (a store is not thread-safe;
SQLite opens in well under a millisecond and WAL readers never block the collector).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import urlencode

from litestar import Response

from fieldscope.collect.charts import stacked_bars
from fieldscope.collect.size_chart import size_histograms
from fieldscope.collect.store import Store, open_store
from fieldscope.collect.web import views
from fieldscope.collect.web.auth import TokenFile
from fieldscope.collect.web.files import shows_image
from fieldscope.collect.web.settings import MAX_PAGE, PAGE_SIZE, DashboardSettings, UploadError
from fieldscope.collect.web.uploads import (
    LoadedModel,
    classify_upload,
    load_models,
    parse_multipart,
    pick_model,
)
from fieldscope.edge.errors import FieldscopeError, MissingDependencyError

__all__ = ["Pages", "html", "markup"]

logger = logging.getLogger(__name__)

HTML = "text/html"  # Litestar adds "; charset=utf-8" to text/ types


def html(status: int, page: str, headers: Mapping[str, str] | None = None) -> Response[bytes]:
    """An HTML response (the security headers are added for every response by the app)."""
    return Response(page.encode("utf-8"), status_code=status, media_type=HTML, headers=headers)


def _templates() -> Any:
    try:
        import jinja2
    except ImportError as exc:
        raise MissingDependencyError(
            "the dashboard needs Jinja2: pip install 'fieldscope[collect]'"
        ) from exc
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fieldscope.collect", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = views.fmt_time
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * float(v):.1f} %"
    return env


class Pages:
    """Everything a request needs: settings, templates, loaded models, tokens."""

    def __init__(self, settings: DashboardSettings) -> None:
        settings.check()
        self.settings = settings
        self.tokens = None if settings.auth_file is None else TokenFile.load(settings.auth_file)
        with self.store():
            pass  # fail now, with a clear message, if the database is not there
        self._prepare_reviews()
        self.models: list[LoadedModel] = load_models(settings.bundles, settings.public_key)
        self._env = _templates()
        # Drawing a chart takes 0.1-0.5 s; the same data (paging, several viewers, a
        # reload) is drawn once (the last 32). Keyed by the bucketed counts, so new data is redrawn.
        self._chart = functools.lru_cache(maxsize=32)(stacked_bars)
        self.size_chart = functools.lru_cache(maxsize=32)(size_histograms)

    @contextlib.contextmanager
    def store(self) -> Iterator[Store]:
        store = open_store(self.settings.db_url, create=False)
        try:
            yield store
        finally:
            store.close()

    @contextlib.contextmanager
    def writable_store(self) -> Iterator[Store]:
        """A store that may write (reviews); the database exists (checked at start)."""
        store = open_store(self.settings.db_url, create=True)
        try:
            yield store
        finally:
            store.close()

    def _prepare_reviews(self) -> None:
        """Give an older database its annotations table now (opening for writing adds
        it), so the review queue can leave reviewed ones out from the first request."""
        try:
            with self.writable_store():
                pass
        except FieldscopeError as exc:
            logger.warning("reviews cannot be stored in this database: %s", exc)

    def render(self, template: str, status: int = 200, **context: Any) -> Response[bytes]:
        page = self._env.get_template(template).render(
            title=self.settings.title, has_upload=bool(self.models), **context
        )
        return html(status, page)

    def error_page(
        self, status: int, message: str, headers: Mapping[str, str] | None = None
    ) -> Response[bytes]:
        phrase = HTTPStatus(status).phrase
        response = self.render("error.html", status, page="error", heading=phrase, message=message)
        response.headers.update(headers or {})
        return response

    def fleet_page(self) -> Response[bytes]:
        with self.store() as store:
            context = views.fleet_rows(store, self.settings.stale_after_s)
        return self.render("fleet.html", page="fleet", **context)

    def identifications_page(self, query: Mapping[str, str]) -> Response[bytes]:
        filters, errors = views.page_filters(query)
        page_text = query.get("page", "1").strip()
        if not page_text.isascii() or not page_text.isdigit():
            page_text = "1"  # not a number at all (a hand-edited link): the first page
        if len(page_text) > 10 or page_text.startswith("0") or int(page_text) > MAX_PAGE:
            return self.error_page(
                HTTPStatus.BAD_REQUEST,
                f"page must be a whole number from 1 to {MAX_PAGE}, got {page_text[:40]}.",
            )
        page = int(page_text)
        with self.store() as store:
            total = store.count(filters)
            pages = max(1, -(-total // PAGE_SIZE))
            if page > pages:
                return self.error_page(
                    HTTPStatus.NOT_FOUND,
                    f"There is no page {page}: these identifications fill {pages} page(s).",
                )
            rows = store.identifications(filters, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
            options = {c: store.distinct(c) for c in ("station", "device", "label", "status")}
            chart, legend, bucket = views.chart(store, filters, self._chart)
        keep = {k: v for k, v in query.items() if k != "page" and v}
        return self.render(
            "identifications.html",
            page="identifications",
            total=total,
            errors=errors,
            query=query,
            options=options,
            chart=markup(chart),
            legend=legend,
            bucket=bucket,
            items=[views.row_item(r, shows_image(self.settings, r)) for r in rows],
            page_no=page,
            pages=pages,
            prev_url="?" + urlencode({**keep, "page": page - 1}) if page > 1 else None,
            next_url="?" + urlencode({**keep, "page": page + 1}) if page < pages else None,
            thumbs=self.settings.archive is not None or self.settings.images is not None,
        )

    def invalid_page(self) -> Response[bytes]:
        with self.store() as store:
            context = views.invalid_items(store)
        return self.render("invalid.html", page="invalid", **context)

    def upload_page(
        self, status: int = 200, error: str | None = None, result: dict[str, Any] | None = None
    ) -> Response[bytes]:
        return self.render(
            "upload.html",
            status,
            page="upload",
            models=[{"index": i, "name": m.name} for i, m in enumerate(self.models)],
            error=error,
            result=result,
            max_mb=f"{self.settings.max_upload_bytes / 1e6:.0f}",
        )

    def classify(self, content_type: str, body: bytes, *, previews: bool) -> dict[str, Any]:
        """Classify the ``image`` field of a multipart body with the ``model`` field's model.

        Raises:
            UploadError, FieldscopeError: what the user sent cannot be classified.
        """
        fields = parse_multipart(content_type, body)
        filename, data = fields.get("image", (None, b""))
        if not data:
            raise UploadError("choose an image file to classify (the form field 'image')")
        choice = fields.get("model", (None, b"0"))[1].decode("ascii", "replace")
        index, model = pick_model(self.models, choice)
        return classify_upload(model, index, filename or "upload", data, previews=previews)

    def upload_result(self, content_type: str, body: bytes) -> Response[bytes]:
        if not self.models:
            return self.upload_page(
                HTTPStatus.CONFLICT, "No model is loaded: start the dashboard with --bundle DIR."
            )
        try:
            result = self.classify(content_type, body, previews=True)
        except FieldscopeError as exc:
            return self.upload_page(HTTPStatus.BAD_REQUEST, str(exc))
        return self.upload_page(result=result)


def markup(html_text: str) -> Any:
    """Trusted HTML (a chart's SVG drawn here) that the templates insert unescaped."""
    from markupsafe import Markup

    return Markup(html_text)
