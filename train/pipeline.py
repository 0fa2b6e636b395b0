"""A whole training run, from DATA_DIR to a complete RUN_DIR, and its resumption.

RUN_DIR after ``fieldscope train``::

    run.json            data folder, versions, status (training/complete), folds
    config.json         the resolved TrainConfig; "preprocess" is the edge recipe
    labels.json         class names in model-output order
    split.json          which file went to train/val/test (convert/ calibrates on
                        train and checks fidelity on test), skipped files and why
    model.keras         the best-on-validation model (takes raw RGB 0-255)
    history.json        per-stage Keras history, per-step learning rate, stage results
    metrics.json, classification_report.txt, predictions_{val,test}.csv, plots/
                        from fieldscope.train.report (the decision threshold chosen
                        on validation is metrics.json["threshold"])
    summary.json        test accuracy, macro-F1, threshold, counts
    cache/              preprocessed images (unless cache_dir is set)
    state/              resumable fitting state; removed when the run completes

With ``folds = K`` each fold is a complete run in ``RUN_DIR/fold-<k>`` and the top level
holds the cross-validation summary (mean ± sd) in metrics.json.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import msgspec
import numpy as np

from fieldscope.train import report
from fieldscope.train.augment import build_augmenter
from fieldscope.train.backbones import BACKBONES, build_classifier
from fieldscope.train.config import TrainConfig
from fieldscope.train.data import (
    DataSplit,
    LoadedImages,
    PreprocessCache,
    Sample,
    check_split_feasible,
    discover,
    kfold_splits,
    load_images,
    make_dataset,
    read_split,
    split_dataset,
)
from fieldscope.train.errors import TrainError
from fieldscope.train.evaluate import predict
from fieldscope.train.fit import FitReporter, fit_two_stage
from fieldscope.train.metrics import choose_threshold

__all__ = ["RunSummary", "check_weights_available", "resume_run", "train_run"]

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
CONFIG_FILE = "config.json"
LABELS_FILE = "labels.json"
HISTORY_FILE = "history.json"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.keras"
STATE_DIR = "state"
AUGMENTED_SAMPLES = 16

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class RunSummary:
    """The numbers a user wants at the end of ``fieldscope train``."""

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


def train_run(
    data_dir: Path,
    run_dir: Path,
    config: TrainConfig,
    *,
    reporter: FitReporter | None = None,
    on_progress: ProgressCallback | None = None,
) -> RunSummary:
    """Train from image folders into a new RUN_DIR; see the module docstring for its contents.

    Raises:
        TrainError: bad data (empty, one class, too few images), RUN_DIR already a run.
        ConfigError: an invalid configuration value.
    """
    started = time.monotonic()
    run = Path(run_dir)
    _check_new_run_dir(run)
    index = discover(Path(data_dir))
    check_split_feasible(index, config.split, folds=config.folds)
    check_weights_available(config)
    if config.cache_dir:
        # Saved absolute, so a resume from another working directory finds the cache.
        config = msgspec.structs.replace(config, cache_dir=str(Path(config.cache_dir).resolve()))
    run.mkdir(parents=True, exist_ok=True)
    _write_json(run / CONFIG_FILE, config.to_dict())
    _write_json(run / LABELS_FILE, list(index.labels))
    _write_run_record(run, index.root, config, status="training")
    return _continue(
        run, config, index.root, started=started, reporter=reporter, on_progress=on_progress
    )


def resume_run(
    run_dir: Path,
    *,
    reporter: FitReporter | None = None,
    on_progress: ProgressCallback | None = None,
) -> tuple[RunSummary, bool]:
    """Continue an interrupted run; returns the summary and whether any work was left.

    Raises:
        TrainError: RUN_DIR is not a fieldscope run, or its data folder is gone.
    """
    started = time.monotonic()
    run = Path(run_dir)
    record = _read_json(run / RUN_FILE, what=f"{run} is not a fieldscope training run")
    if record.get("status") == "complete" and (run / SUMMARY_FILE).exists():
        summary = RunSummary(**_read_json(run / SUMMARY_FILE, what="run summary"))
        return summary, False
    config = TrainConfig.from_dict(
        _read_json(run / CONFIG_FILE, what="run config"), source=str(run / CONFIG_FILE)
    )
    data_dir = Path(record["data_dir"])
    check_weights_available(config)
    summary = _continue(
        run, config, data_dir, started=started, reporter=reporter, on_progress=on_progress
    )
    return summary, True


def check_weights_available(config: TrainConfig) -> None:
    """Fail before any preprocessing when the backbone's pretrained weights cannot be had.

    Offline backbones need their pip package (the error names it); a ``keras.applications``
    backbone downloads its ImageNet file once into ``~/.keras/models``, so it is built
    here, where a failed download costs seconds instead of the whole preprocessing.

    Raises:
        TrainError: the weights package is missing, or the download failed (the message
            says what to install, or which offline backbone to use instead).
    """
    if config.weights != "imagenet":
        return
    spec = BACKBONES[config.backbone]
    if spec.ported:
        from fieldscope.train.ported import weights_file

        weights_file(spec.constructor)
        return
    build_classifier(
        config.backbone,
        num_classes=2,
        image_size=config.image_size,
        alpha=config.alpha,
        weights=config.weights,
    )


def _continue(
    run: Path,
    config: TrainConfig,
    data_dir: Path,
    *,
    started: float,
    reporter: FitReporter | None,
    on_progress: ProgressCallback | None,
) -> RunSummary:
    cache = PreprocessCache(
        Path(config.cache_dir) if config.cache_dir else run / "cache", config.recipe()
    )
    if config.folds:
        summary = _cross_validate(
            run,
            config,
            data_dir,
            cache,
            started=started,
            reporter=reporter,
            on_progress=on_progress,
        )
    else:
        split_file = run / "split.json"
        if split_file.exists():
            split = read_split(run)
            loaded = _load_split(split, cache, on_progress)
        else:
            loaded, split = _prepare_split(data_dir, config, cache, on_progress)
            split.write(run)
        summary = _train_split(run, config, split, loaded, started=started, reporter=reporter)
    _write_run_record(run, data_dir, config, status="complete")
    return summary


def _prepare_split(
    data_dir: Path,
    config: TrainConfig,
    cache: PreprocessCache,
    on_progress: ProgressCallback | None,
) -> tuple[LoadedImages, DataSplit]:
    index = discover(data_dir)
    loaded = load_images(index.samples(), cache, on_progress=on_progress)
    if loaded.skipped:
        log.warning("%d unreadable images skipped (listed in split.json)", len(loaded.skipped))
    index = index.without(s.path for s in loaded.skipped)
    split = split_dataset(index, config.split, seed=config.seed, skipped=loaded.skipped)
    return loaded, split


def _load_split(
    split: DataSplit, cache: PreprocessCache, on_progress: ProgressCallback | None
) -> LoadedImages:
    samples = [*split.train, *split.val, *split.test]
    loaded = load_images(samples, cache, on_progress=on_progress)
    if loaded.skipped:
        first = loaded.skipped[0]
        raise TrainError(
            f"{len(loaded.skipped)} images of this run's split can no longer be read, e.g. "
            f"{first.reason}; restore the data folder {split.root}"
        )
    return loaded


def _arrays(loaded: LoadedImages, samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray]:
    position = {s.path: i for i, s in enumerate(loaded.samples)}
    try:
        rows = [position[s.path] for s in samples]
    except KeyError as exc:
        raise TrainError(f"image {exc} of the split was not loaded") from None
    labels = np.asarray([s.label for s in samples], dtype="int32")
    return loaded.images[rows], labels


def class_weights(y: np.ndarray, n_classes: int) -> dict[int, float]:
    """Inverse-frequency weights, mean 1 over the training images (scikit-learn's
    "balanced"), so an unbalanced plankton set does not learn to answer the big class."""
    counts = np.bincount(y, minlength=n_classes)
    total = counts.sum()
    return {c: float(total / (n_classes * n)) if n else 0.0 for c, n in enumerate(counts)}


def _train_split(
    run: Path,
    config: TrainConfig,
    split: DataSplit,
    loaded: LoadedImages,
    *,
    started: float,
    reporter: FitReporter | None,
) -> RunSummary:
    # Seed before the pipeline exists: tf.data's shuffle draws on the global seed too.
    keras.utils.set_random_seed(config.seed)
    labels = list(split.labels)
    x_train, y_train = _arrays(loaded, split.train)
    x_val, y_val = _arrays(loaded, split.val)
    x_test, y_test = _arrays(loaded, split.test)
    weights = class_weights(y_train, len(labels)) if config.class_weight == "balanced" else None

    def build() -> keras.Model:
        return build_classifier(
            config.backbone,
            num_classes=len(labels),
            image_size=config.image_size,
            alpha=config.alpha,
            weights=config.weights,
            dropout=config.dropout,
        )

    if config.fitting_strategy() == "cached":
        from fieldscope.train.cached import fit_cached

        model = build()
        progress = fit_cached(
            model,
            x_train,
            y_train,
            x_val,
            y_val,
            n_classes=len(labels),
            fine_tune_layers=config.fine_tune_layers,
            fine_tune_epochs=config.fine_tune_epochs,
            learning_rate=config.fine_tune_learning_rate,
            augment_copies=config.augment_copies,
            augmenter=lambda k: build_augmenter(config.augment, seed=config.seed + 101 * k),
            label_smoothing=config.label_smoothing,
            batch_size=config.batch_size,
            patience=config.patience,
            seed=config.seed,
            state_dir=run / STATE_DIR,
            class_weight=weights,
            reporter=reporter,
        )
    else:
        augmenter = build_augmenter(config.augment, seed=config.seed)
        train_ds = make_dataset(
            x_train,
            y_train,
            batch_size=config.batch_size,
            shuffle_seed=config.seed,
            augmenter=augmenter,
        )
        val_ds = make_dataset(x_val, y_val, batch_size=config.batch_size)
        steps = math.ceil(len(x_train) / config.batch_size)
        model, progress = fit_two_stage(
            build,
            train_ds,
            val_ds,
            config=config,
            steps_per_epoch=steps,
            state_dir=run / STATE_DIR,
            class_weight=weights,
            reporter=reporter,
        )
    model.save(run / MODEL_FILE)
    best_stage, best_epoch = progress.best_at or (None, None)
    _write_json(
        run / HISTORY_FILE,
        {
            "stages": progress.history,
            "lr_schedule_per_step": progress.lr_schedule,
            "stage_results": progress.results,
            "best": {
                "stage": best_stage,
                "epoch": best_epoch,
                "val_loss": progress.best_val_loss,
                "val_accuracy": progress.best_val_accuracy,
            },
        },
    )

    probs_val = predict(model, x_val, batch_size=config.batch_size)
    choice = choose_threshold(
        y_val,
        probs_val,
        target_precision=config.target_precision,
        confidence=config.threshold_confidence or None,
    )
    report.write_evaluation(
        run,
        y_val,
        probs_val,
        labels,
        split="val",
        threshold=choice,
        file_paths=[_rel(s.path, split.root) for s in split.val],
    )
    probs_test = predict(model, x_test, batch_size=config.batch_size)
    test_metrics = report.write_evaluation(
        run,
        y_test,
        probs_test,
        labels,
        split="test",
        threshold=choice,
        file_paths=[_rel(s.path, split.root) for s in split.test],
    )
    report.write_training_plots(
        run,
        progress.history,
        progress.lr_schedule,
        split.counts(),
        _augmented_samples(x_train, y_train, labels, config),
    )
    summary = RunSummary(
        run_dir=str(run),
        labels=labels,
        accuracy=float(test_metrics["accuracy"]),
        macro_f1=float(test_metrics["macro_f1"]),
        threshold=choice.threshold,
        threshold_reached=choice.reached,
        counts={"train": len(split.train), "val": len(split.val), "test": len(split.test)},
        skipped=len(split.skipped),
        seconds=time.monotonic() - started,
        test_coverage=test_metrics["at_threshold"]["coverage"],
        test_precision_at_threshold=test_metrics["at_threshold"]["precision"],
    )
    _write_json(run / SUMMARY_FILE, asdict(summary))
    shutil.rmtree(run / STATE_DIR, ignore_errors=True)
    return summary


def _cross_validate(
    run: Path,
    config: TrainConfig,
    data_dir: Path,
    cache: PreprocessCache,
    *,
    started: float,
    reporter: FitReporter | None,
    on_progress: ProgressCallback | None,
) -> RunSummary:
    index = discover(data_dir)
    loaded = load_images(index.samples(), cache, on_progress=on_progress)
    index = index.without(s.path for s in loaded.skipped)
    splits = kfold_splits(
        index, config.folds, config.split, seed=config.seed, skipped=loaded.skipped
    )
    fold_metrics: list[dict[str, Any]] = []
    for split in splits:
        fold_dir = run / f"fold-{split.fold}"
        log.info("fold %d/%d", split.fold, config.folds)
        done = fold_dir / SUMMARY_FILE
        if not done.exists():
            fold_dir.mkdir(parents=True, exist_ok=True)
            fold_config = config.to_dict()
            fold_config["folds"] = 0
            _write_json(fold_dir / CONFIG_FILE, fold_config)
            _write_json(fold_dir / LABELS_FILE, list(index.labels))
            if not (fold_dir / "split.json").exists():
                split.write(fold_dir)
            _write_run_record(fold_dir, index.root, config, status="training", fold=split.fold)
            fold_split = read_split(fold_dir)
            _train_split(
                fold_dir, config, fold_split, loaded, started=time.monotonic(), reporter=reporter
            )
            _write_run_record(fold_dir, index.root, config, status="complete", fold=split.fold)
        fold_metrics.append(report.read_metrics(fold_dir)["splits"]["test"])
    cv = report.write_fold_summary(run, fold_metrics)
    stats = cv["metrics"]
    summary = RunSummary(
        run_dir=str(run),
        labels=list(index.labels),
        accuracy=stats["accuracy"]["mean"],
        macro_f1=stats["macro_f1"]["mean"],
        threshold=None,
        threshold_reached=None,
        counts={"images": len(loaded.samples)},
        skipped=len(loaded.skipped),
        seconds=time.monotonic() - started,
        folds=config.folds,
        accuracy_sd=stats["accuracy"]["sd"],
        macro_f1_sd=stats["macro_f1"]["sd"],
    )
    _write_json(run / SUMMARY_FILE, asdict(summary))
    return summary


def _augmented_samples(
    x: np.ndarray, y: np.ndarray, labels: Sequence[str], config: TrainConfig
) -> list[tuple[np.ndarray, str]]:
    """A few training images as the model sees them in training, for the report's grid."""
    augmenter = build_augmenter(config.augment, seed=config.seed + 7)
    rng = np.random.default_rng(config.seed)
    pick = rng.choice(len(x), size=min(AUGMENTED_SAMPLES, len(x)), replace=False)
    batch = x[pick].astype("float32")
    if augmenter is not None:
        batch = keras.ops.convert_to_numpy(augmenter(batch, training=True))
    images = np.clip(np.rint(batch), 0, 255).astype(np.uint8)
    return [(images[i], labels[int(y[j])]) for i, j in enumerate(pick)]


def _check_new_run_dir(run: Path) -> None:
    """Refuse to mix a new run into an old one, and say each way out."""
    if (run / RUN_FILE).exists():
        raise TrainError(
            f"{run} already holds a training run; continue it with --resume {run} (which "
            "may change --weights before the first epoch, and --epochs, --fine-tune-epochs, "
            f"--patience), start it over with --overwrite, or choose a new --out"
        )
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise TrainError(
            f"--out {run} exists and is not an empty folder (nor a training run); choose a "
            f"new --out, or remove {run} if nothing in it is needed"
        )


def _write_run_record(
    run: Path, data_dir: Path, config: TrainConfig, *, status: str, fold: int | None = None
) -> None:
    import tensorflow as tf

    try:
        version = importlib.metadata.version("fieldscope")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source tree
        version = "unknown"
    previous = _read_json(run / RUN_FILE, what="run record") if (run / RUN_FILE).exists() else {}
    record = {
        "data_dir": str(Path(data_dir).resolve()),
        "status": status,
        "folds": config.folds,
        "fold": fold,
        "started": previous.get("started") or datetime.now(UTC).isoformat(timespec="seconds"),
        "updated": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {
            "fieldscope": version,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
    }
    _write_json(run / RUN_FILE, record)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _read_json(path: Path, *, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainError(f"{what}: {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise TrainError(f"{path} is damaged (expected a JSON object)")
    return data


def _write_json(path: Path, data: Mapping[str, Any] | list[Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    temporary.replace(path)
