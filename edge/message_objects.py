"""The identification message's parts for a segmenting station (``[objects] mode = "segment"``).

A station that cuts every frame into objects sends one identification per object; the
message then carries two optional parts, both absent from a one-frame-one-specimen
station's messages (whose payloads are unchanged, byte for byte):

* ``object`` (:class:`ObjectRef`): which frame the object came from, its place in that
  frame, its bounding box and its measurements in µm. ``frame_id`` is the SHA-256 of the
  frame's encoded bytes (the same as ``image.sha256``): the same string for every object
  of one frame, and the same again if a station re-reads the same file after a crash, so
  ``(device, frame_id, index)`` identifies an object for a collector that de-duplicates.
* ``segmentation`` (:class:`SegmentationSummary`): what became of the frame's connected
  components (found, kept, rejected by size, touching the border, dropped at the border,
  truncated by ``max_objects``). It rides on every object message of the frame, so any
  one of them tells the collector the frame's counts.

A frame in which nothing was kept still reaches the collector, so that counts per sample
stay right: it is sent as one ``rejected`` message with reason ``"no objects"``, the
``segmentation`` part and no ``object`` part.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from msgspec import Meta

from fieldscope.edge.errors import FieldscopeError, MessageError
from fieldscope.edge.wire import Sha256, WireStruct

__all__ = [
    "NO_OBJECTS_REASON",
    "ObjectMeasurements",
    "ObjectRef",
    "SegmentationSummary",
]

# The reason of the one message a segmenting station sends for a frame without objects.
NO_OBJECTS_REASON = "no objects"
_MAX_PIXELS = 65535

Count = Annotated[int, Meta(ge=0, le=1_000_000)]
Microns = Annotated[float, Meta(ge=0)]
Pixel = Annotated[int, Meta(ge=0, le=_MAX_PIXELS)]
Extent = Annotated[int, Meta(ge=1, le=_MAX_PIXELS)]


def _doc(text: str) -> Meta:
    return Meta(description=text)


class _Part(WireStruct, frozen=True):
    _error: ClassVar[type[FieldscopeError]] = MessageError
    _prefix: ClassVar[str] = "identification message: "


class ObjectMeasurements(_Part, frozen=True):
    """An object's size and shape as ``skimage.measure.regionprops`` defines them,
    lengths in µm through the station's ``um_per_px`` calibration."""

    _where: ClassVar[str] = "object.measurements"

    area_px: Annotated[int, Meta(ge=1), _doc("Area in pixels of the frame.")]
    area_um2: Annotated[Microns, _doc("Area in square micrometres.")]
    esd_um: Annotated[Microns, _doc("Equivalent spherical diameter: sqrt(4·area/π), in µm.")]
    perimeter_um: Annotated[
        Microns, _doc("Perimeter (regionprops' 4-connected weighted boundary), in µm.")
    ]
    major_axis_um: Annotated[
        Microns, _doc("Major axis of the ellipse with the same second moments, in µm.")
    ]
    minor_axis_um: Annotated[
        Microns, _doc("Minor axis of the ellipse with the same second moments, in µm.")
    ]
    eccentricity: Annotated[float, Meta(ge=0, le=1), _doc("Of that ellipse: 0 is a circle.")]
    solidity: Annotated[float, Meta(ge=0, le=1), _doc("Area over the convex hull's area.")]
    mean_intensity: Annotated[
        float, Meta(ge=0, le=255), _doc("Mean grey level (0..255) of the frame under the object.")
    ]


class ObjectRef(_Part, frozen=True):
    """One object of a segmented frame (see the module docstring)."""

    _where: ClassVar[str] = "object"

    frame_id: Annotated[
        Sha256,
        _doc(
            "The frame the object was cut from: the SHA-256 of its encoded bytes (image.sha256),"
            " the same for every object of the frame."
        ),
    ]
    index: Annotated[
        int,
        Meta(ge=0, le=1_000_000),
        _doc("The object's place in its frame, 0-based, top to bottom then left to right."),
    ]
    count: Annotated[
        int, Meta(ge=1, le=1_000_000), _doc("How many objects of the frame were classified.")
    ]
    bbox: Annotated[
        tuple[Pixel, Pixel, Extent, Extent],
        _doc("Bounding box [x, y, width, height] of the object in frame pixels."),
    ]
    touches_border: Annotated[bool, _doc("The object is cut by the frame's edge.")]
    measurements: Annotated[ObjectMeasurements, _doc("Size and shape, lengths in µm.")]

    def problems(self) -> list[tuple[str, str]]:
        """An index must be one of the frame's ``count`` objects."""
        if self.index >= self.count:
            return [("index", f"must be below count ({self.count}), got {self.index}")]
        return []


class SegmentationSummary(_Part, frozen=True):
    """What became of a segmented frame's connected components."""

    _where: ClassVar[str] = "segmentation"

    found: Annotated[Count, _doc("Connected components after clean-up.")]
    kept: Annotated[Count, _doc("Objects classified and sent, one message each.")]
    rejected_by_size: Annotated[Count, _doc("Outside min_area_um2..max_area_um2.")]
    touching_border: Annotated[
        Count, _doc("Within the size limits and cut by the frame edge, kept or dropped.")
    ]
    dropped_at_border: Annotated[Count, _doc("Left out because drop_border is set.")]
    truncated: Annotated[Count, _doc("Within limits but over max_objects (the smallest go).")]
    background_ready: Annotated[
        bool, _doc("False while a running-median background is still filling.")
    ]

    def problems(self) -> list[tuple[str, str]]:
        """The kept and dropped cannot outnumber what was found."""
        used = self.kept + self.rejected_by_size + self.dropped_at_border + self.truncated
        if used > self.found:
            return [
                (
                    "found",
                    f"must be at least kept + rejected_by_size + dropped_at_border + "
                    f"truncated ({used}), got {self.found}",
                )
            ]
        return []
