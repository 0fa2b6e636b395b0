"""Files the dashboard serves: thumbnails of the stations' images, its stylesheet.

Thumbnails are looked up by identification id, never by a path from the request: in
the image store that ``collect run --images`` fills, by the row's ``upload_sha256``,
else in the copies of the stations' archives (``--archive``), where the path must
resolve inside the archive folder. Static files come from the package.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from fieldscope.collect.archive import resolve_archived
from fieldscope.collect.images import find_image
from fieldscope.collect.store import IdentificationRow
from fieldscope.collect.web.settings import THUMB_SIDE, DashboardSettings
from fieldscope.collect.web.uploads import _shrink
from fieldscope.edge.errors import FieldscopeError

__all__ = ["image_file", "resolve_archived", "shows_image", "static_file", "thumbnail_jpeg"]

_STATIC_NAME = re.compile(r"^[a-z0-9_-]+\.(css|svg|png|ico)$")
CONTENT_TYPES = {
    "css": "text/css",  # Litestar adds "; charset=utf-8"
    "svg": "image/svg+xml",
    "png": "image/png",
    "ico": "image/x-icon",
}
# Row ids are 64-bit integers in both databases.
ROW_ID = re.compile(r"[0-9]{1,19}")
MAX_ROW_ID = 2**63 - 1


def shows_image(settings: DashboardSettings, row: IdentificationRow) -> bool:
    """Whether the dashboard may have an image for ``row`` (a link worth showing)."""
    uploaded = settings.images is not None and row.upload_sha256 is not None
    return uploaded or (settings.archive is not None and row.archived_path is not None)


def image_file(settings: DashboardSettings, row: IdentificationRow | None) -> Path | str:
    """The row's image: the uploaded one in the image store first, else the copy of the
    station's archived one; or why there is none (a 404's text)."""
    if row is None:
        return "No image for this one."
    if settings.images is not None:
        found = find_image(settings.images, row.upload_sha256)
        if found is not None:
            return found
    if settings.archive is None or row.archived_path is None:
        uploaded = row.upload_sha256 is not None and settings.images is not None
        return "The uploaded image has not arrived yet." if uploaded else "No image for this one."
    path = resolve_archived(settings.archive, row.station, row.device, row.archived_path)
    return "The archived image is not in the archive folder." if path is None else path


def thumbnail_jpeg(
    settings: DashboardSettings, row: IdentificationRow | None, side: int = THUMB_SIDE
) -> bytes | str:
    """A JPEG of the row's image (see :func:`image_file`) at most ``side`` pixels wide
    and high (small for the tables, larger for the review page), or why there is none
    (a 404's text)."""
    path = image_file(settings, row)
    if isinstance(path, str):
        return path
    import cv2

    from fieldscope.edge.preprocess import load_image

    try:
        rgb = load_image(path)
    except FieldscopeError as exc:
        return str(exc)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(_shrink(rgb, side), cv2.COLOR_RGB2BGR))
    if not ok:
        return "Cannot encode the thumbnail."
    return bytes(encoded.tobytes())


def static_file(name: str) -> tuple[bytes, str] | None:
    """A file of the package's ``static`` folder and its content type, or None."""
    if not _STATIC_NAME.match(name):
        return None
    resource = resources.files("fieldscope.collect").joinpath("static", name)
    try:
        data = resource.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    return data, CONTENT_TYPES[name.rsplit(".", 1)[1]]
