"""The preprocessing contract: decoding real files, denoising, resizing, the recipe.

Every image here is a real file: written by OpenCV, or hand-crafted byte by byte where
we need ground truth independent of OpenCV's channel conventions (a PNG or TIFF whose
first stored sample is red *is* red) or a damaged file no encoder would write.
"""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
import zlib
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from fieldscope.edge.errors import FieldscopeError, ImageDecodeError, RecipeError
from fieldscope.edge.preprocess import (
    DENOISE_DEFAULTS,
    DENOISE_METHODS,
    MAX_PIXELS,
    RESAMPLE_METHODS,
    RESIZE_POLICIES,
    PreprocessRecipe,
    decode_image,
    denoise,
    load_and_preprocess,
    load_image,
    preprocess,
    resize_to,
    save_png,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# ── hand-crafted files ────────────────────────────────────────────────────────────────


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _png(
    width: int,
    height: int,
    bit_depth: int,
    colour_type: int,
    rows: list[bytes],
    *,
    extra: bytes = b"",
) -> bytes:
    """A PNG with the given IHDR and unfiltered rows (colour type 2 = RGB, 3 = palette...)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    raw = b"".join(b"\x00" + row for row in rows)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + extra
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )


def _tiff(rgb: np.ndarray, *, big: bool = False, order: str = "<") -> bytes:
    """An uncompressed RGB TIFF (or BigTIFF), directory first and pixels last, as many
    cameras write it, so cutting the file short cuts the pixel data."""
    h, w = rgb.shape[:2]
    word, count_fmt, word_size = ("Q", "Q", 8) if big else ("I", "H", 4)
    head = (b"II" if order == "<" else b"MM") + struct.pack(order + "H", 43 if big else 42)
    if big:
        head += struct.pack(order + "HH", 8, 0)
    ifd_at = len(head) + word_size
    n_entries = 10
    entry_size = 4 + 2 * word_size
    bits_at = ifd_at + struct.calcsize(count_fmt) + n_entries * entry_size + word_size
    bits = struct.pack(order + "HHH", 8, 8, 8)
    pixel_at = bits_at + len(bits)
    pixels = rgb.tobytes()

    def entry(tag: int, kind: int, count: int, value: bytes) -> bytes:
        return struct.pack(order + "HH" + word, tag, kind, count) + value.ljust(word_size, b"\0")

    def short(v: int) -> bytes:
        return struct.pack(order + "H", v)

    def long(v: int) -> bytes:
        return struct.pack(order + "I", v)

    entries = [
        entry(256, 4, 1, long(w)),
        entry(257, 4, 1, long(h)),
        entry(258, 3, 3, bits if big else long(bits_at)),
        entry(259, 3, 1, short(1)),  # no compression
        entry(262, 3, 1, short(2)),  # RGB
        entry(273, 4, 1, long(pixel_at)),
        entry(277, 3, 1, short(3)),
        entry(278, 4, 1, long(h)),
        entry(279, 4, 1, long(len(pixels))),
        entry(284, 3, 1, short(1)),
    ]
    assert len(entries) == n_entries
    ifd = struct.pack(order + count_fmt, n_entries) + b"".join(entries)
    ifd += struct.pack(order + word, 0)
    return head + struct.pack(order + word, ifd_at) + ifd + bits + pixels


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _imwrite(tmp_path: Path, name: str, image: np.ndarray, params: list[int] | None = None) -> Path:
    path = tmp_path / name
    assert cv2.imwrite(str(path), image, params or [])
    return path


def _quadrants() -> np.ndarray:
    """A 64x64 RGB image: red, green / blue, white quadrants."""
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[:32, :32], rgb[:32, 32:], rgb[32:, :32], rgb[32:, 32:] = RED, GREEN, BLUE, WHITE
    return rgb


# ── decoding: every kind of file a microscope camera writes ───────────────────────────


@pytest.mark.parametrize(("ext", "tolerance"), [("png", 0), ("tif", 0), ("bmp", 0), ("jpg", 6)])
def test_colour_files_decode_to_rgb_in_the_right_channel_order(
    tmp_path: Path, ext: str, tolerance: int
) -> None:
    rgb = _quadrants()
    path = _imwrite(tmp_path, f"q.{ext}", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    image = load_image(path)
    assert image.dtype == np.uint8
    assert image.shape == (64, 64, 3)
    assert image.flags.c_contiguous
    for (y, x), colour in zip(
        [(16, 16), (16, 48), (48, 16), (48, 48)], [RED, GREEN, BLUE, WHITE], strict=True
    ):
        assert np.abs(image[y, x].astype(int) - colour).max() <= tolerance, (y, x, image[y, x])


def test_handcrafted_rgb_png_whose_samples_are_red_comes_out_red(tmp_path: Path) -> None:
    path = _write(tmp_path, "red.png", _png(2, 1, 8, 2, [bytes([255, 0, 0, 0, 0, 255])]))
    assert load_image(path).tolist() == [[list(RED), list(BLUE)]]


@pytest.mark.parametrize("big", [False, True], ids=["tiff", "bigtiff"])
@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
def test_handcrafted_rgb_tiff_decodes_exactly(tmp_path: Path, big: bool, order: str) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    rgb[0, 0] = RED
    path = _write(tmp_path, "crafted.tif", _tiff(rgb, big=big, order=order))
    np.testing.assert_array_equal(load_image(path), rgb)


def test_handcrafted_bmp_stores_blue_green_red(tmp_path: Path) -> None:
    # A 24-bit BMP stores B, G, R per pixel, rows bottom-up, each padded to 4 bytes.
    pixel_bytes = bytes([0, 0, 255, 0])  # one red pixel + 1 padding byte
    dib = struct.pack("<IiiHHIIiiII", 40, 1, 1, 1, 24, 0, len(pixel_bytes), 2835, 2835, 0, 0)
    head = b"BM" + struct.pack("<IHHI", 14 + len(dib) + len(pixel_bytes), 0, 0, 14 + len(dib))
    path = _write(tmp_path, "red.bmp", head + dib + pixel_bytes)
    assert load_image(path).tolist() == [[list(RED)]]


@pytest.mark.parametrize("ext", ["png", "tif", "bmp", "jpg"])
def test_grayscale_files_become_three_equal_channels(tmp_path: Path, ext: str) -> None:
    gray = np.full((16, 16), 100, np.uint8)
    gray[:, 8:] = 200
    image = load_image(_imwrite(tmp_path, f"g.{ext}", gray))
    assert image.shape == (16, 16, 3)
    np.testing.assert_array_equal(image[:, :, 0], image[:, :, 1])
    np.testing.assert_array_equal(image[:, :, 0], image[:, :, 2])
    assert abs(int(image[4, 2, 0]) - 100) <= 2
    assert abs(int(image[4, 13, 0]) - 200) <= 2


@pytest.mark.parametrize("ext", ["png", "tif"])
@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        # 12-bit camera data in a 16-bit container: shifted by 4, not by 8 (not black).
        ([[0, 4095], [2048, 16]], [[0, 255], [128, 1]]),
        # Full 16-bit range: shifted by 8.
        ([[0, 65535], [256, 32768]], [[0, 255], [1, 128]]),
        # 10-bit data: shifted by 2.
        ([[0, 1023], [512, 4]], [[0, 255], [128, 1]]),
        # 8-bit data in a 16-bit container: kept as it is.
        ([[0, 200], [17, 255]], [[0, 200], [17, 255]]),
    ],
    ids=["12-bit", "16-bit", "10-bit", "8-bit"],
)
def test_16_bit_grayscale_scales_by_its_container_bit_depth(
    tmp_path: Path, ext: str, samples: list[list[int]], expected: list[list[int]]
) -> None:
    image = load_image(_imwrite(tmp_path, f"g16.{ext}", np.array(samples, np.uint16)))
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image[:, :, 0], expected)
    np.testing.assert_array_equal(image[:, :, 2], expected)


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16_bit_colour_keeps_channel_order_and_scales(tmp_path: Path, ext: str) -> None:
    bgr = np.zeros((2, 2, 3), np.uint16)
    bgr[:, :] = (0, 1000, 4000)  # blue 0, green 1000, red 4000: 12-bit data
    image = load_image(_imwrite(tmp_path, f"c16.{ext}", bgr))
    assert image[0, 0].tolist() == [4000 >> 4, 1000 >> 4, 0]


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_rgba_is_composited_over_white(tmp_path: Path, ext: str) -> None:
    bgra = np.zeros((1, 4, 4), np.uint8)
    bgra[0, 0] = (0, 0, 255, 255)  # opaque red
    bgra[0, 1] = (0, 0, 0, 0)  # fully transparent black → white
    bgra[0, 2] = (0, 0, 0, 128)  # half-transparent black → mid grey
    bgra[0, 3] = (255, 0, 0, 255)  # opaque blue
    image = load_image(_imwrite(tmp_path, f"a.{ext}", bgra))
    assert image.tolist() == [[list(RED), list(WHITE), [127, 127, 127], list(BLUE)]]


def test_16_bit_rgba_png_is_scaled_then_composited(tmp_path: Path) -> None:
    bgra = np.zeros((1, 2, 4), np.uint16)
    bgra[0, 0] = (0, 0, 65535, 65535)
    bgra[0, 1] = (0, 0, 65535, 0)
    image = load_image(_imwrite(tmp_path, "a16.png", bgra))
    assert image.tolist() == [[list(RED), list(WHITE)]]


def test_gray_alpha_palette_and_1_bit_pngs(tmp_path: Path) -> None:
    gray_alpha = _png(2, 1, 8, 4, [bytes([7, 255, 9, 0])])
    assert load_image(_write(tmp_path, "ga.png", gray_alpha)).tolist() == [[[7, 7, 7], list(WHITE)]]
    palette = _png(2, 1, 8, 3, [bytes([0, 1])], extra=_chunk(b"PLTE", bytes([*RED, *BLUE])))
    assert load_image(_write(tmp_path, "p.png", palette)).tolist() == [[list(RED), list(BLUE)]]
    one_bit = _png(4, 1, 1, 0, [bytes([0b1010_0000])])
    assert load_image(_write(tmp_path, "b.png", one_bit))[0, :, 0].tolist() == [255, 0, 255, 0]


def test_32_bit_bmp_fourth_byte_is_padding_not_alpha(tmp_path: Path) -> None:
    bgra = np.zeros((2, 2, 4), np.uint8)
    bgra[:, :] = (0, 255, 0, 0)  # green, fourth byte 0 as most BMP writers leave it
    image = load_image(_imwrite(tmp_path, "x.bmp", bgra))
    assert (image == GREEN).all()


def test_decode_image_accepts_bytes_and_is_deterministic(tmp_path: Path) -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    data = cv2.imencode(".jpg", rgb)[1].tobytes()
    first, second = decode_image(data), decode_image(data)
    assert first.tobytes() == second.tobytes()


# ── bad files: one clear ImageDecodeError naming the file, never a cv2.error ──────────


def _good(ext: str) -> bytes:
    rgb = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    return cv2.imencode(f".{ext}", rgb)[1].tobytes()


def _huge_png(width: int = 100_000, height: int = 100_000) -> bytes:
    # A well-formed PNG (correct CRCs, IDAT, IEND) whose IHDR claims 10 gigapixels.
    return _png(width, height, 8, 2, [b"\x00" * 30])


def _jpeg_with_size(width: int, height: int) -> bytes:
    data = bytearray(_good("jpg"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


BAD_FILES: dict[str, tuple[str, Any, str]] = {
    # id: (file name, bytes, a phrase the message must contain)
    "empty": ("empty.png", b"", "empty"),
    "text named png": ("notes.png", b"sample 12, stained\n", "not a PNG, JPEG, TIFF or BMP"),
    "png cut in IDAT": ("cut.png", _good("png")[:2000], "truncated PNG"),
    "png without IEND": ("cut.png", _good("png")[:-12], "truncated PNG"),
    "png cut in signature": ("cut.png", b"\x89PNG", "truncated PNG"),
    "jpeg without EOI": ("cut.jpg", _good("jpg")[:-2], "truncated JPEG"),
    "jpeg cut in half": ("cut.jpg", _good("jpg")[: len(_good("jpg")) // 2], "truncated JPEG"),
    "jpeg cut in header": ("cut.jpg", _good("jpg")[:30], "truncated JPEG"),
    "tiff cut": ("cut.tif", _good("tif")[:-1], "TIFF"),
    "tiff pixels cut": ("cut.tif", _tiff(np.zeros((8, 8, 3), np.uint8))[:-5], "truncated TIFF"),
    "bmp cut": ("cut.bmp", _good("bmp")[:-100], "truncated BMP"),
    "png 0x0": ("zero.png", _png(0, 0, 8, 2, []), "zero-size image (0x0)"),
    "png 5x0": ("zero.png", _png(5, 0, 8, 2, []), "zero-size"),
    "jpeg 0 wide": ("zero.jpg", _jpeg_with_size(0, 48), "zero-size"),
    "huge png": ("huge.png", _huge_png(), "100000x100000"),
    "huge jpeg": ("huge.jpg", _jpeg_with_size(65535, 65535), "65535x65535"),
    "corrupt png data": (
        "bad.png",
        _png(4, 4, 8, 2, []).replace(_chunk(b"IDAT", zlib.compress(b"")), _chunk(b"IDAT", b"??")),
        "corrupt",
    ),
    "float tiff": (
        "float.tif",
        cv2.imencode(".tif", np.zeros((4, 4), np.float32))[1].tobytes(),
        "float32",
    ),
}


@pytest.mark.parametrize(("name", "data", "phrase"), BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_file_gives_one_clear_error_naming_it(
    tmp_path: Path, name: str, data: bytes, phrase: str
) -> None:
    path = _write(tmp_path, name, data)
    with pytest.raises(ImageDecodeError) as caught:
        load_image(path)
    message = str(caught.value)
    assert str(path) in message
    assert phrase in message
    assert "\n" not in message


def test_huge_header_is_refused_before_allocating_pixels(tmp_path: Path) -> None:
    path = _write(tmp_path, "huge.png", _huge_png())
    tracemalloc.start()
    try:
        with pytest.raises(ImageDecodeError, match="more than the limit of 100,000,000"):
            load_image(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000  # decoding would have needed 30 GB


def test_pixel_limit_is_adjustable_and_defaults_to_max_pixels() -> None:
    data = _good("png")  # 48 x 64 = 3072 pixels
    assert decode_image(data, source="a.png").shape == (48, 64, 3)
    with pytest.raises(ImageDecodeError, match=r"a\.png: .*limit of 3,000"):
        decode_image(data, source="a.png", max_pixels=3000)
    assert MAX_PIXELS == 100_000_000


def test_decode_error_names_the_source_for_bytes() -> None:
    with pytest.raises(ImageDecodeError, match=r"^camera frame 7: the file is empty"):
        decode_image(b"", source="camera frame 7")


def test_missing_file_and_directory_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="no such file"):
        load_image(tmp_path / "absent.png")
    with pytest.raises(ImageDecodeError, match="is a directory"):
        load_image(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_gives_permission_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "locked.png", _good("png"))
    path.chmod(0)
    with pytest.raises(ImageDecodeError, match="permission denied"):
        load_image(path)


# ── denoise ───────────────────────────────────────────────────────────────────────────


def _clean_and_noisy() -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:64, 0:64]
    clean = np.stack([x * 3, y * 3, (x + y) * 2], axis=2).astype(np.uint8)
    noise = np.random.default_rng(4).normal(0, 20, clean.shape)
    noisy = np.clip(clean + noise, 0, 255).astype(np.uint8)
    return clean, noisy


def _error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(float) - b.astype(float)) ** 2))


@pytest.mark.parametrize("method", [m for m in DENOISE_METHODS if m != "none"])
def test_each_denoise_method_reduces_noise(method: str) -> None:
    clean, noisy = _clean_and_noisy()
    before = noisy.copy()
    out = denoise(noisy, method, DENOISE_DEFAULTS[method])
    assert out.shape == noisy.shape
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous
    assert not np.array_equal(out, noisy)
    assert _error(out, clean) < 0.7 * _error(noisy, clean)
    np.testing.assert_array_equal(noisy, before)  # the input is left alone


def test_denoise_none_is_identity_on_a_copy() -> None:
    _, noisy = _clean_and_noisy()
    out = denoise(noisy, "none", {})
    np.testing.assert_array_equal(out, noisy)
    assert out is not noisy


def test_denoise_parameters_change_the_result() -> None:
    _, noisy = _clean_and_noisy()
    assert not np.array_equal(
        denoise(noisy, "median", {"ksize": 3}), denoise(noisy, "median", {"ksize": 7})
    )


@pytest.mark.parametrize(
    ("method", "params", "phrase"),
    [
        ("wavelet", {}, "denoise must be one of"),
        ("median", {"diameter": 5}, "denoise_params.diameter is not a parameter of 'median'"),
        ("median", {"ksize": 4}, "denoise_params.ksize must be an odd integer"),
        ("nlmeans", {"h": float("nan")}, "denoise_params.h must be a finite number"),
    ],
)
def test_denoise_rejects_bad_method_and_parameters(
    method: str, params: dict[str, float], phrase: str
) -> None:
    _, noisy = _clean_and_noisy()
    with pytest.raises(RecipeError, match=phrase):
        denoise(noisy, method, params)


# ── resize policies ───────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("policy", RESIZE_POLICIES)
@pytest.mark.parametrize("source", [(30, 50), (50, 30), (7, 300), (1, 1), (48, 32), (600, 800)])
def test_every_policy_gives_the_requested_shape(policy: str, source: tuple[int, int]) -> None:
    image = np.random.default_rng(5).integers(0, 256, (*source, 3), dtype=np.uint8)
    out = resize_to(image, (32, 48), policy, "border")
    assert out.shape == (32, 48, 3)
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous


def test_stretch_fills_the_whole_frame() -> None:
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, :40], image[:, 40:] = RED, BLUE
    out = resize_to(image, (32, 32), "stretch", "border")
    assert (out[:, :15] == RED).all()
    assert (out[:, 17:] == BLUE).all()


@pytest.mark.parametrize("tall", [False, True])
def test_center_crop_keeps_the_centre(tall: bool) -> None:
    image = np.zeros((60, 120, 3), np.uint8)
    image[:, :30], image[:, 30:90], image[:, 90:] = RED, GREEN, BLUE
    if tall:
        image = np.ascontiguousarray(image.transpose(1, 0, 2))
    out = resize_to(image, (30, 30), "center-crop", "border")
    assert (out == GREEN).all()


def test_center_crop_to_a_wide_target_cuts_top_and_bottom() -> None:
    image = np.zeros((100, 100, 3), np.uint8)
    image[:25], image[25:75], image[75:] = RED, GREEN, BLUE
    assert (resize_to(image, (32, 64), "center-crop", "border") == GREEN).all()


def _framed(height: int, width: int) -> np.ndarray:
    image = np.full((height, width, 3), (200, 100, 50), np.uint8)
    image[0, :], image[-1, :], image[:, 0], image[:, -1] = [(10, 20, 30)] * 4
    return image


def test_letterbox_pads_with_the_border_colour_and_keeps_aspect() -> None:
    out = resize_to(_framed(60, 120), (64, 64), "letterbox", "border")
    # 120 wide → 64: the content is 32 rows high, centred, rows 16..47.
    assert (out[:16] == (10, 20, 30)).all()
    assert (out[48:] == (10, 20, 30)).all()
    assert (out[20:44, 4:60] == (200, 100, 50)).all()


def test_letterbox_border_colour_is_a_median_robust_to_specks() -> None:
    image = _framed(60, 120)
    image[0, :10] = (255, 255, 255)  # dust on the frame edge
    image[-1, -3:] = (0, 0, 0)
    out = resize_to(image, (64, 64), "letterbox", "border")
    assert out[0, 0].tolist() == [10, 20, 30]


def test_letterbox_pads_with_an_explicit_colour_and_upscales_a_small_image() -> None:
    small = np.full((10, 20, 3), (1, 2, 3), np.uint8)
    out = resize_to(small, (64, 64), "letterbox", (255, 255, 255))
    assert (out[:16] == WHITE).all()
    assert (out[48:] == WHITE).all()
    assert (out[16:48] == (1, 2, 3)).all()


def test_letterbox_of_the_same_aspect_has_no_padding() -> None:
    image = np.full((100, 50, 3), 77, np.uint8)
    assert (resize_to(image, (64, 32), "letterbox", (255, 0, 0)) == 77).all()


def test_same_size_returns_an_equal_copy() -> None:
    image = np.random.default_rng(6).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for policy in RESIZE_POLICIES:
        out = resize_to(image, (32, 32), policy, "border")
        np.testing.assert_array_equal(out, image)
        assert out is not image


@pytest.mark.parametrize(
    ("size", "policy", "fill", "phrase"),
    [
        ((32, 32), "crop", "border", "resize must be one of"),
        ((32, 32), "letterbox", "white", "fill must be 'border'"),
        ((32, 32), "letterbox", (0, 0, 256), "fill must be 'border' or three integers"),
        ((0, 32), "stretch", "border", "size must be"),
    ],
)
def test_resize_rejects_bad_arguments(
    size: tuple[int, int], policy: str, fill: Any, phrase: str
) -> None:
    with pytest.raises(RecipeError, match=phrase):
        resize_to(np.zeros((8, 8, 3), np.uint8), size, policy, fill)


# ── exact resampling: the same pixels on x86_64 and ARM ──────────────────────────────


def _specimen_like(height: int, width: int, seed: int = 3, noise: float = 12.0) -> np.ndarray:
    """A smooth, textured frame with fine edges: where resize rounding shows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    base = 128 + 60 * np.sin(xx / 7.3) * np.cos(yy / 5.1)
    image = np.stack([base, base[::-1], base[:, ::-1]], axis=2)
    image += rng.normal(0, noise, image.shape)
    image[height // 3 : height // 2, width // 4 : width // 2] = (30, 200, 90)
    return np.clip(image, 0, 255).astype(np.uint8)


def _area_reference(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The box average under each output pixel, in Python fractions: ground truth."""
    h, w = image.shape[:2]

    def weights(n: int, m: int) -> np.ndarray:
        matrix = np.zeros((m, n), dtype=object)
        for j in range(m):
            for i in range(n):
                overlap = min((i + 1) * m, (j + 1) * n) - max(i * m, j * n)
                matrix[j, i] = Fraction(max(0, overlap), n)
        return matrix

    wy, wx = weights(h, height), weights(w, width)
    out = np.empty((height, width, 3), dtype=np.uint8)
    for c in range(3):
        mean = wy.dot(image[:, :, c].astype(object)).dot(wx.T)
        out[:, :, c] = [[int(v + Fraction(1, 2)) for v in row] for row in mean]
    return out


@pytest.mark.parametrize(
    ("source", "target"),
    [((26, 40), (13, 8)), ((37, 50), (13, 9)), ((61, 45), (16, 45)), ((30, 97), (8, 12))],
)
def test_exact_shrink_is_the_box_average_rounded_half_up(
    source: tuple[int, int], target: tuple[int, int]
) -> None:
    image = _specimen_like(*source)
    out = resize_to(image, target, "stretch", "border")
    np.testing.assert_array_equal(out, _area_reference(image, *target))


def test_exact_shrink_does_not_depend_on_opencv_code_paths() -> None:
    # OpenCV's INTER_AREA at non-integer scales computes in float, and its NEON code
    # rounds differently from SSE: an ARM station saw one grey level differ in 0.2 % of
    # values, which flipped a close call of a 73-class model. The exact shrink is
    # integer arithmetic; with OpenCV's optimised (SIMD) paths off it is unchanged, and
    # it stays within one grey level of INTER_AREA (same geometry).
    image = _specimen_like(961, 1283)
    optimised = cv2.useOptimized()
    try:
        cv2.setUseOptimized(False)
        reference = {p: resize_to(image, (224, 224), p, "border") for p in RESIZE_POLICIES}
    finally:
        cv2.setUseOptimized(optimised)
    for policy in RESIZE_POLICIES:
        exact = resize_to(image, (224, 224), policy, "border")
        np.testing.assert_array_equal(exact, reference[policy])
        area = resize_to(image, (224, 224), policy, "border", "area")
        assert np.abs(exact.astype(np.int16) - area).max() <= 1


def test_recipes_without_resample_keep_the_pixels_they_were_trained_on() -> None:
    # A manifest or run config written before the field existed means INTER_AREA.
    image = _specimen_like(300, 410)
    old = PreprocessRecipe.from_dict({"size": [96, 96], "resize": "stretch"})
    assert old.resample == "area"
    np.testing.assert_array_equal(
        preprocess(image, old), cv2.resize(image, (96, 96), interpolation=cv2.INTER_AREA)
    )
    new = PreprocessRecipe(size=(96, 96), resize="stretch")
    assert new.resample == "exact"
    assert new.to_dict()["resample"] == "exact"
    assert PreprocessRecipe.from_dict(new.to_dict()) == new
    assert new.fingerprint() != old.fingerprint()  # training caches are not mixed up


def test_a_bad_resample_value_is_a_clear_error() -> None:
    with pytest.raises(RecipeError, match=r"resample must be one of exact, area, got 'cubic'"):
        PreprocessRecipe.from_dict({"resample": "cubic"})
    with pytest.raises(RecipeError, match="resample must be one of"):
        resize_to(np.zeros((8, 8, 3), np.uint8), (8, 8), "stretch", "border", "nearest")
    assert RESAMPLE_METHODS == ("exact", "area")


# ── preprocess: the whole contract ────────────────────────────────────────────────────


@pytest.mark.parametrize("policy", RESIZE_POLICIES)
def test_preprocess_returns_the_model_input_shape(policy: str) -> None:
    _, noisy = _clean_and_noisy()
    recipe = PreprocessRecipe(size=(48, 40), denoise="gaussian", resize=policy)
    out = preprocess(noisy, recipe)
    assert out.shape == (48, 40, 3)
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous


def test_preprocess_denoises_at_source_resolution_before_resizing() -> None:
    # Isolated bright specks every 4 px: a 3x3 median at full resolution removes them;
    # shrinking first would average each into its 4x4 block (255/16 = 16) and keep them.
    image = np.zeros((64, 64, 3), np.uint8)
    image[1::4, 1::4] = 255
    recipe = PreprocessRecipe(
        size=(16, 16), denoise="median", denoise_params={"ksize": 3}, resize="stretch"
    )
    assert (preprocess(image, recipe) == 0).all()
    assert (resize_to(image, (16, 16), "stretch", "border") > 0).all()


def test_preprocess_ignores_memory_layout() -> None:
    _, noisy = _clean_and_noisy()
    recipe = PreprocessRecipe(size=(32, 32), denoise="bilateral")
    view = np.asfortranarray(noisy)
    assert preprocess(view, recipe).tobytes() == preprocess(noisy, recipe).tobytes()


@pytest.mark.parametrize(
    ("image", "phrase"),
    [
        (np.zeros((8, 8, 3), np.float32), "float32"),
        (np.zeros((8, 8), np.uint8), r"shape \(8, 8\)"),
        (np.zeros((8, 8, 4), np.uint8), r"shape \(8, 8, 4\)"),
        (np.zeros((0, 8, 3), np.uint8), "empty"),
        ([[1, 2, 3]], "numpy array"),
    ],
)
def test_preprocess_rejects_arrays_that_are_not_rgb_uint8(image: Any, phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase):
        preprocess(image, PreprocessRecipe())


def test_load_and_preprocess_is_deterministic(tmp_path: Path) -> None:
    _, noisy = _clean_and_noisy()
    path = _imwrite(tmp_path, "n.png", cv2.cvtColor(noisy[:, :50], cv2.COLOR_RGB2BGR))
    recipe = PreprocessRecipe(size=(32, 32), denoise="nlmeans", resize="letterbox")
    first = load_and_preprocess(path, recipe)
    second = load_and_preprocess(path, recipe)
    assert first.shape == (32, 32, 3)
    assert first.tobytes() == second.tobytes()


# ── the recipe ────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"denoise": "wavelet"}, "denoise must be one of"),
        ({"denoise": None}, "denoise must be one of"),
        ({"denoise": "median", "denoise_params": {"diameter": 3}}, "denoise_params.diameter"),
        ({"denoise": "median", "denoise_params": {"ksize": 4}}, "denoise_params.ksize"),
        ({"denoise": "gaussian", "denoise_params": {"ksize": 2.5}}, "denoise_params.ksize"),
        ({"denoise": "bilateral", "denoise_params": {"sigma_color": -1}}, "sigma_color"),
        ({"denoise": "bilateral", "denoise_params": {"sigma_space": "75"}}, "sigma_space"),
        ({"denoise": "bilateral", "denoise_params": {"diameter": True}}, "diameter"),
        ({"denoise": "nlmeans", "denoise_params": {"h": float("inf")}}, "denoise_params.h"),
        ({"denoise": "nlmeans", "denoise_params": {"search_window": 20}}, "search_window"),
        ({"denoise": "median", "denoise_params": [5]}, "denoise_params must be"),
        ({"size": (0, 0)}, "size must be"),
        ({"size": (5000, 224)}, "size must be"),
        ({"size": (224,)}, "size must be"),
        ({"size": ("224", "224")}, "size must be"),
        ({"size": 224}, "size must be"),
        ({"resize": "crop"}, "resize must be one of"),
        ({"fill": "white"}, "fill must be"),
        ({"fill": (256, 0, 0)}, "fill must be"),
        ({"fill": (1, 2)}, "fill must be"),
        ({"fill": (True, 0, 0)}, "fill must be"),
    ],
)
def test_recipe_validation_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(RecipeError, match=field):
        PreprocessRecipe(**kwargs)


def test_recipe_reports_every_problem_at_once() -> None:
    with pytest.raises(RecipeError) as caught:
        PreprocessRecipe(size=(1, 1), denoise="median", denoise_params={"ksize": 2}, fill="x")
    message = str(caught.value)
    assert "size" in message
    assert "denoise_params.ksize" in message
    assert "fill" in message


def test_recipe_merges_defaults_and_normalises_integers() -> None:
    assert PreprocessRecipe(denoise="median").denoise_params == {"ksize": 5}
    assert PreprocessRecipe(denoise="median", denoise_params={"ksize": 5.0}) == PreprocessRecipe(
        denoise="median"
    )
    assert isinstance(
        PreprocessRecipe(denoise="median", denoise_params={"ksize": 5.0}).denoise_params["ksize"],
        int,
    )


@pytest.mark.parametrize(
    "recipe",
    [
        PreprocessRecipe(),
        PreprocessRecipe(size=(96, 128), denoise="bilateral", resize="center-crop"),
        PreprocessRecipe(denoise="nlmeans", denoise_params={"h": 4.5}, fill=(255, 255, 255)),
        PreprocessRecipe(denoise="gaussian", denoise_params={"sigma": 1.2}, resize="stretch"),
    ],
)
def test_recipe_round_trips_through_dict_and_json(recipe: PreprocessRecipe) -> None:
    assert PreprocessRecipe.from_dict(recipe.to_dict()) == recipe
    assert PreprocessRecipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


def test_recipe_from_dict_rejects_unknown_keys_and_non_tables() -> None:
    with pytest.raises(RecipeError, match=r"unknown preprocessing key.*denoize"):
        PreprocessRecipe.from_dict({"denoize": "median"})
    with pytest.raises(RecipeError, match="must be a table"):
        PreprocessRecipe.from_dict([("size", [224, 224])])  # type: ignore[arg-type]


# ── save_png ──────────────────────────────────────────────────────────────────────────


def test_save_png_round_trips_exactly_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    rgb = np.random.default_rng(7).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    path = tmp_path / "out.png"
    save_png(path, rgb)
    save_png(path, rgb)  # overwriting is fine
    np.testing.assert_array_equal(load_image(path), rgb)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_save_png_failure_names_the_path(tmp_path: Path) -> None:
    target = tmp_path / "no-such-dir" / "x.png"
    with pytest.raises(FieldscopeError, match=r"cannot write .*no-such-dir/x\.png"):
        save_png(target, np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="RGB uint8"):
        save_png(tmp_path / "y.png", np.zeros((4, 4), np.uint8))
