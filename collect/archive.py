"""Where the collector finds a station's archived image (the dashboard's thumbnails,
the review page, the ``folders`` export)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from fieldscope.edge.errors import ImageDecodeError

if TYPE_CHECKING:
    from fieldscope.collect.store import IdentificationRow

__all__ = ["OBJECT_PAD_PX", "object_png", "resolve_archived"]

# A station's default [objects] pad_px: exported object images are cut the same way.
OBJECT_PAD_PX = 8


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


def object_png(frame: Path, row: IdentificationRow, pad_px: int = OBJECT_PAD_PX) -> bytes | None:
    """The PNG of the object ``row`` describes, cut from its archived ``frame`` (its
    bounding box widened by ``pad_px``, as a station pads the crop it classifies), or
    None when ``row`` is no object of a segmenting station.

    An object's row names the whole frame's image; exports of objects (EcoTaxa, the
    reviewed folders that go back to training) must show the object, not the frame.

    Raises:
        ImageDecodeError: the frame is no readable image.
    """
    box = (row.bbox_x, row.bbox_y, row.bbox_width, row.bbox_height)
    if row.object_index is None or any(v is None for v in box):
        return None
    import cv2

    from fieldscope.edge.decode import load_image

    rgb = load_image(frame)
    x, y, w, h = (int(v or 0) for v in box)
    height, width = rgb.shape[:2]
    x0, y0 = max(x - pad_px, 0), max(y - pad_px, 0)
    x1, y1 = min(x + w + pad_px, width), min(y + h + pad_px, height)
    if x1 <= x0 or y1 <= y0:
        raise ImageDecodeError(f"{frame}: the object's box {box} lies outside the frame")
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb[y0:y1, x0:x1], cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB array
        raise ImageDecodeError(f"{frame}: OpenCV could not encode the object as PNG")
    return bytes(encoded.tobytes())
