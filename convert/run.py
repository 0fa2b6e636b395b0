"""``convert_run``: the thin adapter from a training run directory to the conversion core.

It reads what ``fieldscope train`` recorded, and nothing is re-derived: labels from
``labels.json``, the preprocessing recipe from ``config.json``, which files are train and
test from ``split.json``, the decision threshold and test metrics from ``metrics.json``,
the model from ``model.keras``. convert/ imports edge/ and, of train/, only the run
folder's TensorFlow-free reader :mod:`fieldscope.train.rundir` (docs/architecture.md#layout),
so both sides agree on the files and their format.

Images are decoded and preprocessed afresh by the edge's own
:func:`~fieldscope.edge.preprocess.load_and_preprocess`, not read from the training
cache, so calibration and the fidelity check see exactly the pixels a Pi would.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fieldscope.convert import DEFAULT_CALIBRATION_IMAGES
from fieldscope.convert.errors import ConversionError
from fieldscope.convert.keys import check_private_key
from fieldscope.convert.pipeline import (
    DEFAULT_MAX_ACCURACY_DROP,
    ConversionResult,
    Progress,
    check_output_dir,
    convert_model,
    write_converted_bundle,
)
from fieldscope.convert.quantize import QUANTIZE_MODES, stratified_sample
from fieldscope.edge.bundle import Bundle, Segmentation, Taxon
from fieldscope.edge.errors import (
    BundleError,
    ImageDecodeError,
    MissingDependencyError,
    RecipeError,
)
from fieldscope.edge.preprocess import PreprocessRecipe, load_and_preprocess
from fieldscope.train.rundir import (
    LABELS_FILE,
    METRICS_FILE,
    MetricsRecord,
    RunDir,
    SplitEntry,
    SplitRecord,
    StoredConfig,
)

__all__ = [
    "DEFAULT_CALIBRATION_IMAGES",
    "ConvertedRun",
    "TrainingRun",
    "convert_run",
    "load_images",
    "read_run",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingRun:
    """What a finished training run says about its model (paths absolute)."""

    path: Path
    model_path: Path
    labels: tuple[str, ...]
    recipe: PreprocessRecipe
    train: tuple[tuple[Path, int], ...]
    test: tuple[tuple[Path, int], ...]
    threshold: float | None
    metrics: Mapping[str, Any]
    seed: int = 0
    segmentation: Segmentation | None = None
    taxa: tuple[Taxon, ...] | None = None


def _split_part(
    split: SplitRecord,
    name: str,
    roots: Sequence[Path],
    labels: tuple[str, ...],
    where: Path,
) -> tuple[tuple[Path, int], ...]:
    index = {label: i for i, label in enumerate(labels)}
    out: list[tuple[Path, int]] = []
    items: Sequence[SplitEntry] = getattr(split, name)
    for item in items:
        if item.label not in index:
            raise ConversionError(
                f"{where}: {name} file {item.path} has label {item.label!r}, which is not in "
                f"{LABELS_FILE}"
            )
        out.append((split.path_of(item, roots), index[item.label]))
    return tuple(out)


def _data_roots(
    split: SplitRecord, data_dir: Path | Sequence[Path] | None, where: Path
) -> list[Path]:
    """The run's data folders, or the new places given for them (as many as it has)."""
    recorded = [Path(r) for r in split.roots()]
    if data_dir is None:
        return recorded
    given = [Path(data_dir)] if isinstance(data_dir, str | Path) else [Path(d) for d in data_dir]
    if len(given) != len(recorded):
        raise ConversionError(
            f"{where} was trained on {len(recorded)} data folder(s) "
            f"({', '.join(map(str, recorded))}); give --data-dir once for the new place of "
            f"each, in that order ({len(given)} given)"
        )
    return given


def _test_metrics(metrics: MetricsRecord | None) -> dict[str, Any]:
    """The headline figures of the run (for the manifest), without per-image detail."""
    if metrics is None:
        return {}
    test = metrics.splits.get("test", {})
    summary = {
        f"test_{key}": test[key]
        for key in ("accuracy", "macro_f1", "top_k_accuracy", "ece", "n_samples")
        if key in test
    }
    if "top_k" in test:
        summary["top_k"] = test["top_k"]
    threshold = metrics.threshold or {}
    # Precision and coverage of the accepted validation predictions at the threshold.
    for key in ("threshold", "precision", "coverage", "reached", "target_precision"):
        if key in threshold:
            summary["threshold" if key == "threshold" else f"threshold_{key}"] = threshold[key]
    return summary


def _check_finished(run: RunDir) -> None:
    """A finished single run: not a cross-validation parent, not still training."""
    if not run.path.is_dir():
        raise ConversionError(f"training run {run.path} does not exist or is not a folder")
    if run.run_file.exists():
        record = run.read_record()
        if record.folds and not run.model_file.exists():
            folds = run.trained_folds()
            example = f", e.g. {folds[0].path}" if folds else ""
            raise ConversionError(
                f"{run.path} is a cross-validation run; convert one of its folds{example}"
            )
        if record.status != "complete":
            raise ConversionError(
                f"training run {run.path} is not finished (status {record.status!r}); "
                f"finish it with fieldscope train --resume {run.path}"
            )
    if not run.model_file.is_file():
        raise ConversionError(
            f"{run.model_file} is missing; is {run.path} a finished training run?"
        )


def _recipe(run: RunDir, config: StoredConfig) -> PreprocessRecipe:
    try:
        return PreprocessRecipe.from_dict(config.preprocess)
    except (KeyError, TypeError) as exc:
        raise ConversionError(f"{run.config_file} has no preprocessing recipe") from exc
    except RecipeError as exc:
        raise ConversionError(f"{run.config_file}: {exc}") from exc


def _segmentation(run: RunDir) -> Segmentation | None:
    """The run's segmentation.json as the manifest records it (None: whole frames)."""
    from fieldscope.edge.objects import ObjectsSettings, settings_table

    record = run.read_segmentation()
    if record is None:
        return None
    table = {**settings_table(ObjectsSettings(mode="segment")), **record.objects}
    for station_only in ("mode", "blank"):
        table.pop(station_only, None)
    try:
        return Segmentation.from_dict(table)
    except BundleError as exc:
        raise ConversionError(
            f"{run.segmentation_file}: {exc} (the settings of {record.source}); correct the file"
        ) from None


def _threshold(run: RunDir, metrics: MetricsRecord | None) -> float | None:
    record = metrics.threshold if metrics is not None else None
    if not record or "threshold" not in record:
        return None
    try:
        return float(record["threshold"])
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{run.metrics_file}: the threshold is not a number") from exc


def read_run(run_dir: Path, *, data_dir: Path | Sequence[Path] | None = None) -> TrainingRun:
    """Read a finished run; ``data_dir`` replaces the image folder(s) recorded in it
    (moved data; one per recorded folder, in order).

    Raises:
        ConversionError: the folder is not a finished single-split run, or a file is
            missing or damaged (the message names it).
    """
    run = RunDir(Path(run_dir), ConversionError)
    _check_finished(run)
    labels = tuple(run.read_labels())
    config = run.read_config()
    recipe = _recipe(run, config)
    split = run.read_split()
    if split.labels != list(labels):
        raise ConversionError(f"{run.split_file} and {LABELS_FILE} disagree on the classes")
    roots = _data_roots(split, data_dir, run.split_file)
    metrics = run.read_metrics() if run.metrics_file.exists() else None
    return TrainingRun(
        path=run.path,
        model_path=run.model_file,
        labels=labels,
        recipe=recipe,
        train=_split_part(split, "train", roots, labels, run.split_file),
        test=_split_part(split, "test", roots, labels, run.split_file),
        threshold=_threshold(run, metrics),
        metrics=_test_metrics(metrics),
        seed=config.seed,
        segmentation=_segmentation(run),
        taxa=run.read_taxa(),
    )


def load_images(
    files: tuple[tuple[Path, int], ...], recipe: PreprocessRecipe, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Preprocess files with the edge's function; unreadable ones are skipped and logged.

    Raises:
        ConversionError: every file is missing or unreadable (a moved data folder).
    """
    images: list[np.ndarray] = []
    labels: list[int] = []
    failed: list[str] = []
    for path, label in files:
        try:
            images.append(load_and_preprocess(path, recipe))
            labels.append(label)
        except (ImageDecodeError, OSError) as exc:
            failed.append(str(exc))
            log.warning("skipping %s image %s: %s", what, path, exc)
    if files and not images:
        raise ConversionError(
            f"none of the {len(files)} {what} images could be read (first: {failed[0]}); "
            "if the data folder moved, give its new place with --data-dir"
        )
    h, w = recipe.size
    array = np.stack(images) if images else np.zeros((0, h, w, 3), np.uint8)
    return array, np.asarray(labels, dtype=np.int64)


def load_keras_model(path: Path) -> Any:
    """Load ``model.keras``; a damaged or incompatible file becomes a ConversionError.

    Raises:
        MissingDependencyError: TensorFlow/Keras is not installed (an edge-only install).
    """
    try:
        import keras
    except ModuleNotFoundError as exc:
        raise MissingDependencyError(
            f"conversion needs {exc.name}, which is not installed; install the training "
            "extra: pip install 'fieldscope[train]'"
        ) from exc

    try:
        return keras.models.load_model(path)
    except Exception as exc:  # keras raises many types for a damaged or foreign file
        raise ConversionError(f"cannot load {path}: {exc}") from exc


@dataclass(frozen=True)
class ConvertedRun:
    """The written bundle and the conversion behind it."""

    bundle: Bundle
    result: ConversionResult

    def lines(self) -> list[str]:
        """The closing summary for the terminal."""
        m = self.bundle.manifest
        size = m.files["model.tflite"].size
        runtimes = ", ".join(f"{k} >= {v}" for k, v in sorted((m.min_runtime or {}).items()))
        return [
            f"wrote {self.bundle.path}: {m.model_name} {m.model_version}, "
            f"{self.result.quantize}, {size / 1024:.0f} KiB, {len(m.labels)} labels, "
            f"threshold {m.threshold:.4f}",
            f"fidelity: {self.result.fidelity.summary()}",
            f"runs on: {runtimes}",
            "signed (manifest.sig)" if (self.bundle.path / "manifest.sig").exists() else "unsigned",
        ]


def _default_version() -> str:
    return datetime.now(UTC).strftime("%Y.%m.%d-%H%M%S")


def convert_run(
    run_dir: Path,
    out_dir: Path,
    *,
    quantize: str = "int8",
    model_name: str | None = None,
    model_version: str | None = None,
    sign_key: Path | None = None,
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
    calibration_size: int = DEFAULT_CALIBRATION_IMAGES,
    threshold: float | None = None,
    data_dir: Path | Sequence[Path] | None = None,
    allow_newer_runtime: bool = False,
    float_fallback: bool = True,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ConvertedRun:
    """Convert a training run into a bundle in ``out_dir``; see :func:`convert_model`.

    Cheap checks (run files, output folder, signing key, options) come first, so a
    mistake is reported before minutes of conversion. ``model_name`` defaults to the
    run folder's name, ``model_version`` to the UTC time, ``threshold`` to the one the
    run chose on validation.

    Raises:
        ConversionError: (and its subclasses) the run, the options or the conversion.
        BundleError: the output folder or the signing key.
    """
    _check_options(quantize, calibration_size, max_accuracy_drop)
    run = read_run(run_dir, data_dir=data_dir)
    chosen = _check_outputs(run, out_dir, threshold, sign_key=sign_key, overwrite=overwrite)
    result = _convert(
        run,
        quantize=quantize,
        calibration_size=calibration_size,
        max_accuracy_drop=max_accuracy_drop,
        allow_newer_runtime=allow_newer_runtime,
        float_fallback=float_fallback,
        progress=progress,
    )
    return _write(
        result,
        run,
        out_dir,
        threshold=chosen,
        model_name=model_name,
        model_version=model_version,
        sign_key=sign_key,
        overwrite=overwrite,
    )


def _check_options(quantize: str, calibration_size: int, max_accuracy_drop: float) -> None:
    if quantize not in QUANTIZE_MODES:
        raise ConversionError(
            f"unknown quantisation mode {quantize!r} (choose one of {', '.join(QUANTIZE_MODES)})"
        )
    if calibration_size < 1:
        raise ConversionError(f"calibration images must be >= 1, got {calibration_size}")
    if not max_accuracy_drop >= 0:
        raise ConversionError(
            f"the maximum accuracy drop must be >= 0 points, got {max_accuracy_drop}"
        )


def _check_outputs(
    run: TrainingRun,
    out_dir: Path,
    threshold: float | None,
    *,
    sign_key: Path | None,
    overwrite: bool,
) -> float:
    """Check the output folder and the signing key; return the threshold to ship: the
    given one, else the one the run chose on validation."""
    check_output_dir(out_dir, overwrite=overwrite)
    if sign_key is not None:
        check_private_key(sign_key)
    chosen = threshold if threshold is not None else run.threshold
    if chosen is None:
        raise ConversionError(
            f"{run.path} records no decision threshold ({METRICS_FILE}); give one with --threshold"
        )
    if not 0.0 <= chosen <= 1.0:
        raise ConversionError(f"the threshold must be in 0..1, got {chosen}")
    return chosen


def _run_images(
    run: TrainingRun, quantize: str, calibration_size: int, progress: Progress | None
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Calibration images (int8 only, stratified from train) and the test images."""
    calibration = None
    if quantize == "int8":
        picked = stratified_sample([y for _, y in run.train], calibration_size, seed=run.seed)
        files = tuple(run.train[i] for i in picked)
        if progress:
            progress(f"preprocessing {len(files)} calibration images (stratified from train)")
        calibration, _ = load_images(files, run.recipe, "calibration")
    if progress:
        progress(f"preprocessing {len(run.test)} test images")
    test_images, test_labels = load_images(run.test, run.recipe, "test")
    return calibration, test_images, test_labels


def _convert(
    run: TrainingRun,
    *,
    quantize: str,
    calibration_size: int,
    max_accuracy_drop: float,
    allow_newer_runtime: bool,
    float_fallback: bool,
    progress: Progress | None,
) -> ConversionResult:
    """Preprocess the run's images with the edge's code, then convert its model."""
    calibration, test_images, test_labels = _run_images(run, quantize, calibration_size, progress)
    if progress:
        progress(f"loading {run.model_path}")
    return convert_model(
        load_keras_model(run.model_path),
        labels=run.labels,
        recipe=run.recipe,
        calibration_images=calibration,
        eval_images=test_images,
        eval_labels=test_labels,
        quantize=quantize,
        max_accuracy_drop=max_accuracy_drop,
        allow_newer_runtime=allow_newer_runtime,
        float_fallback=float_fallback,
        progress=progress,
    )


def _write(
    result: ConversionResult,
    run: TrainingRun,
    out_dir: Path,
    *,
    threshold: float,
    model_name: str | None,
    model_version: str | None,
    sign_key: Path | None,
    overwrite: bool,
) -> ConvertedRun:
    """Write the bundle, named after the run folder and the time unless told otherwise."""
    bundle = write_converted_bundle(
        result,
        out_dir,
        model_name=model_name or run.path.resolve().name,
        model_version=model_version or _default_version(),
        threshold=threshold,
        source_run=str(run.path.resolve()),
        training_metrics=run.metrics,
        segmentation=run.segmentation,
        taxa=run.taxa,
        sign_key=sign_key,
        overwrite=overwrite,
    )
    return ConvertedRun(bundle, result)
