"""The report's PNG figures, drawn headless from plain numbers.

Figures are built as ``matplotlib.figure.Figure`` objects on an Agg canvas and never pass
through ``pyplot``: there is no global figure registry to leak into, nothing to close and
no window to open, so the functions are safe in a headless training run, repeated
thousands of times. Each function draws one PNG at ``path`` (folders created) and returns
the path. A fixed style (matplotlib defaults plus the overrides below, applied in a
context) makes the plots look the same whatever the user's matplotlibrc says.

Inputs are the structures of ``fieldscope.train.metrics`` and plain Keras-style
histories, never models, so the report can be redrawn from ``metrics.json`` alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fieldscope.train.errors import EvaluationError
from fieldscope.train.plot_style import (
    _MARK_COLOR,
    _TRAIN_COLOR,
    _VAL_COLOR,
    DPI,
    _class_ticks,
    _figure,
    _short,
)
from fieldscope.train.plots_eval import (
    plot_confusion_matrix,
    plot_per_class_accuracy,
    plot_precision_coverage,
    plot_reliability_diagram,
)

__all__ = [
    "ACCURACY_KEYS",
    "DPI",
    "plot_class_distribution",
    "plot_confusion_matrix",
    "plot_generalization_gap",
    "plot_image_grid",
    "plot_learning_rate",
    "plot_per_class_accuracy",
    "plot_precision_coverage",
    "plot_reliability_diagram",
    "plot_training_curves",
]

# Keras names the accuracy metric differently depending on how it was requested.
ACCURACY_KEYS: tuple[str, ...] = (
    "accuracy",
    "sparse_categorical_accuracy",
    "categorical_accuracy",
    "acc",
)
MAX_GRID_IMAGES = 64

# --------------------------------------------------------------------------- data


def plot_class_distribution(counts: Mapping[str, Mapping[str, int]], path: Path | str) -> Path:
    """Grouped bars: images per class, one bar per split, to spot imbalance and thin splits.

    ``counts`` maps split name → class name → image count; classes keep the order in
    which they first appear, and a class missing from a split counts 0.
    """
    if not counts:
        raise EvaluationError("class distribution: no splits given")
    classes: list[str] = []
    for split, per_class in counts.items():
        if not isinstance(per_class, Mapping):
            raise EvaluationError(f"class distribution: split {split!r} must map class → count")
        for name, value in per_class.items():
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
                raise EvaluationError(
                    f"class distribution: count of {name!r} in {split!r} must be an integer "
                    f">= 0, got {value!r}"
                )
            if name not in classes:
                classes.append(name)
    if not classes:
        raise EvaluationError("class distribution: the splits have no classes")
    splits = list(counts)
    n = len(classes)
    width = float(np.clip(2.0 + 0.45 * n * math.sqrt(len(splits)), 6.4, 24.0))
    bar = 0.8 / len(splits)
    x = np.arange(n)
    with _figure(path, width, 4.8) as fig:
        ax = fig.add_subplot()
        for j, split in enumerate(splits):
            values = [int(counts[split].get(name, 0)) for name in classes]
            bars = ax.bar(
                x - 0.4 + bar * (j + 0.5),
                values,
                bar,
                label=f"{split} (n={sum(values)})",
                color=f"C{j}",
            )
            if n * len(splits) <= 48:
                ax.bar_label(bars, fontsize=7, padding=1)
        _class_ticks(ax, classes, axis="x")
        ax.set_ylabel("images")
        ax.set_xlabel("class")
        ax.set_title("Class distribution per split")
        ax.legend(loc="upper right")
        ax.grid(axis="x", visible=False)
        ax.margins(y=0.12)
    return Path(path)


def plot_image_grid(
    images: Sequence[np.ndarray],
    titles: Sequence[str],
    path: Path | str,
    *,
    title: str = "Augmented training samples",
    ncols: int | None = None,
) -> Path:
    """A grid of uint8 RGB (or grey) images with a caption each, at their own pixels.

    Used for the augmented-samples sheet: seeing what augmentation does to a specimen is
    the quickest check that it is plausible for microscopy.
    """
    if len(images) == 0:
        raise EvaluationError("image grid: no images given")
    if len(images) != len(titles):
        raise EvaluationError(f"image grid: {len(images)} images but {len(titles)} titles")
    if len(images) > MAX_GRID_IMAGES:
        raise EvaluationError(
            f"image grid: {len(images)} images, at most {MAX_GRID_IMAGES} fit a readable sheet"
        )
    checked = [_check_image(image, i) for i, image in enumerate(images)]
    n = len(checked)
    cols = ncols if ncols and ncols > 0 else min(8, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    with _figure(path, max(4.0, 1.9 * cols), 0.5 + 2.0 * rows) as fig:
        axes = fig.subplots(rows, cols, squeeze=False)
        for i, ax in enumerate(axes.flat):
            ax.set_axis_off()
            if i >= n:
                continue
            image = checked[i]
            if image.ndim == 2:
                ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            else:
                ax.imshow(image, interpolation="nearest")
            ax.set_title(_short(str(titles[i]), 24), fontsize=8)
        fig.suptitle(title)
    return Path(path)


def _check_image(image: np.ndarray, index: int) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise EvaluationError(
            f"image grid: image {index} has dtype {arr.dtype}, expected uint8 RGB; "
            "convert with np.clip(x, 0, 255).astype(np.uint8)"
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)) or min(arr.shape[:2]) < 1:
        raise EvaluationError(
            f"image grid: image {index} has shape {arr.shape}, expected (H, W, 3) or (H, W)"
        )
    return arr


# --------------------------------------------------------------------------- training


def _stitch(
    stages: Mapping[str, Mapping[str, Sequence[float]]], what: str
) -> tuple[dict[str, np.ndarray], list[tuple[str, int, int]]]:
    """Join per-stage series end to end: (key → values over all epochs, stage spans).

    A key a stage lacks is NaN over that stage (a gap in the line). Spans are
    ``(name, first, last)`` 1-based inclusive positions; empty stages are left out.
    """
    if not isinstance(stages, Mapping) or not stages:
        raise EvaluationError(f"{what}: expected a mapping of stage name → series, got nothing")
    lengths: dict[str, int] = {}
    for stage, series in stages.items():
        if not isinstance(series, Mapping):
            raise EvaluationError(f"{what}: stage {stage!r} must map metric name → list")
        sizes = {key: len(values) for key, values in series.items()}
        if len(set(sizes.values())) > 1:
            raise EvaluationError(
                f"{what}: stage {stage!r} has series of different lengths {sizes}"
            )
        lengths[stage] = next(iter(sizes.values()), 0)
    total = sum(lengths.values())
    if total == 0:
        raise EvaluationError(f"{what}: no epochs recorded in any stage")
    keys: list[str] = []
    for series in stages.values():
        keys.extend(key for key in series if key not in keys)
    joined = {key: np.full(total, np.nan) for key in keys}
    spans: list[tuple[str, int, int]] = []
    start = 0
    for stage, series in stages.items():
        size = lengths[stage]
        for key, values in series.items():
            try:
                arr = np.asarray(values, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise EvaluationError(f"{what}: {stage!r}/{key!r} is not numeric") from exc
            joined[key][start : start + size] = arr
        if size:
            spans.append((str(stage), start + 1, start + size))
        start += size
    return joined, spans


def _mark_stages(ax: Any, spans: Sequence[tuple[str, int, int]]) -> None:
    """Shade every other stage, draw the boundaries, name the stages along the top."""
    transform = ax.get_xaxis_transform()
    for i, (name, first, last) in enumerate(spans):
        if i % 2 == 1:
            ax.axvspan(first - 0.5, last + 0.5, color="0.5", alpha=0.08, lw=0)
        if i > 0:
            ax.axvline(
                first - 0.5,
                color="0.3",
                ls=":",
                lw=1.2,
                label="stage boundary" if i == 1 else None,
            )
        ax.text(
            (first + last) / 2,
            1.0,
            _short(name, 20),
            transform=transform,
            ha="center",
            va="bottom",
            fontsize=8,
            color="0.3",
        )


def _accuracy_key(series: Mapping[str, np.ndarray]) -> str | None:
    return next((key for key in ACCURACY_KEYS if key in series), None)


def plot_training_curves(
    history: Mapping[str, Mapping[str, Sequence[float]]], path: Path | str
) -> Path:
    """Accuracy and loss per epoch over all stages, train vs validation, boundary marked.

    ``history`` maps stage name → Keras ``History.history`` of that stage, in training
    order (e.g. ``{"head": ..., "fine-tune": ...}``).
    """
    series, spans = _stitch(history, "training curves")
    panels = [key for key in (_accuracy_key(series), "loss") if key is not None and key in series]
    if not panels:
        raise EvaluationError("training curves: history has neither 'loss' nor an accuracy key")
    epochs = np.arange(1, len(next(iter(series.values()))) + 1)
    with _figure(path, 5.2 * len(panels) + 0.6, 4.4) as fig:
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, key in zip(axes, panels, strict=True):
            name = "accuracy" if key != "loss" else "loss"
            ax.plot(epochs, series[key], color=_TRAIN_COLOR, marker=".", label=f"train {name}")
            if f"val_{key}" in series:
                ax.plot(
                    epochs,
                    series[f"val_{key}"],
                    color=_VAL_COLOR,
                    marker=".",
                    ls="--",
                    label=f"validation {name}",
                )
            _mark_stages(ax, spans)
            ax.set_xlabel("epoch (all stages)")
            ax.set_ylabel(name)
            ax.set_title(name.capitalize(), pad=14)
            ax.legend(loc="best")
            _integer_epochs(ax, epochs)
        fig.suptitle("Training curves")
    return Path(path)


def _integer_epochs(ax: Any, epochs: np.ndarray) -> None:
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlim(0.5, epochs[-1] + 0.5)


def plot_generalization_gap(
    history: Mapping[str, Mapping[str, Sequence[float]]], path: Path | str
) -> Path:
    """Per-epoch gap between training and validation, the overfitting signal.

    Accuracy gap is ``train − val`` and loss gap is ``val − train``, so both rise above
    zero when the model fits its training images better than unseen ones.
    """
    series, spans = _stitch(history, "generalization gap")
    acc = _accuracy_key(series)
    gaps: list[tuple[str, np.ndarray]] = []
    if acc is not None and f"val_{acc}" in series:
        gaps.append(("train − val accuracy", series[acc] - series[f"val_{acc}"]))
    if "loss" in series and "val_loss" in series:
        gaps.append(("val − train loss", series["val_loss"] - series["loss"]))
    if not gaps:
        raise EvaluationError(
            "generalization gap: history has no validation series (val_loss/val_accuracy); "
            "fit with validation data"
        )
    epochs = np.arange(1, len(gaps[0][1]) + 1)
    with _figure(path, 5.2 * len(gaps) + 0.6, 4.4) as fig:
        axes = fig.subplots(1, len(gaps), squeeze=False)[0]
        for ax, (name, gap) in zip(axes, gaps, strict=True):
            ax.axhline(0.0, color="0.2", lw=0.8)
            ax.plot(epochs, gap, color=_MARK_COLOR, marker=".", label=name)
            ax.fill_between(epochs, 0.0, gap, color=_MARK_COLOR, alpha=0.12)
            _mark_stages(ax, spans)
            ax.set_xlabel("epoch (all stages)")
            ax.set_ylabel(name)
            ax.set_title(name, pad=14)
            ax.legend(loc="best")
            _integer_epochs(ax, epochs)
        fig.suptitle("Generalization gap (above 0: fits training better than validation)")
    return Path(path)


def plot_learning_rate(
    schedule: Mapping[str, Sequence[float]], path: Path | str, *, unit: str = "step"
) -> Path:
    """The learning rate actually used, per ``unit`` (step or epoch), stages marked.

    ``schedule`` maps stage name → learning rates in order. The y axis is logarithmic when
    the rates span more than a factor 20, because fine-tuning runs orders of magnitude
    lower than the head stage and would otherwise look flat at zero.
    """
    stages = {stage: {"lr": values} for stage, values in schedule.items()}
    series, spans = _stitch(stages, "learning-rate schedule")
    rates = series["lr"]
    if not np.all(np.isfinite(rates)) or rates.min() < 0:
        raise EvaluationError("learning-rate schedule: rates must be finite and >= 0")
    x = np.arange(1, rates.size + 1)
    positive = rates[rates > 0]
    log_scale = positive.size > 0 and positive.max() / positive.min() > 20
    label = "learning rate"
    if log_scale and positive.size < rates.size:
        # A cosine schedule ends at exactly 0, which a log axis cannot show.
        rates = np.where(rates > 0, rates, np.nan)
        label += " (zeros not shown)"
    with _figure(path, 7.0, 4.2) as fig:
        ax = fig.add_subplot()
        ax.plot(x, rates, color=_TRAIN_COLOR, lw=1.6, label=label)
        if log_scale:
            ax.set_yscale("log")
        _mark_stages(ax, spans)
        ax.set_xlim(0.5, x[-1] + 0.5)
        ax.set_xlabel(f"{unit} (all stages)")
        ax.set_ylabel("learning rate")
        ax.set_title("Learning-rate schedule", pad=14)
        ax.legend(loc="best")
    return Path(path)
