"""k-fold cross-validation: each metric's mean and spread over the folds.

Split from :mod:`fieldscope.train.metrics`, which re-exports both functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fieldscope.train.errors import EvaluationError

__all__ = ["FOLD_METRICS", "format_fold_summary", "summarize_folds"]

# Scalar metrics of ``compute_metrics`` that a k-fold summary reports as mean ± sd.
FOLD_METRICS: tuple[str, ...] = (
    "accuracy",
    "macro_f1",
    "weighted_f1",
    "macro_precision",
    "macro_recall",
    "top_k_accuracy",
    "ece",
)


def summarize_folds(fold_metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean ± sample standard deviation (ddof=1) of the scalar metrics over k folds.

    The sample sd is the customary spread for k-fold results; it needs at least two folds,
    and the folds must share their labels, or the numbers would not be comparable.
    """
    folds = list(fold_metrics)
    if len(folds) < 2:
        raise EvaluationError(
            f"a fold summary needs at least 2 folds' metrics, got {len(folds)}; use --folds >= 2"
        )
    label_sets = {tuple(f.get("labels", ())) for f in folds}
    if len(label_sets) > 1:
        raise EvaluationError("folds were evaluated with different labels; cannot summarise")
    summary: dict[str, Any] = {}
    for name in FOLD_METRICS:
        values = []
        for i, fold in enumerate(folds):
            value = fold.get(name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise EvaluationError(
                    f"fold {i} has no numeric {name!r}; pass compute_metrics output"
                )
            values.append(float(value))
        arr = np.asarray(values)
        summary[name] = {
            "mean": float(arr.mean()),
            "sd": float(arr.std(ddof=1)),
            "min": float(arr.min()),
            "max": float(arr.max()),
            "values": values,
        }
    return {
        "n_folds": len(folds),
        "labels": list(next(iter(label_sets))),
        "n_samples": [int(f.get("n_samples", 0)) for f in folds],
        "metrics": summary,
    }


def format_fold_summary(summary: Mapping[str, Any], *, digits: int = 3) -> str:
    """One line per metric, ``accuracy: 0.912 ± 0.021``, for the CLI and the text report."""
    lines = [f"{summary['n_folds']}-fold cross-validation (mean ± sd):"]
    for name, stats in summary["metrics"].items():
        lines.append(f"  {name}: {stats['mean']:.{digits}f} ± {stats['sd']:.{digits}f}")
    return "\n".join(lines) + "\n"
