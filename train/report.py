"""A run's evaluation report on disk: ``metrics.json``, text report, predictions, plots.

Layout inside ``RUN_DIR``::

    metrics.json                 {"format_version": 1, "labels": [...],
                                  "splits": {"val": {...}, "test": {...}},
                                  "threshold": {...}, "folds": {...}}
    classification_report.txt    one "== split: NAME ==" section per evaluated split
    predictions_<split>.csv      file, true_label, predicted_label, score, correct, prob_<label>...
    plots/*.png

Each split's entry in ``metrics.json`` is exactly ``compute_metrics`` output (plus
``at_threshold`` when a threshold is given), and the predictions CSV holds the full
probabilities, so ``metrics_from_predictions`` reproduces the entry exactly: the report
can be audited, or redrawn, without the model. Evaluating a split again replaces its
entry and files and keeps the others, which is what ``fieldscope evaluate`` needs.
Files are replaced atomically, so an interrupted run never leaves half a JSON file.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fieldscope.train import plots
from fieldscope.train.errors import EvaluationError
from fieldscope.train.metrics import (
    ThresholdChoice,
    classification_report_text,
    compute_metrics,
    evaluate_threshold,
    format_fold_summary,
    summarize_folds,
    validate_predictions,
)
from fieldscope.train.rundir import (
    METRICS_FILE,
    METRICS_FORMAT_VERSION,
    PLOTS_DIR,
    REPORT_FILE,
    RunDir,
    write_json,
)

__all__ = [
    "METRICS_FILE",
    "PLOTS_DIR",
    "REPORT_FILE",
    "Predictions",
    "load_threshold",
    "metrics_from_predictions",
    "predictions_path",
    "read_metrics",
    "read_predictions",
    "write_evaluation",
    "write_fold_summary",
    "write_training_plots",
]

_log = logging.getLogger(__name__)

FORMAT_VERSION = METRICS_FORMAT_VERSION
PROB_PREFIX = "prob_"
BASE_COLUMNS: tuple[str, ...] = ("file", "true_label", "predicted_label", "score", "correct")
# Split names become parts of file names, so keep them to a safe alphabet.
_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SECTION = re.compile(r"^== (.+) ==$", re.MULTILINE)
_SPLIT_ORDER = ("train", "val", "test")
_FOLDS_SECTION = "cross-validation"


def predictions_path(run_dir: Path | str, split: str) -> Path:
    """Where ``write_evaluation`` puts a split's predictions."""
    return RunDir(Path(run_dir)).predictions_file(_check_split(split))


def write_evaluation(
    run_dir: Path | str,
    y_true: Any,
    probs: Any,
    labels: Sequence[str],
    *,
    split: str = "test",
    threshold: ThresholdChoice | None = None,
    file_paths: Sequence[str | os.PathLike[str]] | None = None,
) -> dict[str, Any]:
    """Evaluate one split and write (or replace) its part of the report; return its metrics.

    ``threshold`` is the decision threshold chosen on validation: it is stored under
    ``"threshold"``, its precision-coverage curve is plotted, and the split's metrics get
    an ``at_threshold`` entry (coverage and precision of accepted predictions on *this*
    split, e.g. how the validation threshold holds up on test). ``file_paths`` name the
    images in the order of ``y_true``, for the predictions CSV.
    """
    run = Path(run_dir)
    name = _check_split(split)
    y, p, names = validate_predictions(y_true, probs, labels)
    paths = _check_file_paths(file_paths, y.size)
    doc = _load_document(run, names)

    metrics = compute_metrics(y, p, names)
    if threshold is not None:
        metrics["at_threshold"] = evaluate_threshold(y, p, threshold.threshold)
    run.mkdir(parents=True, exist_ok=True)
    _write_predictions(predictions_path(run, name), y, p, names, paths)
    _write_evaluation_plots(run / PLOTS_DIR, metrics, name, threshold)
    _write_report_section(
        run / REPORT_FILE, f"split: {name}", classification_report_text(y, p, names)
    )

    doc["splits"][name] = metrics
    if threshold is not None:
        doc["threshold"] = threshold.to_dict()
    _write_document(run, doc)
    _log.info(
        "%s: %d samples, accuracy %.3f, macro-F1 %.3f -> %s",
        name,
        metrics["n_samples"],
        metrics["accuracy"],
        metrics["macro_f1"],
        run,
    )
    return metrics


def _check_split(split: str) -> str:
    if not isinstance(split, str) or not _SPLIT_NAME.fullmatch(split):
        raise EvaluationError(
            f"split name {split!r} must be 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit (it becomes part of file names)"
        )
    return split


def _check_file_paths(file_paths: Sequence[str | os.PathLike[str]] | None, n: int) -> list[str]:
    if file_paths is None:
        return [""] * n
    if isinstance(file_paths, str):
        raise EvaluationError("file_paths must be a list of paths, one per sample, not a string")
    paths = [os.fspath(f) for f in file_paths]
    if len(paths) != n:
        raise EvaluationError(f"file_paths has {len(paths)} entries but there are {n} samples")
    return paths


def _write_evaluation_plots(
    plot_dir: Path, metrics: Mapping[str, Any], split: str, threshold: ThresholdChoice | None
) -> None:
    labels = metrics["labels"]
    matrix = metrics["confusion_matrix"]
    plots.plot_confusion_matrix(
        matrix,
        labels,
        plot_dir / f"confusion_matrix_{split}.png",
        title=f"Confusion matrix, {split} (counts)",
    )
    plots.plot_confusion_matrix(
        matrix,
        labels,
        plot_dir / f"confusion_matrix_normalized_{split}.png",
        normalize=True,
        title=f"Confusion matrix, {split} (row-normalised)",
    )
    plots.plot_per_class_accuracy(
        metrics["per_class"],
        plot_dir / f"per_class_accuracy_{split}.png",
        overall_accuracy=metrics["accuracy"],
        title=f"Per-class accuracy (recall), {split}",
    )
    plots.plot_reliability_diagram(
        metrics["calibration"], plot_dir / f"reliability_{split}.png", ece=metrics["ece"]
    )
    if threshold is not None:
        plots.plot_precision_coverage(threshold, plot_dir / "precision_coverage.png")


# --------------------------------------------------------------------------- metrics.json


def read_metrics(run_dir: Path | str) -> dict[str, Any]:
    """The run's ``metrics.json``; a missing or damaged file is an ``EvaluationError``."""
    run = RunDir(Path(run_dir), EvaluationError)
    if not run.metrics_file.exists():
        raise EvaluationError(f"no {METRICS_FILE} in {run_dir}; evaluate the run first")
    return run.read_metrics().to_dict()


def load_threshold(run_dir: Path | str) -> ThresholdChoice | None:
    """The decision threshold recorded in the run, or ``None`` if none was chosen."""
    record = read_metrics(run_dir).get("threshold")
    return None if record is None else ThresholdChoice.from_dict(record)


def _load_document(run: Path, labels: Sequence[str]) -> dict[str, Any]:
    if not (run / METRICS_FILE).exists():
        return {"format_version": FORMAT_VERSION, "labels": list(labels), "splits": {}}
    doc = read_metrics(run)
    if doc["labels"] != list(labels):
        raise EvaluationError(
            f"{run / METRICS_FILE} was written for labels {doc['labels']} but these "
            f"predictions use {list(labels)}; a run has one label order, "
            "evaluate this model into its own run directory"
        )
    return doc


def _write_document(run: Path, doc: Mapping[str, Any]) -> None:
    ordered = dict(doc)
    ordered["splits"] = _ordered(doc["splits"])
    write_json(run / METRICS_FILE, ordered, allow_nan=False)


def _ordered(sections: Mapping[str, Any]) -> dict[str, Any]:
    """train, val, test first, then the rest alphabetically: the order a reader expects."""

    def key(name: str) -> tuple[int, str]:
        return (_SPLIT_ORDER.index(name) if name in _SPLIT_ORDER else len(_SPLIT_ORDER), name)

    return {name: sections[name] for name in sorted(sections, key=key)}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_fold_summary(
    run_dir: Path | str, fold_metrics: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Store k-fold cross-validation results (mean ± sd) under ``"folds"``; return them.

    Also adds a "cross-validation" section to the text report.
    """
    summary = summarize_folds(fold_metrics)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    doc = _load_document(run, summary["labels"])
    doc["folds"] = summary
    _write_report_section(run / REPORT_FILE, _FOLDS_SECTION, format_fold_summary(summary))
    _write_document(run, doc)
    return summary


# --------------------------------------------------------------------------- text report


def _write_report_section(path: Path, title: str, body: str) -> None:
    """Replace (or add) one titled section of the text report, keeping the others."""
    sections: dict[str, str] = {}
    if path.exists():
        text = path.read_text(encoding="utf-8")
        parts = _SECTION.split(text)
        # parts = [preamble, title1, body1, title2, body2, ...]
        for i in range(1, len(parts) - 1, 2):
            sections[parts[i]] = parts[i + 1].strip("\n")
    sections[title] = body.strip("\n")

    def key(name: str) -> tuple[int, str]:
        split = name.removeprefix("split: ")
        if name == _FOLDS_SECTION:
            return (len(_SPLIT_ORDER) + 1, name)
        rank = _SPLIT_ORDER.index(split) if split in _SPLIT_ORDER else len(_SPLIT_ORDER)
        return (rank, name)

    lines = [
        "fieldscope classification report (rows: true class; "
        "precision/recall/F1 of the top prediction)",
        "",
    ]
    for name in sorted(sections, key=key):
        lines += [f"== {name} ==", sections[name], ""]
    _atomic_write(path, "\n".join(lines))


# --------------------------------------------------------------------------- predictions CSV


def _write_predictions(
    path: Path, y: np.ndarray, probs: np.ndarray, labels: Sequence[str], files: Sequence[str]
) -> None:
    pred = probs.argmax(axis=1)
    score = probs.max(axis=1)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*BASE_COLUMNS, *(PROB_PREFIX + name for name in labels)])
        for i in range(y.size):
            # Python writes floats in shortest round-trip form: reading back is exact.
            writer.writerow(
                [
                    files[i],
                    labels[y[i]],
                    labels[pred[i]],
                    float(score[i]),
                    int(pred[i] == y[i]),
                    *(float(v) for v in probs[i]),
                ]
            )
    tmp.replace(path)


@dataclass(frozen=True)
class Predictions:
    """A predictions CSV read back: what is needed to recompute every metric."""

    labels: tuple[str, ...]
    y_true: np.ndarray
    probs: np.ndarray
    file_paths: tuple[str, ...]


def read_predictions(path: Path | str) -> Predictions:
    """Read a ``predictions_<split>.csv``; label order comes from its ``prob_`` columns."""
    source = Path(path)
    try:
        with source.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.reader(handle))
    except FileNotFoundError as exc:
        raise EvaluationError(f"no predictions file at {source}") from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise EvaluationError(f"cannot read predictions file {source}: {exc}") from exc
    if not rows or tuple(rows[0][: len(BASE_COLUMNS)]) != BASE_COLUMNS:
        raise EvaluationError(
            f"{source} is not a fieldscope predictions file "
            f"(expected columns {', '.join(BASE_COLUMNS)}, {PROB_PREFIX}<label>...)"
        )
    header = rows[0]
    prob_columns = header[len(BASE_COLUMNS) :]
    if not prob_columns or not all(c.startswith(PROB_PREFIX) for c in prob_columns):
        raise EvaluationError(f"{source}: probability columns must be named {PROB_PREFIX}<label>")
    labels = tuple(c.removeprefix(PROB_PREFIX) for c in prob_columns)
    index = {name: i for i, name in enumerate(labels)}
    y: list[int] = []
    probs: list[list[float]] = []
    files: list[str] = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise EvaluationError(f"{source}:{line}: {len(row)} fields, expected {len(header)}")
        if row[1] not in index:
            raise EvaluationError(f"{source}:{line}: true label {row[1]!r} is not a known class")
        try:
            probs.append([float(v) for v in row[len(BASE_COLUMNS) :]])
        except ValueError as exc:
            raise EvaluationError(f"{source}:{line}: non-numeric probability") from exc
        y.append(index[row[1]])
        files.append(row[0])
    return Predictions(
        labels=labels,
        y_true=np.asarray(y, dtype=np.int64),
        probs=np.asarray(probs, dtype=np.float64).reshape(len(probs), len(labels)),
        file_paths=tuple(files),
    )


def metrics_from_predictions(path: Path | str, *, threshold: float | None = None) -> dict[str, Any]:
    """Recompute a split's metrics from its predictions CSV (equal to its ``metrics.json`` entry).

    Pass the run's threshold to recompute ``at_threshold`` too.
    """
    predictions = read_predictions(path)
    metrics = compute_metrics(predictions.y_true, predictions.probs, predictions.labels)
    if threshold is not None:
        metrics["at_threshold"] = evaluate_threshold(
            predictions.y_true, predictions.probs, threshold
        )
    return metrics


# --------------------------------------------------------------------------- training plots


def write_training_plots(
    run_dir: Path | str,
    history: Mapping[str, Mapping[str, Sequence[float]]],
    lr_schedule: Mapping[str, Sequence[float]] | None = None,
    class_counts_per_split: Mapping[str, Mapping[str, int]] | None = None,
    augmented_samples: Sequence[tuple[np.ndarray, str]] | None = None,
    *,
    lr_unit: str = "step",
) -> list[Path]:
    """Draw the training-side plots into ``RUN_DIR/plots``; return the files written.

    ``history`` maps stage name → that stage's Keras ``History.history``, in order.
    ``lr_schedule`` maps stage name → learning rates per ``lr_unit``; without it, a
    ``learning_rate`` series in the history (per epoch) is used if there is one.
    ``class_counts_per_split`` maps split → class → images; ``augmented_samples`` is a
    list of (uint8 RGB image, caption). A plot whose data is absent (no validation
    series, no schedule) is skipped with a log line rather than failing the run.
    """
    plot_dir = Path(run_dir) / PLOTS_DIR
    written = [plots.plot_training_curves(history, plot_dir / "training_curves.png")]
    if _has_validation(history):
        written.append(plots.plot_generalization_gap(history, plot_dir / "generalization_gap.png"))
    else:
        _log.warning("no validation series in the history: generalization gap plot skipped")
    schedule, unit = _schedule(history, lr_schedule, lr_unit)
    if schedule is not None:
        written.append(
            plots.plot_learning_rate(schedule, plot_dir / "learning_rate.png", unit=unit)
        )
    else:
        _log.info("no learning-rate schedule given or logged: learning-rate plot skipped")
    if class_counts_per_split is not None:
        written.append(
            plots.plot_class_distribution(
                class_counts_per_split, plot_dir / "class_distribution.png"
            )
        )
    if augmented_samples is not None:
        try:
            images = [image for image, _ in augmented_samples]
            titles = [str(title) for _, title in augmented_samples]
        except (TypeError, ValueError) as exc:
            raise EvaluationError(
                "augmented_samples must be a list of (uint8 RGB image, caption) pairs"
            ) from exc
        written.append(plots.plot_image_grid(images, titles, plot_dir / "augmented_samples.png"))
    return written


def _has_validation(history: Mapping[str, Mapping[str, Sequence[float]]]) -> bool:
    return any(
        key.startswith("val_") and len(values) > 0
        for series in history.values()
        if isinstance(series, Mapping)
        for key, values in series.items()
    )


def _schedule(
    history: Mapping[str, Mapping[str, Sequence[float]]],
    lr_schedule: Mapping[str, Sequence[float]] | None,
    unit: str,
) -> tuple[Mapping[str, Sequence[float]] | None, str]:
    if lr_schedule:
        return lr_schedule, unit
    logged = {
        stage: series.get("learning_rate", series.get("lr", []))
        for stage, series in history.items()
        if isinstance(series, Mapping)
    }
    if any(len(values) for values in logged.values()):
        return logged, "epoch"
    return None, unit
