"""The summary of ``fieldscope demo``: a pure function of what the collector stored.

:func:`summarise` joins each stored identification to the species of the image it is
about through the image's sha256 (which the station puts in every message and the
demo computed from each replayed file), counts each outcome, checks that every
replayed image was identified exactly once, and takes the median and 95th percentile
of each stage's latency.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fieldscope.collect.store import IdentificationRow

__all__ = ["DemoSummary", "StageLatency", "percentile", "summarise"]

_LATENCY_STAGES = ("capture", "quality", "preprocess", "inference", "total")


@dataclass(frozen=True)
class StageLatency:
    """Median and 95th percentile of one stage, in milliseconds."""

    stage: str
    median_ms: float
    p95_ms: float


@dataclass(frozen=True)
class DemoSummary:
    """What the station reported, joined to the known species of each replayed image."""

    images: int  # replayed (distinct files)
    stored: int  # identifications in the collector's store
    identified: int  # status ok
    identified_correct: int
    uncertain: int
    rejected: int
    top1_correct: int  # ok or uncertain whose best label is the true species
    missing: int  # replayed images with no identification
    repeated: int  # images identified more than once
    unknown: int  # identifications of an image that was not replayed
    latency: tuple[StageLatency, ...]

    @property
    def accuracy(self) -> float | None:
        """Share of the labelled ("ok") identifications that name the true species."""
        return self.identified_correct / self.identified if self.identified else None

    @property
    def top1_accuracy(self) -> float | None:
        """Share of all classified images (ok and uncertain) whose best label is right."""
        classified = self.identified + self.uncertain
        return self.top1_correct / classified if classified else None

    @property
    def complete(self) -> bool:
        """Every replayed image identified exactly once, and nothing else."""
        return self.missing == 0 and self.repeated == 0 and self.unknown == 0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["latency"] = {s.stage: {"median_ms": s.median_ms, "p95_ms": s.p95_ms}
                           for s in self.latency}  # fmt: skip
        data["accuracy"] = self.accuracy
        data["top1_accuracy"] = self.top1_accuracy
        data["complete"] = self.complete
        return data

    def lines(self) -> list[str]:
        """The table printed at the end."""

        def pct(value: float | None) -> str:
            return "n/a" if value is None else f"{100 * value:.1f} %"

        classified = self.identified + self.uncertain
        once = (
            "each replayed image exactly once"
            if self.complete
            else f"missing {self.missing}, repeated {self.repeated}, unknown {self.unknown}"
        )
        out = [
            f"  images replayed           {self.images:6d}",
            f"  identifications stored    {self.stored:6d}   ({once})",
            f"  identified                {self.identified:6d}   "
            f"accuracy {pct(self.accuracy)} ({self.identified_correct}/{self.identified} "
            "name the true species)",
            f"  uncertain                 {self.uncertain:6d}   "
            "(below the model's threshold: no label given)",
            f"  rejected (quality gate)   {self.rejected:6d}",
            f"  top-1 accuracy, all classified images: {pct(self.top1_accuracy)} "
            f"({self.top1_correct}/{classified})",
            "",
            "  latency per stage (ms)     median      p95",
        ]
        for s in self.latency:
            out.append(f"    {s.stage:<22} {s.median_ms:9.1f} {s.p95_ms:8.1f}")
        return out


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1) by linear interpolation, as numpy's default."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _latencies(timings: Mapping[str, list[float]], delivery: list[float]) -> list[StageLatency]:
    """Median and 95th percentile of each station stage, then of the delivery."""
    names = {"total": "total (station)"}
    latency = [
        StageLatency(names.get(stage, stage), percentile(v, 0.5), percentile(v, 0.95))
        for stage, v in timings.items()
        if v
    ]
    if delivery:
        latency.append(
            StageLatency(
                "capture → collector", percentile(delivery, 0.5), percentile(delivery, 0.95)
            )
        )
    return latency


def summarise(rows: Sequence[IdentificationRow], truth: Mapping[str, str]) -> DemoSummary:
    """Join stored identifications to ``truth`` (image sha256 → species) and count.

    Latencies: the station's own stage timings of classified images (a rejected image
    skips preprocessing and inference, which would pull the medians to 0), and
    ``capture → collector``: from the capture time to the collector receiving the
    message, over MQTT, for every message.
    """
    seen: dict[str, int] = {}
    identified = correct = uncertain = rejected = top1 = unknown = 0
    timings: dict[str, list[float]] = {stage: [] for stage in _LATENCY_STAGES}
    delivery: list[float] = []
    for row in rows:
        seen[row.image_sha256] = seen.get(row.image_sha256, 0) + 1
        species = truth.get(row.image_sha256)
        if species is None:
            unknown += 1
        delivery.append((row.received_at - row.captured_at).total_seconds() * 1000.0)
        if row.status == "rejected":
            rejected += 1
            continue
        for stage in _LATENCY_STAGES:
            timings[stage].append(float(getattr(row, f"{stage}_ms")))
        best = row.top_k[0][0] if row.top_k else None
        top1 += int(species is not None and best == species)
        if row.status == "ok":
            identified += 1
            correct += int(species is not None and row.label == species)
        else:
            uncertain += 1
    latency = _latencies(timings, delivery)
    return DemoSummary(
        images=len(truth),
        stored=len(rows),
        identified=identified,
        identified_correct=correct,
        uncertain=uncertain,
        rejected=rejected,
        top1_correct=top1,
        missing=sum(1 for digest in truth if digest not in seen),
        repeated=sum(1 for digest, n in seen.items() if n > 1 and digest in truth),
        unknown=unknown,
        latency=tuple(latency),
    )
