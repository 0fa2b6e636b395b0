"""Realistic synthetic fleet payloads, for the ingest benchmark, demos and tests.

Every payload is built with the edge's own dataclasses, so it is exactly what a
station publishes (and validates the same way); nothing here is random unless a
seed is given.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import msgspec

from fieldscope.edge.health import CameraState, FrameCounts, Heartbeat, ModelInfo
from fieldscope.edge.message import (
    Candidate,
    Identification,
    ImageRef,
    ModelRef,
    Quality,
    Status,
    Timings,
)
from fieldscope.edge.message_objects import (
    NO_OBJECTS_REASON,
    ObjectMeasurements,
    ObjectRef,
    SegmentationSummary,
)

__all__ = [
    "DEMO_LABELS",
    "demo_model",
    "sample_day",
    "sample_heartbeat",
    "sample_identification",
    "sample_model_info",
    "sample_objects",
]

DEMO_LABELS: tuple[str, ...] = ("Amoeba", "Euglena", "Paramecium", "Vorticella", "Stentor")


def demo_model(name: str = "protists-mnv2", version: str = "1.2.0") -> ModelRef:
    digest = hashlib.sha256(f"{name} {version}".encode()).hexdigest()
    return ModelRef(name, version, digest)


def _rejected(
    device: str,
    station: str,
    seq: int,
    *,
    when: datetime,
    model: ModelRef,
    image: ImageRef,
    reason: str | None,
) -> Identification:
    """A message the quality gate rejected: no label, score or top-k; its reason."""
    return Identification(
        device=device,
        station=station,
        seq=seq,
        captured_at=when,
        label=None,
        score=None,
        top_k=(),
        status=Status.REJECTED,
        model=model,
        image=image,
        timings_ms=Timings(12.5, 1.2, 0.0, 0.0, 14.0),
        quality=Quality(sharpness=12.0, exposure=0.45),
        reason=reason or "too blurry: sharpness 12.0 < 50.0",
    )


def sample_identification(
    seq: int,
    *,
    device: str = "scope-a",
    station: str = "pond-3",
    label: str | None = "Paramecium",
    score: float = 0.91,
    status: Status | str | None = None,
    captured_at: datetime | None = None,
    labels: Sequence[str] = DEMO_LABELS,
    model: ModelRef | None = None,
    archived_path: str | None = None,
    reason: str | None = None,
) -> Identification:
    """One identification; ``label=None`` makes it uncertain, ``status="rejected"`` rejected.

    ``top_k`` holds ``label`` (or the first demo label when uncertain) at ``score``, then
    two other labels sharing the rest, so the message obeys every rule of the contract.
    """
    when = captured_at or datetime(2026, 11, 23, 18, 0, tzinfo=UTC) + timedelta(seconds=seq)
    status = Status(status) if status is not None else (Status.OK if label else Status.UNCERTAIN)
    image = ImageRef(
        hashlib.sha256(f"{device}/{seq}".encode()).hexdigest(), 640, 480, archived_path
    )
    timings = Timings(12.5, 1.2, 3.4, 2.1, 21.0)
    if status is Status.REJECTED:
        model = model or demo_model()
        return _rejected(device, station, seq, when=when, model=model, image=image, reason=reason)
    top = label or labels[0]
    others = [c for c in labels if c != top][:2]
    rest = round((1.0 - score) / max(len(others), 1), 6)
    top_k = (Candidate(top, score), *(Candidate(c, min(rest, score)) for c in others))
    return Identification(
        device=device,
        station=station,
        seq=seq,
        captured_at=when,
        label=label if status is Status.OK else None,
        score=score,
        top_k=top_k,
        status=status,
        model=model or demo_model(),
        image=image,
        timings_ms=timings,
        quality=Quality(sharpness=180.0, exposure=0.52),
        reason=reason
        or (None if status is Status.OK else f"top score {score:.3f} is below the threshold"),
    )


def _draw(
    rng: random.Random, labels: Sequence[str], weights: Sequence[int]
) -> tuple[str | None, float, str | None]:
    """(label, score, status) of one message of a day: 8 % uncertain, 3 % rejected."""
    roll = rng.random()
    if roll < 0.08:
        return None, round(rng.uniform(0.35, 0.59), 3), None
    if roll < 0.11:
        return None, 0.91, "rejected"  # a rejection carries neither label nor score
    label = rng.choices(list(labels), weights)[0]
    return label, round(rng.uniform(0.62, 0.99), 3), None


def sample_day(
    device: str,
    station: str,
    start: datetime,
    count: int,
    *,
    seed: int = 0,
    first_seq: int = 0,
    archived: bool = False,
    labels: Sequence[str] = DEMO_LABELS,
) -> list[Identification]:
    """``count`` identifications spread over a day, with a believable label mix."""
    rng = random.Random(seed)
    weights = [8, 5, 3, 2, 2, 1, 1, 1][: len(labels)] + [1] * max(0, len(labels) - 8)
    out = []
    for i in range(count):
        seq = first_seq + i
        when = start + timedelta(seconds=rng.uniform(0, 86_400))
        label, score, status = _draw(rng, labels, weights)
        path = None
        if archived and status is None and label is not None:
            path = f"/var/lib/fieldscope/archive/{when:%Y-%m-%d}/{device}-{seq}.png"
        out.append(
            sample_identification(
                seq,
                device=device,
                station=station,
                labels=labels,
                label=label,
                score=score,
                status=status,
                captured_at=when,
                archived_path=path,
            )
        )
    return sorted(out, key=lambda m: m.captured_at)


def sample_heartbeat(
    *,
    time: datetime | None = None,
    outbox_depth: int = 0,
    model: ModelRef | None = None,
    warnings: tuple[str, ...] = (),
    fps: float = 0.5,
) -> Heartbeat:
    return Heartbeat(
        time=time or datetime.now(UTC),
        uptime_s=86_400.0,
        frames=FrameCounts(seen=5210, accepted=4870, uncertain=220, rejected=110, failed=10),
        fps=fps,
        outbox_depth=outbox_depth,
        outbox_dropped=0,
        camera_state=CameraState.OK,
        paused=False,
        disk_free_bytes=12_884_901_888,
        cpu_temperature_c=51.2,
        model=model or demo_model(),
        warnings=warnings,
    )


def sample_model_info(model: ModelRef | None = None) -> ModelInfo:
    return ModelInfo(
        model=model or demo_model(),
        labels=DEMO_LABELS,
        threshold=0.6,
        loaded_at=datetime(2026, 11, 22, 9, 0, tzinfo=UTC),
        runtime="ai_edge_litert",
        runtime_version="2.3.0",
        signed=True,
    )


def _sample_object(frame_id: str, i: int, count: int, um_per_px: float) -> ObjectRef:
    radius = 10 + 5 * i
    area = round(math.pi * radius * radius)
    return ObjectRef(
        frame_id=frame_id,
        index=i,
        count=count,
        bbox=(40 * i, 30, 2 * radius + 1, 2 * radius + 1),
        touches_border=i == 0,
        measurements=ObjectMeasurements(
            area_px=area,
            area_um2=round(area * um_per_px**2, 4),
            esd_um=round(math.sqrt(4 * area / math.pi) * um_per_px, 4),
            perimeter_um=round(2 * math.pi * radius * um_per_px, 4),
            major_axis_um=round(2 * radius * 1.1 * um_per_px, 4),
            minor_axis_um=round(2 * radius * 0.9 * um_per_px, 4),
            eccentricity=0.574,
            solidity=0.97,
            mean_intensity=80.0 + i,
        ),
    )


def sample_objects(
    first_seq: int,
    count: int,
    *,
    device: str = "scope-a",
    station: str = "pond-3",
    labels: Sequence[str] = DEMO_LABELS,
    um_per_px: float = 1.5,
) -> list[Identification]:
    """The messages a segmenting station sends for one frame of ``count`` objects
    (seqs ``first_seq``...), or its one "no objects" rejection when ``count`` is 0.

    Object ``i`` is a circle-ish specimen of radius ``10 + 5·i`` pixels, so the sizes
    differ and are easy to check: area ``π·r²`` px, ESD ``2·r`` px, times ``um_per_px``.
    """
    frame = sample_identification(first_seq, device=device, station=station)
    summary = SegmentationSummary(
        found=count + 2,
        kept=count,
        rejected_by_size=2,
        touching_border=min(count, 1),
        dropped_at_border=0,
        truncated=0,
        background_ready=True,
    )
    if count == 0:
        rejected = sample_identification(
            first_seq, device=device, station=station, status="rejected", reason=NO_OBJECTS_REASON
        )
        return [msgspec.structs.replace(rejected, segmentation=summary)]
    out = []
    for i in range(count):
        message = sample_identification(
            first_seq + i, device=device, station=station, label=labels[i % len(labels)]
        )
        ref = _sample_object(frame.image.sha256, i, count, um_per_px)
        image = msgspec.structs.replace(message.image, sha256=frame.image.sha256)
        out.append(msgspec.structs.replace(message, image=image, object=ref, segmentation=summary))
    return out
