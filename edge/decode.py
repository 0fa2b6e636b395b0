"""Contract 1, first step — decoding: any file a microscope camera writes → RGB uint8.

:func:`decode_image` reads the file's own header (PNG, JPEG, TIFF, BMP) before any
pixel is decoded, refuses files cut short and sizes a damaged or hostile file could
claim, then lets OpenCV decode and converts 8/16-bit grey, RGB and RGBA to RGB uint8
in row blocks. :func:`load_image` reads a regular file first. Re-exported by
:mod:`fieldscope.edge.preprocess`.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import numpy.typing as npt

from fieldscope.edge.errors import ImageDecodeError
from fieldscope.edge.pixels import BLOCK_PIXELS, RGBImage, cv_reason
from fieldscope.edge.untrusted import RejectedValueError, read_regular_file

__all__ = ["MAX_DECODE_BYTES", "MAX_PIXELS", "decode_image", "load_image"]

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
    header = _admissible_header(data, source, max_pixels, max_bytes)
    _check_complete(data, header, source)
    return _to_rgb8(_opencv_decode(data, header, source), header.kind, source)


def _admissible_header(data: bytes, source: str, max_pixels: int, max_bytes: int) -> _Header:
    """The file's header, once its size is within both limits; see ``decode_image``."""
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
    return header


def _opencv_decode(data: bytes, header: _Header, source: str) -> npt.NDArray[Any]:
    """OpenCV's decoded array, checked against the size the header gave."""
    try:
        decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageDecodeError(
            f"{source}: OpenCV could not decode the {header.kind} data: {cv_reason(exc)}"
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
    return array


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
    return _tiff_size(tags), tags


def _tiff_size(tags: dict[int, npt.NDArray[Any]]) -> _Header:
    """The first page's header from its tags (sizes bounded: tags are anyone's numbers)."""
    samples = int(tags[_TIFF_SAMPLES][0]) if _TIFF_SAMPLES in tags else 1
    bits = int(tags[_TIFF_BITS].max()) if _TIFF_BITS in tags else 1
    photometric = int(tags[_TIFF_PHOTOMETRIC][0]) if _TIFF_PHOTOMETRIC in tags else 1
    channels = min(samples, 64)  # bounded: the tag is a 16-bit number anyone can write
    if photometric in _TIFF_VIA_RGBA or bits not in (8, 16, 32, 64):
        channels = max(channels, 4)
    width, height = int(tags[_TIFF_WIDTH][0]), int(tags[_TIFF_HEIGHT][0])
    return _Header("TIFF", width, height, channels, max(1, min(bits, 64) // 8))


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
    rows = max(1, BLOCK_PIXELS // max(1, width))
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
