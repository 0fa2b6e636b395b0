"""Fuzzing the image decoder: whatever bytes a camera folder holds, ``decode_image``
returns an RGB image or raises our ``ImageDecodeError`` — never another exception,
never a crash of the process.

The inputs are random bytes, random bytes behind a real format signature (so the
header parsers, not only the signature check, see them), and real PNG, JPEG, TIFF and
BMP files written by OpenCV and then damaged: bytes flipped, ranges cut out or
repeated, the file truncated, and the header's width and height overwritten.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import cv2
import numpy as np
import pytest
from chaos_harness import FUZZ_SETTINGS, TallyOf
from hypothesis import given
from hypothesis import strategies as st

from fieldscope.edge.errors import ImageDecodeError
from fieldscope.edge.preprocess import decode_image

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
