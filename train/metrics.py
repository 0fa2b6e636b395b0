"""Evaluation of a classifier from plain arrays: no Keras, no TensorFlow.

Everything here takes ``y_true`` (class indices into ``labels``) and ``probs`` (one row of
class probabilities per sample, columns in ``labels`` order) as numpy arrays, so the same
code scores a Keras model, a TFLite bundle or a predictions CSV read back from a run.
Results are plain ``dict``/``list``/``float``/``int`` so they go straight into JSON.

Conventions, chosen once so every number in a report means the same thing:

* The predicted class is ``argmax(probs)``; ties go to the class that comes first in
  ``labels`` (numpy's ``argmax``), and top-k uses the same tie order, so top-1 equals
  accuracy.
* The confusion matrix has true classes as rows and predicted classes as columns, both in
  ``labels`` order, and always has every class, predicted or not.
* Per-class precision/recall/F1 that are undefined (a class never predicted, or absent
  from ``y_true``) are reported as 0.0, as scikit-learn's ``zero_division=0`` does.
  Macro and weighted averages run over the classes that occur in ``y_true`` or in the
  predictions: a class the model never predicts still drags macro-F1 down, but a class
  absent from a small split and never predicted does not.
* Expected calibration error uses 15 equal-width confidence bins over (0, 1] (Guo et al.,
  2017): ``ECE = sum_b n_b/N * |accuracy_b - mean_confidence_b|``, where a sample's
  confidence is its top probability. Equal-width bins keep ECE comparable between runs
  and models; 15 is the customary count.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix
from sklearn.metrics import precision_recall_fscore_support as _prfs

from fieldscope.train.errors import EvaluationError
from fieldscope.train.folds import FOLD_METRICS, format_fold_summary, summarize_folds

__all__ = [
    "ECE_BINS",
    "FOLD_METRICS",
    "TOP_K",
    "ThresholdChoice",
    "calibration_bins",
    "choose_threshold",
    "classification_report_text",
    "compute_metrics",
    "evaluate_threshold",
    "format_fold_summary",
    "precision_lower_bound",
    "summarize_folds",
    "top_k_accuracy",
    "validate_predictions",
]

_log = logging.getLogger(__name__)

ECE_BINS = 15
TOP_K = 3
# Rows of ``probs`` must sum to 1 within this: loose enough for a dequantised int8 softmax,
# tight enough to catch logits or unnormalised scores passed by mistake.
PROB_SUM_TOLERANCE = 0.05
# Floating-point slack when comparing a precision or coverage with its target, so that
# 4/5 meets a target of 0.8 whatever the rounding.
_EPS = 1e-9


def validate_predictions(
    y_true: Any, probs: Any, labels: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Check and normalise evaluation inputs; return ``(y int64, probs float64, labels)``.

    Every metric goes through here so that a wrong shape, an out-of-range label or logits
    in place of probabilities fail with one message that says what to fix, instead of a
    numpy traceback or, worse, a plausible-looking wrong number. Probabilities become
    float64 so metrics recomputed from a CSV equal the originals bit for bit. Without
    ``labels`` the classes are the columns of ``probs``.
    """
    try:
        p = np.asarray(probs, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise EvaluationError(f"probs must be a numeric array, got {type(probs).__name__}") from exc
    y_raw = np.asarray(y_true)
    if y_raw.size == 0 and p.size == 0:
        raise EvaluationError(
            "no predictions to evaluate: y_true and probs are empty; "
            "evaluate on a split with images"
        )
    if p.ndim != 2:
        raise EvaluationError(
            f"probs must be 2-D (samples, classes), got shape {p.shape}; "
            "pass the model's softmax output for a batch"
        )
    names = _validate_labels(labels, p.shape[1])
    n_classes = len(names)
    if p.shape[1] != n_classes:
        raise EvaluationError(
            f"probs has {p.shape[1]} columns but there are {n_classes} labels; "
            "the model's output and labels.json disagree"
        )
    y = _validate_y(y_raw, p.shape[0], n_classes)
    _validate_probs(p)
    return y, p, names


def _validate_labels(labels: Sequence[str] | None, n_columns: int) -> tuple[str, ...]:
    if labels is None:
        names = tuple(str(i) for i in range(n_columns))
    elif isinstance(labels, str) or not isinstance(labels, Sequence):
        raise EvaluationError(f"labels must be a list of class names, got {labels!r}")
    else:
        names = tuple(labels)
    bad = [name for name in names if not isinstance(name, str) or not name]
    if bad:
        raise EvaluationError(f"labels must be non-empty strings, got {bad[:3]!r}")
    if len(set(names)) != len(names):
        dupes = sorted({name for name in names if names.count(name) > 1})
        raise EvaluationError(f"labels must be unique, duplicated: {', '.join(dupes)}")
    if len(names) < 2:
        raise EvaluationError(f"a classifier needs at least 2 classes, got {len(names)}")
    return names


def _validate_y(y_raw: np.ndarray, n_samples: int, n_classes: int) -> np.ndarray:
    if y_raw.ndim != 1:
        raise EvaluationError(
            f"y_true must be 1-D class indices, got shape {y_raw.shape}; "
            "pass integer indices, not one-hot rows"
        )
    if y_raw.shape[0] != n_samples:
        raise EvaluationError(
            f"y_true has {y_raw.shape[0]} samples but probs has {n_samples} rows; "
            "they must describe the same images in the same order"
        )
    if y_raw.dtype.kind in "iu" or (
        y_raw.dtype.kind == "f" and np.all(np.isfinite(y_raw)) and np.all(y_raw == np.round(y_raw))
    ):
        y = y_raw.astype(np.int64)
    else:
        raise EvaluationError(
            f"y_true must hold integer class indices 0..{n_classes - 1}, got dtype {y_raw.dtype}; "
            "map label names to their index in labels first"
        )
    out_of_range = (y < 0) | (y >= n_classes)
    if out_of_range.any():
        first = int(np.flatnonzero(out_of_range)[0])
        raise EvaluationError(
            f"y_true[{first}] = {int(y[first])} is not a class index 0..{n_classes - 1} "
            f"({int(out_of_range.sum())} such values); labels and y_true disagree"
        )
    return y


def _validate_probs(p: np.ndarray) -> None:
    if not np.all(np.isfinite(p)):
        row = int(np.flatnonzero(~np.all(np.isfinite(p), axis=1))[0])
        raise EvaluationError(f"probs row {row} has NaN or infinite values")
    if p.min() < -1e-6 or p.max() > 1 + 1e-6:
        raise EvaluationError(
            f"probs must lie in [0, 1], found values in [{p.min():.4g}, {p.max():.4g}]; "
            "these look like logits: apply softmax first"
        )
    sums = p.sum(axis=1)
    off = np.abs(sums - 1.0) > PROB_SUM_TOLERANCE
    if off.any():
        row = int(np.flatnonzero(off)[0])
        raise EvaluationError(
            f"probs rows must sum to 1 (softmax output), row {row} sums to {sums[row]:.4g}"
        )


def top_k_accuracy(y: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Fraction of samples whose true class is among the ``k`` most probable ones.

    Ties are broken towards the earlier label, as ``argmax`` does, so ``k=1`` gives
    exactly the accuracy (scikit-learn's ``top_k_accuracy_score`` breaks ties differently).
    """
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(order == y[:, None], axis=1)))


def calibration_bins(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS
) -> tuple[float, list[dict[str, Any]]]:
    """Expected calibration error and the per-bin table behind the reliability diagram.

    Bin ``i`` holds confidences in ``(i/n_bins, (i+1)/n_bins]`` (the first bin also holds
    0). Empty bins report ``None`` for their accuracy and confidence, since there is
    nothing to measure there; they contribute nothing to ECE.
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    conf = np.clip(confidence, 0.0, 1.0)
    index = np.searchsorted(edges[1:-1], conf, side="left")
    ece = 0.0
    bins: list[dict[str, Any]] = []
    for b in range(n_bins):
        members = index == b
        count = int(members.sum())
        entry: dict[str, Any] = {
            "lower": float(edges[b]),
            "upper": float(edges[b + 1]),
            "count": count,
            "accuracy": None,
            "mean_confidence": None,
        }
        if count:
            acc = float(correct[members].mean())
            mean_conf = float(conf[members].mean())
            entry["accuracy"] = acc
            entry["mean_confidence"] = mean_conf
            ece += count / conf.size * abs(acc - mean_conf)
        bins.append(entry)
    return float(ece), bins


def compute_metrics(y_true: Any, probs: Any, labels: Sequence[str]) -> dict[str, Any]:
    """Every number the report needs for one split, as a JSON-ready dict.

    Keys: ``n_samples``, ``n_classes``, ``labels``, ``accuracy``, ``macro_precision``,
    ``macro_recall``, ``macro_f1``, ``weighted_f1``, ``top_k`` (``min(3, n_classes)``),
    ``top_k_accuracy``, ``ece``, ``mean_confidence``, ``per_class`` (label → precision,
    recall, f1, support), ``confusion_matrix`` (rows true, columns predicted, ``labels``
    order) and ``calibration`` (``n_bins`` and the per-bin table). See the module
    docstring for tie-breaking, undefined values and the ECE binning.
    """
    y, p, names = validate_predictions(y_true, probs, labels)
    n_classes = len(names)
    pred = p.argmax(axis=1)
    confidence = p.max(axis=1)
    correct = pred == y
    all_classes = list(range(n_classes))
    prec, rec, f1, support = _prfs(y, pred, labels=all_classes, zero_division=0.0)
    present = np.union1d(y, pred).tolist()
    macro_p, macro_r, macro_f1, _ = _prfs(
        y, pred, labels=present, average="macro", zero_division=0.0
    )
    _, _, weighted_f1, _ = _prfs(y, pred, labels=present, average="weighted", zero_division=0.0)
    k = min(TOP_K, n_classes)
    ece, bins = calibration_bins(confidence, correct)
    matrix = confusion_matrix(y, pred, labels=all_classes)
    return {
        "n_samples": int(y.size),
        "n_classes": n_classes,
        "labels": list(names),
        "accuracy": float(correct.mean()),
        "macro_precision": float(macro_p),
        "macro_recall": float(macro_r),
        "macro_f1": float(macro_f1),
        "weighted_f1": float(weighted_f1),
        "top_k": k,
        "top_k_accuracy": top_k_accuracy(y, p, k),
        "ece": ece,
        "mean_confidence": float(confidence.mean()),
        "per_class": {
            name: {
                "precision": float(prec[i]),
                "recall": float(rec[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(names)
        },
        "confusion_matrix": [[int(v) for v in row] for row in matrix],
        "calibration": {"n_bins": ECE_BINS, "bins": bins},
    }


def classification_report_text(
    y_true: Any, probs: Any, labels: Sequence[str], *, digits: int = 3
) -> str:
    """scikit-learn's per-class table with our label names, plus top-k accuracy and ECE.

    Every class gets a row, even one absent from this split, so reports of different
    splits line up.
    """
    y, p, names = validate_predictions(y_true, probs, labels)
    pred = p.argmax(axis=1)
    table = classification_report(
        y,
        pred,
        labels=list(range(len(names))),
        target_names=list(names),
        digits=digits,
        zero_division=0.0,
    )
    k = min(TOP_K, len(names))
    ece, _ = calibration_bins(p.max(axis=1), pred == y)
    footer = (
        f"top-{k} accuracy: {top_k_accuracy(y, p, k):.{digits}f}\n"
        f"expected calibration error ({ECE_BINS} bins): {ece:.{digits}f}\n"
        f"samples: {y.size}\n"
    )
    return str(table).rstrip("\n") + "\n\n" + footer


def evaluate_threshold(y_true: Any, probs: Any, threshold: float) -> dict[str, Any]:
    """How a decision threshold behaves on a split: coverage and precision of accepted ones.

    A prediction is *accepted* when its top probability is ``>= threshold`` (the edge
    answers "uncertain" otherwise). ``precision`` is ``None`` when nothing is accepted.
    """
    y, p, _ = validate_predictions(y_true, probs)
    t = _check_unit(threshold, "threshold")
    accepted = p.max(axis=1) >= t
    n_accepted = int(accepted.sum())
    correct = p.argmax(axis=1) == y
    return {
        "threshold": t,
        "n_accepted": n_accepted,
        "coverage": n_accepted / y.size,
        "precision": float(correct[accepted].mean()) if n_accepted else None,
    }


def _check_unit(value: float, name: str, *, open_low: bool = False) -> float:
    interval = "(0, 1]" if open_low else "[0, 1]"
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise EvaluationError(f"{name} must be a number in {interval}, got {value!r}") from exc
    if not math.isfinite(v) or v > 1.0 or v < 0.0 or (open_low and v == 0.0):
        raise EvaluationError(f"{name} must be in {interval}, got {value!r}")
    return v


@dataclass(frozen=True)
class ThresholdChoice:
    """The decision threshold chosen on validation data, with the evidence behind it.

    ``precision`` and ``coverage`` are those of the accepted validation predictions at
    ``threshold``; ``reached`` tells whether ``target_precision`` was met. The curve
    (``curve_threshold`` strictly decreasing, ``curve_coverage`` increasing with it) has
    one point per distinct validation confidence, for the precision–coverage plot.
    """

    threshold: float
    precision: float
    coverage: float
    n_accepted: int
    n_samples: int
    reached: bool
    target_precision: float
    min_coverage: float
    curve_threshold: tuple[float, ...]
    curve_precision: tuple[float, ...]
    curve_coverage: tuple[float, ...]
    # With ``confidence`` set, the rule holds for the lower confidence bound of the
    # precision (``precision_bound``), not for the observed precision.
    confidence: float | None = None
    precision_bound: float | None = None

    RULE = (
        "lowest validation confidence t such that predictions with top probability >= t "
        "have precision >= target_precision and coverage >= min_coverage"
    )
    RULE_BOUND = (
        "lowest validation confidence t such that predictions with top probability >= t "
        "have a one-sided Clopper-Pearson lower confidence bound of their precision "
        ">= target_precision and coverage >= min_coverage"
    )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored under ``"threshold"`` in ``metrics.json``."""
        return {
            "threshold": self.threshold,
            "precision": self.precision,
            "coverage": self.coverage,
            "n_accepted": self.n_accepted,
            "n_samples": self.n_samples,
            "reached": self.reached,
            "target_precision": self.target_precision,
            "min_coverage": self.min_coverage,
            "confidence": self.confidence,
            "precision_bound": self.precision_bound,
            "rule": self.RULE if self.confidence is None else self.RULE_BOUND,
            "curve": {
                "threshold": list(self.curve_threshold),
                "precision": list(self.curve_precision),
                "coverage": list(self.curve_coverage),
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ThresholdChoice:
        """Rebuild from ``to_dict`` output (e.g. read from a run's ``metrics.json``)."""
        try:
            curve = data["curve"]
            choice = cls(
                threshold=float(data["threshold"]),
                precision=float(data["precision"]),
                coverage=float(data["coverage"]),
                n_accepted=int(data["n_accepted"]),
                n_samples=int(data["n_samples"]),
                reached=bool(data["reached"]),
                target_precision=float(data["target_precision"]),
                min_coverage=float(data["min_coverage"]),
                curve_threshold=tuple(float(v) for v in curve["threshold"]),
                curve_precision=tuple(float(v) for v in curve["precision"]),
                curve_coverage=tuple(float(v) for v in curve["coverage"]),
                confidence=_optional_float(data.get("confidence")),
                precision_bound=_optional_float(data.get("precision_bound")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EvaluationError(f"invalid threshold record: missing or bad {exc}") from exc
        lengths = {len(choice.curve_threshold), len(choice.curve_precision)}
        lengths.add(len(choice.curve_coverage))
        if len(lengths) != 1 or not choice.curve_threshold:
            raise EvaluationError("invalid threshold record: curve lists differ in length")
        _check_unit(choice.threshold, "threshold")
        return choice


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def precision_lower_bound(correct: Any, accepted: Any, confidence: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound of ``correct / accepted`` at ``confidence``.

    Exact (conservative) for a binomial proportion: with probability at least
    ``confidence`` the true precision of a threshold is at or above it, however few
    images the validation split accepted. 0 where nothing is correct.
    """
    from scipy.stats import beta

    k = np.asarray(correct, dtype=np.float64)
    n = np.asarray(accepted, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        bound = beta.ppf(1.0 - confidence, k, n - k + 1.0)
    return np.where(k > 0, np.nan_to_num(bound, nan=0.0), 0.0)


def choose_threshold(
    y_true: Any,
    probs: Any,
    target_precision: float = 0.95,
    min_coverage: float = 0.0,
    *,
    confidence: float | None = None,
) -> ThresholdChoice:
    """Pick the confidence below which the edge should answer "uncertain".

    Rule: the lowest threshold ``t`` such that the predictions the edge would accept
    (top probability ``>= t``) have precision ``>= target_precision`` on this validation
    set, and cover at least ``min_coverage`` of it. A user states the error rate they can
    tolerate in what the station reports; among the thresholds that honour it, the lowest
    one answers for the most specimens. ``min_coverage`` stops the rule from "succeeding"
    by accepting only a handful of images. Precision is not monotonic in ``t``, so every
    candidate is checked, not just the first crossing.

    Candidates are the observed confidences: accepting below the least confident accepted
    validation sample would be an extrapolation without evidence.

    ``confidence`` (e.g. 0.95) makes the promise hold beyond the validation images: the
    rule then applies to the lower confidence bound of the precision
    (:func:`precision_lower_bound`) instead of the observed precision. A threshold that
    just meets the target on a few hundred validation images misses it on new images
    about half the time; the bound trades some coverage for a target that holds.

    If no threshold meets the target (within the coverage floor), the one with the best
    precision is returned (the lowest such, for coverage) with ``reached=False`` and a
    warning: a run must still produce a usable bundle, and the flag lets the caller or
    the report say that the target was not met.
    """
    target = _check_unit(target_precision, "target_precision", open_low=True)
    floor = _check_unit(min_coverage, "min_coverage")
    if confidence is not None:
        confidence = _check_unit(confidence, "confidence", open_low=True)
        if confidence >= 1.0:
            raise EvaluationError(f"confidence must be in (0, 1), got {confidence!r}")
    y, p, _ = validate_predictions(y_true, probs)
    curve = _Curve.of(y, p, confidence)
    return curve.choose(target, floor)


@dataclass(frozen=True)
class _Curve:
    """Precision and coverage of the accepted predictions at each observed confidence."""

    thresholds: np.ndarray
    accepted: np.ndarray
    precision: np.ndarray
    coverage: np.ndarray
    bound: np.ndarray  # what must meet the target: the precision, or its lower bound
    n: int
    confidence: float | None

    @classmethod
    def of(cls, y: np.ndarray, p: np.ndarray, confidence: float | None) -> _Curve:
        n = y.size
        top = p.max(axis=1)
        correct = p.argmax(axis=1) == y
        order = np.argsort(-top, kind="stable")
        conf_sorted = top[order]
        cum_correct = np.cumsum(correct[order])
        # The accepted set for t = a confidence value ends at the last sample with that value.
        ends = np.flatnonzero(np.r_[conf_sorted[1:] != conf_sorted[:-1], True])
        accepted = ends + 1
        precision = cum_correct[ends] / accepted
        bound = (
            precision
            if confidence is None
            else precision_lower_bound(cum_correct[ends], accepted, confidence)
        )
        return cls(conf_sorted[ends], accepted, precision, accepted / n, bound, n, confidence)

    def choose(self, target: float, floor: float) -> ThresholdChoice:
        """The lowest threshold meeting the target, else the best one (see choose_threshold)."""
        feasible = self.coverage >= floor - _EPS
        meets = feasible & (self.bound >= target - _EPS)
        reached = bool(meets.any())
        if reached:
            i = int(np.flatnonzero(meets)[-1])
        else:
            candidates = np.flatnonzero(feasible)  # never empty: the last point covers all
            best = self.bound[candidates].max()
            i = int(candidates[self.bound[candidates] >= best - _EPS][-1])
            self._warn_not_reached(i, target, floor)
        return ThresholdChoice(
            threshold=float(self.thresholds[i]),
            precision=float(self.precision[i]),
            coverage=float(self.coverage[i]),
            n_accepted=int(self.accepted[i]),
            n_samples=int(self.n),
            reached=reached,
            target_precision=target,
            min_coverage=floor,
            curve_threshold=tuple(float(v) for v in self.thresholds),
            curve_precision=tuple(float(v) for v in self.precision),
            curve_coverage=tuple(float(v) for v in self.coverage),
            confidence=self.confidence,
            precision_bound=None if self.confidence is None else float(self.bound[i]),
        )

    def _warn_not_reached(self, i: int, target: float, floor: float) -> None:
        confidence = self.confidence
        what = "precision" if confidence is None else f"{confidence:.0%} lower bound of precision"
        _log.warning(
            "target precision %.3f not reached on %d validation samples (coverage >= %.3f); "
            "using threshold %.4f with the best %s %.3f at coverage %.3f",
            target,
            self.n,
            floor,
            self.thresholds[i],
            what,
            self.bound[i],
            self.coverage[i],
        )
