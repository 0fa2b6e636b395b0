"""Transfer learning on cached backbone activations: converged head, then fine-tuning.

The end-to-end recipe (``fieldscope.train.fit``) pushes every training image through
the whole backbone in every epoch of both stages. On a workstation CPU that limits
stage 1 to a handful of epochs, and a head that stopped far from convergence is a poor
start for fine-tuning: on a real 73-class pollen set it ended five points below a
ten-line notebook (frozen features + logistic regression). This recipe does the
expensive part once:

1. **Split the backbone** at a layer boundary crossed by a single tensor, so that the
   top part holds at least ``fine_tune_layers`` layers (``split_backbone``).
2. **Extract** the cut activations of every training image, and of
   ``augment_copies - 1`` randomly augmented copies of it (the run's augmentation
   layers), and of the validation images, once. BatchNorm is frozen in the recipe, so
   the bottom part is a fixed function and its output can be cached exactly.
3. **Stage 1 (head)**: pooled features of the cached activations; a multinomial
   logistic regression (scikit-learn, L-BFGS, to convergence) whose L2 strength is
   chosen on the validation log-loss. That is the linear probe a research notebook
   fits, so the recipe starts where the notebook ends.
4. **Stage 2 (fine-tune)**: the top layers, dropout and the head initialised from
   stage 1, trained on the cached activations with Adam on a cosine schedule and label
   smoothing; early stopping and a best-on-validation checkpoint (accuracy, then the
   temperature-calibrated log-loss) that includes the stage-1 head, so fine-tuning can
   only replace it by doing better on validation.
5. **Calibration**: the chosen model's temperature, fitted on the validation log-loss,
   is folded into the final layer, so its scores (and the decision threshold chosen on
   them) are calibrated probabilities. Top-1 is unchanged by a temperature.

Each stage-2 epoch costs only the top layers, so twenty epochs take minutes on two
cores. The layers are shared with the full classifier, which therefore ends up holding
the trained weights and is saved and converted as usual.

This module imports Keras and scikit-learn: import it only where training happens.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from fieldscope.train.backbones import backbone_of
from fieldscope.train.cached_head import (
    HEAD_C_GRID,
    HeadFit,
    calibrated_log_loss,
    fit_head,
    fold_temperature,
)
from fieldscope.train.cached_tune import (
    Best,
    CachedData,
    FineTuneSettings,
    _class_weight_vector,
    fine_tune,
)
from fieldscope.train.errors import TrainError
from fieldscope.train.fit import (
    BEST_WEIGHTS,
    STAGE_NAMES,
    FitProgress,
    FitReporter,
    LogReporter,
    StageResult,
)

__all__ = [
    "ACTIVATION_DTYPE",
    "HEAD_C_GRID",
    "BackboneSplit",
    "calibrated_log_loss",
    "extract_activations",
    "fit_cached",
    "fit_head",
    "fold_temperature",
    "split_backbone",
]

log = logging.getLogger(__name__)

# Cached activations are post-ReLU/linear block outputs of order 1: float16 keeps three
# significant digits, halves the memory, and the top layers compute in float32.
ACTIVATION_DTYPE = np.float16
EXTRACT_BATCH = 32


@dataclass
class BackboneSplit:
    """A classifier cut in two: ``bottom`` (frozen, cached) and ``head_model`` (trained).

    ``bottom`` maps raw RGB 0-255 to the cut activations (the input normalisation is
    included); ``head_model`` maps those activations to class probabilities through the
    top backbone layers, the dropout and the final Dense layer of the classifier, whose
    layer objects it shares. ``features`` maps activations to the pooled features.
    """

    bottom: keras.Model
    features: keras.Model
    head_model: keras.Model
    dense: keras.layers.Dense
    top_layers: int
    cut_name: str


def _single_tensor_cuts(backbone: keras.Model) -> list[int]:
    """Indices ``c`` such that layers ``[c:]`` read exactly one tensor made by ``[:c]``."""
    layers = backbone.layers
    position = {id(layer): i for i, layer in enumerate(layers)}
    cuts: list[int] = []
    # Walk from the top; stop once a cut would leave only a few top layers.
    for cut in range(1, len(layers)):
        crossing: set[int] = set()
        for layer in layers[cut:]:
            for node in layer._inbound_nodes:
                for tensor in node.input_tensors:
                    source = tensor._keras_history.operation
                    if position.get(id(source), -1) < cut:
                        crossing.add(id(tensor))
        if len(crossing) == 1:
            cuts.append(cut)
    return cuts


def _around_backbone(
    model: keras.Model, backbone: keras.Model
) -> tuple[list[Any], list[Any], keras.layers.Dense]:
    """The layers of the classifier before the backbone (input normalisation) and after
    it (dropout, the Dense head), in order, and that Dense layer."""
    index = model.layers.index(backbone)
    before = list(model.layers[1:index])
    after = list(model.layers[index + 1 :])
    dense = after[-1]
    if not isinstance(dense, keras.layers.Dense):
        raise TrainError(f"{model.name} does not end in a Dense classifier layer")
    return before, after, dense


def split_backbone(model: keras.Model, top_layers: int) -> BackboneSplit:
    """Cut ``model``'s backbone so that at least ``top_layers`` layers lie above the cut.

    The cut is the deepest single-tensor boundary that leaves ``top_layers`` or more
    layers on top (residual blocks are never split). ``top_layers = 0`` cuts right
    below the pooling, so only the head trains in stage 2.

    Raises:
        TrainError: the model is not a ``build_classifier`` model, or its backbone has
            no usable boundary.
    """
    backbone = backbone_of(model)
    layers = backbone.layers
    cuts = [c for c in _single_tensor_cuts(backbone) if len(layers) - c >= max(1, top_layers)]
    if not cuts:
        raise TrainError(
            f"cannot split backbone {backbone.name} with {top_layers} trainable top layers; "
            "lower fine_tune_layers"
        )
    cut = cuts[-1]
    cut_tensor = layers[cut - 1].output
    bottom_backbone = keras.Model(backbone.input, cut_tensor, name="cached_bottom")
    top_backbone = keras.Model(cut_tensor, backbone.output, name="cached_top")

    before, after, dense = _around_backbone(model, backbone)

    image = keras.Input(shape=model.input_shape[1:], dtype="float32", name="image")
    x = image
    for layer in before:
        x = layer(x)
    bottom = keras.Model(image, bottom_backbone(x, training=False), name="bottom")

    activations = keras.Input(shape=tuple(cut_tensor.shape[1:]), name="activations")
    pooled = top_backbone(activations, training=False)
    features = keras.Model(activations, pooled, name="features")
    y = pooled
    for layer in after:
        y = layer(y)
    head_model = keras.Model(activations, y, name="head_model")
    return BackboneSplit(
        bottom=bottom,
        features=features,
        head_model=head_model,
        dense=dense,
        top_layers=len(layers) - cut,
        cut_name=layers[cut - 1].name,
    )


def extract_activations(
    bottom: keras.Model,
    images: np.ndarray,
    *,
    augmenter: Callable[..., Any] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """``bottom`` applied to ``images`` (N x H x W x 3, 0-255), optionally augmented first.

    Batches are converted one at a time so the float32 copies never exist for the whole
    set; the result is ``ACTIVATION_DTYPE``.
    """
    out: np.ndarray | None = None
    for start in range(0, len(images), EXTRACT_BATCH):
        batch = images[start : start + EXTRACT_BATCH].astype("float32")
        if augmenter is not None:
            batch = keras.ops.convert_to_numpy(augmenter(batch, training=True))
        values = keras.ops.convert_to_numpy(bottom(batch, training=False))
        if out is None:
            out = np.empty((len(images), *values.shape[1:]), dtype=ACTIVATION_DTYPE)
        out[start : start + len(batch)] = values.astype(ACTIVATION_DTYPE)
        if on_batch is not None:
            on_batch(len(batch))
    if out is None:
        raise TrainError("no images to extract features from")
    return out


def _pooled(features: keras.Model, activations: np.ndarray) -> np.ndarray:
    parts = [
        keras.ops.convert_to_numpy(
            features(activations[i : i + 256].astype("float32"), training=False)
        )
        for i in range(0, len(activations), 256)
    ]
    return np.concatenate(parts).astype(np.float64)


def fit_cached(
    model: keras.Model,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    n_classes: int,
    fine_tune_layers: int,
    fine_tune_epochs: int,
    learning_rate: float,
    augment_copies: int,
    augmenter: Callable[[int], Callable[..., Any] | None],
    label_smoothing: float,
    batch_size: int,
    patience: int,
    seed: int,
    state_dir: Path,
    class_weight: Mapping[int, float] | None = None,
    reporter: FitReporter | None = None,
) -> FitProgress:
    """Train ``model`` (from ``build_classifier``, pretrained) in place; see the module doc.

    ``augmenter(k)`` returns the augmentation for cached copy ``k`` (1-based; ``None``
    for no augmentation). Returns the fit record, in the form the end-to-end recipe
    writes, so history, plots and reports are the same for both recipes.
    """
    reporter = reporter or LogReporter()
    state_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(seed)
    progress = FitProgress()
    split = split_backbone(model, fine_tune_layers)
    started = time.monotonic()
    train, val = (x_train, y_train), (x_val, y_val)
    data = _extract_all(split, train, val, reporter, augment_copies, augmenter=augmenter)
    settings = FineTuneSettings(
        n_classes, fine_tune_epochs, learning_rate, label_smoothing, batch_size, patience, seed,
        class_weight,
    )  # fmt: skip
    best = _stage_one(split, data, settings, progress, reporter, started=started)
    _save_weights(model, state_dir)
    if fine_tune_epochs > 0:
        fine_tune(split, data, settings=settings, progress=progress, reporter=reporter, best=best)
    split.head_model.set_weights(best.weights)
    fold_temperature(split.dense, best.temperature)
    log.info("temperature %.3f folded into the classifier layer", best.temperature)
    progress.stage = 3
    progress.finished = True
    return progress


def _extract_all(
    split: BackboneSplit,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    reporter: FitReporter,
    augment_copies: int,
    *,
    augmenter: Callable[[int], Callable[..., Any] | None],
) -> CachedData:
    """The only pass through the whole backbone: every cached copy, and validation."""
    log.info(
        "cached recipe: backbone cut after %s, %d layers on top", split.cut_name, split.top_layers
    )
    (x_train, y_train), (x_val, y_val) = train, val
    started = time.monotonic()
    copies_n = max(1, augment_copies)
    total = len(x_train) * copies_n + len(x_val)
    steps = math.ceil(total / EXTRACT_BATCH)
    reporter.stage_begin(1, STAGE_NAMES[0], 1, 0)
    done = [0, 0]

    def tick(n: int) -> None:
        done[0] += n
        done[1] += 1
        reporter.batch_end(1, 1, done[1], steps, {})

    copies = [extract_activations(split.bottom, x_train, on_batch=tick)]
    for k in range(1, copies_n):
        copies.append(
            extract_activations(split.bottom, x_train, augmenter=augmenter(k), on_batch=tick)
        )
    a_val = extract_activations(split.bottom, x_val, on_batch=tick)
    log.info("extracted %d activations in %.1f s", total, time.monotonic() - started)
    return CachedData(copies, y_train, a_val, y_val)


def _stage_one(
    split: BackboneSplit,
    data: CachedData,
    settings: FineTuneSettings,
    progress: FitProgress,
    reporter: FitReporter,
    *,
    started: float,
) -> Best:
    """A converged linear head: its weights (with the top layers') and temperature."""
    y_rep = np.tile(data.y_train, len(data.copies))
    head = fit_head(
        np.concatenate([_pooled(split.features, a) for a in data.copies]),
        y_rep,
        _pooled(split.features, data.a_val),
        data.y_val,
        n_classes=settings.n_classes,
        sample_weight=_class_weight_vector(y_rep, settings.class_weight),
    )
    split.dense.set_weights([head.kernel, head.bias])
    head_probs = keras.ops.convert_to_numpy(
        split.head_model.predict(data.a_val.astype("float32"), batch_size=256, verbose=0)
    )
    head_calibrated, temperature = calibrated_log_loss(head_probs, data.y_val)
    log.info(
        "stage 1: C=%g, val log-loss %.4f (%.4f at temperature %.2f), val accuracy %.3f",
        head.c,
        head.val_loss,
        head_calibrated,
        temperature,
        head.val_accuracy,
    )
    _record_stage_one(progress, head, head_calibrated, reporter, time.monotonic() - started)
    return Best([w.copy() for w in split.head_model.get_weights()], temperature)


def _record_stage_one(
    progress: FitProgress,
    head: HeadFit,
    calibrated: float,
    reporter: FitReporter,
    seconds: float,
) -> None:
    """Stage 1 in the fit record and on the reporter, as one epoch of the head stage."""
    progress.history[STAGE_NAMES[0]] = {
        "loss": [head.train_loss],
        "accuracy": [head.train_accuracy],
        "val_loss": [head.val_loss],
        "val_loss_calibrated": [calibrated],
        "val_accuracy": [head.val_accuracy],
    }
    progress.best_val_loss = calibrated
    progress.best_val_accuracy = head.val_accuracy
    progress.best_at = [1, 1]
    result = StageResult(
        stage=1,
        name=STAGE_NAMES[0],
        epochs_run=1,
        best_val_loss=calibrated,
        best_val_accuracy=head.val_accuracy,
        improved=True,
        stopped_early=False,
        seconds=seconds,
    )
    logs = {
        "loss": head.train_loss,
        "accuracy": head.train_accuracy,
        "val_loss": head.val_loss,  # raw, like the stage-2 lines
        "val_accuracy": head.val_accuracy,
    }
    reporter.epoch_end(1, 1, 1, logs, True)
    reporter.stage_end(result)
    progress.results.append(_as_dict(result))


def _save_weights(model: keras.Model, state_dir: Path) -> None:
    model.save_weights(str(state_dir / BEST_WEIGHTS))


def _as_dict(result: StageResult) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(result)
