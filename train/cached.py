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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from fieldscope.train.backbones import backbone_of
from fieldscope.train.errors import TrainError
from fieldscope.train.fit import (
    BEST_WEIGHTS,
    MIN_DELTA,
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
# Inverse L2 strengths tried for the stage-1 logistic regression (scikit-learn's C,
# applied to the summed log-loss). Wide on purpose: the best value moves with the
# number of images and classes (measured 0.1-1 on ndsb24, 1-10 on small sets).
HEAD_C_GRID: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
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

    # The layers of the classifier before the backbone (input normalisation) and after it
    # (dropout, the Dense head), in order.
    index = model.layers.index(backbone)
    before = list(model.layers[1:index])
    after = model.layers[index + 1 :]
    dense = after[-1]
    if not isinstance(dense, keras.layers.Dense):
        raise TrainError(f"{model.name} does not end in a Dense classifier layer")

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


def _better(
    accuracy: float, loss: float, best_accuracy: float | None, best_loss: float | None
) -> bool:
    """Whether a stage-2 epoch replaces the best so far: higher validation accuracy, or
    the same accuracy with a lower calibrated log-loss.

    Accuracy first, because top-1 is what a station is judged on: on real plankton
    (ndsb24) the fine-tuned epochs were 2 points more accurate on validation and 1 point
    on the test images than the stage-1 head, whose strong L2 penalty nevertheless gave
    it the lowest validation log-loss, calibrated or not.
    """
    if best_accuracy is None or best_loss is None:
        return True
    if accuracy > best_accuracy + 1e-9:
        return True
    return abs(accuracy - best_accuracy) <= 1e-9 and loss < best_loss - MIN_DELTA


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
    from sklearn.linear_model import LogisticRegression

    mean = x_train.mean(axis=0)
    # Standardise, but never scale a feature up by more than the typical one: a nearly
    # constant feature (a dead channel) would otherwise get a weight hundreds of times
    # larger than the rest once the scaling is folded back, and with one int8 scale for
    # the whole layer every other weight of the converted model would round to zero.
    std = x_train.std(axis=0)
    scale = np.maximum(std, float(np.median(std))) + 1e-6
    xt = (x_train - mean) / scale
    xv = (x_val - mean) / scale
    present = np.unique(y_train)
    best: tuple[float, float, np.ndarray, np.ndarray, np.ndarray] | None = None
    train_fit = (math.nan, math.nan)
    scores: dict[float, float] = {}
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
        probs = np.zeros((len(xv), n_classes))
        probs[:, clf.classes_] = clf.predict_proba(xv)
        loss = _log_loss(probs, y_val)
        scores[float(c)] = loss
        log.debug("head C=%g: val log-loss %.4f", c, loss)
        if best is None or loss < best[1] - 1e-9:
            train_probs = np.zeros((len(xt), n_classes))
            train_probs[:, clf.classes_] = clf.predict_proba(xt)
            train_fit = (
                _log_loss(train_probs, y_train),
                float(np.mean(train_probs.argmax(axis=1) == y_train)),
            )
            best = (float(c), loss, clf.coef_.copy(), clf.intercept_.copy(), probs)
            worse = 0
        else:
            worse += 1
    assert best is not None
    c, loss, coef, intercept, val_probs = best
    coef = np.asarray(coef, dtype=np.float64)
    intercept = np.asarray(intercept, dtype=np.float64)
    if len(present) == 2 and coef.shape[0] == 1:  # scikit-learn's binary form
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    kernel = np.zeros((x_train.shape[1], n_classes))
    bias = np.full(n_classes, -30.0)
    kernel[:, clf.classes_] = (coef / scale).T
    bias[clf.classes_] = intercept - (coef / scale) @ mean
    accuracy = float(np.mean(val_probs.argmax(axis=1) == y_val))
    return HeadFit(
        kernel.astype("float32"),
        bias.astype("float32"),
        c,
        loss,
        accuracy,
        scores,
        train_loss=train_fit[0],
        train_accuracy=train_fit[1],
    )


class _Batches(keras.utils.PyDataset):  # type: ignore[misc]
    """One epoch: every training image once, each in one of its cached copies at random."""

    def __init__(
        self,
        copies: Sequence[np.ndarray],
        y: np.ndarray,
        weights: np.ndarray | None,
        *,
        batch_size: int,
        seed: int,
        epoch: int,
    ) -> None:
        super().__init__()
        self.copies = copies
        self.y = y
        self.weights = weights
        self.batch_size = batch_size
        self.seed = seed
        rng = np.random.default_rng([seed, epoch])
        self.order = rng.permutation(len(y))
        self.which = rng.integers(0, len(copies), size=len(y))

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __getitem__(self, i: int) -> Any:
        rows = self.order[i * self.batch_size : (i + 1) * self.batch_size]
        which = self.which[rows]
        x = np.stack([self.copies[k][r] for k, r in zip(which, rows, strict=True)]).astype(
            "float32"
        )
        y = self.y[rows]
        if self.weights is None:
            return x, y
        return x, y, self.weights[rows]


class _Loss(keras.losses.Loss):  # type: ignore[misc]
    """Sparse categorical cross-entropy with label smoothing (Keras has it only dense)."""

    def __init__(self, n_classes: int, smoothing: float) -> None:
        super().__init__(name="smoothed_crossentropy")
        self.n_classes = n_classes
        self.smoothing = smoothing

    def call(self, y_true: Any, y_pred: Any) -> Any:
        ops = keras.ops
        onehot = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), self.n_classes)
        return keras.losses.categorical_crossentropy(onehot, y_pred, label_smoothing=self.smoothing)


def _class_weight_vector(
    y: np.ndarray, class_weight: Mapping[int, float] | None
) -> np.ndarray | None:
    if not class_weight:
        return None
    return np.asarray([class_weight.get(int(c), 1.0) for c in y], dtype="float32")


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
    log.info(
        "cached recipe: backbone cut after %s, %d layers on top", split.cut_name, split.top_layers
    )

    # --- extraction (the only pass through the whole backbone) -------------------------
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
    extract_seconds = time.monotonic() - started
    log.info("extracted %d activations in %.1f s", total, extract_seconds)

    # --- stage 1: a converged linear head ----------------------------------------------
    f_train = np.concatenate([_pooled(split.features, a) for a in copies])
    y_rep = np.tile(y_train, copies_n)
    weights = _class_weight_vector(y_rep, class_weight)
    head = fit_head(
        f_train,
        y_rep,
        _pooled(split.features, a_val),
        y_val,
        n_classes=n_classes,
        sample_weight=weights,
    )
    split.dense.set_weights([head.kernel, head.bias])
    head_probs = keras.ops.convert_to_numpy(
        split.head_model.predict(a_val.astype("float32"), batch_size=256, verbose=0)
    )
    head_calibrated, temperature = calibrated_log_loss(head_probs, y_val)
    log.info(
        "stage 1: C=%g, val log-loss %.4f (%.4f at temperature %.2f), val accuracy %.3f",
        head.c,
        head.val_loss,
        head_calibrated,
        temperature,
        head.val_accuracy,
    )
    stage1_seconds = time.monotonic() - started
    progress.history[STAGE_NAMES[0]] = {
        "loss": [head.train_loss],
        "accuracy": [head.train_accuracy],
        "val_loss": [head.val_loss],
        "val_loss_calibrated": [head_calibrated],
        "val_accuracy": [head.val_accuracy],
    }
    progress.best_val_loss = head_calibrated
    progress.best_val_accuracy = head.val_accuracy
    progress.best_at = [1, 1]
    _save_weights(model, state_dir)
    best_weights = [w.copy() for w in split.head_model.get_weights()]
    best_temperature = [temperature]
    result = StageResult(
        stage=1,
        name=STAGE_NAMES[0],
        epochs_run=1,
        best_val_loss=head_calibrated,
        best_val_accuracy=head.val_accuracy,
        improved=True,
        stopped_early=False,
        seconds=stage1_seconds,
    )
    reporter.epoch_end(
        1,
        1,
        1,
        {
            "loss": head.train_loss,
            "accuracy": head.train_accuracy,
            "val_loss": head.val_loss,  # raw, like the stage-2 lines
            "val_accuracy": head.val_accuracy,
        },
        True,
    )
    reporter.stage_end(result)
    progress.results.append(_as_dict(result))

    # --- stage 2: fine-tune the top on the cached activations --------------------------
    if fine_tune_epochs > 0:
        best_weights = _fine_tune(
            split,
            copies,
            y_train,
            a_val,
            y_val,
            progress=progress,
            best_weights=best_weights,
            n_classes=n_classes,
            epochs=fine_tune_epochs,
            learning_rate=learning_rate,
            label_smoothing=label_smoothing,
            batch_size=batch_size,
            patience=patience,
            seed=seed,
            class_weight=class_weight,
            reporter=reporter,
            best_temperature=best_temperature,
        )
    split.head_model.set_weights(best_weights)
    fold_temperature(split.dense, best_temperature[0])
    log.info("temperature %.3f folded into the classifier layer", best_temperature[0])
    progress.stage = 3
    progress.finished = True
    return progress


def _fine_tune(
    split: BackboneSplit,
    copies: Sequence[np.ndarray],
    y_train: np.ndarray,
    a_val: np.ndarray,
    y_val: np.ndarray,
    *,
    progress: FitProgress,
    best_weights: list[np.ndarray],
    n_classes: int,
    epochs: int,
    learning_rate: float,
    label_smoothing: float,
    batch_size: int,
    patience: int,
    seed: int,
    class_weight: Mapping[int, float] | None,
    reporter: FitReporter,
    best_temperature: list[float],
) -> list[np.ndarray]:
    """Stage 2; returns the best-on-validation weights of ``split.head_model``.

    "Best" is :func:`_better`'s: validation accuracy, then the temperature-calibrated
    validation log-loss (:func:`calibrated_log_loss`); ``best_temperature[0]`` is updated
    with the best epoch's temperature.
    """
    started = time.monotonic()
    head_model = split.head_model
    for layer in split.features.layers[-1].layers:
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    weights = _class_weight_vector(y_train, class_weight)
    steps = math.ceil(len(y_train) / batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(
        learning_rate, decay_steps=max(1, epochs * steps)
    )
    head_model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=_Loss(n_classes, label_smoothing),
        metrics=["accuracy"],
    )
    name = STAGE_NAMES[1]
    reporter.stage_begin(2, name, epochs, 0)
    series: dict[str, list[float]] = {}
    wait = 0
    improved_any = False
    stopped = False
    epochs_run = 0
    lrs: list[float] = []
    val = (a_val.astype("float32"), y_val)
    for epoch in range(1, epochs + 1):
        first_step = (epoch - 1) * steps
        lrs.extend(float(schedule(first_step + s)) for s in range(steps))
        data = _Batches(copies, y_train, weights, batch_size=batch_size, seed=seed, epoch=epoch)
        history = head_model.fit(data, epochs=1, verbose=0, shuffle=False)
        logs = {k: float(v[-1]) for k, v in history.history.items()}
        temperature = _validate(head_model, val, logs)
        calibrated = logs["val_loss_calibrated"]
        if not math.isfinite(logs.get("loss", math.nan)):
            raise TrainError(
                f"training diverged in stage 2 epoch {epoch} (loss {logs.get('loss')}); "
                "lower the fine-tune learning rate"
            )
        for key, value in logs.items():
            series.setdefault(key, []).append(value)
        series.setdefault("learning_rate", []).append(lrs[first_step])
        improved = _better(
            logs["val_accuracy"], calibrated, progress.best_val_accuracy, progress.best_val_loss
        )
        if improved:
            progress.best_val_loss = calibrated
            progress.best_val_accuracy = logs["val_accuracy"]
            progress.best_at = [2, epoch]
            best_weights = [w.copy() for w in head_model.get_weights()]
            best_temperature[0] = temperature
            wait = 0
            improved_any = True
        else:
            wait += 1
        epochs_run = epoch
        reporter.epoch_end(2, epoch, epochs, logs, improved)
        # The first epochs move away from the stage-1 head before they improve on it
        # (measured on ndsb24: below it for 3 epochs, above it from the 4th to the 7th):
        # early stopping counts only in the second half of the schedule.
        if patience and wait >= patience and epochs // 2 <= epoch < epochs:
            stopped = True
            break
    progress.history[name] = series
    progress.lr_schedule[name] = lrs
    result = StageResult(
        stage=2,
        name=name,
        epochs_run=epochs_run,
        best_val_loss=progress.best_val_loss,
        best_val_accuracy=progress.best_val_accuracy,
        improved=improved_any,
        stopped_early=stopped,
        seconds=time.monotonic() - started,
    )
    reporter.stage_end(result)
    progress.results.append(_as_dict(result))
    return best_weights


def _validate(
    model: keras.Model, val: tuple[np.ndarray, np.ndarray], logs: dict[str, float]
) -> float:
    """Add the validation figures of one epoch to ``logs``; return its temperature."""
    x, y = val
    probs = keras.ops.convert_to_numpy(model.predict(x, batch_size=256, verbose=0))
    logs["val_loss"] = _log_loss(probs, y)
    logs["val_loss_calibrated"], temperature = calibrated_log_loss(probs, y)
    logs["val_accuracy"] = float(np.mean(probs.argmax(axis=1) == y))
    return temperature


def _save_weights(model: keras.Model, state_dir: Path) -> None:
    model.save_weights(str(state_dir / BEST_WEIGHTS))


def _as_dict(result: StageResult) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(result)
