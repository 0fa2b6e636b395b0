"""Many specimens in one frame: segmentation into objects, and their measurements in µm.

A slide of pollen, a settled plankton sample or a flow cell shows dozens of organisms
per field of view. This stage cuts a frame into objects the way PlanktoScope-like
instruments do, so that each object can be classified, counted and sized on its own:

1. background correction: none, a blank frame of the empty slide (flat field), or the
   running median of the last ``median_frames`` frames (a flow cell, where objects move
   and the median is the empty channel);
2. a global (Otsu) or local (adaptive) threshold, for dark objects on a light field,
   light objects on a dark field, or ``auto`` (the field is the majority of the pixels);
3. morphological opening (removes noise) and closing (joins a broken outline), holes
   filled;
4. connected components, size limits in µm² through the ``um_per_px`` calibration,
   objects touching the frame border flagged (or dropped), the largest ``max_objects``
   kept; a padded RGB crop per object.

The measurements follow ``skimage.measure.regionprops``' definitions on the object's
mask (area, equivalent diameter, 4-connected weighted perimeter, inertia-ellipse axes
and eccentricity, solidity, mean intensity) so that numbers agree with the tools
ecologists already use; the tests compare them with regionprops. OpenCV and numpy only:
this runs on the station, TensorFlow-free, and ``fieldscope segment`` runs the same code
on a workstation so that people label exactly what a station will classify.
"""

from __future__ import annotations

import collections
import logging
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import cv2
import msgspec
import numpy as np
import numpy.typing as npt
from msgspec import Meta

from fieldscope.edge.errors import ConfigError, FieldscopeError
from fieldscope.edge.typed import Problems, problems_of

__all__ = [
    "FrameError",
    "FrameObjects",
    "FrameSummary",
    "Measurements",
    "ObjectsSettings",
    "SegmentedObject",
    "Segmenter",
    "check_settings",
    "measure",
    "segmentation_differences",
    "settings_table",
]

log = logging.getLogger(__name__)

ObjectsMode = Literal["frame", "segment"]
Background = Literal["none", "blank", "median"]
Threshold = Literal["otsu", "adaptive"]
Polarity = Literal["dark-on-light", "light-on-dark", "auto"]
OBJECTS_MODES: tuple[str, ...] = typing.get_args(ObjectsMode)
BACKGROUNDS: tuple[str, ...] = typing.get_args(Background)
THRESHOLDS: tuple[str, ...] = typing.get_args(Threshold)
POLARITIES: tuple[str, ...] = typing.get_args(Polarity)

RGBImage = npt.NDArray[np.uint8]
Mask = npt.NDArray[np.bool_]

# Below this many frames a running median is mostly the objects themselves: the
# background correction waits (and says so in the summary) until it has them.
MIN_MEDIAN_FRAMES = 3
# The level a corrected frame's background is brought to (uint8, room for both signs).
_CORRECTED_LEVEL = 128.0


_Array = typing.TypeVar("_Array", bound=npt.NDArray[typing.Any])


def _constant(array: _Array) -> _Array:
    """A module-level table made read-only, so no caller can change it for the others."""
    array.setflags(write=False)
    return array


def _perimeter_weights() -> npt.NDArray[np.float64]:
    """skimage.measure.perimeter(neighborhood=4): the length each boundary-pixel code adds."""
    weights = np.zeros(50, np.float64)
    weights[[5, 7, 15, 17, 25, 27]] = 1.0
    weights[[21, 33]] = math.sqrt(2.0)
    weights[[13, 23]] = (1.0 + math.sqrt(2.0)) / 2.0
    return _constant(weights)


_PERIMETER_KERNEL = _constant(np.array([[10, 2, 10], [2, 1, 2], [10, 2, 10]], np.float32))
_PERIMETER_WEIGHTS = _perimeter_weights()
_CROSS = _constant(np.asarray(cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3)), np.uint8))


# The declarations ObjectsSettings and the bundle manifest's record of it share.
Kernel = Annotated[int, Meta(ge=0, le=101, extra={"unit": "pixels"})]
Pad = Annotated[int, Meta(ge=0, le=4096, extra={"unit": "pixels"})]
MedianFrames = Annotated[int, Meta(ge=MIN_MEDIAN_FRAMES, le=255, extra={"unit": "frames"})]
BlockPx = Annotated[int, Meta(ge=3, le=1001, extra={"unit": "pixels"})]
Offset = Annotated[float, Meta(ge=-255, le=255, extra={"unit": "grey levels"})]
UmPerPx = Annotated[float, Meta(gt=0, le=10_000, extra={"unit": "µm per pixel"})]
MinArea = Annotated[float, Meta(ge=0, extra={"unit": "µm²"})]
MaxArea = Annotated[float | None, Meta(gt=0, extra={"unit": "µm²"})]
Area = Annotated[float, Meta(gt=0, extra={"unit": "µm²"})]  # msgspec's form of MaxArea
MaxObjects = Annotated[int, Meta(ge=1, le=100_000, extra={"unit": "objects"})]


class FrameError(FieldscopeError):
    """A frame the segmenter cannot use (wrong shape or type, or not the blank's size)."""


class ObjectsSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[objects]``: how a frame becomes objects.

    ``mode = "frame"`` keeps one frame = one specimen (a picking tray); ``"segment"``
    cuts every frame into objects. ``blank`` is an image of the empty slide, used when
    ``background = "blank"``. ``blur_px`` smooths sensor noise before the threshold (0
    = none); ``open_px`` and ``close_px`` are the diameters of the clean-up kernels (0 =
    skip). ``min_area_um2``/``max_area_um2`` reject dust and clumps; ``um_per_px`` is the
    calibration (µm per pixel side, from a stage micrometer). ``pad_px`` widens each crop
    so the classifier sees the outline with some field around it.
    """

    mode: ObjectsMode = "frame"
    background: Background = "none"
    blank: Path | None = None
    median_frames: MedianFrames = 15
    threshold: Threshold = "otsu"
    adaptive_block_px: BlockPx = 51
    adaptive_offset: Offset = 5.0
    polarity: Polarity = "auto"
    blur_px: Kernel = 3
    open_px: Kernel = 3
    close_px: Kernel = 3
    fill_holes: bool = True
    um_per_px: UmPerPx = 1.0
    min_area_um2: MinArea = 0.0
    max_area_um2: MaxArea = None
    max_objects: MaxObjects = 100
    pad_px: Pad = 8
    drop_border: bool = False

    def problems(self) -> Problems:
        """What the declarations cannot say: keys that go together, files that must exist."""
        out: Problems = []
        if self.background == "blank" and self.blank is None:
            out.append(("blank", 'background = "blank" needs blank = "<image of the empty slide>"'))
        if self.blank is not None and self.background != "blank":
            out.append(
                ("blank", f'is only used with background = "blank", not {self.background!r}')
            )
        if self.blank is not None and self.background == "blank" and not self.blank.is_file():
            out.append(("blank", f"{self.blank} is not a file (an image of the empty slide)"))
        for key in ("adaptive_block_px", "blur_px"):
            value = getattr(self, key)
            if value and value % 2 == 0:
                out.append((key, f"must be an odd number of pixels, got {value}"))
        high, low = self.max_area_um2, self.min_area_um2
        if high is not None and 0 < high <= low:  # <= 0 is the declared bound's problem
            out.append(("max_area_um2", f"must be above min_area_um2 ({low:g}), got {high:g}"))
        return out


def check_settings(settings: ObjectsSettings, where: str = "objects") -> ObjectsSettings:
    """``settings`` if valid, else a ConfigError with one line per problem.

    A Struct built in code skips msgspec's decoding checks; this applies the same
    declarations and messages as a config file gets.
    """
    problems = problems_of(settings)
    if problems:
        lines = "\n".join(f"{where}.{key}: {message}" for key, message in problems)
        raise ConfigError(f"invalid objects settings:\n{lines}")
    return settings


def settings_table(settings: ObjectsSettings) -> dict[str, typing.Any]:
    """Every setting as TOML/JSON values (``blank`` a string, unset ones left out), the
    form in which settings travel: ``segmentation.toml``, a run's record, a manifest."""
    table = msgspec.structs.asdict(settings)
    table["blank"] = None if settings.blank is None else str(settings.blank)
    return {key: value for key, value in table.items() if value is not None}


# Settings that change which pixels become a crop: all but mode, blank (a station's
# own file) and max_objects (how many crops, not what one holds); some matter only while
# another setting selects them (adaptive_* with threshold = "adaptive"...).
_NOT_CROP = ("mode", "blank", "max_objects")
_CROP_SETTINGS = tuple(f for f in ObjectsSettings.__struct_fields__ if f not in _NOT_CROP)
_ONLY_WITH = types.MappingProxyType(
    {
        "median_frames": ("background", "median"),
        "adaptive_block_px": ("threshold", "adaptive"),
        "adaptive_offset": ("threshold", "adaptive"),
    }
)


def segmentation_differences(station: ObjectsSettings, bundle: ObjectsSettings | None) -> list[str]:
    """How the station's crops would differ from those the model was trained on.

    ``bundle`` is the segmentation recorded in the bundle (None: trained on whole
    frames, or before bundles recorded it). Empty when they agree; otherwise one phrase
    per difference, ``setting station value vs bundle value``. A model sees crops unlike
    its training crops (other padding, another scale, merged objects) without any error,
    only with worse answers: this is what the station's log warns about.
    """
    if station.mode != "segment":
        if bundle is None:
            return []
        return ['mode station "frame" (whole frames) vs bundle trained on segmented crops']
    if bundle is None:
        return ['mode station "segment" vs bundle trained on whole frames (no segmentation)']
    out = []
    for key in _CROP_SETTINGS:
        mine, theirs = getattr(station, key), getattr(bundle, key)
        if key in _ONLY_WITH:
            switch, value = _ONLY_WITH[key]
            if value not in (getattr(station, switch), getattr(bundle, switch)):
                continue
        if mine != theirs:
            out.append(f"{key} station {_shown(mine)} vs bundle {_shown(theirs)}")
    return out


def _shown(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return str(value).lower()
    return "unset" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


class Measurements(msgspec.Struct, frozen=True):
    """One object's size and shape; lengths in µm, as regionprops defines them."""

    area_px: int
    area_um2: float
    esd_um: float  # equivalent spherical (circular) diameter: sqrt(4·area/π)
    perimeter_um: float
    major_axis_um: float
    minor_axis_um: float
    eccentricity: float
    solidity: float
    mean_intensity: float  # mean luma (0..255) of the frame under the mask


class FrameSummary(msgspec.Struct, frozen=True):
    """What became of a frame's components: the counts a collector needs to tell
    "no specimens" from "specimens too small" or "too many for max_objects"."""

    found: int  # connected components after clean-up
    kept: int
    rejected_by_size: int
    touching_border: int  # of those within the size limits, kept or dropped
    dropped_at_border: int
    truncated: int  # within limits but over max_objects (the smallest go)
    background_ready: bool  # False while a running median still fills


@dataclass(frozen=True)
class SegmentedObject:
    """One object: where it is, its crop and mask, its measurements.

    ``bbox`` is ``(x, y, width, height)`` of the mask in frame pixels; ``crop`` is the
    padded box (``crop_box``, clipped to the frame) of the RGB frame, and ``mask`` the
    object's pixels within that same box. In ``mode = "frame"`` the one object is the
    whole frame and ``measurements`` is None.
    """

    index: int
    bbox: tuple[int, int, int, int]
    crop_box: tuple[int, int, int, int]
    crop: RGBImage
    mask: Mask
    touches_border: bool
    measurements: Measurements | None


@dataclass(frozen=True)
class FrameObjects:
    """A segmented frame: its objects in reading order (top to bottom, left to right)."""

    objects: tuple[SegmentedObject, ...]
    summary: FrameSummary


class Segmenter:
    """Cuts frames into objects with one set of settings.

    Holds the running median's frames (a flow cell's state), so a station keeps one
    Segmenter for its life and a new one starts a fresh background. Not thread-safe:
    one Segmenter per pipeline thread that segments.

    Raises:
        ConfigError: invalid settings, or a blank frame that cannot be read.
    """

    def __init__(self, settings: ObjectsSettings, blank: RGBImage | None = None) -> None:
        self.settings = check_settings(settings)
        self._history: collections.deque[npt.NDArray[np.uint8]] = collections.deque(
            maxlen=settings.median_frames
        )
        self._blank: npt.NDArray[np.float32] | None = None
        if settings.background == "blank":
            image = blank if blank is not None else _read_blank(settings.blank)
            self._blank = np.maximum(_luma(image, "the blank frame").astype(np.float32), 1.0)

    def segment(self, frame: RGBImage) -> FrameObjects:
        """The objects of one RGB uint8 frame (H×W×3), with the frame's summary.

        Raises:
            FrameError: not an H×W×3 uint8 array, or not the blank frame's size.
        """
        gray = _luma(frame, "the frame")
        if self.settings.mode == "frame":
            return _whole_frame(frame, gray)
        corrected, ready = self._corrected(gray)
        mask = _foreground(corrected, self.settings)
        return _objects(frame, gray, mask, self.settings, ready)

    def _corrected(self, gray: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.uint8], bool]:
        """The frame with an even background at one level (transmission ratio)."""
        background: npt.NDArray[np.float32] | None = None
        ready = True
        if self._blank is not None:
            if self._blank.shape != gray.shape:
                raise FrameError(
                    f"the frame is {gray.shape[1]}×{gray.shape[0]} px but the blank frame "
                    f"is {self._blank.shape[1]}×{self._blank.shape[0]}; take the blank with "
                    "the same camera settings"
                )
            background = self._blank
        elif self.settings.background == "median":
            if self._history and self._history[0].shape != gray.shape:
                self._history.clear()  # the camera's resolution changed: start again
            self._history.append(gray)
            ready = len(self._history) >= MIN_MEDIAN_FRAMES
            if ready:
                stacked = np.stack(tuple(self._history))
                background = np.maximum(np.median(stacked, axis=0).astype(np.float32), 1.0)
        if background is None:
            return gray, ready
        ratio = gray.astype(np.float32) / background * np.float32(_CORRECTED_LEVEL)
        return np.clip(np.rint(ratio), 0, 255).astype(np.uint8), ready


def _read_blank(path: Path | None) -> RGBImage:
    from fieldscope.edge.decode import load_image

    if path is None:  # check_settings has refused this already
        raise ConfigError('background = "blank" needs blank = "<image of the empty slide>"')
    try:
        return load_image(path)
    except FieldscopeError as exc:
        raise ConfigError(f"objects.blank: cannot read {path}: {exc}") from exc


def _luma(image: object, what: str) -> npt.NDArray[np.uint8]:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        got = image.dtype if isinstance(image, np.ndarray) else type(image).__name__
        raise FrameError(f"{what} must be a uint8 RGB array, got {got}")
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise FrameError(f"{what} must be an H×W×3 RGB array, got shape {image.shape}")
    return np.asarray(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), dtype=np.uint8)


def _whole_frame(frame: RGBImage, gray: npt.NDArray[np.uint8]) -> FrameObjects:
    """``mode = "frame"``: today's behaviour, the frame is the specimen."""
    height, width = gray.shape
    box = (0, 0, width, height)
    whole = SegmentedObject(
        0, box, box, frame, np.ones(gray.shape, np.bool_), touches_border=False, measurements=None
    )
    return FrameObjects((whole,), FrameSummary(1, 1, 0, 0, 0, 0, background_ready=True))


def _dark_objects(corrected: npt.NDArray[np.uint8], polarity: str) -> bool:
    """True when the objects are darker than the field. ``auto``: the field is the
    majority, so the median pixel is field; it is light when above Otsu's level."""
    if polarity != "auto":
        return polarity == "dark-on-light"
    level, _ = cv2.threshold(corrected, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    return float(np.median(corrected)) > level


def _foreground(corrected: npt.NDArray[np.uint8], s: ObjectsSettings) -> npt.NDArray[np.uint8]:
    """The binary object mask (0/255) after threshold and clean-up."""
    image = corrected
    if s.blur_px > 1:
        image = np.asarray(cv2.GaussianBlur(image, (s.blur_px, s.blur_px), 0), dtype=np.uint8)
    dark = _dark_objects(image, s.polarity)
    flag = cv2.THRESH_BINARY_INV if dark else cv2.THRESH_BINARY
    if s.threshold == "otsu":
        _, mask = cv2.threshold(image, 0, 255, flag | cv2.THRESH_OTSU)
    else:
        offset = s.adaptive_offset if dark else -s.adaptive_offset
        mask = cv2.adaptiveThreshold(
            image, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C, flag, s.adaptive_block_px, offset
        )
    for size, operation in ((s.open_px, cv2.MORPH_OPEN), (s.close_px, cv2.MORPH_CLOSE)):
        if size > 1:
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
            mask = cv2.morphologyEx(mask, operation, kernel)
    binary = np.asarray(mask, dtype=np.uint8)
    return _filled(binary) if s.fill_holes else binary


def _filled(mask: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Holes (field enclosed by an object, e.g. a translucent centre) become object."""
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    outside = padded.copy()
    flood = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8)
    cv2.floodFill(outside, flood, (0, 0), 255)
    holes = cv2.bitwise_not(outside)[1:-1, 1:-1]
    return np.asarray(cv2.bitwise_or(mask, holes), dtype=np.uint8)


@dataclass(frozen=True)
class _Component:
    label: int
    bbox: tuple[int, int, int, int]
    area: int
    touches_border: bool


def _components(mask: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.int32], list[_Component]]:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    height, width = mask.shape
    found = []
    for label in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[label])
        border = x == 0 or y == 0 or x + w == width or y + h == height
        found.append(_Component(label, (x, y, w, h), area, border))
    return np.asarray(labels, dtype=np.int32), found


def _objects(
    frame: RGBImage,
    gray: npt.NDArray[np.uint8],
    mask: npt.NDArray[np.uint8],
    s: ObjectsSettings,
    ready: bool,
) -> FrameObjects:
    """Size limits, border rule and max_objects applied; crops and measurements made."""
    labels, found = _components(mask)
    px_area = s.um_per_px * s.um_per_px
    sized = [
        c
        for c in found
        if c.area * px_area >= s.min_area_um2
        and (s.max_area_um2 is None or c.area * px_area <= s.max_area_um2)
    ]
    at_border = sum(c.touches_border for c in sized)
    eligible = [c for c in sized if not (s.drop_border and c.touches_border)]
    largest = sorted(eligible, key=lambda c: -c.area)[: s.max_objects]
    ordered = sorted(largest, key=lambda c: (c.bbox[1], c.bbox[0]))
    objects = tuple(
        _cut(i, c, frame=frame, gray=gray, labels=labels, s=s) for i, c in enumerate(ordered)
    )
    summary = FrameSummary(
        found=len(found),
        kept=len(objects),
        rejected_by_size=len(found) - len(sized),
        touching_border=at_border,
        dropped_at_border=len(sized) - len(eligible),
        truncated=len(eligible) - len(largest),
        background_ready=ready,
    )
    return FrameObjects(objects, summary)


def _cut(
    index: int,
    c: _Component,
    *,
    frame: RGBImage,
    gray: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.int32],
    s: ObjectsSettings,
) -> SegmentedObject:
    x, y, w, h = c.bbox
    own = labels[y : y + h, x : x + w] == c.label
    height, width = gray.shape
    x0, y0 = max(x - s.pad_px, 0), max(y - s.pad_px, 0)
    x1, y1 = min(x + w + s.pad_px, width), min(y + h + s.pad_px, height)
    crop_mask = labels[y0:y1, x0:x1] == c.label
    measurements = measure(own, gray[y : y + h, x : x + w], s.um_per_px)
    return SegmentedObject(
        index=index,
        bbox=c.bbox,
        crop_box=(x0, y0, x1 - x0, y1 - y0),
        crop=np.ascontiguousarray(frame[y0:y1, x0:x1]),
        mask=crop_mask,
        touches_border=c.touches_border,
        measurements=measurements,
    )


# ── measurements (regionprops' definitions) ───────────────────────────────────────────


def measure(mask: Mask, gray: npt.NDArray[np.uint8], um_per_px: float = 1.0) -> Measurements:
    """Size and shape of the object in ``mask`` (one region; ``gray`` the same box).

    Area counts pixels; the axes are those of the ellipse with the same second central
    moments; the perimeter is regionprops' 4-connected weighted boundary length.
    """
    binary = np.ascontiguousarray(mask, dtype=np.uint8)
    area = int(np.count_nonzero(binary))
    if area == 0:
        raise ValueError("measure() needs a mask with at least one pixel")
    major, minor, eccentricity = _axes(binary)
    u = float(um_per_px)
    return Measurements(
        area_px=area,
        area_um2=area * u * u,
        esd_um=math.sqrt(4.0 * area / math.pi) * u,
        perimeter_um=_perimeter(binary) * u,
        major_axis_um=major * u,
        minor_axis_um=minor * u,
        eccentricity=eccentricity,
        solidity=area / _convex_area(binary),
        mean_intensity=float(gray[binary.astype(bool)].mean()),
    )


def _axes(binary: npt.NDArray[np.uint8]) -> tuple[float, float, float]:
    """Major and minor axis lengths (4·sqrt of the inertia tensor's eigenvalues) and
    eccentricity, from the central moments as regionprops computes them."""
    m = cv2.moments(binary, binaryImage=True)
    a, b, c = m["mu20"] / m["m00"], m["mu11"] / m["m00"], m["mu02"] / m["m00"]
    spread = math.sqrt(((a - c) / 2.0) ** 2 + b * b)
    high, low = (a + c) / 2.0 + spread, max((a + c) / 2.0 - spread, 0.0)
    eccentricity = math.sqrt(1.0 - low / high) if high > 0 else 0.0
    return 4.0 * math.sqrt(high), 4.0 * math.sqrt(low), eccentricity


def _perimeter(binary: npt.NDArray[np.uint8]) -> float:
    """skimage.measure.perimeter(mask, neighborhood=4)."""
    padded = cv2.copyMakeBorder(binary, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, _CROSS, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    border = (padded - eroded).astype(np.float32)
    codes = cv2.filter2D(border, -1, _PERIMETER_KERNEL, borderType=cv2.BORDER_CONSTANT)
    histogram = np.bincount(np.rint(codes).astype(np.int64).ravel(), minlength=50)
    return float(histogram[:50] @ _PERIMETER_WEIGHTS)


def _convex_area(binary: npt.NDArray[np.uint8]) -> int:
    """Pixels whose centre lies in (or on) the convex hull of the midpoints of the
    object's pixel edges, as skimage's ``convex_hull_image`` counts them."""
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    points = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float32)
    corners = np.concatenate([points + np.asarray(d, np.float32) for d in _EDGE_MIDPOINTS])
    hull = np.asarray(cv2.convexHull(corners), dtype=np.float32).reshape(-1, 2)
    height, width = binary.shape
    xs = np.arange(width, dtype=np.float64)[None, :]
    count = 0
    # A band of rows at a time: a frame-sized object (a dark corner) would otherwise
    # need several float64 frames at once, tens of MB on a station with 512 MB.
    for top in range(0, height, _HULL_ROWS):
        ys = np.arange(top, min(top + _HULL_ROWS, height), dtype=np.float64)[:, None]
        band = np.broadcast_to(xs, (len(ys), width))
        inside = _in_convex(hull, band, np.broadcast_to(ys, band.shape))
        count += int(np.count_nonzero(inside | binary[top : top + len(ys)].astype(bool)))
    return max(count, 1)


_HULL_ROWS = 64


_EDGE_MIDPOINTS = ((-0.5, 0.0), (0.5, 0.0), (0.0, -0.5), (0.0, 0.5))


def _in_convex(
    hull: npt.NDArray[np.float32], xs: npt.NDArray[np.float64], ys: npt.NDArray[np.float64]
) -> npt.NDArray[np.bool_]:
    """Grid points on or inside a convex polygon (either winding), vectorised."""
    pts = hull.astype(np.float64)
    nxt = np.roll(pts, -1, axis=0)
    inside = np.ones(xs.shape, np.bool_)
    positive = np.ones(xs.shape, np.bool_)
    for (x0, y0), (x1, y1) in zip(pts, nxt, strict=True):
        cross = (x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0)
        inside &= cross >= -1e-9
        positive &= cross <= 1e-9
    return inside | positive
