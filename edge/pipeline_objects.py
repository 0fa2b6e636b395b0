"""The pipeline's object path (``[objects] mode = "segment"``): one frame, many specimens.

Split from :mod:`fieldscope.edge.pipeline`, which calls these at the same three places
as its frame path: ``prepare`` cuts the gated frame into objects with the daemon's one
:class:`~fieldscope.edge.objects.Segmenter` (it holds a flow cell's running median);
``classify`` runs each object's crop through the bundle's own preprocessing recipe,
exactly as a frame would be (and as ``fieldscope segment`` crops are for training),
and classifies it; ``store`` sends one identification per object, each its own outbox
entry and ``seq``.

Crops, not model inputs, wait in the queue between ``prepare`` and ``classify``: a
224x224 input is 150 kB and a frame may hold 50 objects, while their crops are a few
kB each. Preprocessing a crop costs a few percent of classifying it, so little
overlap is lost, and the daemon stays within a small Pi's memory.

Exactly once per file, as for frames: object ``i`` of ``n`` is stored with the source
key ``<file key>#<i>`` and the last one with the file's own key, which is what the
capture stage looks up after a restart. A daemon that died between two objects of a
file sees the file again (its key is not stored yet), segments it again and skips the
objects whose keys are already in the outbox, so no object is lost or sent twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from fieldscope.edge.classify import Prediction
from fieldscope.edge.message import (
    Identification,
    ImageRef,
    ModelRef,
    Quality,
    Timings,
    build_identification,
    build_rejection,
)
from fieldscope.edge.message_objects import (
    NO_OBJECTS_REASON,
    ObjectMeasurements,
    ObjectRef,
    SegmentationSummary,
)
from fieldscope.edge.objects import FrameSummary, SegmentedObject, Segmenter
from fieldscope.edge.preprocess import PreprocessRecipe, preprocess
from fieldscope.edge.topics import Topics

if TYPE_CHECKING:
    from fieldscope.edge.pipeline_parts import _Prepared

logger = logging.getLogger(__name__)

__all__ = [
    "FrameFacts",
    "ObjectMessage",
    "ObjectWork",
    "Segmented",
    "classify_objects",
    "object_key",
    "object_messages",
    "segment_frame",
    "store_objects",
]


@dataclass
class ObjectWork:
    """One object on its way through the pipeline: where it is, its model input, and
    (after ``classify``) the classifier's decision."""

    index: int
    bbox: tuple[int, int, int, int]
    touches_border: bool
    measurements: ObjectMeasurements
    crop: npt.NDArray[np.uint8] | None  # released once classified
    preprocess_ms: float = 0.0
    prediction: Prediction | None = None
    inference_ms: float = 0.0


@dataclass
class Segmented:
    """A gated frame cut into objects: the frame's counts and the objects kept."""

    summary: SegmentationSummary
    objects: list[ObjectWork]
    segment_ms: float


def _measurements(obj: SegmentedObject) -> ObjectMeasurements:
    m = obj.measurements
    if m is None:  # only mode = "frame" makes objects without measurements
        raise ValueError("a segmented object has no measurements")
    return ObjectMeasurements(
        area_px=m.area_px,
        area_um2=round(m.area_um2, 4),
        esd_um=round(m.esd_um, 4),
        perimeter_um=round(m.perimeter_um, 4),
        major_axis_um=round(m.major_axis_um, 4),
        minor_axis_um=round(m.minor_axis_um, 4),
        eccentricity=min(round(m.eccentricity, 6), 1.0),
        solidity=min(round(m.solidity, 6), 1.0),
        mean_intensity=round(m.mean_intensity, 3),
    )


def _summary(summary: FrameSummary) -> SegmentationSummary:
    return SegmentationSummary(
        found=summary.found,
        kept=summary.kept,
        rejected_by_size=summary.rejected_by_size,
        touching_border=summary.touching_border,
        dropped_at_border=summary.dropped_at_border,
        truncated=summary.truncated,
        background_ready=summary.background_ready,
    )


def segment_frame(segmenter: Segmenter, image: npt.NDArray[np.uint8]) -> Segmented:
    """The frame's objects with their crops and measurements."""
    t0 = time.perf_counter()
    found = segmenter.segment(image)
    segment_ms = (time.perf_counter() - t0) * 1000.0
    objects = [
        ObjectWork(
            index=obj.index,
            bbox=obj.bbox,
            touches_border=obj.touches_border,
            measurements=_measurements(obj),
            crop=obj.crop,
        )
        for obj in found.objects
    ]
    return Segmented(_summary(found.summary), objects, segment_ms)


def classify_objects(
    segmented: Segmented, recipe: PreprocessRecipe, classify: Callable[..., Prediction]
) -> None:
    """Preprocess and classify every object's crop, one at a time (see the module
    docstring); the crops are released as they are used."""
    for obj in segmented.objects:
        if obj.crop is None:
            continue
        t0 = time.perf_counter()
        tensor = preprocess(obj.crop, recipe)
        t1 = time.perf_counter()
        obj.prediction = classify(tensor)
        obj.inference_ms = (time.perf_counter() - t1) * 1000.0
        obj.preprocess_ms = (t1 - t0) * 1000.0
        obj.crop = None


def object_key(frame_key: str | None, index: int, count: int) -> str | None:
    """The outbox source key of object ``index`` of ``count`` (see the module docstring)."""
    if frame_key is None or index == count - 1:
        return frame_key
    return f"{frame_key}#{index}"


@dataclass(frozen=True)
class FrameFacts:
    """What every message of one frame shares."""

    topics: Topics
    model_ref: ModelRef
    image: ImageRef
    captured_at: datetime
    capture_ms: float
    quality_ms: float
    started: float  # monotonic time the camera read began
    quality: Quality | None


@dataclass(frozen=True)
class ObjectMessage:
    """One message of a segmented frame: its outbox source key, its status, and the
    builder of its payload for the ``seq`` the outbox hands out."""

    source_key: str | None
    status: str
    payload: Callable[[int], bytes]


def object_messages(
    segmented: Segmented, facts: FrameFacts, frame_key: str | None
) -> list[ObjectMessage]:
    """The frame's messages: one per object, or the one "no objects" rejection."""
    if not segmented.objects:
        return [ObjectMessage(frame_key, "rejected", _no_objects(segmented, facts))]
    count = len(segmented.objects)
    return [
        ObjectMessage(
            object_key(frame_key, i, count),
            obj.prediction.status if obj.prediction is not None else "rejected",
            _one_object(obj, count, segmented, facts),
        )
        for i, obj in enumerate(segmented.objects)
    ]


def _timings(facts: FrameFacts, preprocess_ms: float, inference_ms: float) -> Timings:
    return Timings(
        capture=facts.capture_ms,
        quality=facts.quality_ms,
        preprocess=preprocess_ms,
        inference=inference_ms,
        total=(time.monotonic() - facts.started) * 1000.0,
    )


def _frame_payload(
    build: Callable[..., Identification],
    segmented: Segmented,
    facts: FrameFacts,
    timings: Timings,
    **specific: object,
) -> Callable[[int], bytes]:
    """The message for a seq, built by ``build`` (``build_rejection`` or
    ``build_identification``) from what every message of the frame carries (station,
    capture, model, image, quality, segmentation) plus its ``specific`` fields."""

    def payload(seq: int) -> bytes:
        return build(
            device=facts.topics.device,
            station=facts.topics.station,
            seq=seq,
            captured_at=facts.captured_at,
            model=facts.model_ref,
            image=facts.image,
            timings=timings,
            quality=facts.quality,
            segmentation=segmented.summary,
            **specific,
        ).to_json()

    return payload


def _no_objects(segmented: Segmented, facts: FrameFacts) -> Callable[[int], bytes]:
    timings = _timings(facts, segmented.segment_ms, 0.0)
    return _frame_payload(build_rejection, segmented, facts, timings, reason=NO_OBJECTS_REASON)


def _one_object(
    obj: ObjectWork, count: int, segmented: Segmented, facts: FrameFacts
) -> Callable[[int], bytes]:
    prediction = obj.prediction
    if prediction is None:
        raise ValueError(f"object {obj.index} of the frame was not classified")
    ref = ObjectRef(
        frame_id=facts.image.sha256,
        index=obj.index,
        count=count,
        bbox=obj.bbox,
        touches_border=obj.touches_border,
        measurements=obj.measurements,
    )
    timings = _timings(facts, segmented.segment_ms + obj.preprocess_ms, obj.inference_ms)
    return _frame_payload(
        build_identification, segmented, facts, timings, prediction=prediction, object_ref=ref
    )


class _Counters(Protocol):
    def stored_one(self, status: str) -> None: ...


def store_objects(
    work: _Prepared,
    image: ImageRef,
    topics: Topics,
    *,
    commit: Callable[[Callable[[int], bytes], str | None], object | None],
    stored_before: Callable[[str], bool],
    counters: _Counters,
) -> bool:
    """Commit the segmented frame's messages one by one (``commit(payload, source_key)``
    returns None when a message was not stored); True when all of them are stored, so
    the caller may mark the file handled."""
    captured, segmented = work.captured, work.segmented
    if segmented is None:
        raise ValueError("store_objects needs a segmented frame")
    facts = FrameFacts(
        topics=topics,
        model_ref=work.model.ref,
        image=image,
        captured_at=captured.captured_at,
        capture_ms=captured.capture_ms,
        quality_ms=work.quality_ms,
        started=captured.started,
        quality=work.quality.to_message(),
    )
    for message in object_messages(segmented, facts, captured.key):
        key = message.source_key
        if key is not None and key != captured.key and stored_before(key):
            continue  # stored before a restart that came between two objects
        if commit(message.payload, key) is None:
            return False
        counters.stored_one(message.status)
    logger.debug("stored %d objects of %s", len(segmented.objects), captured.source)
    return True
