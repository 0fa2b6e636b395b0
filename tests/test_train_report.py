"""The run's evaluation report on disk: metrics.json, text report, predictions CSV, plots."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from fieldscope.train.errors import EvaluationError
from fieldscope.train.metrics import ThresholdChoice, choose_threshold
from fieldscope.train.report import (
    load_threshold,
    metrics_from_predictions,
    predictions_path,
    read_metrics,
    read_predictions,
    write_evaluation,
    write_fold_summary,
    write_training_plots,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVALUATION_PLOTS = (
    "confusion_matrix_{split}.png",
    "confusion_matrix_normalized_{split}.png",
    "per_class_accuracy_{split}.png",
    "reliability_{split}.png",
)


def class_names(n: int) -> list[str]:
    # Long names, a comma and a quote: what real species folders look like, and CSV traps.
    names = [f"Globigerina_species_{i}" if i % 3 == 0 else f"sp{i}" for i in range(n)]
    names[-1] = 'Genus "x", sp.'
    return names


def predictions(n_classes: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A plausible classifier: right most of the time, every class present."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.arange(n_classes), rng.integers(0, n_classes, size=n - n_classes)]
    logits = rng.normal(0.0, 1.0, size=(n, n_classes))
    logits[np.arange(n), y] += 2.5
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return y, probs.astype(np.float32)


def assert_png(path: Path, *, min_side: int = 300, max_side: int = 3000) -> tuple[int, int]:
    """A real, non-blank PNG of a readable size; returns (height, width)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert 5_000 < len(data) < 5_000_000, (path, len(data))
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    height, width = image.shape[:2]
    assert min_side <= height <= max_side, (path, height)
    assert min_side <= width <= max_side, (path, width)
    assert image.std() > 5, f"{path} looks blank"
    return height, width


def evaluate_run(run: Path, n_classes: int) -> tuple[ThresholdChoice, dict[str, object]]:
    labels = class_names(n_classes)
    y_val, p_val = predictions(n_classes, 120, seed=1)
    y_test, p_test = predictions(n_classes, 150, seed=2)
    choice = choose_threshold(y_val, p_val, target_precision=0.9)
    write_evaluation(run, y_val, p_val, labels, split="val", threshold=choice)
    files = [f"data/{labels[c]}/{i:04d}.png" for i, c in enumerate(y_test)]
    test = write_evaluation(
        run, y_test, p_test, labels, split="test", threshold=choice, file_paths=files
    )
    return choice, test


@pytest.fixture(scope="module", params=[2, 12], ids=["2-classes", "12-classes"])
def evaluated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    run = tmp_path_factory.mktemp(f"run{request.param}")
    choice, test = evaluate_run(run, request.param)
    return run, request.param, choice, test


# --------------------------------------------------------------------------- write_evaluation


def test_every_evaluation_artefact_is_written(evaluated) -> None:
    run, _, _, _ = evaluated
    assert (run / "metrics.json").is_file()
    assert (run / "classification_report.txt").is_file()
    for split in ("val", "test"):
        assert predictions_path(run, split).is_file()
        for pattern in EVALUATION_PLOTS:
            assert_png(run / "plots" / pattern.format(split=split))
    assert_png(run / "plots" / "precision_coverage.png")
    if "matplotlib.pyplot" in sys.modules:  # nothing may be left open in pyplot's registry
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_metrics_json_structure(evaluated) -> None:
    run, n_classes, choice, test = evaluated
    doc = json.loads((run / "metrics.json").read_text())
    assert doc["format_version"] == 1
    assert doc["labels"] == class_names(n_classes)
    assert list(doc["splits"]) == ["val", "test"]
    assert doc["splits"]["test"] == test
    assert doc["threshold"]["threshold"] == choice.threshold
    assert doc["threshold"]["target_precision"] == 0.9
    assert len(doc["splits"]["val"]["confusion_matrix"]) == n_classes
    # How the validation threshold holds up on test is recorded with the test metrics.
    assert 0.0 < test["at_threshold"]["coverage"] <= 1.0
    assert load_threshold(run) == choice


def test_metrics_recomputed_from_saved_predictions_equal_metrics_json(evaluated) -> None:
    run, _, _, _ = evaluated
    doc = read_metrics(run)
    threshold = doc["threshold"]["threshold"]
    for split in ("val", "test"):
        recomputed = metrics_from_predictions(predictions_path(run, split), threshold=threshold)
        assert recomputed == doc["splits"][split]


def test_predictions_csv_columns(evaluated) -> None:
    run, n_classes, _, _ = evaluated
    labels = class_names(n_classes)
    with predictions_path(run, "test").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 150
    assert list(rows[0])[:5] == ["file", "true_label", "predicted_label", "score", "correct"]
    assert list(rows[0])[5:] == [f"prob_{name}" for name in labels]
    for row in rows:
        probs = [float(row[f"prob_{name}"]) for name in labels]
        assert row["predicted_label"] == labels[int(np.argmax(probs))]
        assert float(row["score"]) == max(probs)
        assert row["correct"] == str(int(row["predicted_label"] == row["true_label"]))
        assert row["file"].startswith(f"data/{row['true_label']}/")
    read = read_predictions(predictions_path(run, "test"))
    assert read.labels == tuple(labels)
    assert read.probs.shape == (150, n_classes)


def test_text_report_has_one_section_per_split(evaluated) -> None:
    run, n_classes, _, _ = evaluated
    text = (run / "classification_report.txt").read_text()
    assert text.count("== split: val ==") == 1
    assert text.count("== split: test ==") == 1
    assert text.index("== split: val ==") < text.index("== split: test ==")
    assert class_names(n_classes)[0] in text


def test_confusion_matrix_figure_grows_with_the_class_count(evaluated, tmp_path: Path) -> None:
    run, n_classes, _, _ = evaluated
    height, width = assert_png(run / "plots" / "confusion_matrix_test.png")
    if n_classes == 12:
        small = tmp_path / "small"
        evaluate_run(small, 2)
        small_height, small_width = assert_png(small / "plots" / "confusion_matrix_test.png")
        assert width > small_width
        assert height > small_height


def test_evaluating_a_split_again_replaces_it_and_keeps_the_others(tmp_path: Path) -> None:
    labels = ["a", "b", "c"]
    y, probs = predictions(3, 40, seed=5)
    uninformed = np.full((40, 3), 1 / 3)  # always predicts "a"
    write_evaluation(tmp_path, y, uninformed, labels, split="val")
    write_evaluation(tmp_path, y, probs, labels, split="test")
    perfect = np.eye(3)[y]
    again = write_evaluation(tmp_path, y, perfect, labels, split="test")
    doc = read_metrics(tmp_path)
    assert again["accuracy"] == 1.0
    assert doc["splits"]["test"]["accuracy"] == 1.0
    assert doc["splits"]["val"]["accuracy"] < 1.0
    assert "threshold" not in doc
    assert "at_threshold" not in doc["splits"]["test"]
    text = (tmp_path / "classification_report.txt").read_text()
    assert text.count("== split: test ==") == 1
    assert text.count("== split: val ==") == 1
    assert metrics_from_predictions(predictions_path(tmp_path, "test")) == again


def test_fold_summary_is_merged(tmp_path: Path) -> None:
    labels = ["a", "b"]
    folds = []
    for seed in range(3):
        y, probs = predictions(2, 30, seed=seed)
        folds.append(write_evaluation(tmp_path, y, probs, labels, split=f"fold{seed}"))
    summary = write_fold_summary(tmp_path, folds)
    doc = read_metrics(tmp_path)
    assert doc["folds"] == summary
    assert summary["metrics"]["accuracy"]["values"] == [f["accuracy"] for f in folds]
    assert list(doc["splits"]) == ["fold0", "fold1", "fold2"]
    text = (tmp_path / "classification_report.txt").read_text()
    assert "== cross-validation ==" in text
    assert "accuracy:" in text.split("== cross-validation ==")[1]


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_write_nothing(tmp_path: Path) -> None:
    labels = ["a", "b", "c"]
    y, probs = predictions(3, 20, seed=0)
    cases = [
        (lambda: write_evaluation(tmp_path, y, probs[:, :2], labels), "2 columns but there are 3"),
        (lambda: write_evaluation(tmp_path, y + 1, probs, labels), "is not a class index 0..2"),
        (lambda: write_evaluation(tmp_path, [], np.zeros((0, 3)), labels), "no predictions"),
        (lambda: write_evaluation(tmp_path, y, probs, labels, split="../x"), "split name"),
        (lambda: write_evaluation(tmp_path, y, probs, labels, file_paths=["a.png"]), "1 entries"),
    ]
    for call, fragment in cases:
        with pytest.raises(EvaluationError) as info:
            call()
        assert fragment in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_labels_must_match_the_run(tmp_path: Path) -> None:
    y, probs = predictions(3, 20, seed=0)
    write_evaluation(tmp_path, y, probs, ["a", "b", "c"], split="val")
    with pytest.raises(EvaluationError, match="one label order"):
        write_evaluation(tmp_path, y, probs, ["c", "b", "a"], split="test")
    assert list(read_metrics(tmp_path)["splits"]) == ["val"]


def test_damaged_metrics_json_is_reported(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text("{not json")
    y, probs = predictions(3, 20, seed=0)
    with pytest.raises(EvaluationError, match="cannot read"):
        write_evaluation(tmp_path, y, probs, ["a", "b", "c"])
    (tmp_path / "metrics.json").write_text('{"accuracy": 0.9}')
    with pytest.raises(EvaluationError, match="not a fieldscope metrics file"):
        read_metrics(tmp_path)
    with pytest.raises(EvaluationError, match=r"no metrics\.json"):
        read_metrics(tmp_path / "elsewhere")


def test_a_file_that_is_not_a_predictions_csv_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "predictions_test.csv"
    bad.write_text("path,label\nx.png,a\n")
    with pytest.raises(EvaluationError, match="not a fieldscope predictions file"):
        metrics_from_predictions(bad)
    with pytest.raises(EvaluationError, match="no predictions file"):
        metrics_from_predictions(tmp_path / "missing.csv")


# --------------------------------------------------------------------------- training plots


def specimen(label: int, angle: float) -> np.ndarray:
    """A microscope-like RGB image drawn with OpenCV: a tinted disc on a light field."""
    image = np.full((96, 96, 3), 225, dtype=np.uint8)
    color = [(40, 90, 160), (160, 60, 60), (60, 140, 70)][label % 3]
    axes = (30, 18) if label % 2 else (24, 24)
    cv2.ellipse(image, (48, 48), axes, angle, 0, 360, color, thickness=-1)
    cv2.circle(image, (48, 48), 6, (20, 20, 20), thickness=-1)
    return image


def two_stage_history(validation: bool = True) -> dict[str, dict[str, list[float]]]:
    head = {"loss": [1.4, 1.0, 0.8, 0.7], "accuracy": [0.4, 0.6, 0.7, 0.75]}
    tune = {"loss": [0.6, 0.5, 0.45], "accuracy": [0.8, 0.85, 0.88]}
    if validation:
        head |= {"val_loss": [1.5, 1.1, 0.95, 0.9], "val_accuracy": [0.35, 0.55, 0.62, 0.66]}
        tune |= {"val_loss": [0.85, 0.84, 0.86], "val_accuracy": [0.7, 0.72, 0.71]}
    return {"head": head, "fine-tune": tune}


def test_every_training_plot_is_written(tmp_path: Path) -> None:
    labels = class_names(12)
    counts = {
        split: {name: scale * (i + 2) for i, name in enumerate(labels)}
        for split, scale in (("train", 7), ("val", 2), ("test", 2))
    }
    schedule = {
        "head": [1e-3] * 40,
        "fine-tune": list(1e-5 * 0.5 * (1 + np.cos(np.linspace(0, np.pi, 30)))),
    }
    samples = [(specimen(i, 20.0 * i), labels[i % 12]) for i in range(16)]
    written = write_training_plots(tmp_path, two_stage_history(), schedule, counts, samples)
    names = sorted(p.name for p in written)
    assert names == [
        "augmented_samples.png",
        "class_distribution.png",
        "generalization_gap.png",
        "learning_rate.png",
        "training_curves.png",
    ]
    for path in written:
        assert path.parent == tmp_path / "plots"
        assert_png(path)


def test_training_plots_without_validation_or_schedule(tmp_path: Path) -> None:
    history = two_stage_history(validation=False)
    history["head"]["learning_rate"] = [1e-3] * 4
    history["fine-tune"]["learning_rate"] = [1e-5, 5e-6, 1e-6]
    written = write_training_plots(tmp_path, history)
    assert sorted(p.name for p in written) == ["learning_rate.png", "training_curves.png"]
    assert not (tmp_path / "plots" / "generalization_gap.png").exists()
    for path in written:
        assert_png(path)


def test_training_plots_reject_bad_inputs(tmp_path: Path) -> None:
    float_image = specimen(0, 0.0).astype(np.float32)
    with pytest.raises(EvaluationError, match="expected uint8"):
        write_training_plots(tmp_path, two_stage_history(), augmented_samples=[(float_image, "a")])
    uneven = {"head": {"loss": [1.0, 0.9], "val_loss": [1.0]}}
    with pytest.raises(EvaluationError, match="different lengths"):
        write_training_plots(tmp_path, uneven)
    with pytest.raises(EvaluationError, match="no epochs"):
        write_training_plots(tmp_path, {"head": {"loss": []}})
    with pytest.raises(EvaluationError, match="count of 'a'"):
        write_training_plots(
            tmp_path, two_stage_history(), class_counts_per_split={"train": {"a": -1}}
        )


def test_run_summary_says_once_how_the_threshold_was_chosen() -> None:
    """It printed "0.9000 (target not reached) (chosen on validation)"."""
    from fieldscope.train.pipeline import RunSummary

    summary = RunSummary(
        run_dir="runs/x", labels=["a", "b"], accuracy=0.5, macro_f1=0.4, threshold=0.9,
        threshold_reached=False, counts={"train": 10}, skipped=0, seconds=3.0,
    )  # fmt: skip
    line = summary.lines()[1]
    assert line == (
        "decision threshold 0.9000 (chosen on validation; its target precision was not reached)"
    )
    reached = dataclasses.replace(summary, threshold_reached=True)
    assert reached.lines()[1] == "decision threshold 0.9000 (chosen on validation)"
