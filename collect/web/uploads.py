"""Uploads: the multipart body, the bundles offered, classifying one image.

The upload page and ``POST /api/v1/classify`` classify with the same code as a
station (``fieldscope.edge.classify``) on bundles loaded and verified once at
start-up; a classifier is not thread-safe, so each has a lock.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fieldscope.collect.web.settings import PREVIEW_SIDE, UPLOAD_MAX_PIXELS, UploadError
from fieldscope.edge.errors import MissingDependencyError

if TYPE_CHECKING:
    from fieldscope.edge.bundle import Bundle
    from fieldscope.edge.classify import Classifier

__all__ = ["LoadedModel", "classify_upload", "load_models", "parse_multipart", "pick_model"]

logger = logging.getLogger(__name__)


def _multipart() -> Any:
    try:
        import python_multipart
    except ImportError as exc:
        raise MissingDependencyError(
            "uploads need python-multipart: pip install 'fieldscope[collect]'"
        ) from exc
    return python_multipart


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)


@dataclass
class _Parts:
    """python-multipart's callbacks, collecting each part's headers and bytes."""

    parts: list[_Part] = field(default_factory=list)
    name: bytes = b""
    value: bytes = b""

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": lambda: self.parts.append(_Part()),
            "on_part_data": lambda d, a, b: self.parts[-1].data.extend(d[a:b]),
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
        }

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self.name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def _header_end(self) -> None:
        self.parts[-1].headers[self.name.lower()] = self.value
        self.name = self.value = b""


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a ``multipart/form-data`` body: name → (file name or None, bytes).

    Parsed by python-multipart's streaming parser, which keeps binary parts exact.

    Raises:
        UploadError: not multipart/form-data, no boundary, or a malformed body.
    """
    pm = _multipart()
    kind, options = pm.multipart.parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise UploadError("the upload must be sent as multipart/form-data")
    collected = _Parts()
    try:
        parser = pm.MultipartParser(boundary, collected.callbacks())
        parser.write(body)
        parser.finalize()
    except pm.exceptions.MultipartParseError as exc:
        raise UploadError(f"the multipart body is malformed: {exc}") from exc
    if not collected.parts:
        raise UploadError("the multipart body has no parts")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in collected.parts:
        _, disposition = pm.multipart.parse_options_header(
            part.headers.get(b"content-disposition", b"")
        )
        name = disposition.get(b"name")
        if name is not None:
            filename = disposition.get(b"filename")
            fields[name.decode("utf-8", "replace")] = (
                None if filename is None else filename.decode("utf-8", "replace"),
                bytes(part.data),
            )
    return fields


@dataclass
class LoadedModel:
    """A bundle offered for uploads, with its classifier and the lock guarding it."""

    name: str
    bundle: Bundle
    classifier: Classifier
    lock: threading.Lock = field(default_factory=threading.Lock)


def load_models(bundles: Sequence[Path], public_key: Path | None) -> list[LoadedModel]:
    """Verify and load each bundle once (at start-up: a bad bundle fails the start)."""
    if not bundles:
        return []
    from fieldscope.edge.bundle import verify_bundle
    from fieldscope.edge.classify import Classifier

    models = []
    for path in bundles:
        bundle = verify_bundle(Path(path), public_key=public_key)
        manifest = bundle.manifest
        name = f"{manifest.model_name} {manifest.model_version}"
        models.append(LoadedModel(name, bundle, Classifier(bundle, num_threads=1, k=5)))
        logger.info("upload page: bundle %s (%s)", path, name)
    return models


def pick_model(models: Sequence[LoadedModel], choice: str) -> tuple[int, LoadedModel]:
    """The model the form or the API asked for by its number.

    Raises:
        UploadError: not a number of a loaded model.
    """
    choice = choice.strip() or "0"
    if not choice.isascii() or not choice.isdigit() or int(choice) >= len(models):
        raise UploadError(f"no model number {choice[:40]!r} on this dashboard")
    return int(choice), models[int(choice)]


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


def classify_upload(
    model: LoadedModel, index: int, filename: str, data: bytes, *, previews: bool = True
) -> dict[str, Any]:
    """Decode, preprocess as the bundle says, classify; what the result page shows.

    Raises:
        FieldscopeError: the bytes are not an image the edge decoder accepts.
    """
    from fieldscope.edge.preprocess import decode_image, preprocess

    started = time.perf_counter()
    image = decode_image(data, source=filename, max_pixels=UPLOAD_MAX_PIXELS)
    model_input = preprocess(image, model.bundle.manifest.preprocessing)
    with model.lock:
        t0 = time.perf_counter()
        prediction = model.classifier.classify(model_input)
        inference_ms = (time.perf_counter() - t0) * 1000
    return {
        "filename": filename,
        "model": model.name,
        "model_index": index,
        "status": prediction.status,
        "label": prediction.label,
        "score": prediction.score,
        "threshold": model.classifier.threshold,
        "top_k": [
            {"label": label, "score": score, "width": max(0.5, 100 * score)}
            for label, score in prediction.top_k
        ],
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
        "size": f"{image.shape[1]}×{image.shape[0]}",
        "input_size": f"{model_input.shape[1]}×{model_input.shape[0]}",
        "image_url": _data_url(image, PREVIEW_SIDE) if previews else "",
        "input_url": _data_url(model_input, PREVIEW_SIDE) if previews else "",
        "inference_ms": inference_ms,
        "total_ms": (time.perf_counter() - started) * 1000,
    }
