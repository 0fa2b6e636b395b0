"""Two-stage transfer learning that survives interruption.

Stage 1 ("head") trains only the new classifier on a frozen backbone (with
``weights = "none"`` there is nothing pretrained to protect, so it trains the whole
network from scratch). Stage 2
("fine-tune") unfreezes the top N backbone layers — BatchNorm stays frozen — and trains
everything at a much lower learning rate that decays along a cosine. Both stages use
class weights (if asked), early stopping on validation loss and a best-on-validation
checkpoint that spans both stages: if fine-tuning never beats the head, the head wins.

After every epoch the full state (model with optimizer, best weights, early-stopping
counters, history) is written to ``RUN_DIR/state``, so ``fieldscope train --resume``
continues an interrupted run from its last finished epoch.

This module imports Keras: import it only where training actually happens.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import keras

from fieldscope.train.backbones import backbone_of, set_fine_tune_layers
from fieldscope.train.config import TrainConfig
from fieldscope.train.errors import TrainError
from fieldscope.train.rundir import BEST_WEIGHTS, LAST_MODEL, PROGRESS_FILE

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = [
    "STAGE_NAMES",
    "FitProgress",
    "FitReporter",
    "LogReporter",
    "StageResult",
    "fit_two_stage",
]

log = logging.getLogger(__name__)

STAGE_NAMES: tuple[str, str] = ("head", "fine-tune")
# Smallest drop in validation loss that counts as an improvement.
MIN_DELTA = 1e-4


@dataclass
class StageResult:
    """What one stage did, for the summary line and ``history.json``."""

    stage: int
    name: str
    epochs_run: int
    best_val_loss: float | None
    best_val_accuracy: float | None
    improved: bool
    stopped_early: bool
    seconds: float

    def line(self) -> str:
        """The one summary line a user sees per stage."""
        best = (
            f"best val_loss {self.best_val_loss:.4f}, val_accuracy {self.best_val_accuracy:.3f}"
            if self.improved and self.best_val_loss is not None
            else "no improvement on the previous stage"
        )
        stop = ", stopped early" if self.stopped_early else ""
        return (
            f"stage {self.stage} ({self.name}): {self.epochs_run} epochs in "
            f"{self.seconds:.1f} s, {best}{stop}"
        )


@dataclass
class FitProgress:
    """The resumable state of a two-stage fit (``state/progress.json``)."""

    stage: int = 1
    epoch: int = 0  # epochs finished in the current stage
    wait: int = 0
    stopped: bool = False
    stage_seconds: float = 0.0
    stage_improved: bool = False
    best_val_loss: float | None = None
    best_val_accuracy: float | None = None
    best_at: list[int] | None = None  # [stage, epoch within stage], 1-based
    finished: bool = False
    history: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    lr_schedule: dict[str, list[float]] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)

    def save(self, state_dir: Path) -> None:
        _atomic_json(state_dir / PROGRESS_FILE, asdict(self))

    @classmethod
    def load(cls, state_dir: Path) -> FitProgress | None:
        path = state_dir / PROGRESS_FILE
        if not path.exists():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise TrainError(
                f"cannot resume: {path} is damaged ({exc}); start a new run instead"
            ) from exc


class FitReporter(Protocol):
    """Where a fit reports progress; the CLI draws a bar, a library user may log."""

    def stage_begin(self, stage: int, name: str, epochs: int, first_epoch: int) -> None: ...

    def batch_end(
        self, stage: int, epoch: int, step: int, steps: int, logs: Mapping[str, float]
    ) -> None: ...

    def epoch_end(
        self, stage: int, epoch: int, epochs: int, logs: Mapping[str, float], improved: bool
    ) -> None: ...

    def stage_end(self, result: StageResult) -> None: ...


class LogReporter:
    """A ``FitReporter`` that writes one log line per epoch and per stage."""

    def stage_begin(self, stage: int, name: str, epochs: int, first_epoch: int) -> None:
        log.info("stage %d (%s): epochs %d..%d", stage, name, first_epoch + 1, epochs)

    def batch_end(
        self, stage: int, epoch: int, step: int, steps: int, logs: Mapping[str, float]
    ) -> None:
        pass

    def epoch_end(
        self, stage: int, epoch: int, epochs: int, logs: Mapping[str, float], improved: bool
    ) -> None:
        log.info("stage %d epoch %d/%d: %s", stage, epoch, epochs, _format_logs(logs))

    def stage_end(self, result: StageResult) -> None:
        log.info("%s", result.line())


def _format_logs(logs: Mapping[str, float]) -> str:
    keys = ("loss", "accuracy", "val_loss", "val_accuracy")
    return " ".join(f"{k} {logs[k]:.4f}" for k in keys if k in logs)


def fit_two_stage(
    build_model: Callable[[], keras.Model],
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset,
    *,
    config: TrainConfig,
    steps_per_epoch: int,
    state_dir: Path,
    class_weight: Mapping[int, float] | None = None,
    reporter: FitReporter | None = None,
) -> tuple[keras.Model, FitProgress]:
    """Run (or continue) both stages; return the best-on-validation model and the record.

    ``build_model`` must build the same architecture every time (weights are carried
    between stages and across a resume by file). A progress file in ``state_dir`` means
    "continue": the stage and epoch it records are picked up where they stopped.
    """
    reporter = reporter or LogReporter()
    state_dir.mkdir(parents=True, exist_ok=True)
    progress = FitProgress.load(state_dir) or FitProgress()
    # Seeded from the config and the point where this call starts, so a resumed run
    # does not replay the random stream of the epochs it already has.
    keras.utils.set_random_seed(config.seed + 1000 * progress.stage + progress.epoch)

    stages = [(1, config.epochs), (2, _fine_tune_epochs(config))]
    for stage, epochs in stages:
        if progress.stage > stage or progress.finished:
            continue
        if epochs == 0:
            _finish_stage(progress, state_dir, reporter, stage, skipped=True)
            continue
        if progress.epoch < epochs and not progress.stopped:
            _run_stage(
                build_model,
                stage,
                epochs,
                train_ds=train_ds,
                val_ds=val_ds,
                config=config,
                steps=steps_per_epoch,
                progress=progress,
                state_dir=state_dir,
                class_weight=class_weight,
                reporter=reporter,
            )
        _finish_stage(progress, state_dir, reporter, stage, skipped=False)

    return _best_model(build_model, progress, state_dir), progress


def _best_model(
    build_model: Callable[[], keras.Model], progress: FitProgress, state_dir: Path
) -> keras.Model:
    """The best-on-validation checkpoint in a fresh model; the fit is then finished."""
    model = build_model()
    best = state_dir / BEST_WEIGHTS
    if not best.exists():
        raise TrainError(f"no best checkpoint in {state_dir}; the run recorded no epoch")
    model.load_weights(best)
    progress.finished = True
    progress.save(state_dir)
    return model


def _run_stage(
    build_model: Callable[[], keras.Model],
    stage: int,
    epochs: int,
    *,
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset,
    config: TrainConfig,
    steps: int,
    progress: FitProgress,
    state_dir: Path,
    class_weight: Mapping[int, float] | None,
    reporter: FitReporter,
) -> None:
    """Train ``stage`` from the epoch ``progress`` records up to ``epochs`` (or early stop)."""
    model = _stage_model(
        build_model,
        stage,
        progress=progress,
        config=config,
        steps=steps,
        state_dir=state_dir,
    )
    reporter.stage_begin(stage, STAGE_NAMES[stage - 1], epochs, progress.epoch)
    callback = _StageCallback(
        stage=stage,
        epochs=epochs,
        steps=steps,
        progress=progress,
        state_dir=state_dir,
        patience=config.patience,
        reporter=reporter,
    )
    model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=epochs,
        initial_epoch=progress.epoch,
        class_weight=dict(class_weight) if class_weight else None,
        callbacks=[callback],
        shuffle=False,  # the tf.data pipeline shuffles
        verbose=0,
    )


def _fine_tune_epochs(config: TrainConfig) -> int:
    return config.fine_tune_epochs if config.fine_tune_layers > 0 else 0


def _stage_model(
    build_model: Callable[[], keras.Model],
    stage: int,
    *,
    progress: FitProgress,
    config: TrainConfig,
    steps: int,
    state_dir: Path,
) -> keras.Model:
    """The model to (continue to) train in ``stage``, compiled for it."""
    last = state_dir / LAST_MODEL
    if progress.epoch > 0 and last.exists():
        # Mid-stage resume: the saved model carries its trainable flags, optimizer state
        # (moments, step count for the cosine schedule) and compile settings.
        try:
            model = keras.models.load_model(last)
        except Exception as exc:  # keras raises many types for a damaged file
            raise TrainError(f"cannot resume from {last}: {exc}") from exc
        model.run_eagerly = config.run_eagerly
        return model

    model = build_model()
    if stage == 1:
        # A random backbone has nothing to protect: from scratch, stage 1 trains it all.
        backbone_of(model).trainable = config.weights == "none"
        optimizer = keras.optimizers.Adam(config.learning_rate)
    else:
        model.load_weights(state_dir / BEST_WEIGHTS)
        unfrozen = set_fine_tune_layers(model, config.fine_tune_layers)
        log.info("stage 2: %d backbone layers with weights unfrozen", unfrozen)
        schedule = keras.optimizers.schedules.CosineDecay(
            config.fine_tune_learning_rate, decay_steps=max(1, config.fine_tune_epochs * steps)
        )
        optimizer = keras.optimizers.Adam(schedule)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
        run_eagerly=config.run_eagerly,
    )
    return model


def _finish_stage(
    progress: FitProgress, state_dir: Path, reporter: FitReporter, stage: int, *, skipped: bool
) -> None:
    if not skipped:
        name = STAGE_NAMES[stage - 1]
        result = StageResult(
            stage=stage,
            name=name,
            epochs_run=progress.epoch,
            best_val_loss=progress.best_val_loss,
            best_val_accuracy=progress.best_val_accuracy,
            improved=progress.stage_improved,
            stopped_early=progress.stopped,
            seconds=progress.stage_seconds,
        )
        progress.results.append(asdict(result))
        reporter.stage_end(result)
    progress.stage = stage + 1
    progress.epoch = 0
    progress.wait = 0
    progress.stopped = False
    progress.stage_seconds = 0.0
    progress.stage_improved = False
    progress.save(state_dir)
    (state_dir / LAST_MODEL).unlink(missing_ok=True)


class _StageCallback(keras.callbacks.Callback):  # type: ignore[misc]
    """Early stopping, best checkpoint, per-step learning rate and resumable state."""

    def __init__(
        self,
        *,
        stage: int,
        epochs: int,
        steps: int,
        progress: FitProgress,
        state_dir: Path,
        patience: int,
        reporter: FitReporter,
    ) -> None:
        super().__init__()
        self.stage = stage
        self.name = STAGE_NAMES[stage - 1]
        self.epochs = epochs
        self.steps = steps
        self.progress = progress
        self.state_dir = state_dir
        self.patience = patience
        self.reporter = reporter
        self.epoch_lrs: list[float] = []
        self.epoch_started = 0.0
        self.current_epoch = 0

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self.epoch_lrs = []
        self.epoch_started = time.monotonic()
        self.current_epoch = epoch + 1

    def on_train_batch_begin(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        self.epoch_lrs.append(float(self.model.optimizer.learning_rate))

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        self.reporter.batch_end(
            self.stage, self.current_epoch, batch + 1, self.steps, _floats(logs)
        )

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        values = _floats(logs)
        p = self.progress
        val_loss = values.get("val_loss", math.nan)
        if not math.isfinite(values.get("loss", math.nan)):
            raise TrainError(
                f"training diverged in stage {self.stage} epoch {epoch + 1} (loss is "
                f"{values.get('loss')}); lower the learning rate"
            )
        series = p.history.setdefault(self.name, {})
        for key, value in values.items():
            if key != "learning_rate":
                series.setdefault(key, []).append(value)
        series.setdefault("learning_rate", []).append(
            self.epoch_lrs[0] if self.epoch_lrs else math.nan
        )
        p.lr_schedule.setdefault(self.name, []).extend(self.epoch_lrs)

        improved = math.isfinite(val_loss) and (
            p.best_val_loss is None or val_loss < p.best_val_loss - MIN_DELTA
        )
        if improved:
            p.best_val_loss = val_loss
            p.best_val_accuracy = values.get("val_accuracy")
            p.best_at = [self.stage, epoch + 1]
            p.wait = 0
            p.stage_improved = True
            _atomic_save(self.model.save_weights, self.state_dir / BEST_WEIGHTS)
        else:
            p.wait += 1
        if self.patience and p.wait >= self.patience and epoch + 1 < self.epochs:
            p.stopped = True
            self.model.stop_training = True
        p.epoch = epoch + 1
        p.stage_seconds += time.monotonic() - self.epoch_started
        if not p.stopped and p.epoch < self.epochs:
            # Only a model that will train on needs saving for a resume.
            _atomic_save(self.model.save, self.state_dir / LAST_MODEL)
        p.save(self.state_dir)
        self.reporter.epoch_end(self.stage, epoch + 1, self.epochs, values, improved)


def _floats(logs: Mapping[str, Any] | None) -> dict[str, float]:
    return {k: float(v) for k, v in (logs or {}).items()}


def _atomic_save(save: Callable[[str], Any], path: Path) -> None:
    """Keras save to a temporary name with the same suffix, then rename over ``path``."""
    suffix = ".weights.h5" if path.name.endswith(".weights.h5") else path.suffix
    temporary = path.with_name(f".tmp-{os.getpid()}{suffix}")
    save(str(temporary))
    temporary.replace(path)


def _atomic_json(path: Path, data: Any) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
    temporary.replace(path)
