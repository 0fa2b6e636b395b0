"""A whole training run, from DATA_DIR to a complete RUN_DIR, and its resumption.

The run folder's layout, file names and readers live in :mod:`fieldscope.train.rundir`;
this module writes a run through it.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import msgspec
import numpy as np

from fieldscope.edge.taxa import read_taxa, taxa_table
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
    kfold_splits,
    load_images,
    make_dataset,
    read_split,
    split_dataset,
)
from fieldscope.train.errors import TrainError
from fieldscope.train.evaluate import predict
from fieldscope.train.fit import FitReporter, fit_two_stage
from fieldscope.train.metrics import ThresholdChoice, choose_threshold
from fieldscope.train.roots import discover_roots

# The run folder's names lived here before train/rundir.py; re-exported for old imports.
from fieldscope.train.rundir import (  # noqa: F401
    CONFIG_FILE,
    HISTORY_FILE,
    LABELS_FILE,
    MODEL_FILE,
    MULTI_ROOT_FORMAT_VERSION,
    RUN_FILE,
    RUN_FORMAT_VERSION,
    STATE_DIR,
    SUMMARY_FILE,
    RunDir,
    RunRecord,
    RunSummary,
    SegmentationRecord,
    write_json,
)

__all__ = ["RunSummary", "check_weights_available", "resume_run", "train_run"]

log = logging.getLogger(__name__)

AUGMENTED_SAMPLES = 16

ProgressCallback = Callable[[int, int], None]


def train_run(
    data_dir: Path | Sequence[Path],
    run_dir: Path,
    config: TrainConfig,
    *,
    reporter: FitReporter | None = None,
    on_progress: ProgressCallback | None = None,
    segmentation: SegmentationRecord | None = None,
    taxa: Path | None = None,
) -> RunSummary:
    """Train from image folders into a new RUN_DIR (its layout: :mod:`fieldscope.train.rundir`).

    ``data_dir``: one data folder, or several merged by class name
    (:mod:`fieldscope.train.roots`). ``segmentation``: how the images were cut from
    frames, kept for the bundle; ``taxa``: a ``taxa.csv`` (:mod:`fieldscope.edge.taxa`),
    checked against the class folders and kept as ``taxa.json`` for the bundle.

    Raises:
        TrainError: bad data (empty, one class, too few images), RUN_DIR already a run.
        TaxaError: ``taxa`` unreadable, malformed, or naming labels that are no class.
        ConfigError: an invalid configuration value.
    """
    started = time.monotonic()
    run = RunDir(Path(run_dir), TrainError)
    _check_new_run_dir(run)
    index = discover_roots(data_dir)
    check_split_feasible(index, config.split, folds=config.folds)
    check_weights_available(config)
    taxa_rows = None if taxa is None else read_taxa(taxa, index.labels)
    if config.cache_dir:
        # Saved absolute, so a resume from another working directory finds the cache.
        config = msgspec.structs.replace(config, cache_dir=str(Path(config.cache_dir).resolve()))
    run.path.mkdir(parents=True, exist_ok=True)
    write_json(run.config_file, config.to_dict())
    write_json(run.labels_file, list(index.labels))
    if segmentation is not None:
        write_json(run.segmentation_file, segmentation)
    if taxa_rows is not None:
        write_json(run.taxa_file, taxa_table(taxa_rows))
    _write_run_record(run, index.all_roots, config, status="training")
    return _continue(
        run, config, index.all_roots, started=started, reporter=reporter, on_progress=on_progress
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
    run = RunDir(Path(run_dir), TrainError)
    if not run.run_file.exists():
        raise TrainError(
            f"{run.path} is not a fieldscope training run: {run.run_file} does not exist"
        )
    record = run.read_record()
    if record.status == "complete" and run.summary_file.exists():
        return run.read_summary(), False
    if not record.roots():
        raise TrainError(
            f"{run.run_file} does not say where the images are (no data_dir); start a new run"
        )
    config = TrainConfig.from_dict(run.read_config_tree(), source=str(run.config_file))
    check_weights_available(config)
    summary = _continue(
        run,
        config,
        tuple(Path(r) for r in record.roots()),
        started=started,
        reporter=reporter,
        on_progress=on_progress,
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
    run: RunDir,
    config: TrainConfig,
    data_dir: Sequence[Path],
    *,
    started: float,
    reporter: FitReporter | None,
    on_progress: ProgressCallback | None,
) -> RunSummary:
    cache = PreprocessCache(
        Path(config.cache_dir) if config.cache_dir else run.cache_dir, config.recipe()
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
        if run.split_file.exists():
            split = read_split(run.path)
            loaded = _load_split(split, cache, on_progress)
        else:
            loaded, split = _prepare_split(data_dir, config, cache, on_progress)
            split.write(run.path)
        summary = _train_split(run, config, split, loaded, started=started, reporter=reporter)
    _write_run_record(run, data_dir, config, status="complete")
    return summary


def _prepare_split(
    data_dir: Sequence[Path],
    config: TrainConfig,
    cache: PreprocessCache,
    on_progress: ProgressCallback | None,
) -> tuple[LoadedImages, DataSplit]:
    index = discover_roots(data_dir)
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
            f"{first.reason}; restore the data folder "
            f"{' + '.join(str(r) for r in split.all_roots)}"
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
    run: RunDir,
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
    train = _arrays(loaded, split.train)
    val = _arrays(loaded, split.val)
    test = _arrays(loaded, split.test)
    model, progress = _fit(run, config, labels, train, val, reporter=reporter)
    model.save(run.model_file)
    _write_history(run, progress)
    choice, test_metrics = _evaluate(run, model, config, split, val=val, test=test)
    report.write_training_plots(
        run.path,
        progress.history,
        progress.lr_schedule,
        split.counts(),
        _augmented_samples(*train, labels, config),
    )
    summary = RunSummary(
        run_dir=str(run.path),
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
    write_json(run.summary_file, asdict(summary))
    shutil.rmtree(run.state_dir, ignore_errors=True)
    return summary


Arrays = tuple[np.ndarray, np.ndarray]


def _fit(
    run: RunDir,
    config: TrainConfig,
    labels: Sequence[str],
    train: Arrays,
    val: Arrays,
    *,
    reporter: FitReporter | None,
) -> tuple[keras.Model, Any]:
    """Fit with the config's strategy (cached features or end-to-end two-stage)."""
    weights = class_weights(train[1], len(labels)) if config.class_weight == "balanced" else None

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
            *train,
            *val,
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
            state_dir=run.state_dir,
            class_weight=weights,
            reporter=reporter,
        )
        return model, progress
    return _fit_end_to_end(run, config, build, train, val, weights=weights, reporter=reporter)


def _fit_end_to_end(
    run: RunDir,
    config: TrainConfig,
    build: Callable[[], keras.Model],
    train: Arrays,
    val: Arrays,
    *,
    weights: dict[int, float] | None,
    reporter: FitReporter | None,
) -> tuple[keras.Model, Any]:
    """The two-stage fit through augmenting tf.data pipelines."""
    augmenter = build_augmenter(config.augment, seed=config.seed)
    train_ds = make_dataset(
        *train, batch_size=config.batch_size, shuffle_seed=config.seed, augmenter=augmenter
    )
    val_ds = make_dataset(*val, batch_size=config.batch_size)
    return fit_two_stage(
        build,
        train_ds,
        val_ds,
        config=config,
        steps_per_epoch=math.ceil(len(train[0]) / config.batch_size),
        state_dir=run.state_dir,
        class_weight=weights,
        reporter=reporter,
    )


def _write_history(run: RunDir, progress: Any) -> None:
    best_stage, best_epoch = progress.best_at or (None, None)
    write_json(
        run.history_file,
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


def _evaluate(
    run: RunDir,
    model: keras.Model,
    config: TrainConfig,
    split: DataSplit,
    *,
    val: Arrays,
    test: Arrays,
) -> tuple[ThresholdChoice, dict[str, Any]]:
    """Choose the decision threshold on validation, and report val and test with it."""
    probs_val = predict(model, val[0], batch_size=config.batch_size)
    choice = choose_threshold(
        val[1],
        probs_val,
        target_precision=config.target_precision,
        confidence=config.threshold_confidence or None,
    )
    labels = list(split.labels)

    def write(
        name: str, truth: np.ndarray, probs: np.ndarray, samples: Sequence[Sample]
    ) -> dict[str, Any]:
        """The split's evaluation files, at the threshold chosen on validation."""
        paths = [_rel(s.path, split.root) for s in samples]
        return report.write_evaluation(
            run.path, truth, probs, labels, split=name, threshold=choice, file_paths=paths
        )

    write("val", val[1], probs_val, split.val)
    probs_test = predict(model, test[0], batch_size=config.batch_size)
    return choice, write("test", test[1], probs_test, split.test)


def _cross_validate(
    run: RunDir,
    config: TrainConfig,
    data_dir: Sequence[Path],
    cache: PreprocessCache,
    *,
    started: float,
    reporter: FitReporter | None,
    on_progress: ProgressCallback | None,
) -> RunSummary:
    index = discover_roots(data_dir)
    loaded = load_images(index.samples(), cache, on_progress=on_progress)
    index = index.without(s.path for s in loaded.skipped)
    splits = kfold_splits(
        index, config.folds, config.split, seed=config.seed, skipped=loaded.skipped
    )
    fold_metrics: list[dict[str, Any]] = []
    for split in splits:
        fold = run.fold(split.fold or 0)
        log.info("fold %d/%d", split.fold, config.folds)
        if not fold.summary_file.exists():
            _train_fold(fold, config, split, loaded, roots=index.all_roots, reporter=reporter)
        fold_metrics.append(report.read_metrics(fold.path)["splits"]["test"])
    stats = report.write_fold_summary(run.path, fold_metrics)["metrics"]
    summary = RunSummary(
        run_dir=str(run.path),
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
    write_json(run.summary_file, asdict(summary))
    return summary


def _train_fold(
    fold: RunDir,
    config: TrainConfig,
    split: DataSplit,
    loaded: LoadedImages,
    *,
    roots: Sequence[Path],
    reporter: FitReporter | None,
) -> None:
    """Train one fold of a cross-validation run as a complete run folder of its own."""
    fold.path.mkdir(parents=True, exist_ok=True)
    fold_config = config.to_dict()
    fold_config["folds"] = 0
    write_json(fold.config_file, fold_config)
    write_json(fold.labels_file, list(split.labels))
    if not fold.split_file.exists():
        split.write(fold.path)
    _write_run_record(fold, roots, config, status="training", fold=split.fold)
    fold_split = read_split(fold.path)
    _train_split(fold, config, fold_split, loaded, started=time.monotonic(), reporter=reporter)
    _write_run_record(fold, roots, config, status="complete", fold=split.fold)


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


def _check_new_run_dir(run: RunDir) -> None:
    """Refuse to mix a new run into an old one, and say each way out."""
    if run.run_file.exists():
        raise TrainError(
            f"{run.path} already holds a training run; continue it with --resume {run.path} "
            "(which may change --weights before the first epoch, and --epochs, "
            f"--fine-tune-epochs, --patience), start it over with --overwrite, or choose a "
            "new --out"
        )
    if run.path.exists() and (not run.path.is_dir() or any(run.path.iterdir())):
        raise TrainError(
            f"--out {run.path} exists and is not an empty folder (nor a training run); choose "
            f"a new --out, or remove {run.path} if nothing in it is needed"
        )


def _write_run_record(
    run: RunDir,
    roots: Sequence[Path],
    config: TrainConfig,
    *,
    status: str,
    fold: int | None = None,
) -> None:
    """``run.json``, in the lowest run format that holds it (2 only for several folders)."""
    import tensorflow as tf

    try:
        version = importlib.metadata.version("fieldscope")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source tree
        version = "unknown"
    previous = run.read_record() if run.run_file.exists() else None
    now = datetime.now(UTC).isoformat(timespec="seconds")
    folders = [str(Path(r).resolve()) for r in roots]
    several = len(folders) > 1
    record = RunRecord(
        format_version=MULTI_ROOT_FORMAT_VERSION if several else 1,
        data_dir=folders[0],
        data_dirs=folders if several else [],
        status="complete" if status == "complete" else "training",
        folds=config.folds,
        fold=fold,
        started=(previous.started if previous else None) or now,
        updated=now,
        versions={
            "fieldscope": version,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
    )
    write_json(run.run_file, record)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
