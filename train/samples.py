"""The samples of a dataset: image files with their class, and what could not be read.

The types that discovery, splitting and loading share (``fieldscope.train.data``
re-exports them), kept apart so the loader does not import the splitter.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["IMAGE_SUFFIXES", "SPLITS", "DatasetIndex", "Sample", "SkippedFile", "class_counts"]

# What ``fieldscope.edge.preprocess.decode_image`` reads (PNG, JPEG, TIFF, BMP).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True, order=True)
class Sample:
    """One image file and its class index (into the dataset's ``labels``)."""

    path: Path
    label: int


@dataclass(frozen=True)
class SkippedFile:
    """A file that looked like an image but could not be decoded; kept for the run summary."""

    path: Path
    reason: str


@dataclass(frozen=True)
class DatasetIndex:
    """What ``discover`` found: the classes, and the samples of each given part.

    ``parts`` is ``{"all": ...}`` for plain class folders, or any of ``train``/``val``/
    ``test`` for a pre-split folder (``train`` always present). ``roots`` lists every data
    folder when there are several (``root`` is the first); empty means just ``root``.
    """

    root: Path
    labels: tuple[str, ...]
    parts: Mapping[str, tuple[Sample, ...]]
    roots: tuple[Path, ...] = ()

    @property
    def presplit(self) -> bool:
        return "all" not in self.parts

    @property
    def all_roots(self) -> tuple[Path, ...]:
        """Every data folder, in the order given."""
        return self.roots or (self.root,)

    @property
    def where(self) -> str:
        """The data folder(s), for messages."""
        return " + ".join(str(r) for r in self.all_roots)

    def samples(self) -> tuple[Sample, ...]:
        return tuple(s for part in self.parts.values() for s in part)

    def without(self, paths: Iterable[Path]) -> DatasetIndex:
        """The same index minus some files (those that could not be decoded)."""
        drop = set(paths)
        parts = {k: tuple(s for s in v if s.path not in drop) for k, v in self.parts.items()}
        return DatasetIndex(self.root, self.labels, parts, self.roots)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class per part, every class listed (0 when absent)."""
        return {name: class_counts(part, self.labels) for name, part in self.parts.items()}


def class_counts(samples: Iterable[Sample], labels: Sequence[str]) -> dict[str, int]:
    """Images per class, every class listed (0 when absent)."""
    counts = Counter(s.label for s in samples)
    return {name: counts.get(i, 0) for i, name in enumerate(labels)}
