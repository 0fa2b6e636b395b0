"""Predictions from a trained run, and ``fieldscope evaluate RUN_DIR [DATA_DIR]``.

Evaluation reuses everything the run recorded — its labels, its preprocessing recipe,
its decision threshold — and never re-derives them: a folder is scored exactly as the
edge would see it. The report files are rewritten through ``fieldscope.train.report``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from fieldscope.train import report
from fieldscope.train.config import TrainConfig
from fieldscope.train.data import (
    PreprocessCache,
    Sample,
    SkippedFile,
    discover,
    load_images,
    make_dataset,
    read_split,
)
from fieldscope.train.errors import EvaluationError, TrainError
from fieldscope.train.rundir import RunDir

__all__ = ["EvaluationResult", "evaluate_run", "load_run_model", "predict"]

log = logging.getLogger(__name__)


def predict(model: keras.Model, images: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
    """Class probabilities (N, classes) for uint8 RGB images, through the same tf.data path."""
    if len(images) == 0:
        return np.zeros((0, int(model.output_shape[-1])), dtype="float32")
    ds = make_dataset(images, batch_size=batch_size)
    return np.asarray(model.predict(ds, verbose=0), dtype="float64")


@dataclass(frozen=True)
class EvaluationResult:
    """What ``evaluate_run`` scored and where it wrote it."""

    run_dir: Path
    split: str
    data_dir: Path
    n_images: int
    skipped: tuple[SkippedFile, ...]
    metrics: dict[str, Any]

    def lines(self) -> list[str]:
        m = self.metrics
        out = [
            f"{self.split}: {self.n_images} images from {self.data_dir}: accuracy "
            f"{m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}, top-{m['top_k']} "
            f"{m['top_k_accuracy']:.3f}, ECE {m['ece']:.3f}"
        ]
        at = m.get("at_threshold")
        if at:
            precision = "n/a" if at["precision"] is None else f"{at['precision']:.3f}"
            out.append(
                f"at the run's decision threshold {at['threshold']:.4f}: accepts "
                f"{at['n_accepted']}/{self.n_images} ({at['coverage']:.0%}), precision {precision}"
            )
        if self.skipped:
            out.append(f"skipped {len(self.skipped)} unreadable images")
        out.append(f"report rewritten in {self.run_dir}")
        return out


def load_run_model(run_dir: Path) -> tuple[keras.Model, list[str], TrainConfig]:
    """The run's model, labels and resolved config; errors name the missing file."""
    run = RunDir(Path(run_dir), TrainError)
    _check_single_run(run)
    try:
        labels = run.read_labels()
        config = TrainConfig.from_dict(run.read_config_tree(), source=str(run.config_file))
    except TrainError as exc:
        raise TrainError(f"cannot read the run's labels/config in {run.path}: {exc}") from exc
    try:
        model = keras.models.load_model(run.model_file)
    except Exception as exc:  # keras raises many types for a damaged file
        raise TrainError(f"cannot load {run.model_file}: {exc}") from exc
    if int(model.output_shape[-1]) != len(labels):
        raise TrainError(
            f"{run.path}: the model has {model.output_shape[-1]} outputs but "
            f"{run.labels_file.name} lists {len(labels)} classes"
        )
    return model, [str(x) for x in labels], config


def _check_single_run(run: RunDir) -> None:
    """A finished single run: its model, labels and config are there (errors name them)."""
    if not run.path.is_dir():
        raise TrainError(f"run folder {run.path} does not exist")
    if run.is_run() and not run.model_file.exists():
        folds = run.trained_folds()
        if folds:
            raise TrainError(
                f"{run.path} is a cross-validation run; evaluate one of its folds, "
                f"e.g. {folds[0].path}"
            )
    for path in (run.model_file, run.labels_file, run.config_file):
        if not path.exists():
            raise TrainError(
                f"{path} is missing; is {run.path} a finished fieldscope training run?"
            )


def evaluate_run(
    run_dir: Path,
    data_dir: Path | None = None,
    *,
    split: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> EvaluationResult:
    """Score the run's model on its test split, or on any folder of class folders.

    Without DATA_DIR the run's own test split is re-evaluated (split name ``test``).
    A DATA_DIR is scored under the split name ``split`` (default ``eval``), so the
    original test figures stay in the report beside it; ``--split test`` replaces them.
    A DATA_DIR that is itself split into train/val/test is scored on its ``test/``.

    Raises:
        TrainError: the run is incomplete, or DATA_DIR has classes the model lacks.
    """
    run = RunDir(Path(run_dir), TrainError)
    model, labels, config = load_run_model(run.path)
    cache_dir = Path(config.cache_dir) if config.cache_dir else run.cache_dir
    cache = PreprocessCache(cache_dir, config.recipe())
    if data_dir is None:
        samples, root = _own_test_split(run, labels)
        name = split or "test"
    else:
        samples, root = _folder_samples(Path(data_dir), labels)
        name = split or "eval"
    loaded = load_images(samples, cache, on_progress=on_progress)
    if not loaded.samples:
        raise TrainError(f"no readable images to evaluate in {root}")
    probs = predict(model, loaded.images, batch_size=config.batch_size)
    try:
        threshold = report.load_threshold(run.path)
    except EvaluationError:
        log.warning("no decision threshold recorded in %s; evaluating without one", run.path)
        threshold = None
    metrics = report.write_evaluation(
        run.path,
        loaded.labels,
        probs,
        labels,
        split=name,
        threshold=threshold,
        file_paths=[_rel(s.path, root) for s in loaded.samples],
    )
    return EvaluationResult(run.path, name, root, len(loaded.samples), loaded.skipped, metrics)


def _own_test_split(run: RunDir, labels: list[str]) -> tuple[list[Sample], Path]:
    """The test images the run set aside, and the data folder they are in."""
    data_split = read_split(run.path)
    if list(data_split.labels) != labels:
        raise TrainError(
            f"{run.path}: {run.split_file.name} and {run.labels_file.name} disagree on the classes"
        )
    return list(data_split.test), data_split.root


def _folder_samples(data_dir: Path, labels: list[str]) -> tuple[list[Sample], Path]:
    """A folder of class folders (or its test/), labelled in the run's class order."""
    index = discover(data_dir, min_classes=1)
    part = "all" if not index.presplit else "test"
    if part not in index.parts:
        raise TrainError(f"{index.root} is split into folders but has no test/ to evaluate")
    unknown = [c for c in index.labels if c not in labels]
    if unknown:
        raise TrainError(
            f"{index.root} has classes the model was not trained on: {', '.join(unknown)} "
            f"(the model knows: {', '.join(labels)})"
        )
    to_run = {i: labels.index(c) for i, c in enumerate(index.labels)}
    return [Sample(s.path, to_run[s.label]) for s in index.parts[part]], index.root


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
