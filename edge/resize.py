"""Contract 1, last step — resizing to the model's input size, the same pixels on
every CPU (:func:`resize_to`), and the checks of a recipe's size, policy and fill.

Re-exported by :mod:`fieldscope.edge.preprocess`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import cv2
import numpy as np
import numpy.typing as npt

from fieldscope.edge.errors import RecipeError
from fieldscope.edge.pixels import BLOCK_PIXELS, RGBImage, check_rgb

__all__ = [
    "RESAMPLE_METHODS",
    "RESIZE_POLICIES",
    "resample_problems",
    "resize_problems",
    "resize_to",
    "size_problems",
]

RESIZE_POLICIES: tuple[str, ...] = ("stretch", "center-crop", "letterbox")
# How a shrink resamples. "exact" (the default since recipes carry the field): the box
# average of INTER_AREA computed in integers; the same pixels on x86_64 and ARM. "area": OpenCV's
# INTER_AREA, which at non-integer scales rounds differently on ARM (one grey level in
# ~0.2 % of values, enough to flip a close call of a 73-class model); kept so bundles
# and run folders made before the field existed keep the pixels they were trained on.
RESAMPLE_METHODS: tuple[str, ...] = ("exact", "area")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def size_problems(size: object, name: str) -> list[str]:
    if (
        not isinstance(size, tuple | list)
        or len(size) != 2
        or not all(_is_int(v) and 8 <= v <= 4096 for v in size)
    ):
        return [f"{name} must be (height, width) integers in 8..4096, got {size!r}"]
    return []


def resize_problems(policy: object, fill: object) -> list[str]:
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


def resample_problems(resample: object) -> list[str]:
    """``resample`` must be one of ``RESAMPLE_METHODS``."""
    if not isinstance(resample, str) or resample not in RESAMPLE_METHODS:
        return [f"resample must be one of {', '.join(RESAMPLE_METHODS)}, got {resample!r}"]
    return []


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
    rgb = check_rgb(image, "resize_to: image")
    problems = size_problems(size, "size") + resize_problems(policy, fill)
    problems += resample_problems(resample)
    if problems:
        raise RecipeError("; ".join(problems))
    out_h, out_w = int(size[0]), int(size[1])
    if policy == "stretch":
        return _resize(rgb, out_w, out_h, resample)
    if policy == "center-crop":
        return _center_crop(rgb, out_h, out_w, resample)
    return _letterbox(rgb, out_h, out_w, fill, resample)


def _center_crop(rgb: RGBImage, out_h: int, out_w: int, resample: str) -> RGBImage:
    """The largest centred region with the target's aspect ratio, resized."""
    h, w = rgb.shape[:2]
    if w * out_h > h * out_w:  # source is wider than the target: crop the sides
        crop_h, crop_w = h, max(1, (2 * h * out_w + out_h) // (2 * out_h))
    else:  # taller (or equal): crop top and bottom
        crop_h, crop_w = max(1, (2 * w * out_h + out_w) // (2 * out_w)), w
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return _resize(rgb[top : top + crop_h, left : left + crop_w], out_w, out_h, resample)


def _letterbox(
    rgb: RGBImage, out_h: int, out_w: int, fill: str | tuple[int, int, int], resample: str
) -> RGBImage:
    """Scaled to fit inside, the aspect ratio kept, the rest padded with ``fill``."""
    h, w = rgb.shape[:2]
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
    band = max(1, BLOCK_PIXELS // max(1, w))
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
