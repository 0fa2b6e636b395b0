"""Stage 1 of the cached recipe: a converged softmax head, and temperature calibration.

Split from :mod:`fieldscope.train.cached` (which re-exports these names): the linear
probe a research notebook fits (scikit-learn's logistic regression, its L2 strength
chosen on the validation log-loss), turned into the classifier's Dense layer, and the
temperature scaling that makes its scores calibrated probabilities.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

__all__ = ["HEAD_C_GRID", "HeadFit", "calibrated_log_loss", "fit_head", "fold_temperature"]

log = logging.getLogger("fieldscope.train.cached")

# Inverse L2 strengths tried for the stage-1 logistic regression (scikit-learn's C,
# applied to the summed log-loss). Wide on purpose: the best value moves with the
# number of images and classes (measured 0.1-1 on ndsb24, 1-10 on small sets).
HEAD_C_GRID: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def _log_loss(probs: np.ndarray, y: np.ndarray) -> float:
    picked = np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)
    return float(-np.mean(np.log(picked)))


def calibrated_log_loss(probs: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """The validation log-loss after temperature scaling, and that temperature.

    Choosing between a strongly regularised stage-1 head (cautious, well calibrated)
    and fine-tuned top layers (sharper, more often right) on the raw log-loss favours
    the cautious one even when it is less accurate. With each candidate's best
    temperature (Guo et al., 2017) the comparison is on what a temperature cannot fix:
    how well the scores rank the classes. The temperature is folded into the final
    layer afterwards (``fold_temperature``), so the saved model is calibrated too.
    """
    from scipy.optimize import minimize_scalar

    log_p = np.log(np.clip(probs.astype(np.float64), 1e-12, 1.0))
    rows = np.arange(len(y))

    def loss(temperature: float) -> float:
        z = log_p / temperature
        z -= z.max(axis=1, keepdims=True)
        z -= np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-z[rows, y].mean())

    best = minimize_scalar(loss, bounds=(0.05, 20.0), method="bounded")
    return float(best.fun), float(best.x)


def fold_temperature(dense: keras.layers.Dense, temperature: float) -> None:
    """Divide the final layer's logits by ``temperature`` (kernel and bias alike)."""
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel / temperature, bias / temperature])


@dataclass(frozen=True)
class HeadFit:
    """The stage-1 head: Dense kernel (features x classes) and bias, and how it was chosen."""

    kernel: np.ndarray
    bias: np.ndarray
    c: float
    val_loss: float
    val_accuracy: float
    scores: dict[float, float]
    train_loss: float = math.nan
    train_accuracy: float = math.nan


@dataclass
class _Best:
    """The best C so far: its validation loss, coefficients and probabilities."""

    c: float
    loss: float
    coef: np.ndarray
    intercept: np.ndarray
    val_probs: np.ndarray
    train_fit: tuple[float, float]


def fit_head(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    n_classes: int,
    sample_weight: np.ndarray | None = None,
    c_grid: Sequence[float] = HEAD_C_GRID,
) -> HeadFit:
    """A converged softmax head on pooled features, its L2 strength chosen on validation.

    Features are standardised for the solver (low-variance ones no more than the median
    one) and the scaling is folded back into the weights, so the result is a plain Dense
    layer on the raw features whose weights quantise well. Classes missing
    from ``y_train`` get a bias of -inf's stand-in (a very low logit).
    """
    mean = x_train.mean(axis=0)
    # Standardise, but never scale a feature up by more than the typical one: a nearly
    # constant feature (a dead channel) would otherwise get a weight hundreds of times
    # larger than the rest once the scaling is folded back, and with one int8 scale for
    # the whole layer every other weight of the converted model would round to zero.
    std = x_train.std(axis=0)
    scale = np.maximum(std, float(np.median(std))) + 1e-6
    xt = (x_train - mean) / scale
    xv = (x_val - mean) / scale
    scores: dict[float, float] = {}
    clf, best = _search_c(
        xt, y_train, xv, y_val, n_classes=n_classes, sample_weight=sample_weight,
        c_grid=c_grid, scores=scores,
    )  # fmt: skip
    present = len(np.unique(y_train))
    kernel, bias = _dense_weights(
        clf.classes_, best, mean, scale, n_classes=n_classes, n_present=present
    )
    accuracy = float(np.mean(best.val_probs.argmax(axis=1) == y_val))
    return HeadFit(
        kernel.astype("float32"),
        bias.astype("float32"),
        best.c,
        best.loss,
        accuracy,
        scores,
        train_loss=best.train_fit[0],
        train_accuracy=best.train_fit[1],
    )


def _probabilities(clf: Any, x: np.ndarray, n_classes: int) -> np.ndarray:
    probs = np.zeros((len(x), n_classes))
    probs[:, clf.classes_] = clf.predict_proba(x)
    return probs


def _search_c(
    xt: np.ndarray,
    y_train: np.ndarray,
    xv: np.ndarray,
    y_val: np.ndarray,
    *,
    n_classes: int,
    sample_weight: np.ndarray | None,
    c_grid: Sequence[float],
    scores: dict[float, float],
) -> tuple[Any, _Best]:
    """Fit the logistic regression for each C (recording ``scores``); the best one."""
    from sklearn.linear_model import LogisticRegression

    best: _Best | None = None
    # Ascending C with warm starts: each fit starts from the previous, more regularised
    # solution, which L-BFGS refines in a fraction of the iterations of a cold start.
    # The validation loss is unimodal in C in practice: stop two steps past its minimum.
    clf = LogisticRegression(C=min(c_grid), max_iter=1000, tol=1e-4, warm_start=True)
    worse = 0
    for c in sorted(c_grid):
        if worse >= 2:
            break
        clf.set_params(C=c)
        clf.fit(xt, y_train, sample_weight=sample_weight)
        probs = _probabilities(clf, xv, n_classes)
        loss = _log_loss(probs, y_val)
        scores[float(c)] = loss
        log.debug("head C=%g: val log-loss %.4f", c, loss)
        if best is None or loss < best.loss - 1e-9:
            train_probs = _probabilities(clf, xt, n_classes)
            train_fit = (
                _log_loss(train_probs, y_train),
                float(np.mean(train_probs.argmax(axis=1) == y_train)),
            )
            best = _Best(float(c), loss, clf.coef_.copy(), clf.intercept_.copy(), probs, train_fit)
            worse = 0
        else:
            worse += 1
    assert best is not None
    return clf, best


def _dense_weights(
    classes: np.ndarray,
    best: _Best,
    mean: np.ndarray,
    scale: np.ndarray,
    *,
    n_classes: int,
    n_present: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The Dense kernel and bias on the raw features, every class present."""
    coef = np.asarray(best.coef, dtype=np.float64)
    intercept = np.asarray(best.intercept, dtype=np.float64)
    if n_present == 2 and coef.shape[0] == 1:  # scikit-learn's binary form
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    kernel = np.zeros((len(mean), n_classes))
    bias = np.full(n_classes, -30.0)
    kernel[:, classes] = (coef / scale).T
    bias[classes] = intercept - (coef / scale) @ mean
    return kernel, bias
