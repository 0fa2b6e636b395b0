"""The training run folder: its file names, its format version, and reading it back.

One module owns ``RUN_DIR`` so that every writer in ``fieldscope.train`` and every
reader (``fieldscope evaluate``, ``fieldscope convert``, reports, benchmarks) agrees on
what is where, and a damaged file is reported the same way everywhere: the file, and
what is wrong with it. It imports neither TensorFlow nor any other module of
``fieldscope.train``, so ``fieldscope.convert`` may use it (the only part of train/ it
may import; tests/test_dependency_rule.py checks both).

Layout of RUN_DIR after ``fieldscope train``::

    run.json            format version, data folder, versions, status, folds
    config.json         the resolved TrainConfig; "preprocess" is the edge recipe
    segmentation.json   the [objects] settings that cut the training crops (when known)
    taxa.json           what each label stands for (``fieldscope train --taxa taxa.csv``)
    labels.json         class names in model-output order
    split.json          which file went to train/val/test, skipped files and why
    model.keras         the best-on-validation model (takes raw RGB 0-255)
    history.json        per-stage Keras history, per-step learning rate, stage results
    metrics.json        per-split metrics and the decision threshold (see train/report.py)
    classification_report.txt, predictions_<split>.csv, plots/
    summary.json        the closing summary of ``fieldscope train``
    cache/              preprocessed images (unless cache_dir is set)
    state/              resumable fitting state; removed when the run completes
    fold-<k>/           with ``folds = K``: each fold is a complete run of its own

Runs written before ``run.json`` carried ``format_version`` are format 1, which they
are. Format 2 adds ``data_dirs`` (``fieldscope train`` given several data folders) to
``run.json`` and ``split.json``, with each split entry naming its folder by index; a run
of one data folder is still written as format 1, so earlier fieldscope reads it, and an
earlier fieldscope refuses a format-2 run ("upgrade fieldscope") instead of looking for
its images in the wrong folder.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from fieldscope.edge.errors import FieldscopeError
from fieldscope.edge.taxa import Taxon

__all__ = [
    "BEST_WEIGHTS",
    "CACHE_DIR",
    "CACHE_RECIPE_FILE",
    "CONFIG_FILE",
    "HISTORY_FILE",
    "LABELS_FILE",
    "LAST_MODEL",
    "METRICS_FILE",
    "METRICS_FORMAT_VERSION",
    "MODEL_FILE",
    "MULTI_ROOT_FORMAT_VERSION",
    "PLOTS_DIR",
    "PROGRESS_FILE",
    "REPORT_FILE",
    "RUN_FILE",
    "RUN_FORMAT_VERSION",
    "SEGMENTATION_FILE",
    "SPLIT_FILE",
    "STATE_DIR",
    "SUMMARY_FILE",
    "MetricsRecord",
    "RunDir",
    "RunDirError",
    "RunRecord",
    "RunSummary",
    "SegmentationRecord",
    "SkippedEntry",
    "SplitEntry",
    "SplitRecord",
    "StoredConfig",
    "write_json",
]

# The newest run format this fieldscope reads and writes; a run is written in the
# lowest format that holds it (1 for one data folder, 2 for several).
RUN_FORMAT_VERSION = 2
MULTI_ROOT_FORMAT_VERSION = 2
METRICS_FORMAT_VERSION = 1

RUN_FILE = "run.json"
CONFIG_FILE = "config.json"
SEGMENTATION_FILE = "segmentation.json"
TAXA_FILE = "taxa.json"
LABELS_FILE = "labels.json"
SPLIT_FILE = "split.json"
MODEL_FILE = "model.keras"
HISTORY_FILE = "history.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.json"
REPORT_FILE = "classification_report.txt"
PLOTS_DIR = "plots"
CACHE_DIR = "cache"
CACHE_RECIPE_FILE = "recipe.json"
STATE_DIR = "state"
PROGRESS_FILE = "progress.json"
LAST_MODEL = "last.keras"
BEST_WEIGHTS = "best.weights.h5"
_FOLD_PREFIX = "fold-"
_PREDICTIONS = "predictions_{split}.csv"

T = TypeVar("T")


class RunDirError(FieldscopeError):
    """A run folder, or one of its files, that cannot be read (the message names it)."""


class RunRecord(msgspec.Struct, frozen=True, kw_only=True):
    """``run.json``: where the data came from, how far the run got, and with what."""

    # None only in hand-made or very old records; convert reads split.json's data_dir.
    # With several data folders it is the first, and ``data_dirs`` lists them all.
    data_dir: str | None = None
    status: Literal["training", "complete"]
    folds: Annotated[int, msgspec.Meta(ge=0)] = 0
    fold: int | None = None
    started: str | None = None
    updated: str | None = None
    versions: dict[str, str] = {}
    # Absent in runs from before it was written: they are format 1.
    format_version: Annotated[int, msgspec.Meta(ge=1)] = 1
    data_dirs: list[str] = []

    def roots(self) -> list[str]:
        """Every data folder of the run, in the order given (empty when none is recorded)."""
        if self.data_dirs:
            return list(self.data_dirs)
        return [self.data_dir] if self.data_dir is not None else []


class SegmentationRecord(msgspec.Struct, frozen=True, kw_only=True):
    """``segmentation.json``: how the training crops were cut, for the bundle's manifest.

    ``objects`` is the ``[objects]`` table (``fieldscope.edge.objects.settings_table``)
    of ``source``, the TOML file it was read from (``fieldscope segment`` writes one as
    ``segmentation.toml``); convert validates it into the manifest's record.
    """

    source: str
    objects: dict[str, Any]


class SplitEntry(msgspec.Struct, frozen=True):
    """One image of ``split.json``: path relative to its data folder (or absolute), class
    name, and which data folder (an index into ``SplitRecord.roots()``; 0 when one)."""

    path: str
    label: str
    root: Annotated[int, msgspec.Meta(ge=0)] = 0


class SkippedEntry(msgspec.Struct, frozen=True):
    """An unreadable image left out of the split, and why (``root`` as in ``SplitEntry``)."""

    path: str
    reason: str
    root: Annotated[int, msgspec.Meta(ge=0)] = 0


class SplitRecord(msgspec.Struct, frozen=True, kw_only=True):
    """``split.json``: which file went to train, val and test."""

    data_dir: str
    labels: list[str]
    train: list[SplitEntry]
    val: list[SplitEntry]
    test: list[SplitEntry]
    seed: int = 0
    ratios: list[float] = []
    fold: int | None = None
    folds: int | None = None
    test_source: str = "split"
    skipped: list[SkippedEntry] = []
    # Every data folder when there are several (format 2); ``data_dir`` is the first.
    data_dirs: list[str] = []

    def roots(self) -> list[str]:
        """Every data folder the entries' ``root`` indices point into."""
        return list(self.data_dirs) or [self.data_dir]

    def problems(self) -> list[str]:
        """Entries whose ``root`` names no data folder (a damaged or hand-edited file)."""
        n = len(self.roots())
        entries: list[SplitEntry | SkippedEntry] = [
            *self.train,
            *self.val,
            *self.test,
            *self.skipped,
        ]
        return [
            f"{e.path} has root {e.root}, but there are {n} data folders"
            for e in entries
            if e.root >= n
        ]

    def path_of(
        self, entry: SplitEntry | SkippedEntry, roots: Sequence[Path] | None = None
    ) -> Path:
        """The entry's file: its path under its data folder (``roots`` replaces the recorded
        folders, for data that moved), or the path itself when absolute."""
        path = Path(entry.path)
        folders = [Path(r) for r in self.roots()] if roots is None else list(roots)
        return path if path.is_absolute() else folders[entry.root] / path


class StoredConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What readers without ``TrainConfig`` need from ``config.json`` (the rest is ignored).

    ``fieldscope.train.config.TrainConfig`` validates the whole file; this is the part
    convert/ and the benchmarks rely on, checked just as strictly.
    """

    preprocess: dict[str, Any]
    seed: int = 0
    folds: Annotated[int, msgspec.Meta(ge=0)] = 0
    cache_dir: str = ""
    batch_size: Annotated[int, msgspec.Meta(ge=1)] = 32
    target_precision: float | None = None


class MetricsRecord(msgspec.Struct, frozen=True, kw_only=True):
    """``metrics.json``: one ``compute_metrics`` entry per split, the threshold, folds."""

    format_version: Literal[1]
    labels: list[str]
    splits: dict[str, dict[str, Any]]
    threshold: dict[str, Any] | None = None
    folds: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON document, without the absent optional parts (as it was always written)."""
        doc: dict[str, Any] = {
            "format_version": self.format_version,
            "labels": list(self.labels),
            "splits": dict(self.splits),
        }
        if self.threshold is not None:
            doc["threshold"] = self.threshold
        if self.folds is not None:
            doc["folds"] = self.folds
        return doc


@dataclass(frozen=True)
class RunSummary:
    """``summary.json``: the numbers a user wants at the end of ``fieldscope train``."""

    run_dir: str
    labels: list[str]
    accuracy: float
    macro_f1: float
    threshold: float | None
    threshold_reached: bool | None
    counts: dict[str, int]
    skipped: int
    seconds: float
    folds: int = 0
    accuracy_sd: float | None = None
    macro_f1_sd: float | None = None
    test_coverage: float | None = None
    test_precision_at_threshold: float | None = None

    def lines(self) -> list[str]:
        """The closing summary, one fact per line."""
        if self.folds:
            out = [
                f"{self.folds}-fold cross-validation: test accuracy {self.accuracy:.3f} ± "
                f"{self.accuracy_sd:.3f}, macro-F1 {self.macro_f1:.3f} ± {self.macro_f1_sd:.3f}"
            ]
        else:
            chosen = "chosen on validation"
            if self.threshold_reached not in (None, True):
                chosen += "; its target precision was not reached"
            threshold = "none" if self.threshold is None else f"{self.threshold:.4f}"
            out = [
                f"test accuracy {self.accuracy:.3f}, macro-F1 {self.macro_f1:.3f}",
                f"decision threshold {threshold} ({chosen})",
            ]
            if self.test_coverage is not None:
                precision = self.test_precision_at_threshold
                shown = "n/a" if precision is None else f"{precision:.3f}"
                out[-1] += (
                    f"; on test it accepts {self.test_coverage:.0%} of images "
                    f"with precision {shown}"
                )
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        out.append(
            f"{len(self.labels)} classes; images: {counts}; skipped unreadable: {self.skipped}"
        )
        out.append(f"run dir: {self.run_dir} ({self.seconds:.0f} s)")
        return out


def write_json(path: Path, data: Any, *, allow_nan: bool = True) -> None:
    """Write JSON atomically (temporary file + rename): a killed run never leaves half a file."""
    if isinstance(data, msgspec.Struct):
        data = msgspec.to_builtins(data)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    temporary.write_text(json.dumps(data, indent=2, allow_nan=allow_nan) + "\n", encoding="utf-8")
    temporary.replace(path)


@dataclass(frozen=True)
class RunDir:
    """The paths of one run folder, and readers that name the file and what is wrong.

    ``error`` is the exception type raised for a missing or damaged file, so each caller
    keeps its own (``TrainError`` in train/, ``ConversionError`` in convert/).
    """

    path: Path
    error: type[Exception] = field(default=RunDirError, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # --- paths -------------------------------------------------------------------------

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def segmentation_file(self) -> Path:
        return self.path / SEGMENTATION_FILE

    @property
    def taxa_file(self) -> Path:
        return self.path / TAXA_FILE

    @property
    def labels_file(self) -> Path:
        return self.path / LABELS_FILE

    @property
    def split_file(self) -> Path:
        return self.path / SPLIT_FILE

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def history_file(self) -> Path:
        return self.path / HISTORY_FILE

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def report_file(self) -> Path:
        return self.path / REPORT_FILE

    @property
    def plots_dir(self) -> Path:
        return self.path / PLOTS_DIR

    @property
    def cache_dir(self) -> Path:
        return self.path / CACHE_DIR

    @property
    def state_dir(self) -> Path:
        return self.path / STATE_DIR

    @property
    def progress_file(self) -> Path:
        return self.state_dir / PROGRESS_FILE

    def predictions_file(self, split: str) -> Path:
        """Where a split's predictions CSV goes (``split`` is checked by the report)."""
        return self.path / _PREDICTIONS.format(split=split)

    def fold(self, k: int) -> RunDir:
        """Fold ``k`` of a cross-validation run, itself a complete run folder."""
        return RunDir(self.path / f"{_FOLD_PREFIX}{k}", self.error)

    def trained_folds(self) -> list[RunDir]:
        """The folds that hold a model, in name order (for "convert one of its folds")."""
        found = (p for p in self.path.glob(f"{_FOLD_PREFIX}*") if (p / MODEL_FILE).exists())
        return [RunDir(p, self.error) for p in sorted(found, key=lambda p: p.name)]

    def is_run(self) -> bool:
        """Whether the folder holds a fieldscope training run (its ``run.json``)."""
        return self.run_file.is_file()

    # --- readers -----------------------------------------------------------------------

    def read_record(self) -> RunRecord:
        """``run.json``; runs without ``format_version`` are read as the current format."""
        record = self._decode(self.run_file, RunRecord, "the run record")
        if record.format_version > RUN_FORMAT_VERSION:
            raise self.error(
                f"{self.run_file} is run format {record.format_version}, newer than this "
                f"fieldscope reads ({RUN_FORMAT_VERSION}); upgrade fieldscope"
            )
        return record

    def read_labels(self) -> list[str]:
        """``labels.json``: the class names in model-output order."""
        return self._decode(self.labels_file, list[str], "class names")

    def read_config_tree(self) -> dict[str, Any]:
        """``config.json`` as stored, for ``TrainConfig.from_dict`` to validate."""
        return self._decode(self.config_file, dict[str, Any], "the training config")

    def read_config(self) -> StoredConfig:
        """The part of ``config.json`` that readers without TensorFlow need."""
        return self._decode(self.config_file, StoredConfig, "the training config")

    def read_segmentation(self) -> SegmentationRecord | None:
        """``segmentation.json``, or None for a run of whole frames; a fold reads its
        cross-validation run's (the folds share its data)."""
        for folder in (self.path, self.path.parent):
            path = folder / SEGMENTATION_FILE
            if path.is_file():
                return self._decode(path, SegmentationRecord, "how the crops were cut")
            if not self.path.name.startswith(_FOLD_PREFIX):
                break
        return None

    def read_taxa(self) -> tuple[Taxon, ...] | None:
        """``taxa.json`` (the run's taxa.csv, checked against its labels), or None when
        training had no --taxa; a fold reads its cross-validation run's."""
        for folder in (self.path, self.path.parent):
            path = folder / TAXA_FILE
            if path.is_file():
                rows = self._decode(path, list[dict[str, Any]], "the taxa of the labels")
                try:
                    return tuple(Taxon.from_dict(row, f"taxa[{i}]") for i, row in enumerate(rows))
                except FieldscopeError as exc:
                    raise self.error(f"{path} is damaged (the taxa of the labels): {exc}") from None
            if not self.path.name.startswith(_FOLD_PREFIX):
                break
        return None

    def read_split(self) -> SplitRecord:
        """``split.json``: the files of train, val and test."""
        record = self._decode(self.split_file, SplitRecord, "which files are train and test")
        problems = record.problems()
        if problems:
            raise self.error(
                f"{self.split_file} is damaged (which files are train and test): {problems[0]}"
            )
        return record

    def read_metrics(self) -> MetricsRecord:
        """``metrics.json``: per-split metrics, the decision threshold, fold summary."""
        path = self.metrics_file
        tree = self._decode(path, object, "test metrics and threshold")
        try:
            return msgspec.convert(tree, MetricsRecord)
        except msgspec.ValidationError as exc:
            raise self.error(
                f"{path} is not a fieldscope metrics file (format_version "
                f"{METRICS_FORMAT_VERSION}): {exc}; move it away and evaluate again"
            ) from None

    def read_summary(self) -> RunSummary:
        """``summary.json``: the closing summary of ``fieldscope train``."""
        return self._decode(self.summary_file, RunSummary, "the run summary")

    def read_progress(self) -> dict[str, Any] | None:
        """``state/progress.json``, or ``None`` before the first epoch finished."""
        if not self.progress_file.exists():
            return None
        return self._decode(self.progress_file, dict[str, Any], "the fitting progress")

    def _decode(self, path: Path, kind: type[T], what: str) -> T:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise self.error(
                f"{path} is missing ({what}); is {self.path} a finished fieldscope training run?"
            ) from None
        except OSError as exc:
            raise self.error(f"cannot read {path} ({what}): {exc}") from exc
        try:
            return msgspec.json.decode(data, type=kind)
        except msgspec.ValidationError as exc:
            raise self.error(f"{path} is damaged ({what}): {exc}") from None
        except msgspec.DecodeError as exc:
            raise self.error(f"cannot read {path} ({what}): {exc}") from None
