"""Files the dashboard serves: thumbnails from the image archive, its stylesheet.

Thumbnails are looked up by identification id, never by a path from the request,
and must resolve inside the archive folder; static files come from the package.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from fieldscope.collect.archive import resolve_archived
from fieldscope.collect.store import IdentificationRow
from fieldscope.collect.web.settings import THUMB_SIDE
from fieldscope.collect.web.uploads import _shrink
from fieldscope.edge.errors import FieldscopeError

__all__ = ["resolve_archived", "static_file", "thumbnail_jpeg"]

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


def thumbnail_jpeg(
    archive: Path, row: IdentificationRow | None, side: int = THUMB_SIDE
) -> bytes | str:
    """A JPEG of the row's archived image at most ``side`` pixels wide and high (small
    for the tables, larger for the review page), or why there is none (a 404's text)."""
    if row is None or row.archived_path is None:
        return "No archived image for this one."
    path = resolve_archived(archive, row.station, row.device, row.archived_path)
    if path is None:
        return "The archived image is not in the archive folder."
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
