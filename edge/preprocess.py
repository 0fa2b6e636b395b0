"""Contract 1 — preprocessing: the one function that turns a decoded frame into model input.

Training (``fieldscope.train``) and the edge daemon call the *same* functions, so the
model sees identical pixels on the workstation and on the Pi. Normalisation to the
backbone's range lives inside the model graph; everything here returns RGB uint8.

The pipeline is ``load_image``/``decode_image`` (any file a microscope camera writes →
RGB uint8), then ``preprocess``: ``denoise`` at the source resolution (the filter
parameters are in source pixels, as in the research scripts) followed by ``resize_to``
the model's input size. Every function is pure and deterministic: the same bytes give
the same pixels, run after run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, cast

import cv2
import numpy as np
import numpy.typing as npt

from fieldscope.edge.errors import FieldscopeError, ImageDecodeError, RecipeError
from fieldscope.edge.untrusted import RejectedValueError, read_number, read_regular_file, show_value

__all__ = [
    "DENOISE_DEFAULTS",
    "DENOISE_LIMITS",
    "DENOISE_METHODS",
    "MAX_DECODE_BYTES",
    "MAX_PIXELS",
    "RESAMPLE_METHODS",
    "RESIZE_POLICIES",
    "PreprocessRecipe",
    "decode_image",
    "denoise",
    "load_and_preprocess",
    "load_image",
    "preprocess",
    "resize_to",
    "save_png",
]

RGBImage = npt.NDArray[np.uint8]

# Each denoise method with its parameters and their defaults (OpenCV's names and units).
DENOISE_DEFAULTS: Mapping[str, Mapping[str, float | int]] = {
    "none": {},
    "bilateral": {"diameter": 9, "sigma_color": 75.0, "sigma_space": 75.0},
    "median": {"ksize": 5},
    "gaussian": {"ksize": 5, "sigma": 0.0},
    "nlmeans": {"h": 10.0, "h_color": 10.0, "template_window": 7, "search_window": 21},
}
DENOISE_METHODS: tuple[str, ...] = tuple(DENOISE_DEFAULTS)
RESIZE_POLICIES: tuple[str, ...] = ("stretch", "center-crop", "letterbox")
# How a shrink resamples. "exact" (the default since recipes carry the field): the box
# average of INTER_AREA computed in integers; the same pixels on x86_64 and ARM. "area": OpenCV's
# INTER_AREA, which at non-integer scales rounds differently on ARM (one grey level in
# ~0.2 % of values, enough to flip a close call of a 73-class model); kept so bundles
# and run folders made before the field existed keep the pixels they were trained on.
RESAMPLE_METHODS: tuple[str, ...] = ("exact", "area")
# What a recipe read from a manifest or run config without a "resample" key means.
_LEGACY_RESAMPLE = "area"

# The range each parameter may take. Windows are bounded because their cost grows with
# their area: nlmeans with search_window=999 held a daemon's main thread for minutes on
# one frame, and median ksize=10001 took 93 s per image. The limits are several times
# what microscope denoising uses (the defaults above; nlmeans at its limits takes about
# 2.3x its default time), and checked wherever a recipe is
# validated: manifests, [preprocessing] overrides, train flags, `preview --param`.
DENOISE_LIMITS: Mapping[str, Mapping[str, tuple[float, float]]] = {
    "none": {},
    # diameter 0 lets OpenCV derive it from sigma_space (about 3 x sigma_space, see below).
    "bilateral": {"diameter": (0, 31), "sigma_color": (0, 1000), "sigma_space": (0, 1000)},
    "median": {"ksize": (1, 31)},
    "gaussian": {"ksize": (1, 63), "sigma": (0, 100)},
    "nlmeans": {
        "h": (0, 255),
        "h_color": (0, 255),
        "template_window": (1, 15),
        "search_window": (1, 35),
    },
}
# With diameter 0 OpenCV uses a window of 2 * round(1.5 * sigma_space) + 1 pixels.
_BILATERAL_DERIVED_MAX_SIGMA = 10

# Parameters OpenCV takes as window sizes: integers, and odd so the window has a centre.
_INTEGER_PARAMS = frozenset({"diameter", "ksize", "template_window", "search_window"})
_ODD_PARAMS = frozenset({"ksize", "template_window", "search_window"})

# Largest image (width × height) we agree to decode. A 100-megapixel RGB frame is 300 MB
# of uint8 (1.2 GB as float), already more than a Raspberry Pi can spare; the largest
# whole-slide tiles and stitched mosaics a field station meets are well below it.
MAX_PIXELS = 100_000_000
# Largest decode, in bytes of memory, checked from the header before decoding: what
# OpenCV's decoded array takes (width × height × channels × bytes per sample) plus the
# RGB uint8 result. Pixels alone are not enough: a 777 KB 10000×9999 16-bit RGBA PNG
# is 800 MB decoded, and took 4.4 GB before the conversion was done in row blocks.
# 640 MiB admits a 100-megapixel 8-bit RGB frame (600 MB with its result).
MAX_DECODE_BYTES = 640 * 1024 * 1024
# Pixels converted per block in _to_rgb8, so its temporaries stay a few megabytes.
_BLOCK_PIXELS = 1 << 18


@dataclass(frozen=True)
class PreprocessRecipe:
    """Everything needed to reproduce the model's input pixels from a decoded frame.

    It travels inside the bundle manifest (``to_dict``/``from_dict``) so the edge never
    re-derives preprocessing. ``size`` is (height, width) of the model input.
    ``fill`` is the letterbox padding: ``"border"`` (median of the image border, which
    suits white-background plankton and dark-field images alike) or an RGB triple.
    ``resample`` is how shrinking works (``RESAMPLE_METHODS``): ``"exact"`` gives the
    same pixels on every CPU; ``"area"`` is what recipes without the field meant.
    Window parameters given as integral floats (``ksize = 5.0``) are stored as ints, so
    equal recipes compare equal whatever file format they came from.
    """

    size: tuple[int, int] = (224, 224)
    denoise: str = "none"
    denoise_params: Mapping[str, float | int] = field(default_factory=dict)
    resize: str = "letterbox"
    fill: str | tuple[int, int, int] = "border"
    resample: str = "exact"

    def __post_init__(self) -> None:
        problems = self.validate()
        if problems:
            raise RecipeError("invalid preprocessing recipe: " + "; ".join(problems))
        # Freeze the defaults-merged parameters so equal recipes compare equal.
        merged = {**DENOISE_DEFAULTS[self.denoise], **dict(self.denoise_params)}
        params = {k: int(v) if k in _INTEGER_PARAMS else v for k, v in sorted(merged.items())}
        object.__setattr__(self, "denoise_params", params)
        object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))
        if not isinstance(self.fill, str):
            object.__setattr__(self, "fill", tuple(int(c) for c in self.fill))

    def validate(self) -> list[str]:
        """Every problem with this recipe, each naming the field; empty when valid."""
        problems: list[str] = []
        problems.extend(_size_problems(self.size, "size"))
        problems.extend(_denoise_problems(self.denoise, self.denoise_params))
        problems.extend(_resize_problems(self.resize, self.fill))
        if not isinstance(self.resample, str) or self.resample not in RESAMPLE_METHODS:
            problems.append(
                f"resample must be one of {', '.join(RESAMPLE_METHODS)}, got {self.resample!r}"
            )
        return problems

    def __hash__(self) -> int:
        # denoise_params is a dict, so the generated hash would fail; hash the canonical form.
        return hash(self.fingerprint())

    def fingerprint(self) -> str:
        """A stable sha256 of the canonical recipe: a cache key for preprocessed images."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, as stored in the bundle manifest and the training config."""
        return {
            "size": [self.size[0], self.size[1]],
            "denoise": self.denoise,
            "denoise_params": dict(self.denoise_params),
            "resize": self.resize,
            "fill": self.fill if isinstance(self.fill, str) else list(self.fill),
            "resample": self.resample,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessRecipe:
        """Parse the manifest/config form; unknown keys are errors, not silently dropped.

        A recipe without ``resample`` was written before the field existed (a bundle or
        a run folder trained on INTER_AREA pixels), so it gets ``"area"``: the pixels it
        was trained on, not the newer default.
        """
        if not isinstance(data, Mapping):
            raise RecipeError(f"preprocessing recipe must be a table/object, got {data!r}")
        known = {"size", "denoise", "denoise_params", "resize", "fill", "resample"}
        unknown = sorted(str(key) for key in set(data) - known)
        if unknown:
            raise RecipeError(
                f"unknown preprocessing key(s): {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )
        kwargs: dict[str, Any] = dict(data)
        kwargs.setdefault("resample", _LEGACY_RESAMPLE)
        if "size" in kwargs and isinstance(kwargs["size"], list):
            kwargs["size"] = tuple(kwargs["size"])
        if "fill" in kwargs and isinstance(kwargs["fill"], list):
            kwargs["fill"] = tuple(kwargs["fill"])
        return cls(**kwargs)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _size_problems(size: object, name: str) -> list[str]:
    if (
        not isinstance(size, tuple | list)
        or len(size) != 2
        or not all(_is_int(v) and 8 <= v <= 4096 for v in size)
    ):
        return [f"{name} must be (height, width) integers in 8..4096, got {size!r}"]
    return []


def _denoise_problems(method: object, params: object) -> list[str]:
    """Problems with a denoise method and its parameters, each naming the field."""
    if not isinstance(method, str) or method not in DENOISE_DEFAULTS:
        return [f"denoise must be one of {', '.join(DENOISE_METHODS)}, got {method!r}"]
    if not isinstance(params, Mapping):
        return [f"denoise_params must be a table/object of numbers, got {params!r}"]
    problems: list[str] = []
    allowed = DENOISE_DEFAULTS[method]
    for key, value in params.items():
        if key not in allowed:
            names = ", ".join(allowed) or "no parameters"
            problems.append(
                f"denoise_params.{key} is not a parameter of {method!r} (it takes {names})"
            )
        else:
            problems.extend(_param_problems(method, key, value))
    if method == "bilateral" and not problems:
        merged = {**allowed, **params}
        sigma = float(merged["sigma_space"])
        if merged["diameter"] == 0 and sigma > _BILATERAL_DERIVED_MAX_SIGMA:
            problems.append(
                f"denoise_params.diameter 0 derives the window from sigma_space ({sigma:g} "
                f"would give {2 * round(1.5 * sigma) + 1} pixels); give a diameter of 1..31, "
                f"or sigma_space <= {_BILATERAL_DERIVED_MAX_SIGMA}"
            )
    return problems


def _param_problems(method: str, key: str, value: object) -> list[str]:
    """Problems with one denoise parameter's value: type, finiteness, range, oddness."""
    low, high = DENOISE_LIMITS[method][key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return [f"denoise_params.{key} must be a number, got {show_value(value)}"]
    try:  # the shared bounded reader: a 400-digit integer is a problem, not OverflowError
        number = read_number(value, low, high)
    except RejectedValueError as exc:
        why = " (larger windows take minutes per frame)" if key in _INTEGER_PARAMS else ""
        return [f"denoise_params.{key} {exc}{why}"]
    if key in _INTEGER_PARAMS and int(number) != number:
        return [f"denoise_params.{key} must be an integer, got {show_value(value)}"]
    if key in _ODD_PARAMS and int(number) % 2 == 0:
        return [f"denoise_params.{key} must be an odd integer, got {show_value(value)}"]
    return []


def _resize_problems(policy: object, fill: object) -> list[str]:
    problems: list[str] = []
    if not isinstance(policy, str) or policy not in RESIZE_POLICIES:
        problems.append(f"resize must be one of {', '.join(RESIZE_POLICIES)}, got {policy!r}")
    if isinstance(fill, str):
        if fill != "border":
            problems.append(f"fill must be 'border' or an RGB triple, got {fill!r}")
    elif (
        not isinstance(fill, tuple | list)
        or len(fill) != 3
        or not all(_is_int(c) and 0 <= c <= 255 for c in fill)
    ):
        problems.append(f"fill must be 'border' or three integers 0..255, got {fill!r}")
    return problems


# ── decoding ──────────────────────────────────────────────────────────────────────────


class _Header(NamedTuple):
    """What the file's own header claims, read before any pixel is decoded."""

    kind: str  # "PNG", "JPEG", "TIFF" or "BMP"
    width: int
    height: int
    # What OpenCV's decoded array will hold per pixel (an upper bound where it depends
    # on chunks the header does not cover, such as a PNG palette's transparency).
    channels: int = 3
    bytes_per_sample: int = 1

    def decoded_bytes(self) -> int:
        """Memory for OpenCV's decoded array plus our RGB uint8 result."""
        return self.width * self.height * (self.channels * self.bytes_per_sample + 3)


def decode_image(
    data: bytes,
    *,
    source: str = "<bytes>",
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_DECODE_BYTES,
) -> RGBImage:
    """Decode a PNG, JPEG, TIFF or BMP file's bytes into a C-contiguous RGB uint8 (H, W, 3).

    The header is read and checked *before* decoding: a file must be complete (PNG up to
    its IEND chunk, JPEG up to its end-of-image marker, TIFF and BMP up to their last
    pixel byte), because OpenCV may return a silently half-grey image for a file cut
    short by a full SD card or an interrupted copy; its claimed width × height must not
    exceed ``max_pixels``, and the memory decoding takes (width × height × channels ×
    bytes per sample, plus the RGB result) must not exceed ``max_bytes``, so a small
    damaged or hostile file cannot make us allocate gigabytes. The conversion to RGB
    works in row blocks, so the peak stays close to that estimate.

    Sample conversion:

    * 16-bit images are brought to 8 bits by a right shift chosen from the image's
      largest value: the smallest of 8, 10, 12, 14 or 16 bits that holds it. Scientific
      cameras store 10-, 12- or 14-bit data in 16-bit containers; a fixed ``>> 8`` would
      turn a 12-bit frame nearly black, while a per-image min–max stretch would make the
      same specimen look brighter or darker depending on what else is in the field and
      amplify noise in empty frames. A shift keeps intensities linear, and frames from
      one camera comparable. Caveat: a 12-bit frame whose brightest pixel is below 1024
      reads as 10-bit, i.e. 4× brighter; brightfield frames are rarely that dark.
    * Alpha is composited over white (straight alpha, rounded in integers): a
      transparent pixel's stored colour is undefined, and white is the empty field of a
      brightfield microscope. BMP's fourth byte is ignored, because most writers leave
      it 0 as padding rather than as alpha.
    * Grayscale becomes three equal channels; palette and 1-bit images are expanded.
    * EXIF/TIFF orientation is ignored: pixels stay in sensor order, so one camera
      always gives one geometry. A multi-page TIFF (a z-stack) yields its first page.
    * Float or signed-integer TIFFs are refused: there is no scale that is right for all.

    Raises:
        ImageDecodeError: naming ``source`` and the problem (empty, truncated, not an
            image, zero or oversized dimensions, unsupported sample type, corrupt data).
    """
    if len(data) == 0:
        raise ImageDecodeError(f"{source}: the file is empty (0 bytes)")
    header = _read_header(data, source)
    if header.width <= 0 or header.height <= 0:
        raise ImageDecodeError(
            f"{source}: the {header.kind} header gives a zero-size image "
            f"({header.width}x{header.height})"
        )
    pixels = header.width * header.height
    if pixels > max_pixels:
        raise ImageDecodeError(
            f"{source}: the {header.kind} header claims {header.width}x{header.height} "
            f"({pixels:,} pixels), more than the limit of {max_pixels:,}; refusing to "
            "decode it (a damaged or hostile file can claim any size)"
        )
    need = header.decoded_bytes()
    if need > max_bytes:
        raise ImageDecodeError(
            f"{source}: decoding this {header.width}x{header.height} {header.kind} "
            f"({header.channels} channel(s) of {8 * header.bytes_per_sample} bits) would take "
            f"{need / 2**20:,.0f} MiB, more than the limit of {max_bytes / 2**20:,.0f} MiB; "
            "refusing to decode it (export it smaller, or as 8-bit RGB)"
        )
    _check_complete(data, header, source)
    try:
        decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageDecodeError(
            f"{source}: OpenCV could not decode the {header.kind} data: {_cv_reason(exc)}"
        ) from exc
    if decoded is None:
        raise ImageDecodeError(
            f"{source}: the {header.kind} data is corrupt (OpenCV could not decode it)"
        )
    array = np.asarray(decoded)
    if array.shape[:2] != (header.height, header.width):
        raise ImageDecodeError(
            f"{source}: decoded {array.shape[1]}x{array.shape[0]} pixels but the "
            f"{header.kind} header says {header.width}x{header.height}; the file is corrupt"
        )
    return _to_rgb8(array, header.kind, source)


def load_image(path: str | os.PathLike[str], *, max_bytes: int = MAX_DECODE_BYTES) -> RGBImage:
    """Read an image file into RGB uint8 (H, W, 3); see ``decode_image`` for conversions.

    Only a regular file is read (through symlinks): a FIFO would block forever and a
    ``.png`` link to ``/dev/zero`` would never end, so both are refused before reading,
    as is a file over ``max_bytes`` (the decode budget, which no image file that fits
    it can exceed compressed).

    Raises:
        ImageDecodeError: the file is missing, a directory or other special file, too
            large, unreadable, or not a valid image; the message names the path.
    """
    p = Path(path)
    try:
        data = read_regular_file(p, max_bytes)
    except RejectedValueError as exc:  # a directory, FIFO, device or socket, or too large
        raise ImageDecodeError(f"{p}: {exc}") from None
    except FileNotFoundError as exc:
        raise ImageDecodeError(f"{p}: no such file") from exc
    except PermissionError as exc:
        raise ImageDecodeError(f"{p}: permission denied (check the file's owner and mode)") from exc
    except OSError as exc:
        raise ImageDecodeError(f"{p}: cannot read the file ({exc.strerror or exc})") from exc
    return decode_image(data, source=str(p), max_bytes=max_bytes)


def _cv_reason(exc: cv2.error) -> str:
    """OpenCV's message without its source-file prefix, on one line."""
    text = " ".join(str(exc).split())
    return text.rsplit(" error: ", 1)[-1] or "unknown OpenCV error"


_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"II+\x00": "TIFF",
    b"MM\x00+": "TIFF",
    b"BM": "BMP",
}


def _read_header(data: bytes, source: str) -> _Header:
    """Recognise the format by its signature (never by the file name) and read its size."""
    for signature, kind in _SIGNATURES.items():
        if data.startswith(signature):
            break
        if len(data) < len(signature) and signature.startswith(data):
            raise ImageDecodeError(
                f"{source}: truncated {kind} (only {len(data)} bytes); the file was cut short"
            )
    else:
        raise ImageDecodeError(
            f"{source}: not a PNG, JPEG, TIFF or BMP image (it starts with {data[:8]!r})"
        )
    if kind == "PNG":
        return _png_header(data, source)
    if kind == "JPEG":
        return _jpeg_header(data, source)[0]
    if kind == "TIFF":
        return _tiff_header(data, source)[0]
    return _bmp_header(data, source)


def _check_complete(data: bytes, header: _Header, source: str) -> None:
    """Refuse a file that was cut short, before OpenCV half-decodes it."""
    if header.kind == "PNG":
        _check_png_complete(data, source)
    elif header.kind == "JPEG":
        scan_start = _jpeg_header(data, source)[1]
        # Inside entropy-coded data every 0xFF is followed by 0x00 or a restart marker,
        # so FF D9 after the first scan can only be the end-of-image marker.
        if data.rfind(b"\xff\xd9", scan_start) < 0:
            raise ImageDecodeError(
                f"{source}: truncated JPEG (no end-of-image marker); the file was cut short"
            )
    elif header.kind == "TIFF":
        _check_tiff_complete(data, source)
    else:
        _check_bmp_complete(data, source)


def _png_header(data: bytes, source: str) -> _Header:
    if len(data) < 8 + 8 + 13:
        raise ImageDecodeError(f"{source}: truncated PNG (the header is incomplete)")
    length, chunk_type = struct.unpack_from(">I4s", data, 8)
    if chunk_type != b"IHDR" or length != 13:
        raise ImageDecodeError(f"{source}: corrupt PNG (the first chunk is not IHDR)")
    width, height, depth, colour_type = struct.unpack_from(">IIBB", data, 16)
    # Grey 1 channel, RGB 3; palette, grey+alpha and RGBA may all come out as 4.
    channels = {0: 1, 2: 3}.get(colour_type, 4)
    return _Header("PNG", width, height, channels, 2 if depth > 8 else 1)


def _check_png_complete(data: bytes, source: str) -> None:
    pos, seen_data = 8, False
    while True:
        if pos + 8 > len(data):
            raise ImageDecodeError(
                f"{source}: truncated PNG (no IEND chunk after byte {pos}); the file was cut short"
            )
        length, chunk_type = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > len(data):
            name = chunk_type.decode("latin-1")
            raise ImageDecodeError(
                f"{source}: truncated PNG (chunk {name!r} at byte {pos} runs past the end "
                f"of the {len(data)}-byte file); the file was cut short"
            )
        if chunk_type == b"IDAT":
            seen_data = True
        elif chunk_type == b"IEND":
            break
        pos = end
    if not seen_data:
        raise ImageDecodeError(f"{source}: corrupt PNG (no image data chunk)")


_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})


def _jpeg_header(data: bytes, source: str) -> tuple[_Header, int]:
    """The frame size and where the first scan's entropy-coded data starts."""
    pos = 2
    size: tuple[int, int, int, int] | None = None  # width, height, channels, precision
    while True:
        pos = data.find(b"\xff", pos)  # libjpeg also skips stray bytes between segments
        while 0 <= pos < len(data) and data[pos] == 0xFF:
            pos += 1
        if pos < 0 or pos >= len(data):
            raise ImageDecodeError(
                f"{source}: truncated JPEG (it ends before the image data); the file was cut short"
            )
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker == 0xD9:
            raise ImageDecodeError(f"{source}: corrupt JPEG (end-of-image before any image data)")
        if pos + 2 > len(data):
            raise ImageDecodeError(f"{source}: truncated JPEG (a header segment is cut off)")
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2:
            raise ImageDecodeError(
                f"{source}: corrupt JPEG (segment 0xFF{marker:02X} at byte {pos - 2})"
            )
        if pos + length > len(data):
            raise ImageDecodeError(
                f"{source}: truncated JPEG (segment 0xFF{marker:02X} at byte {pos - 2} runs "
                f"past the end of the {len(data)}-byte file); the file was cut short"
            )
        if marker in _JPEG_SOF:
            if length < 8:
                raise ImageDecodeError(f"{source}: corrupt JPEG (frame header too short)")
            precision, height, width, components = struct.unpack_from(">BHHB", data, pos + 2)
            size = (width, height, 1 if components == 1 else max(3, components), precision)
        elif marker == 0xDA:
            if size is None:
                raise ImageDecodeError(f"{source}: corrupt JPEG (no frame header before data)")
            width, height, channels, precision = size
            header = _Header("JPEG", width, height, channels, 2 if precision > 8 else 1)
            return header, pos + length
        pos += length


# TIFF field types we read: BYTE, SHORT, LONG, LONG8 (numpy dtype codes).
_TIFF_TYPES = {1: "u1", 3: "u2", 4: "u4", 16: "u8"}
_TIFF_WIDTH, _TIFF_HEIGHT, _TIFF_BITS, _TIFF_PHOTOMETRIC, _TIFF_SAMPLES = 256, 257, 258, 262, 277
# Photometric interpretations OpenCV decodes through libtiff's RGBA reader (4 channels):
# palette, CMYK, YCbCr, CIELab.
_TIFF_VIA_RGBA = frozenset({3, 5, 6, 8})
_TIFF_STRIPS, _TIFF_STRIP_BYTES, _TIFF_TILES, _TIFF_TILE_BYTES = 273, 279, 324, 325
_TIFF_WANTED = frozenset(
    {
        _TIFF_WIDTH,
        _TIFF_HEIGHT,
        _TIFF_BITS,
        _TIFF_PHOTOMETRIC,
        _TIFF_SAMPLES,
        _TIFF_STRIPS,
        _TIFF_STRIP_BYTES,
        _TIFF_TILES,
        _TIFF_TILE_BYTES,
    }
)


def _tiff_header(data: bytes, source: str) -> tuple[_Header, dict[int, npt.NDArray[Any]]]:
    """Size of the first page, with its strip/tile tags (classic TIFF and BigTIFF)."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    # Classic TIFF uses 4-byte offsets and counts, BigTIFF 8-byte ones; a directory
    # is an entry count, the entries (tag, type, count, value-or-offset), the next offset.
    word = order + ("Q" if big else "I")
    word_size = struct.calcsize(word)
    count_fmt = order + ("Q" if big else "H")
    entry_size = 4 + 2 * word_size
    if len(data) < (16 if big else 8):
        raise ImageDecodeError(f"{source}: truncated TIFF (the header is incomplete)")
    (ifd,) = struct.unpack_from(word, data, 8 if big else 4)
    if ifd + struct.calcsize(count_fmt) > len(data):
        raise ImageDecodeError(f"{source}: truncated TIFF (the first directory is missing)")
    (n_entries,) = struct.unpack_from(count_fmt, data, ifd)
    first_entry = ifd + struct.calcsize(count_fmt)
    if first_entry + n_entries * entry_size + word_size > len(data):
        raise ImageDecodeError(f"{source}: truncated TIFF (the first directory is cut off)")
    tags: dict[int, npt.NDArray[Any]] = {}
    for i in range(n_entries):
        entry = first_entry + i * entry_size
        tag, field_type = struct.unpack_from(order + "HH", data, entry)
        if tag not in _TIFF_WANTED:
            continue
        (count,) = struct.unpack_from(word, data, entry + 4)
        if field_type not in _TIFF_TYPES or count == 0:
            raise ImageDecodeError(f"{source}: corrupt TIFF (tag {tag} has an invalid type)")
        dtype = np.dtype(order + _TIFF_TYPES[field_type])
        value_at = entry + 4 + word_size
        if count * dtype.itemsize > word_size:  # the values do not fit inline
            (value_at,) = struct.unpack_from(word, data, value_at)
        if value_at + count * dtype.itemsize > len(data):
            raise ImageDecodeError(f"{source}: truncated TIFF (tag {tag} points past the end)")
        tags[tag] = np.frombuffer(data, dtype=dtype, count=count, offset=value_at)
    if _TIFF_WIDTH not in tags or _TIFF_HEIGHT not in tags:
        raise ImageDecodeError(f"{source}: corrupt TIFF (no image width/height tags)")
    samples = int(tags[_TIFF_SAMPLES][0]) if _TIFF_SAMPLES in tags else 1
    bits = int(tags[_TIFF_BITS].max()) if _TIFF_BITS in tags else 1
    photometric = int(tags[_TIFF_PHOTOMETRIC][0]) if _TIFF_PHOTOMETRIC in tags else 1
    channels = min(samples, 64)  # bounded: the tag is a 16-bit number anyone can write
    if photometric in _TIFF_VIA_RGBA or bits not in (8, 16, 32, 64):
        channels = max(channels, 4)
    header = _Header(
        "TIFF",
        int(tags[_TIFF_WIDTH][0]),
        int(tags[_TIFF_HEIGHT][0]),
        channels,
        max(1, min(bits, 64) // 8),
    )
    return header, tags


def _check_tiff_complete(data: bytes, source: str) -> None:
    tags = _tiff_header(data, source)[1]
    for offsets_tag, counts_tag in (
        (_TIFF_STRIPS, _TIFF_STRIP_BYTES),
        (_TIFF_TILES, _TIFF_TILE_BYTES),
    ):
        if offsets_tag not in tags or counts_tag not in tags:
            continue
        offsets, counts = tags[offsets_tag], tags[counts_tag]
        # Compare each term first so that the sum cannot wrap around in uint64.
        if (
            len(offsets) != len(counts)
            or int(offsets.max()) > len(data)
            or int(counts.max()) > len(data)
            or int((offsets.astype(np.uint64) + counts.astype(np.uint64)).max()) > len(data)
        ):
            raise ImageDecodeError(
                f"{source}: truncated TIFF (the pixel data runs past the end of the "
                f"{len(data)}-byte file); the file was cut short"
            )


def _bmp_fields(data: bytes, source: str) -> tuple[int, int, int, int, int]:
    """(width, height, bits per pixel, compression, pixel data offset) of a BMP."""
    if len(data) < 26:
        raise ImageDecodeError(f"{source}: truncated BMP (the header is incomplete)")
    offset, dib_size = struct.unpack_from("<II", data, 10)
    if dib_size == 12:  # OS/2 BITMAPCOREHEADER
        width, height, _, bpp = struct.unpack_from("<HHHH", data, 18)
        return width, height, bpp, 0, offset
    if dib_size < 16:
        raise ImageDecodeError(f"{source}: corrupt BMP (unknown header size {dib_size})")
    if len(data) < 34:
        raise ImageDecodeError(f"{source}: truncated BMP (the header is incomplete)")
    width, height, _, bpp, compression = struct.unpack_from("<iiHHI", data, 18)
    if dib_size < 20:
        compression = 0
    return width, abs(height), bpp, compression, offset


def _bmp_header(data: bytes, source: str) -> _Header:
    width, height, bpp, *_ = _bmp_fields(data, source)
    return _Header("BMP", width, height, 4 if bpp == 32 else 3)


def _check_bmp_complete(data: bytes, source: str) -> None:
    width, height, bpp, compression, offset = _bmp_fields(data, source)
    # Uncompressed and bit-field BMPs have a computable size; RLE ones OpenCV checks itself.
    if compression in (0, 3, 6) and bpp in (1, 4, 8, 16, 24, 32):
        stride = (width * bpp + 31) // 32 * 4
        if offset + stride * height > len(data):
            raise ImageDecodeError(
                f"{source}: truncated BMP (pixel data needs {offset + stride * height} bytes, "
                f"the file has {len(data)}); the file was cut short"
            )


def _to_rgb8(array: npt.NDArray[Any], kind: str, source: str) -> RGBImage:
    """OpenCV's BGR(A)/gray output, 8- or 16-bit, to RGB uint8; see ``decode_image``.

    Converted in blocks of rows into one preallocated result, so the temporaries
    (uint32 alpha blending, 16-bit shifts) take a few megabytes, not several times the
    image: the peak is the decoded array plus the result, which ``decode_image``
    checked against its budget from the header.
    """
    if array.dtype not in (np.uint8, np.uint16):
        raise ImageDecodeError(
            f"{source}: unsupported {kind} sample type {array.dtype} "
            "(only 8- and 16-bit unsigned integer images are supported; export as such)"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        colour, alpha = array, None
    elif array.ndim == 3 and array.shape[2] in (2, 4):
        colour, alpha = array[:, :, :-1], array[:, :, -1]
        if kind == "BMP":
            alpha = None
    elif array.ndim == 3 and array.shape[2] == 3:
        colour, alpha = array, None
    else:
        raise ImageDecodeError(f"{source}: unsupported {kind} layout with shape {array.shape}")
    shift = None
    if colour.dtype == np.uint16:
        peak = int(colour.max())
        shift = next(b for b in (8, 10, 12, 14, 16) if peak < 1 << b) - 8
    height, width = colour.shape[:2]
    out = np.empty((height, width, 3), dtype=np.uint8)
    rows = max(1, _BLOCK_PIXELS // max(1, width))
    for top in range(0, height, rows):
        block = slice(top, top + rows)
        out[block] = _rows_to_rgb8(colour[block], None if alpha is None else alpha[block], shift)
    return out


def _rows_to_rgb8(
    colour: npt.NDArray[Any], alpha: npt.NDArray[Any] | None, shift: int | None
) -> RGBImage:
    """One block of rows of :func:`_to_rgb8`; ``shift`` is set for 16-bit samples."""
    if shift is not None:
        colour8 = (colour >> shift).astype(np.uint8)
        alpha8 = (
            None
            if alpha is None
            else ((alpha.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        )
    else:
        colour8, alpha8 = colour.astype(np.uint8, copy=False), alpha
    if alpha8 is not None:
        a = alpha8.astype(np.uint32)
        if colour8.ndim == 3:
            a = a[:, :, np.newaxis]
        blended = (colour8.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
        colour8 = blended.astype(np.uint8)
    if colour8.ndim == 2 or colour8.shape[2] == 1:
        gray = colour8.reshape(colour8.shape[0], colour8.shape[1], 1)
        return np.repeat(gray, 3, axis=2)
    return colour8[:, :, ::-1]


# ── denoise, resize, preprocess ───────────────────────────────────────────────────────


def _check_rgb(image: object, what: str) -> RGBImage:
    """The array as C-contiguous uint8 (H, W, 3), or a ValueError saying what it is."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{what} must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"{what} must be RGB uint8 of shape (height, width, 3), "
            f"got {image.dtype} of shape {image.shape}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {image.shape})")
    return np.ascontiguousarray(image)


def denoise(
    image: RGBImage, method: str, params: Mapping[str, float | int] | None = None
) -> RGBImage:
    """Apply one of ``DENOISE_METHODS`` at the image's own resolution; returns a new array.

    ``params`` override ``DENOISE_DEFAULTS[method]`` (OpenCV's units: pixels for
    windows, 0..255 intensity for sigmas). ``none`` returns an equal copy. ``nlmeans``
    is the strongest and by far the slowest (about 1 s for 1280×960 on a desktop core).

    Raises:
        RecipeError: unknown method, unknown or invalid parameter.
        ValueError: ``image`` is not RGB uint8 (H, W, 3).
    """
    rgb = _check_rgb(image, "denoise: image")
    given = {} if params is None else params
    problems = _denoise_problems(method, given)
    if problems:
        raise RecipeError("; ".join(problems))
    p = {**DENOISE_DEFAULTS[method], **given}
    try:
        if method == "bilateral":
            out = cv2.bilateralFilter(
                rgb, int(p["diameter"]), float(p["sigma_color"]), float(p["sigma_space"])
            )
        elif method == "median":
            out = cv2.medianBlur(rgb, int(p["ksize"]))
        elif method == "gaussian":
            k = int(p["ksize"])
            out = cv2.GaussianBlur(rgb, (k, k), float(p["sigma"]))
        elif method == "nlmeans":
            # OpenCV converts to CIELAB assuming BGR, so hand it BGR and turn it back.
            bgr = np.ascontiguousarray(rgb[:, :, ::-1])
            out = cv2.fastNlMeansDenoisingColored(
                bgr,
                None,
                float(p["h"]),
                float(p["h_color"]),
                int(p["template_window"]),
                int(p["search_window"]),
            )[:, :, ::-1]
        else:
            out = rgb.copy()
    except cv2.error as exc:
        raise RecipeError(
            f"denoise {method!r} with {dict(p)} failed in OpenCV: {_cv_reason(exc)}"
        ) from exc
    return np.ascontiguousarray(cast(RGBImage, out))


def resize_to(
    image: RGBImage,
    size: tuple[int, int],
    policy: str,
    fill: str | tuple[int, int, int] = "border",
    resample: str = "exact",
) -> RGBImage:
    """Bring an image to ``size`` = (height, width) by one of ``RESIZE_POLICIES``.

    * ``stretch`` — resize to the size, distorting the aspect ratio.
    * ``center-crop`` — cut the largest centred region with the target aspect ratio,
      then resize it (the same as scaling the short side to fit and cropping).
    * ``letterbox`` — scale to fit inside, keep the aspect ratio, pad the rest with
      ``fill``: an RGB triple, or ``"border"`` = the per-channel median of the image's
      outer 1-pixel border, so padding looks like the specimen's own background.

    Shrinking averages the source area under each output pixel (no aliasing of fine
    cell walls). With ``resample="exact"`` that box average is computed in integers,
    so it is the same on every CPU (OpenCV's INTER_AREA geometry, rounded half up;
    within one grey level of INTER_AREA). ``"area"`` is OpenCV's INTER_AREA itself,
    which rounds differently on ARM at non-integer scales (recipes made before
    ``resample`` existed). Enlarging on either axis uses INTER_LINEAR_EXACT, OpenCV's
    fixed-point bilinear, exact on x86 and ARM. Sizes and offsets
    are computed in integers; the result is deterministic.

    Raises:
        RecipeError: invalid ``size``, ``policy`` or ``fill``.
        ValueError: ``image`` is not RGB uint8 (H, W, 3).
    """
    rgb = _check_rgb(image, "resize_to: image")
    problems = _size_problems(size, "size") + _resize_problems(policy, fill)
    if resample not in RESAMPLE_METHODS:
        problems.append(f"resample must be one of {', '.join(RESAMPLE_METHODS)}, got {resample!r}")
    if problems:
        raise RecipeError("; ".join(problems))
    out_h, out_w = int(size[0]), int(size[1])
    h, w = rgb.shape[:2]
    if policy == "stretch":
        return _resize(rgb, out_w, out_h, resample)
    if policy == "center-crop":
        if w * out_h > h * out_w:  # source is wider than the target: crop the sides
            crop_h, crop_w = h, max(1, (2 * h * out_w + out_h) // (2 * out_h))
        else:  # taller (or equal): crop top and bottom
            crop_h, crop_w = max(1, (2 * w * out_h + out_w) // (2 * out_w)), w
        top, left = (h - crop_h) // 2, (w - crop_w) // 2
        return _resize(rgb[top : top + crop_h, left : left + crop_w], out_w, out_h, resample)
    colour = _border_colour(rgb) if isinstance(fill, str) else tuple(int(c) for c in fill)
    if w * out_h >= h * out_w:  # limited by width
        new_w, new_h = out_w, min(out_h, max(1, (2 * h * out_w + w) // (2 * w)))
    else:
        new_w, new_h = min(out_w, max(1, (2 * w * out_h + h) // (2 * h))), out_h
    canvas = np.empty((out_h, out_w, 3), dtype=np.uint8)
    canvas[:, :] = np.array(colour, dtype=np.uint8)
    top, left = (out_h - new_h) // 2, (out_w - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = _resize(rgb, new_w, new_h, resample)
    return canvas


def _resize(image: RGBImage, width: int, height: int, resample: str) -> RGBImage:
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return np.array(image, dtype=np.uint8, order="C", copy=True)
    source = np.ascontiguousarray(image)
    shrink = width <= w and height <= h
    if shrink and resample == "exact":
        return _area_exact(source, height, width)
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR_EXACT
    out = cv2.resize(source, (width, height), interpolation=interpolation)
    return np.ascontiguousarray(cast(RGBImage, out))


class _AreaAxis(NamedTuple):
    """Where each output pixel's box starts and ends along one axis, in integers.

    Scaled so that a source pixel is ``m`` units and an output pixel ``n`` units long
    (source length n, output length m): output j covers [j n, (j + 1) n), which starts
    ``cut_first`` units into source pixel ``first`` and ends ``cut_last`` units before
    the end of source pixel ``last``.
    """

    first: npt.NDArray[np.intp]
    last: npt.NDArray[np.intp]
    cut_first: npt.NDArray[np.int64]
    cut_last: npt.NDArray[np.int64]


def _area_axis(n: int, m: int) -> _AreaAxis:
    start = np.arange(m, dtype=np.int64) * n
    end = start + n
    first = start // m
    last = (end - 1) // m
    return _AreaAxis(first, last, start - first * m, (last + 1) * m - end)


def _box_sums(values: npt.NDArray[Any], axis: _AreaAxis, m: int, dim: int) -> npt.NDArray[np.int64]:
    """Along ``dim``: each output box's sum of source values times overlap, exactly.

    The running sum is int32 where it cannot overflow (uint8 rows up to 8 million
    pixels long), which halves the memory traffic of the pass over the full frame.
    """
    n = values.shape[dim]
    small = values.dtype == np.uint8 and 255 * n < 2**31
    shape = list(values.shape)
    shape[dim] += 1
    cumulative = np.zeros(shape, dtype=np.int32 if small else np.int64)
    inner = [slice(None)] * values.ndim
    inner[dim] = slice(1, None)
    np.cumsum(values, axis=dim, dtype=cumulative.dtype, out=cumulative[tuple(inner)])
    whole = np.take(cumulative, axis.last + 1, axis=dim).astype(np.int64)
    whole -= np.take(cumulative, axis.first, axis=dim)
    weights = [1] * values.ndim
    weights[dim] = -1
    sums: npt.NDArray[np.int64] = whole * m
    sums -= np.take(values, axis.first, axis=dim) * axis.cut_first.reshape(weights)
    sums -= np.take(values, axis.last, axis=dim) * axis.cut_last.reshape(weights)
    return sums


def _area_exact(image: RGBImage, height: int, width: int) -> RGBImage:
    """INTER_AREA's box average computed in integers: the same pixels on every CPU.

    Each output pixel is the mean of the source area it covers, partial pixels at its
    edges weighted by the part inside (OpenCV's INTER_AREA geometry), rounded half up.
    Sums and overlaps are integers (int64 holds 255 x MAX_PIXELS x 4096), so no
    float rounding, SIMD width or FMA can change a value. It works column-wise in bands
    of rows, so the temporaries stay a few megabytes beyond the first pass's result,
    made along the axis that leaves the smaller one.
    """
    h, w = image.shape[:2]
    if h * width > height * w:  # narrow the longer way first: a smaller intermediate
        flipped = _area_exact(np.ascontiguousarray(image.transpose(1, 0, 2)), width, height)
        return np.ascontiguousarray(flipped.transpose(1, 0, 2))
    columns = _area_axis(w, width)
    rows = _area_axis(h, height)
    narrowed = np.empty((h, width, 3), dtype=np.int64)
    band = max(1, _BLOCK_PIXELS // max(1, w))
    for top in range(0, h, band):
        narrowed[top : top + band] = _box_sums(image[top : top + band], columns, width, 1)
    total = _box_sums(narrowed, rows, height, 0)
    divisor = w * h
    return np.ascontiguousarray(((total + divisor // 2) // divisor).astype(np.uint8))


def _border_colour(image: RGBImage) -> tuple[int, int, int]:
    """Per-channel median of the outer 1-pixel frame, each pixel counted once."""
    h, w = image.shape[:2]
    if h <= 2 or w <= 2:
        border = image.reshape(-1, 3)
    else:
        border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    median = np.floor(np.median(border, axis=0) + 0.5)
    return int(median[0]), int(median[1]), int(median[2])


def preprocess(image: RGBImage, recipe: PreprocessRecipe) -> RGBImage:
    """The model input for one decoded frame: denoise at source resolution, then resize.

    Denoising first is what the filter parameters mean (a 5-pixel median of the camera's
    pixels) and what the research scripts did; resizing first would change what each
    parameter does with every input size. Returns C-contiguous uint8 (H, W, 3) with
    (H, W) == ``recipe.size``.

    Raises:
        ValueError: ``image`` is not RGB uint8 (H, W, 3) or ``recipe`` is not a recipe.
    """
    rgb = _check_rgb(image, "preprocess: image")
    if not isinstance(recipe, PreprocessRecipe):
        raise ValueError(f"preprocess: recipe must be a PreprocessRecipe, got {recipe!r}")
    if recipe.denoise != "none":
        rgb = denoise(rgb, recipe.denoise, recipe.denoise_params)
    return resize_to(rgb, recipe.size, recipe.resize, recipe.fill, recipe.resample)


def load_and_preprocess(path: str | os.PathLike[str], recipe: PreprocessRecipe) -> RGBImage:
    """``preprocess(load_image(path), recipe)``: what training feeds the model per file.

    Raises:
        ImageDecodeError: the file cannot be read or decoded; the message names it.
    """
    return preprocess(load_image(path), recipe)


def save_png(path: str | os.PathLike[str], rgb: RGBImage) -> None:
    """Write RGB uint8 (H, W, 3) as a lossless PNG, atomically.

    The bytes go to a hidden temporary file beside ``path`` that is then renamed over
    it, so a reader (or a power cut on the Pi's SD card) never sees a half-written image.

    Raises:
        FieldscopeError: the file cannot be written; the message names the path.
        ValueError: ``rgb`` is not RGB uint8 (H, W, 3).
    """
    image = _check_rgb(rgb, "save_png: rgb")
    target = Path(path)
    try:
        ok, encoded = cv2.imencode(".png", np.ascontiguousarray(image[:, :, ::-1]))
    except cv2.error as exc:
        raise FieldscopeError(f"cannot encode {target} as PNG: {_cv_reason(exc)}") from exc
    if not ok:
        raise FieldscopeError(f"cannot encode {target} as PNG")
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with temporary.open("xb") as handle:
            handle.write(encoded.tobytes())
        temporary.replace(target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise FieldscopeError(f"cannot write {target}: {exc.strerror or exc}") from exc
