"""Fuzzing the image decoder: whatever bytes a camera folder holds, ``decode_image``
returns an RGB image or raises our ``ImageDecodeError`` — never another exception,
never a crash of the process.

The inputs are random bytes, random bytes behind a real format signature (so the
header parsers, not only the signature check, see them), and real PNG, JPEG, TIFF and
BMP files written by OpenCV and then damaged: bytes flipped, ranges cut out or
repeated, the file truncated, and the header's width and height overwritten.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from chaos_harness import FUZZ_SETTINGS, TallyOf
from helpers import identification_document, manifest_document, model_info_document
from hypothesis import example, given
from hypothesis import strategies as st

from fieldscope.edge.bundle import (
    MANIFEST_FILE,
    MODEL_FILE,
    Quantization,
    QuantParams,
    read_bundle,
)
from fieldscope.edge.errors import FieldscopeError, ImageDecodeError
from fieldscope.edge.health import Heartbeat, ModelInfo
from fieldscope.edge.message import Identification
from fieldscope.edge.preprocess import PreprocessRecipe, decode_image, load_image

pytestmark = [pytest.mark.chaos]

# Small enough that a damaged header claiming a huge size is refused or cheap.
_MAX_PIXELS = 4_000_000


def _encode(ext: str, image: np.ndarray, params: tuple[int, ...] = ()) -> bytes:
    ok, buffer = cv2.imencode(ext, image, list(params))
    assert ok, f"OpenCV could not write {ext}"
    return buffer.tobytes()


def _real_files() -> dict[str, bytes]:
    """Real files in every layout the decoder converts: 8/16-bit, grey, alpha, RLE..."""
    rng = np.random.default_rng(7)
    bgr = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
    bgr[5:15, 8:20] = (20, 200, 90)  # some structure, so compression has work to do
    grey = bgr[:, :, 1].copy()
    bgra = np.dstack([bgr, rng.integers(0, 256, bgr.shape[:2], dtype=np.uint8)])
    deep = (bgr.astype(np.uint16) << 4) | 0x0F  # 12-bit data in a 16-bit container
    return {
        "png-rgb": _encode(".png", bgr),
        "png-grey": _encode(".png", grey),
        "png-rgba": _encode(".png", bgra),
        "png-16bit": _encode(".png", deep),
        "jpeg": _encode(".jpg", bgr, (cv2.IMWRITE_JPEG_QUALITY, 80)),
        "jpeg-progressive": _encode(".jpg", bgr, (cv2.IMWRITE_JPEG_PROGRESSIVE, 1)),
        "jpeg-grey": _encode(".jpg", grey),
        "tiff-raw": _encode(".tif", bgr, (cv2.IMWRITE_TIFF_COMPRESSION, 1)),
        "tiff-lzw": _encode(".tif", bgr, (cv2.IMWRITE_TIFF_COMPRESSION, 5)),
        "tiff-16bit": _encode(".tif", deep),
        "tiff-rgba": _encode(".tif", bgra),
        "bmp": _encode(".bmp", bgr),
        "bmp-grey": _encode(".bmp", grey),
    }


REAL = _real_files()
SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"II+\x00", b"BM")


def _check(data: bytes) -> str:
    """The property: an RGB uint8 image, or ImageDecodeError (a FieldscopeError) with a
    one-line message naming the file; any other exception fails the test. Which one."""
    refused: ImageDecodeError | None = None
    try:
        image = decode_image(data, source="fuzz.bin", max_pixels=_MAX_PIXELS)
    except ImageDecodeError as exc:
        refused = exc
    if refused is not None:
        text = str(refused)
        assert text.startswith("fuzz.bin: "), text
        assert "\n" not in text
        assert len(text) > len("fuzz.bin: ") + 10
        return "refused with ImageDecodeError"
    assert isinstance(image, np.ndarray)
    assert image.dtype == np.uint8
    assert image.ndim == 3
    assert image.shape[2] == 3
    assert image.shape[0] * image.shape[1] <= _MAX_PIXELS
    assert image.flags.c_contiguous
    return "decoded"


# --- mutations of real files ---------------------------------------------------------------

Mutation = Callable[[bytearray], None]


@st.composite
def mutations(draw: st.DrawFn, size: int) -> Mutation:
    """One way a file gets damaged on an SD card, in a copy or by a hostile sender."""
    kind = draw(
        st.sampled_from(["flip", "set", "cut", "repeat", "truncate", "insert", "dimensions"])
    )
    at = draw(st.integers(0, max(0, size - 1)))
    length = draw(st.integers(1, 64))
    value = draw(st.integers(0, 255))
    blob = draw(st.binary(min_size=1, max_size=32))
    dims = draw(st.sampled_from([0, 1, 2, 255, 4096, 65535, 2**31 - 1, 2**32 - 1]))

    def mutate(data: bytearray) -> None:
        n = len(data)
        if n == 0:
            return
        i = at % n
        if kind == "flip":
            data[i] ^= 1 << (value % 8)
        elif kind == "set":
            data[i] = value
        elif kind == "cut":
            del data[i : i + length]
        elif kind == "repeat":
            data[i:i] = data[i : i + length]
        elif kind == "truncate":
            del data[i:]
        elif kind == "insert":
            data[i:i] = blob
        else:  # overwrite the fields a header keeps its size in
            _set_dimensions(data, dims)

    return mutate


def _set_dimensions(data: bytearray, value: int) -> None:
    if data.startswith(b"\x89PNG") and len(data) >= 24:
        struct.pack_into(">II", data, 16, value, value & 0xFFFF)
    elif data.startswith(b"BM") and len(data) >= 26:
        struct.pack_into("<ii", data, 18, value & 0x7FFFFFFF, -(value & 0xFFFF))
    elif data.startswith(b"\xff\xd8"):
        sof = next(
            (i for i in range(2, len(data) - 8) if data[i] == 0xFF and data[i + 1] == 0xC0), None
        )
        if sof is not None:
            struct.pack_into(">HH", data, sof + 5, value & 0xFFFF, (value >> 3) & 0xFFFF)
    elif data[:2] in (b"II", b"MM"):
        order = "<" if data[:2] == b"II" else ">"
        ifd = struct.unpack_from(order + "I", data, 4)[0]
        if ifd + 2 <= len(data):
            count = struct.unpack_from(order + "H", data, ifd)[0]
            for k in range(min(count, 64)):
                entry = ifd + 2 + 12 * k
                if entry + 12 > len(data):
                    break
                tag = struct.unpack_from(order + "H", data, entry)[0]
                if tag in (256, 257):  # ImageWidth, ImageLength as LONG
                    struct.pack_into(order + "HI", data, entry + 2, 4, 1)
                    struct.pack_into(order + "I", data, entry + 8, value)


@FUZZ_SETTINGS
@given(
    name=st.sampled_from(sorted(REAL)),
    damage=st.lists(mutations(4096), min_size=1, max_size=4),
)
def test_fuzz_damaged_real_files_decode_or_raise_our_error(
    chaos_tally: TallyOf, name: str, damage: list[Mutation]
) -> None:
    data = bytearray(REAL[name])
    for mutate in damage:
        mutate(data)
    chaos_tally("fuzz decode_image, damaged real files").counts[_check(bytes(data))] += 1


@FUZZ_SETTINGS
@given(data=st.binary(max_size=2048))
def test_fuzz_random_bytes_raise_our_error(chaos_tally: TallyOf, data: bytes) -> None:
    chaos_tally("fuzz decode_image, random bytes").counts[_check(data)] += 1


@FUZZ_SETTINGS
@given(signature=st.sampled_from(SIGNATURES), tail=st.binary(max_size=512))
def test_fuzz_random_bytes_behind_a_real_signature(
    chaos_tally: TallyOf, signature: bytes, tail: bytes
) -> None:
    outcome = _check(signature + tail)
    chaos_tally("fuzz decode_image, random bytes behind a signature").counts[outcome] += 1


def test_the_undamaged_seeds_decode() -> None:
    """The mutations start from files that really are valid (else the fuzz proves little)."""
    for name, data in REAL.items():
        image = decode_image(data, source=name)
        assert image.shape == (23, 31, 3), name


# --- numbers of any size, deep nesting and odd names in the other readers (issue 15) -------
#
# A 400-digit integer in a float field once raised OverflowError past every
# ``except MessageError`` and stopped a collector for good; nesting 100,000 deep raised
# RecursionError past the bundle watcher. The property for every reader of outside data:
# it returns a value or raises its own error type, whatever the number or the depth.


def _manifest_doc() -> dict[str, Any]:
    return manifest_document(
        quantization=Quantization(QuantParams(0.5, 0), None),
        preprocessing=PreprocessRecipe(size=(32, 32), denoise="median"),
    )


# Where a number goes: (document, path of keys).
_NUMBER_SLOTS: list[tuple[str, tuple[str | int, ...]]] = [
    ("identification", ("score",)),
    ("identification", ("seq",)),
    ("identification", ("quality", "sharpness")),
    ("identification", ("timings_ms", "capture")),
    ("identification", ("image", "width")),
    ("identification", ("top_k", 1, "score")),
    ("model", ("threshold",)),
    ("manifest", ("threshold",)),
    ("manifest", ("quantization", "input", "scale")),
    ("manifest", ("quantization", "input", "zero_point")),
    ("manifest", ("files", MODEL_FILE, "size")),
    ("manifest", ("input_shape", 1)),
    ("manifest", ("preprocessing", "denoise_params", "ksize")),
    ("manifest", ("schema_version",)),
]

_digits = st.text("0123456789", min_size=1, max_size=6000).map(lambda s: s.lstrip("0") or "0")
number_literals = st.one_of(
    st.integers().map(str),
    st.builds(lambda sign, d: sign + d, st.sampled_from(["", "-"]), _digits),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.builds(lambda m, e: f"{m}e{e}", st.integers(-99, 99), st.integers(-100_000, 100_000)),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "-0"]),
    # Long ones on purpose: shrinking favours short strings, and the trouble starts at 309
    # digits (beyond a double) and again at 4301 (beyond Python's int/str limit).
    st.builds(lambda n, d: d * n, st.integers(300, 6000), st.sampled_from("123456789")),
)


def _document(kind: str) -> dict[str, Any]:
    return {
        "identification": identification_document,
        "model": model_info_document,
        "manifest": _manifest_doc,
    }[kind]()


def _raw(doc: dict[str, Any], path: tuple[str | int, ...], literal: str) -> bytes:
    node: Any = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = "@@RAW@@"
    return json.dumps(doc).replace('"@@RAW@@"', literal, 1).encode()


def _read(kind: str, payload: bytes) -> str:
    """Feed ``payload`` to the reader of ``kind``; 'accepted' or 'refused' (our error);
    any other exception fails the test."""
    try:
        if kind == "identification":
            Identification.from_json(payload)
        elif kind == "model":
            ModelInfo.from_json(payload)
        elif kind == "heartbeat":
            Heartbeat.from_json(payload)
        else:
            with tempfile.TemporaryDirectory() as folder:
                (Path(folder) / MANIFEST_FILE).write_bytes(payload)
                (Path(folder) / MODEL_FILE).write_bytes(b"model")
                read_bundle(Path(folder))
    except FieldscopeError as exc:
        text = str(exc)
        assert "\n" not in text
        assert len(text) < 1000, text[:200]
        return "refused with our error"
    return "accepted"


@FUZZ_SETTINGS
@given(slot=st.sampled_from(_NUMBER_SLOTS), literal=number_literals)
@example(slot=("identification", ("quality", "sharpness")), literal="9" * 400)
@example(slot=("model", ("threshold",)), literal="9" * 400)
@example(slot=("manifest", ("threshold",)), literal="9" * 5000)
@example(slot=("manifest", ("quantization", "input", "scale")), literal="9" * 400)
def test_fuzz_numbers_of_any_size_in_payloads_and_manifests(
    chaos_tally: TallyOf, slot: tuple[str, tuple[str | int, ...]], literal: str
) -> None:
    kind, path = slot
    outcome = _read(kind, _raw(_document(kind), path, literal))
    chaos_tally("fuzz numbers of any size, payload and manifest readers").counts[outcome] += 1


@FUZZ_SETTINGS
@given(
    slot=st.sampled_from(_NUMBER_SLOTS),
    depth=st.integers(1, 200_000),
    opener=st.sampled_from(["[", '{"a": ', '[{"b": ']),
    closed=st.booleans(),
)
def test_fuzz_deep_nesting_in_payloads_and_manifests(
    chaos_tally: TallyOf,
    slot: tuple[str, tuple[str | int, ...]],
    depth: int,
    opener: str,
    closed: bool,
) -> None:
    closer = {"[": "]", '{"a": ': "}", '[{"b": ': "}]"}[opener]
    literal = opener * depth + "1" + (closer * depth if closed else "")
    kind, path = slot
    outcome = _read(kind, _raw(_document(kind), path, literal))
    chaos_tally("fuzz deep nesting, payload and manifest readers").counts[outcome] += 1


_VALID_PNG = _encode(".png", np.full((8, 8, 3), 77, np.uint8))


@FUZZ_SETTINGS
@given(name=st.binary(min_size=1, max_size=60).filter(lambda b: b"/" not in b and b"\0" not in b))
def test_fuzz_file_names_that_are_not_utf8_load_and_print(name: bytes) -> None:
    """A folder camera or `edge classify` meets whatever bytes a copy wrote as a name."""
    from fieldscope.edge.cli import _shown

    with tempfile.TemporaryDirectory() as folder:
        path = Path(os.fsdecode(os.fsencode(folder) + b"/" + name + b".png"))
        path.write_bytes(_VALID_PNG)
        assert load_image(path).shape == (8, 8, 3)
        _shown(path).encode("utf-8")  # printable: never UnicodeEncodeError
