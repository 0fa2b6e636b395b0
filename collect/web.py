"""The dashboard: fleet, identifications with a chart, invalid messages, "try the model".

A standard-library HTTP server (``ThreadingHTTPServer``) rendering Jinja2 templates
with autoescaping; no JavaScript and nothing from a CDN, so it works on a field
laptop without internet. Decisions:

* **Reads only.** Each request opens its own read-only store (a store is not
  thread-safe; SQLite opens in well under a millisecond and WAL readers never block
  the collector).
* **Safe by default**: binds 127.0.0.1 (expose it through a reverse proxy with
  authentication, or ``--host 0.0.0.0`` on a trusted network); every value is
  escaped by the templates; a Content-Security-Policy forbids scripts and inline
  styles; uploads are capped (``max_upload_bytes``) before they are read, and decoded
  with the edge's size-checking decoder; thumbnails are looked up by identification
  id, never by a path from the request, and must resolve inside the archive folder.
* **The upload page** classifies with the same code as a station
  (``fieldscope.edge.classify``) on bundles loaded and verified once at start-up;
  a classifier is not thread-safe, so each has a lock.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, urlencode, urlsplit

from fieldscope.collect.charts import bucket_range, series_from_counts, stacked_bars, swatch
from fieldscope.collect.export import ExportError, parse_time
from fieldscope.collect.store import Filters, IdentificationRow, Store, StoreError, open_store
from fieldscope.edge.errors import FieldscopeError, MissingDependencyError

if TYPE_CHECKING:
    from fieldscope.edge.bundle import Bundle
    from fieldscope.edge.classify import Classifier

__all__ = ["Dashboard", "DashboardSettings", "UploadError", "parse_multipart", "resolve_archived"]

logger = logging.getLogger(__name__)

PAGE_SIZE = 50
# Beyond this a page number is nonsense (and its offset would overflow the database's
# 64-bit integers): the request gets a 400, not a 500.
MAX_PAGE = 10**9
_PAGE_NUMBER = re.compile(r"[1-9][0-9]{0,9}")
# Row ids are 64-bit integers in both databases.
_ROW_ID = re.compile(r"[0-9]{1,19}")
_MAX_ROW_ID = 2**63 - 1
THUMB_SIDE = 160
PREVIEW_SIDE = 480
# Uploaded images: the edge decoder refuses more pixels than this (a 40 MP frame is
# already beyond any microscope camera a station uses).
UPLOAD_MAX_PIXELS = 40_000_000
_STATIC_NAME = re.compile(r"^[a-z0-9_-]+\.(css|svg|png|ico)$")
_CONTENT_TYPES = {
    "css": "text/css; charset=utf-8",
    "svg": "image/svg+xml",
    "png": "image/png",
    "ico": "image/x-icon",
}
_SECURITY_HEADERS = (
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)


class Headers(Protocol):
    """Request headers with case-insensitive ``get`` (``http.server``'s message, a dict)."""

    def get(self, name: str, default: Any = None, /) -> Any: ...


class UploadError(FieldscopeError):
    """An upload request is malformed, too large or not an image."""


@dataclass(frozen=True)
class DashboardSettings:
    """What ``fieldscope collect serve`` serves.

    ``bundles`` are bundle folders offered on the upload page; ``archive`` is a folder
    holding copies of the stations' image archives (see :func:`resolve_archived`);
    ``stale_after_s``: a device whose last heartbeat is older is flagged.
    ``request_timeout_s``: a client that sends nothing for this long (a stalled
    upload, an idle keep-alive) is disconnected, so it cannot hold a thread forever.
    """

    db_url: str
    host: str = "127.0.0.1"
    port: int = 8080
    bundles: tuple[Path, ...] = ()
    public_key: Path | None = None
    archive: Path | None = None
    max_upload_bytes: int = 20 * 1024 * 1024
    stale_after_s: float = 300.0
    title: str = "fieldscope"
    request_timeout_s: float = 30.0


@dataclass
class _Model:
    name: str
    bundle: Bundle
    classifier: Classifier
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


# --- helpers that need no server ---------------------------------------------------------------


def resolve_archived(archive: Path, station: str, device: str, archived_path: str) -> Path | None:
    """The local copy of a station's archived image, or None.

    A station archives ``<its archive dir>/<UTC day>/<file>``; the collector's host
    keeps copies of the archives as ``ARCHIVE/<station>/<device>/<day>/<file>``
    (e.g. rsync of each station's folder), or ``ARCHIVE/<device>/<day>/<file>``, or
    all in one ``ARCHIVE/<day>/<file>``. Only the day folder and the file name of the
    station's path are used, and the result must lie inside ``archive``.
    """
    parts = PurePosixPath(archived_path.replace("\\", "/")).parts[-2:]
    if not parts or any(p in ("", ".", "..") for p in parts):
        return None
    root = archive.resolve()
    candidates = []
    for base in (root / station / device, root / device, root):
        candidates.append(base.joinpath(*parts))
        candidates.append(base / parts[-1])
    for candidate in candidates:
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError):
            continue
        if resolved.is_relative_to(root) and resolved.is_file():
            return resolved
    return None


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a ``multipart/form-data`` body: name → (file name or None, bytes).

    Written here because the standard library's ``cgi`` is gone in Python 3.13 and the
    ``email`` parser rewrites line endings inside binary parts.
    """
    match = re.search(r'boundary="?([^";,]+)"?', content_type)
    if not content_type.lower().startswith("multipart/form-data") or not match:
        raise UploadError("the upload must be sent as multipart/form-data")
    delimiter = b"--" + match.group(1).encode("latin-1")
    fields: dict[str, tuple[str | None, bytes]] = {}
    chunks = body.split(delimiter)
    if len(chunks) < 3:
        raise UploadError("the multipart body has no parts")
    for raw in chunks[1:-1]:
        part = raw.removeprefix(b"\r\n").removesuffix(b"\r\n")
        head, sep, data = part.partition(b"\r\n\r\n")
        if not sep:
            raise UploadError("a multipart part has no header")
        headers = head.decode("utf-8", "replace")
        disposition = next(
            (
                line
                for line in headers.split("\r\n")
                if line.lower().startswith("content-disposition")
            ),
            "",
        )
        name = re.search(r'\bname="([^"]*)"', disposition)
        filename = re.search(r'\bfilename="([^"]*)"', disposition)
        if name:
            fields[name.group(1)] = (filename.group(1) if filename else None, data)
    return fields


def _fmt_time(value: datetime | None) -> str:
    if value is None:
        return "–"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _fmt_age(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "never"
    seconds = max(0.0, (now - value).total_seconds())
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def _shrink(rgb: Any, side: int) -> Any:
    """The image scaled down (never up) so its longer side is at most ``side`` pixels."""
    import cv2

    height, width = rgb.shape[:2]
    scale = min(1.0, side / max(height, width))
    if scale >= 1.0:
        return rgb
    return cv2.resize(
        rgb,
        (max(1, round(width * scale)), max(1, round(height * scale))),
        interpolation=cv2.INTER_AREA,
    )


def _data_url(rgb: Any, side: int) -> str:
    """A downscaled PNG of an RGB image as a ``data:`` URL (no file, no second request)."""
    import cv2

    ok, encoded = cv2.imencode(".png", cv2.cvtColor(_shrink(rgb, side), cv2.COLOR_RGB2BGR))
    if not ok:
        return ""
    return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


# --- the dashboard ---------------------------------------------------------------------------


class Dashboard:
    """Pages over a collector database; :meth:`serve` runs it, :meth:`start` in a thread."""

    def __init__(self, settings: DashboardSettings) -> None:
        self.settings = settings
        with self._store():
            pass  # fail now, with a clear message, if the database is not there
        self._models = self._load_models(settings.bundles, settings.public_key)
        self._env = self._templates()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- set-up --------------------------------------------------------------------------

    @staticmethod
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
        env.filters["when"] = _fmt_time
        env.filters["pct"] = lambda v: "–" if v is None else f"{100 * float(v):.1f} %"
        return env

    @staticmethod
    def _load_models(bundles: Sequence[Path], public_key: Path | None) -> list[_Model]:
        if not bundles:
            return []
        from fieldscope.edge.bundle import verify_bundle
        from fieldscope.edge.classify import Classifier

        models = []
        for path in bundles:
            bundle = verify_bundle(Path(path), public_key=public_key)
            manifest = bundle.manifest
            name = f"{manifest.model_name} {manifest.model_version}"
            models.append(_Model(name, bundle, Classifier(bundle, num_threads=1, k=5)))
            logger.info("upload page: bundle %s (%s)", path, name)
        return models

    @contextlib.contextmanager
    def _store(self) -> Iterator[Store]:
        store = open_store(self.settings.db_url, create=False)
        try:
            yield store
        finally:
            store.close()

    # --- serving ---------------------------------------------------------------------------

    def make_server(self) -> ThreadingHTTPServer:
        dashboard = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "fieldscope"
            sys_version = ""
            # The socket timeout of every read: http.server ends a request that stalls
            # (the request line, headers or an upload's body) and closes the connection.
            timeout = dashboard.settings.request_timeout_s

            def do_GET(self) -> None:
                self._respond(dashboard.handle("GET", self.path, self.headers, None))

            def do_HEAD(self) -> None:
                response = dashboard.handle("GET", self.path, self.headers, None)
                self._respond(response, body=False)

            def do_POST(self) -> None:
                length_text = self.headers.get("Content-Length")
                limit = dashboard.settings.max_upload_bytes
                if length_text is None or not length_text.isdigit():
                    response = dashboard.error_page(
                        HTTPStatus.LENGTH_REQUIRED, "The upload needs a Content-Length."
                    )
                    self.close_connection = True
                elif int(length_text) > limit:
                    response = dashboard.error_page(
                        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"The upload is {int(length_text) / 1e6:.1f} MB; the limit is "
                        f"{limit / 1e6:.1f} MB.",
                    )
                    self.close_connection = True  # the body is never read
                else:
                    body = self.rfile.read(int(length_text))
                    response = dashboard.handle("POST", self.path, self.headers, body)
                self._respond(response)

            def _respond(self, response: _Response, body: bool = True) -> None:
                self.send_response(response.status)
                self.send_header("Content-Type", response.content_type)
                self.send_header("Content-Length", str(len(response.body)))
                self.send_header("Cache-Control", "no-store")
                for name, value in (*_SECURITY_HEADERS, *response.headers):
                    self.send_header(name, value)
                self.end_headers()
                if body:
                    self.wfile.write(response.body)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("%s %s", self.address_string(), format % args)

        server = ThreadingHTTPServer((self.settings.host, self.settings.port), Handler)
        server.daemon_threads = True
        return server

    def start(self) -> tuple[str, int]:
        """Serve in a background thread; returns the address (port 0 picks a free one)."""
        try:
            self._server = self.make_server()
        except OSError as exc:
            raise FieldscopeError(
                f"cannot listen on {self.settings.host}:{self.settings.port}: {exc}"
            ) from exc
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="collect-dashboard", daemon=True
        )
        self._thread.start()
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)

    # --- routing ------------------------------------------------------------------------------

    def handle(self, method: str, target: str, headers: Headers, body: bytes | None) -> _Response:
        """Answer one request (also the entry point of the tests without a socket)."""
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query, max_num_fields=50).items()}
        path = url.path
        routes: dict[tuple[str, str], Callable[[], _Response]] = {
            ("GET", "/"): self.fleet_page,
            ("GET", "/identifications"): lambda: self.identifications_page(query),
            ("GET", "/invalid"): self.invalid_page,
            ("GET", "/upload"): self.upload_page,
            ("POST", "/upload"): lambda: self.upload_result(headers, body or b""),
            ("GET", "/healthz"): lambda: _Response(200, b"ok\n", "text/plain; charset=utf-8"),
        }
        try:
            route = routes.get((method, path))
            if route is not None:
                return route()
            if method == "GET" and path.startswith("/thumb/"):
                return self.thumbnail(path.removeprefix("/thumb/"))
            if method == "GET" and path.startswith("/static/"):
                return self.static(path.removeprefix("/static/"))
            return self.error_page(HTTPStatus.NOT_FOUND, f"No page at {path}.")
        except StoreError as exc:
            logger.error("%s", exc)
            return self.error_page(HTTPStatus.SERVICE_UNAVAILABLE, str(exc))
        except Exception:
            logger.exception("error answering %s %s", method, path)
            return self.error_page(
                HTTPStatus.INTERNAL_SERVER_ERROR, "Something went wrong; see the log."
            )

    def _render(self, template: str, status: int = 200, **context: Any) -> _Response:
        page = self._env.get_template(template).render(
            title=self.settings.title, has_upload=bool(self._models), **context
        )
        return _Response(status, page.encode("utf-8"))

    def error_page(self, status: int, message: str) -> _Response:
        phrase = HTTPStatus(status).phrase
        return self._render("error.html", status, page="error", heading=phrase, message=message)

    # --- pages --------------------------------------------------------------------------------

    def fleet_page(self) -> _Response:
        now = datetime.now(UTC)
        stale = timedelta(seconds=self.settings.stale_after_s)
        with self._store() as store:
            devices = store.devices()
            activity = store.device_activity()
            total = store.count()
            invalid = store.count_invalid()
            missing = store.missing_counts()
            gaps: dict[str, list[str]] = {}
            for gap in store.gaps(limit=500):
                span = str(gap.first) if gap.first == gap.last else f"{gap.first}..{gap.last}"
                gaps.setdefault(gap.device, []).append(span)
        rows = []
        for d in devices:
            hb = d.heartbeat or {}
            count, last = activity.get(d.device, (0, None))
            heard = d.heartbeat_received_at
            rows.append(
                {
                    "device": d.device,
                    "station": d.station,
                    "status": d.status or "unknown",
                    "status_since": _fmt_age(d.status_at, now),
                    "heartbeat_age": _fmt_age(heard, now),
                    "stale": heard is not None and now - heard > stale,
                    "model": (f"{d.model_name} {d.model_version}" if d.model_name else "–"),
                    "outbox": "–" if d.outbox_depth is None else d.outbox_depth,
                    "fps": hb.get("fps"),
                    "camera": (hb.get("camera") or {}).get("state", "–"),
                    "temperature": hb.get("cpu_temperature_c"),
                    "warnings": list(hb.get("warnings") or []),
                    "count": count,
                    "missing": missing.get(d.device, 0),
                    "gaps": ", ".join(gaps.get(d.device, [])[:10]),
                    "last_identification": _fmt_age(last, now) if last else "never",
                }
            )
        online = sum(1 for r in rows if r["status"] == "online")
        return self._render(
            "fleet.html",
            page="fleet",
            devices=rows,
            online=online,
            total=total,
            invalid=invalid,
            missing=sum(missing.values()),
            now=_fmt_time(now),
        )

    def _filters(self, query: Mapping[str, str]) -> tuple[Filters, list[str]]:
        errors: list[str] = []
        since = until = None
        try:
            if query.get("since"):
                since = parse_time(query["since"], "from")
            if query.get("until"):
                until = parse_time(query["until"], "to")
                if len(query["until"].strip()) == 10:  # a date: include that whole day
                    until += timedelta(days=1)
        except ExportError as exc:
            errors.append(str(exc))
        picks = {
            k: (query[k],) if query.get(k) else () for k in ("station", "device", "label", "status")
        }
        try:
            filters = Filters(
                stations=picks["station"],
                devices=picks["device"],
                labels=picks["label"],
                statuses=picks["status"],
                since=since,
                until=until,
            )
        except StoreError as exc:
            errors.append(str(exc))
            filters = Filters(
                stations=picks["station"],
                devices=picks["device"],
                labels=picks["label"],
                statuses=picks["status"],
            )
        return filters, errors

    def identifications_page(self, query: Mapping[str, str]) -> _Response:
        filters, errors = self._filters(query)
        page_text = query.get("page", "1").strip()
        if not page_text.isascii() or not page_text.isdigit():
            page_text = "1"  # not a number at all (a hand-edited link): the first page
        if not _PAGE_NUMBER.fullmatch(page_text) or int(page_text) > MAX_PAGE:
            return self.error_page(
                HTTPStatus.BAD_REQUEST,
                f"page must be a whole number from 1 to {MAX_PAGE}, got {page_text[:40]}.",
            )
        page = int(page_text)
        with self._store() as store:
            total = store.count(filters)
            last = max(1, -(-total // PAGE_SIZE))
            if page > last:
                return self.error_page(
                    HTTPStatus.NOT_FOUND,
                    f"There is no page {page}: these identifications fill {last} page(s).",
                )
            rows = store.identifications(filters, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
            span = store.time_range(filters)
            options = {c: store.distinct(c) for c in ("station", "device", "label", "status")}
            chart, legend, bucket = self._chart(store, filters, span)
        items = [self._item(r) for r in rows]
        keep = {k: v for k, v in query.items() if k != "page" and v}
        pages = max(1, -(-total // PAGE_SIZE))
        return self._render(
            "identifications.html",
            page="identifications",
            items=items,
            total=total,
            errors=errors,
            query=query,
            options=options,
            chart=_markup(chart),
            legend=[(_markup(swatch(c)), name, n) for name, c, n in legend],
            bucket=bucket,
            page_no=page,
            pages=pages,
            prev_url="?" + urlencode({**keep, "page": page - 1}) if page > 1 else None,
            next_url="?" + urlencode({**keep, "page": page + 1}) if page < pages else None,
            thumbs=self.settings.archive is not None,
        )

    def _item(self, r: IdentificationRow) -> dict[str, Any]:
        return {
            "id": r.id,
            "captured_at": r.captured_at,
            "device": r.device,
            "station": r.station,
            "seq": r.seq,
            "status": r.status,
            "label": r.label,
            "score": r.score,
            "top_k": r.top_k,
            "model": f"{r.model_name} {r.model_version}",
            "reason": r.reason,
            "thumb": (
                f"/thumb/{r.id}" if self.settings.archive is not None and r.archived_path else None
            ),
        }

    def _chart(
        self, store: Store, filters: Filters, span: tuple[datetime, datetime] | None
    ) -> tuple[str, list[tuple[str, str, int]], str]:
        if span is None:
            return stacked_bars([], []), [], "day"
        first, last = span
        hourly = last - first <= timedelta(days=3)
        bucket = "hour" if hourly else "day"
        counts = store.label_counts(filters, bucket)
        if hourly:
            start = first.replace(minute=0, second=0, microsecond=0)
            end = last.replace(minute=0, second=0, microsecond=0)
            buckets = bucket_range(start, end, timedelta(hours=1))
            fmt = "%m-%d %H:00"
        else:
            start = first.replace(hour=0, minute=0, second=0, microsecond=0)
            end = last.replace(hour=0, minute=0, second=0, microsecond=0)
            buckets = bucket_range(start, end, timedelta(days=1))
            fmt = "%Y-%m-%d"
        series = series_from_counts(counts, buckets)
        svg = stacked_bars(
            buckets, series, bucket_label=fmt, title=f"Identifications per label and {bucket}"
        )
        legend = [(s.name, s.colour, sum(s.counts)) for s in series]
        return svg, legend, bucket

    def invalid_page(self) -> _Response:
        with self._store() as store:
            rows = store.invalid_messages(limit=200)
            count = store.count_invalid()
        items = [
            {
                "received_at": r.received_at,
                "topic": r.topic,
                "kind": r.kind or "–",
                "reason": r.reason,
                "payload": r.payload[:600].decode("utf-8", "replace")
                + ("…" if len(r.payload) > 600 else ""),
            }
            for r in rows
        ]
        return self._render("invalid.html", page="invalid", items=items, count=count)

    def upload_page(
        self, status: int = 200, error: str | None = None, result: dict[str, Any] | None = None
    ) -> _Response:
        models = [{"index": i, "name": m.name} for i, m in enumerate(self._models)]
        return self._render(
            "upload.html",
            status,
            page="upload",
            models=models,
            error=error,
            result=result,
            max_mb=f"{self.settings.max_upload_bytes / 1e6:.0f}",
        )

    def upload_result(self, headers: Headers, body: bytes) -> _Response:
        if not self._models:
            return self.upload_page(
                HTTPStatus.CONFLICT, "No model is loaded: start the dashboard with --bundle DIR."
            )
        try:
            fields = parse_multipart(headers.get("Content-Type", ""), body)
            filename, data = fields.get("image", (None, b""))
            if not data:
                raise UploadError("choose an image file to classify")
            choice = fields.get("model", (None, b"0"))[1].decode("ascii", "replace").strip()
            if not choice.isdigit() or int(choice) >= len(self._models):
                raise UploadError(f"no model number {choice!r} on this dashboard")
            model = self._models[int(choice)]
            result = self._classify(model, filename or "upload", data)
        except (UploadError, FieldscopeError) as exc:
            return self.upload_page(HTTPStatus.BAD_REQUEST, str(exc))
        return self.upload_page(result=result)

    def _classify(self, model: _Model, filename: str, data: bytes) -> dict[str, Any]:
        from fieldscope.edge.preprocess import decode_image, preprocess

        started = time.perf_counter()
        image = decode_image(data, source=filename, max_pixels=UPLOAD_MAX_PIXELS)
        recipe = model.bundle.manifest.preprocessing
        model_input = preprocess(image, recipe)
        with model.lock:
            t0 = time.perf_counter()
            prediction = model.classifier.classify(model_input)
            inference_ms = (time.perf_counter() - t0) * 1000
        return {
            "filename": filename,
            "model": model.name,
            "model_index": self._models.index(model),
            "status": prediction.status,
            "label": prediction.label,
            "score": prediction.score,
            "threshold": model.classifier.threshold,
            "top_k": [
                {"label": label, "score": score, "width": max(0.5, 100 * score)}
                for label, score in prediction.top_k
            ],
            "size": f"{image.shape[1]}×{image.shape[0]}",
            "input_size": f"{model_input.shape[1]}×{model_input.shape[0]}",
            "image_url": _data_url(image, PREVIEW_SIDE),
            "input_url": _data_url(model_input, PREVIEW_SIDE),
            "inference_ms": inference_ms,
            "total_ms": (time.perf_counter() - started) * 1000,
        }

    # --- files ----------------------------------------------------------------------------------

    def thumbnail(self, ident: str) -> _Response:
        archive = self.settings.archive
        if archive is None or not _ROW_ID.fullmatch(ident) or int(ident) > _MAX_ROW_ID:
            return self.error_page(HTTPStatus.NOT_FOUND, "No such thumbnail.")
        with self._store() as store:
            row = store.identification(int(ident))
        if row is None or row.archived_path is None:
            return self.error_page(HTTPStatus.NOT_FOUND, "No archived image for this one.")
        path = resolve_archived(archive, row.station, row.device, row.archived_path)
        if path is None:
            return self.error_page(
                HTTPStatus.NOT_FOUND, "The archived image is not in the archive folder."
            )
        import cv2

        from fieldscope.edge.preprocess import load_image

        try:
            rgb = load_image(path)
        except FieldscopeError as exc:
            return self.error_page(HTTPStatus.NOT_FOUND, str(exc))
        small = _shrink(rgb, THUMB_SIDE)
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
        if not ok:
            return self.error_page(HTTPStatus.INTERNAL_SERVER_ERROR, "Cannot encode the thumbnail.")
        return _Response(200, encoded.tobytes(), "image/jpeg")

    def static(self, name: str) -> _Response:
        if not _STATIC_NAME.match(name):
            return self.error_page(HTTPStatus.NOT_FOUND, "No such file.")
        resource = resources.files("fieldscope.collect").joinpath("static", name)
        try:
            data = resource.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return self.error_page(HTTPStatus.NOT_FOUND, "No such file.")
        return _Response(200, data, _CONTENT_TYPES[name.rsplit(".", 1)[1]])


def _markup(html_text: str) -> Any:
    from markupsafe import Markup

    return Markup(html_text)
