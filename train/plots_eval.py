"""The report's evaluation figures: confusion matrix, per-class accuracy, reliability
diagram, precision against coverage (re-exported by :mod:`fieldscope.train.plots`).

Inputs are the structures of ``fieldscope.train.metrics``, so the figures can be redrawn
from ``metrics.json`` alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fieldscope.train.errors import EvaluationError
from fieldscope.train.metrics import ThresholdChoice
from fieldscope.train.plot_style import (
    _MARK_COLOR,
    _MAX_ANNOTATED_CLASSES,
    _TRAIN_COLOR,
    _VAL_COLOR,
    _class_ticks,
    _figure,
    _tick_fontsize,
)

__all__ = [
    "plot_confusion_matrix",
    "plot_per_class_accuracy",
    "plot_precision_coverage",
    "plot_reliability_diagram",
]


def _checked_matrix(
    matrix: Sequence[Sequence[int]] | np.ndarray, labels: Sequence[str]
) -> np.ndarray:
    cm = np.asarray(matrix, dtype=np.float64)
    n = len(labels)
    if n < 1 or cm.shape != (n, n):
        raise EvaluationError(
            f"confusion matrix: shape {cm.shape} does not match {n} labels (need {n}x{n})"
        )
    if not np.all(np.isfinite(cm)) or cm.min() < 0:
        raise EvaluationError("confusion matrix: counts must be finite and >= 0")
    return cm


def _annotate_cells(
    ax: Any, values: np.ndarray, support: np.ndarray, *, normalize: bool, vmax: float
) -> None:
    """The number in each cell, white on dark cells; empty rows stay empty."""
    size = float(np.clip(150 / len(values), 5, 10))
    for (i, j), value in np.ndenumerate(values):
        text = f"{value:.2f}" if normalize else f"{int(value)}"
        if normalize and support[i] == 0:
            text = ""
        ax.text(
            j,
            i,
            text,
            ha="center",
            va="center",
            fontsize=size,
            color="white" if value > 0.6 * vmax else "black",
        )


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]] | np.ndarray,
    labels: Sequence[str],
    path: Path | str,
    *,
    normalize: bool = False,
    title: str | None = None,
) -> Path:
    """Confusion matrix heat map (rows true, columns predicted), counts or row-normalised.

    Row-normalised cells are per-class recall and confusion rates, which stay readable
    with unbalanced classes; a class with no samples shows an empty row. The figure,
    fonts and number format scale with the number of classes; past 30 classes the cell
    numbers are left out.
    """
    cm = _checked_matrix(matrix, labels)
    n = len(labels)
    support = cm.sum(axis=1)
    if normalize:
        values = np.divide(cm, support[:, None], out=np.zeros_like(cm), where=support[:, None] > 0)
        vmax = 1.0
    else:
        values = cm
        vmax = max(float(cm.max()), 1.0)
    side = float(np.clip(2.8 + 0.5 * n, 5.0, 22.0))
    with _figure(path, side + 1.2, side) as fig:
        ax = fig.add_subplot()
        image = ax.imshow(values, vmin=0.0, vmax=vmax, cmap="Blues", interpolation="nearest")
        ax.grid(visible=False)
        fig.colorbar(
            image, ax=ax, shrink=0.8, label="fraction of true class" if normalize else "images"
        )
        if n <= _MAX_ANNOTATED_CLASSES:
            _annotate_cells(ax, values, support, normalize=normalize, vmax=vmax)
        _class_ticks(ax, labels, axis="x")
        _class_ticks(
            ax, [f"{name} (n={int(s)})" for name, s in zip(labels, support, strict=True)], axis="y"
        )
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        kind = "row-normalised" if normalize else "counts"
        ax.set_title(title or f"Confusion matrix ({kind})")
    return Path(path)


def plot_per_class_accuracy(
    per_class: Mapping[str, Mapping[str, Any]],
    path: Path | str,
    *,
    overall_accuracy: float | None = None,
    title: str = "Per-class accuracy (recall)",
) -> Path:
    """Horizontal bars of each class's recall with its sample count, overall accuracy marked.

    Takes ``compute_metrics(...)["per_class"]``. Horizontal bars keep long species names
    readable; the sample count shows which low bars rest on few images.
    """
    if not per_class:
        raise EvaluationError("per-class accuracy: no classes given")
    try:
        names = list(per_class)
        recall = np.array([float(per_class[name]["recall"]) for name in names])
        support = [int(per_class[name]["support"]) for name in names]
    except (KeyError, TypeError, ValueError) as exc:
        raise EvaluationError(
            "per-class accuracy: each class needs 'recall' and 'support' (compute_metrics output)"
        ) from exc
    n = len(names)
    y = np.arange(n)
    with _figure(path, 7.2, float(np.clip(1.4 + 0.38 * n, 3.2, 24.0))) as fig:
        ax = fig.add_subplot()
        colors = [_TRAIN_COLOR if s > 0 else "0.7" for s in support]
        ax.barh(y, recall, color=colors, height=0.7)
        for i, (value, count) in enumerate(zip(recall, support, strict=True)):
            text = f"{value:.2f} (n={count})" if count else "no samples"
            ax.text(value + 0.01, i, text, va="center", fontsize=_tick_fontsize(n) - 1)
        if overall_accuracy is not None:
            ax.axvline(
                float(overall_accuracy),
                color=_MARK_COLOR,
                ls="--",
                lw=1.2,
                label=f"overall accuracy {float(overall_accuracy):.2f}",
            )
            ax.legend(loc="lower right")
        _class_ticks(ax, names, axis="y")
        ax.invert_yaxis()
        ax.set_xlim(0.0, 1.18)
        ax.set_xticks(np.linspace(0.0, 1.0, 6))
        ax.set_xlabel("recall (fraction of the class identified correctly)")
        ax.grid(axis="y", visible=False)
        ax.set_title(title)
    return Path(path)


def _bins(
    calibration: Mapping[str, Any],
) -> tuple[list[Any], np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The bins and their lower and upper edges, counts, accuracy and mean confidence."""
    try:
        bins = list(calibration["bins"])
        lower = np.array([float(b["lower"]) for b in bins])
        upper = np.array([float(b["upper"]) for b in bins])
        counts = np.array([int(b["count"]) for b in bins])
        acc = np.array([np.nan if b["accuracy"] is None else float(b["accuracy"]) for b in bins])
        conf = np.array(
            [np.nan if b["mean_confidence"] is None else float(b["mean_confidence"]) for b in bins]
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise EvaluationError(
            "reliability diagram: expected compute_metrics(...)['calibration'] with bins"
        ) from exc
    return bins, lower, upper, counts, acc, conf


def _draw_bins(
    ax: Any, lower: np.ndarray, width: np.ndarray, acc: np.ndarray, conf: np.ndarray
) -> None:
    """The diagonal, each bin's accuracy, and its gap to the bin's mean confidence."""
    ax.plot([0, 1], [0, 1], color="0.4", ls="--", lw=1, label="perfect calibration")
    ax.bar(
        lower,
        acc,
        width,
        align="edge",
        color=_TRAIN_COLOR,
        edgecolor="white",
        label="accuracy in bin",
    )
    ax.bar(
        lower,
        conf - acc,
        width,
        bottom=acc,
        align="edge",
        color=_MARK_COLOR,
        alpha=0.3,
        edgecolor=_MARK_COLOR,
        hatch="//",
        label="gap to mean confidence",
    )


def plot_reliability_diagram(
    calibration: Mapping[str, Any], path: Path | str, *, ece: float | None = None
) -> Path:
    """Accuracy against confidence per bin, with the gap to the diagonal and bin counts.

    Takes ``compute_metrics(...)["calibration"]``. Bars below the diagonal mean the model
    is overconfident there, which is what the decision threshold has to compensate.
    """
    bins, lower, upper, counts, acc, conf = _bins(calibration)
    if not bins or counts.sum() == 0:
        raise EvaluationError("reliability diagram: no samples in any bin")
    width = upper - lower
    filled = counts > 0
    with _figure(path, 6.0, 6.6) as fig:
        top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        _draw_bins(top, lower[filled], width[filled], acc[filled], conf[filled])
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("accuracy")
        top.legend(loc="upper left")
        suffix = f" (ECE = {ece:.3f}, {len(bins)} bins)" if ece is not None else ""
        top.set_title("Reliability diagram" + suffix)
        bottom.bar(lower, counts, width, align="edge", color="0.55", edgecolor="white")
        bottom.set_xlabel("confidence (top probability)")
        bottom.set_ylabel("samples")
    return Path(path)


def plot_precision_coverage(choice: ThresholdChoice, path: Path | str) -> Path:
    """Precision of accepted predictions against coverage, with the chosen threshold.

    Left: the trade-off curve with the target precision and the chosen point. Right: both
    quantities against the threshold, so a user can see what moving it would cost.
    """
    t = np.asarray(choice.curve_threshold)
    precision = np.asarray(choice.curve_precision)
    coverage = np.asarray(choice.curve_coverage)
    if t.size == 0 or not (t.size == precision.size == coverage.size):
        raise EvaluationError("precision-coverage: the threshold choice has no curve")
    status = "target reached" if choice.reached else "target NOT reached"
    with _figure(path, 11.0, 4.6) as fig:
        left, right = fig.subplots(1, 2)
        _draw_tradeoff(left, choice, precision, coverage, status)
        _draw_against_threshold(right, choice, t, precision, coverage)
    return Path(path)


def _draw_tradeoff(
    left: Any, choice: ThresholdChoice, precision: np.ndarray, coverage: np.ndarray, status: str
) -> None:
    """Precision against coverage, the target, and the chosen point."""
    left.step(coverage, precision, where="post", color=_TRAIN_COLOR, label="accepted predictions")
    left.axhline(
        choice.target_precision,
        color="0.4",
        ls="--",
        lw=1,
        label=f"target precision {choice.target_precision:.2f}",
    )
    left.plot(
        [choice.coverage],
        [choice.precision],
        marker="*",
        ms=14,
        color=_MARK_COLOR,
        ls="none",
        label=f"threshold {choice.threshold:.3f}: precision {choice.precision:.3f}, "
        f"coverage {choice.coverage:.3f}",
    )
    left.set_xlim(0, 1.02)
    left.set_ylim(min(0.0, float(precision.min())) - 0.02, 1.02)
    left.set_xlabel("coverage (fraction accepted)")
    left.set_ylabel("precision of accepted")
    left.set_title(f"Precision vs coverage ({status})")
    left.legend(loc="lower left")


def _draw_against_threshold(
    right: Any, choice: ThresholdChoice, t: np.ndarray, precision: np.ndarray, coverage: np.ndarray
) -> None:
    """Precision and coverage against the threshold, the chosen one marked."""
    # A threshold x accepts what the next observed confidence >= x accepts: with the
    # thresholds ascending, each value holds on the interval to its left ("pre").
    right.step(t[::-1], precision[::-1], where="pre", color=_TRAIN_COLOR, label="precision")
    right.step(t[::-1], coverage[::-1], where="pre", color=_VAL_COLOR, label="coverage")
    right.axvline(choice.threshold, color=_MARK_COLOR, ls="--", lw=1.2, label="chosen threshold")
    right.set_xlim(min(float(t.min()), 1.0) - 0.02, 1.01)
    right.set_ylim(-0.02, 1.02)
    right.set_xlabel("confidence threshold")
    right.set_ylabel("fraction")
    right.set_title(f"Against the threshold (validation, n={choice.n_samples})")
    right.legend(loc="lower left")
