"""The dashboard: fleet, identifications with a chart, invalid messages, "try the model",
and a versioned JSON API under ``/api/v1``.

A Litestar application (:mod:`.app`, :mod:`.api`) served by uvicorn (:mod:`.server`),
rendering Jinja2 templates with autoescaping; no JavaScript and nothing from a CDN,
so it works on a field laptop without internet. Decisions:

* **Reads only**, except classifying an upload; each request opens its own
  read-only store (:mod:`.pages`).
* **Safe by default**: binds 127.0.0.1; any other address needs ``--auth-file``,
  whose tokens the write endpoints require (:mod:`.auth`); every value is escaped by
  the templates; a Content-Security-Policy forbids scripts and inline styles; uploads
  are capped before they are read and decoded with the edge's size-checking decoder;
  thumbnails are looked up by identification id and must resolve inside the archive
  folder (:mod:`.files`).
"""

from fieldscope.collect.web.files import resolve_archived
from fieldscope.collect.web.server import Dashboard
from fieldscope.collect.web.settings import DashboardSettings, UploadError
from fieldscope.collect.web.uploads import parse_multipart

__all__ = ["Dashboard", "DashboardSettings", "UploadError", "parse_multipart", "resolve_archived"]
