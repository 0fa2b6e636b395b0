"""The images of an EcoTaxa import bundle: found in the archive copies, packed as PNG/JPEG.

EcoTaxa stores PNG, JPEG and GIF only; a station may archive BMP or TIFF (a microscope
camera's format), so those are decoded with the edge's reader (OpenCV; 16-bit and
grey become 8-bit RGB) and written as PNG. PNG and JPEG are packed byte for byte: a
re-encoded JPEG would lose quality for nothing. An object of a segmenting station is
cut from its frame (:func:`~fieldscope.collect.archive.object_png`), since EcoTaxa's
features and category describe the object.
"""

from __future__ import annotations

import zipfile
from collections import Counter
from pathlib import Path

from fieldscope.collect.archive import object_png, resolve_archived
from fieldscope.collect.export.folders import folder_name
from fieldscope.collect.store import IdentificationRow
from fieldscope.edge.errors import FieldscopeError

__all__ = ["IMAGES_DIR", "ImagePacker", "png_bytes"]

IMAGES_DIR = "images"
_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"


def png_bytes(path: Path) -> bytes:
    """``path`` (any image the edge reads: BMP, TIFF, 16-bit...) as an 8-bit RGB PNG.

    Raises:
        ImageDecodeError: the file is no readable image.
    """
    import cv2

    from fieldscope.edge.decode import load_image

    rgb = load_image(path)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB array
        raise FieldscopeError(f"{path}: OpenCV could not encode it as PNG")
    return bytes(encoded.tobytes())


class ImagePacker:
    """Adds each row's archived image to ``zf`` under ``images/``; counts what it could
    not (no archived path, not in ``archive``, unreadable) for the export's notes."""

    def __init__(self, zf: zipfile.ZipFile, archive: Path | None) -> None:
        self._zf = zf
        self._archive = archive
        self._missing: Counter[str] = Counter()

    def add(self, row: IdentificationRow) -> str:
        """The image's path inside the bundle (``img_file_name``), or "" when not found."""
        if row.archived_path is None:
            return ""
        if self._archive is None:
            self._missing["no --archive given"] += 1
            return ""
        found = resolve_archived(self._archive, row.station, row.device, row.archived_path)
        if found is None:
            self._missing[f"not found in {self._archive}"] += 1
            return ""
        try:
            crop = object_png(found, row)  # an object's row names its whole frame
            data, suffix = (crop, ".png") if crop is not None else self._image(found)
        except (OSError, FieldscopeError):
            self._missing["unreadable"] += 1
            return ""
        name = f"{IMAGES_DIR}/{folder_name(row.device)}_{row.seq}{suffix}"
        self._zf.writestr(name, data)
        return name

    @staticmethod
    def _image(found: Path) -> tuple[bytes, str]:
        with found.open("rb") as fh:
            start = fh.read(8)
        if start.startswith(_PNG):
            return found.read_bytes(), ".png"
        if start.startswith(_JPEG):
            return found.read_bytes(), ".jpg"
        return png_bytes(found), ".png"

    def notes(self) -> list[str]:
        """One line per reason images are missing."""
        return [
            f"{count} image(s) {why}: their img_file_name is empty"
            for why, count in sorted(self._missing.items())
        ]
