"""End to end: ``fieldscope train`` on the synthetic specimens, then evaluate and resume.

One tiny run (MobileNetV2 alpha 0.35 at 48x48, weights none, eager, 2+1 epochs) is
shared by the module; the other tests train their own only where they must (resume,
folds). The numbers are not asserted to be good — a from-scratch model on 18 images is
not — only that everything a user and the convert step rely on is there and consistent.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from helpers import CliOutcome, run_main

from fieldscope.cli.main import main
from fieldscope.edge.preprocess import PreprocessRecipe, load_and_preprocess
from fieldscope.edge.specimens import write_dataset
from fieldscope.train.config import TrainConfig
from fieldscope.train.data import PreprocessCache, discover, read_split, split_dataset
from fieldscope.train.fit import StageResult
from fieldscope.train.pipeline import train_run
from fieldscope.train.report import metrics_from_predictions, predictions_path, read_predictions

pytestmark = pytest.mark.slow

TINY = [
    "--backbone", "mobilenet_v2", "--weights", "none", "--alpha", "0.35", "--image-size", "48",
    "--batch-size", "8",
    "--run-eagerly", "--fine-tune-layers", "20",
]  # fmt: skip


@pytest.fixture(scope="session")
def specimens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 species x 10 images, plus one truncated PNG among them."""
    root = tmp_path_factory.mktemp("specimens") / "data"
    write_dataset(root, classes=3, per_class=10, size=64, seed=0)
    first = sorted(p for p in root.iterdir() if p.is_dir())[0]
    good = sorted(first.glob("*.png"))[0].read_bytes()
    (first / "broken.png").write_bytes(good[: len(good) // 2])
    return root


@pytest.fixture(scope="module")
def run(specimens: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CliOutcome]:
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    outcome = run_main(
        ["train", str(specimens), "--out", str(run_dir), *TINY, "--epochs", "2",
         "--fine-tune-epochs", "1", "--denoise", "median", "--denoise-param", "ksize=3"]
    )  # fmt: skip
    assert outcome.code == 0, outcome.err
    return run_dir, outcome


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _recipe(run_dir: Path) -> PreprocessRecipe:
    return PreprocessRecipe.from_dict(_json(run_dir / "config.json")["preprocess"])


def test_run_dir_has_every_artefact(run: tuple[Path, CliOutcome], specimens: Path) -> None:
    run_dir, outcome = run
    for name in (
        "model.keras", "labels.json", "config.json", "split.json", "history.json",
        "metrics.json", "classification_report.txt", "predictions_val.csv",
        "predictions_test.csv", "summary.json", "run.json",
    ):  # fmt: skip
        assert (run_dir / name).is_file(), name
    plots = {p.name for p in (run_dir / "plots").glob("*.png")}
    assert {
        "class_distribution.png", "augmented_samples.png", "training_curves.png",
        "generalization_gap.png", "learning_rate.png", "confusion_matrix_test.png",
        "confusion_matrix_normalized_test.png", "per_class_accuracy_test.png",
        "precision_coverage.png",
    } <= plots  # fmt: skip
    assert not (run_dir / "state").exists(), "the resumable state is removed when done"

    labels = _json(run_dir / "labels.json")
    assert labels == sorted(p.name for p in specimens.iterdir())
    config = _json(run_dir / "config.json")
    assert TrainConfig.from_dict(config).backbone == "mobilenet_v2"
    assert (
        config["preprocess"]
        == PreprocessRecipe(size=(48, 48), denoise="median", denoise_params={"ksize": 3}).to_dict()
    )

    history = _json(run_dir / "history.json")
    assert list(history["stages"]) == ["head", "fine-tune"]
    assert len(history["stages"]["head"]["val_loss"]) == 2
    assert len(history["stages"]["fine-tune"]["val_loss"]) == 1
    steps = 3  # 18 training images in batches of 8
    assert len(history["lr_schedule_per_step"]["head"]) == 2 * steps
    assert [StageResult(**r).stage for r in history["stage_results"]] == [1, 2]

    metrics = _json(run_dir / "metrics.json")
    assert set(metrics["splits"]) == {"val", "test"}
    threshold = metrics["threshold"]["threshold"]
    assert 0.0 < threshold <= 1.0
    summary = _json(run_dir / "summary.json")
    assert summary["accuracy"] == metrics["splits"]["test"]["accuracy"]
    assert summary["threshold"] == threshold
    assert summary["skipped"] == 1

    # The closing summary a user reads.
    assert f"test accuracy {summary['accuracy']:.3f}" in outcome.out
    assert f"macro-F1 {summary['macro_f1']:.3f}" in outcome.out
    assert f"decision threshold {threshold:.4f}" in outcome.out
    assert f"run dir: {run_dir}" in outcome.out
    assert "skipped unreadable: 1" in outcome.out
    assert "stage 1 (head): 2 epochs" in outcome.err
    assert "stage 2 (fine-tune): 1 epochs" in outcome.err


def test_metrics_match_a_recomputation_from_the_saved_predictions(
    run: tuple[Path, CliOutcome],
) -> None:
    run_dir, _ = run
    metrics = _json(run_dir / "metrics.json")
    threshold = metrics["threshold"]["threshold"]
    for split in ("val", "test"):
        again = metrics_from_predictions(predictions_path(run_dir, split), threshold=threshold)
        assert json.loads(json.dumps(again)) == metrics["splits"][split], split


def test_training_pixels_are_the_edge_pixels_bit_for_bit(run: tuple[Path, CliOutcome]) -> None:
    run_dir, _ = run
    recipe = _recipe(run_dir)
    cache = PreprocessCache(run_dir / "cache", recipe)
    split = read_split(run_dir)
    files = [s.path for s in (*split.train, *split.val, *split.test)]
    assert len(files) == 30
    for path in files:
        cached = np.load(cache.path_for(path), allow_pickle=False)
        assert np.array_equal(cached, load_and_preprocess(path, recipe)), path


def test_saved_model_gives_the_saved_probabilities_on_edge_pixels(
    run: tuple[Path, CliOutcome],
) -> None:
    run_dir, _ = run
    model = keras.models.load_model(run_dir / "model.keras")
    recipe = _recipe(run_dir)
    saved = read_predictions(predictions_path(run_dir, "test"))
    root = read_split(run_dir).root
    pixels = np.stack([load_and_preprocess(root / f, recipe) for f in saved.file_paths])
    # Raw uint8 RGB straight from the edge's preprocessing: no scaling outside the model.
    probs = keras.ops.convert_to_numpy(model(pixels.astype("float32"), training=False))
    np.testing.assert_allclose(probs, saved.probs, atol=1e-5)


def test_split_is_disjoint_complete_and_reproduced_by_its_seed(
    run: tuple[Path, CliOutcome], specimens: Path
) -> None:
    run_dir, _ = run
    split = read_split(run_dir)
    parts = [set(split.train), set(split.val), set(split.test)]
    assert sum(len(p) for p in parts) == len(set().union(*parts))
    broken = [s.path.name for s in split.skipped]
    assert broken == ["broken.png"]
    assert "truncated" in split.skipped[0].reason or "corrupt" in split.skipped[0].reason
    index = discover(specimens).without(s.path for s in split.skipped)
    assert set().union(*parts) == set(index.samples())
    config = TrainConfig.from_dict(_json(run_dir / "config.json"))
    again = split_dataset(index, config.split, seed=config.seed, skipped=split.skipped)
    assert again.to_dict() == split.to_dict()


def test_evaluate_rewrites_the_report(
    run: tuple[Path, CliOutcome], specimens: Path, tmp_path: Path
) -> None:
    run_dir, _ = run
    before = _json(run_dir / "metrics.json")
    outcome = run_main(["evaluate", str(run_dir)])
    assert outcome.code == 0, outcome.err
    assert "test: 6 images" in outcome.out
    after = _json(run_dir / "metrics.json")
    assert after["splits"]["test"] == before["splits"]["test"]

    # Any folder of (some of) the run's classes, scored as a separate split.
    other = tmp_path / "field-samples"
    labels = _json(run_dir / "labels.json")
    shutil.copytree(specimens / labels[1], other / labels[1])
    outcome = run_main(["evaluate", str(run_dir), str(other)])
    assert outcome.code == 0, outcome.err
    metrics = _json(run_dir / "metrics.json")
    assert metrics["splits"]["eval"]["n_samples"] == 10
    assert metrics["splits"]["test"] == before["splits"]["test"]
    assert (
        metrics_from_predictions(predictions_path(run_dir, "eval"), threshold=None)["accuracy"]
        == metrics["splits"]["eval"]["accuracy"]
    )

    (other / "unknown_species").mkdir()
    shutil.copy(next((other / labels[1]).glob("*.png")), other / "unknown_species" / "x.png")
    outcome = run_main(["evaluate", str(run_dir), str(other)])
    assert outcome.code == 2
    assert "not trained on: unknown_species" in outcome.err
    assert outcome.err.count("\n") == 1

    outcome = run_main(["evaluate", str(tmp_path)])
    assert outcome.code == 2
    assert "model.keras is missing" in outcome.err


class _StopAfter:
    """A reporter that interrupts the run after a given epoch, like Ctrl-C would."""

    def __init__(self, stage: int, epoch: int) -> None:
        self.at = (stage, epoch)

    def stage_begin(self, *args: Any) -> None:
        pass

    def batch_end(self, *args: Any) -> None:
        pass

    def epoch_end(
        self, stage: int, epoch: int, epochs: int, logs: Mapping[str, float], improved: bool
    ) -> None:
        if (stage, epoch) == self.at:
            raise KeyboardInterrupt

    def stage_end(self, result: StageResult) -> None:
        pass


def test_resume_continues_an_interrupted_run(specimens: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = TrainConfig(
        backbone="mobilenet_v2", weights="none", alpha=0.35, image_size=32, batch_size=8,
        run_eagerly=True,
        epochs=2, fine_tune_epochs=1, fine_tune_layers=20, seed=5,
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        train_run(specimens, run_dir, config, reporter=_StopAfter(stage=1, epoch=1))
    progress = _json(run_dir / "state" / "progress.json")
    assert (progress["stage"], progress["epoch"]) == (1, 1)
    assert (run_dir / "state" / "last.keras").is_file()
    assert not (run_dir / "model.keras").exists()

    outcome = run_main(["train", str(specimens), "--out", str(run_dir), *TINY])
    assert outcome.code == 2
    assert f"--resume {run_dir}" in outcome.err

    # After an epoch the checkpoint holds the weights: the starting weights stay as they were.
    outcome = run_main(["train", "--resume", str(run_dir), "--weights", "imagenet"])
    assert outcome.code == 2
    assert "has trained epochs already, so --weights can no longer change" in outcome.err
    assert _json(run_dir / "config.json")["weights"] == "none"

    # A run.json as fieldscope wrote it before several data folders (and format_version).
    record = _json(run_dir / "run.json")
    del record["data_dirs"], record["format_version"]
    (run_dir / "run.json").write_text(json.dumps(record))

    # More epochs are fine: stage 1 goes on to 3.
    outcome = run_main(["train", "--resume", str(run_dir), "--epochs", "3"])
    assert outcome.code == 0, outcome.err
    assert "resuming after epoch 1" in outcome.err
    history = _json(run_dir / "history.json")
    assert len(history["stages"]["head"]["loss"]) == 3
    assert len(history["stages"]["fine-tune"]["loss"]) == 1
    assert (run_dir / "model.keras").is_file()
    assert _json(run_dir / "run.json")["status"] == "complete"
    assert "test accuracy" in outcome.out

    outcome = run_main(["train", "--resume", str(run_dir)])
    assert outcome.code == 0
    assert "already complete" in outcome.out


def test_a_run_of_two_data_folders_resumes_with_both(specimens: Path, tmp_path: Path) -> None:
    field = tmp_path / "reviewed"
    species = sorted(p.name for p in specimens.iterdir() if p.is_dir())
    for name in species[:2]:  # a second folder of two of the classes, same file names
        (field / name).mkdir(parents=True)
        for image in sorted((specimens / name).glob("*_000[0-3].png")):
            shutil.copyfile(image, field / name / image.name)
    run_dir = tmp_path / "run"
    config = TrainConfig(
        backbone="mobilenet_v2", weights="none", alpha=0.35, image_size=32, batch_size=8,
        run_eagerly=True, epochs=2, fine_tune_epochs=0, seed=5,
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        train_run([specimens, field], run_dir, config, reporter=_StopAfter(stage=1, epoch=1))
    record = _json(run_dir / "run.json")
    roots = [str(specimens.resolve()), str(field.resolve())]
    assert (record["format_version"], record["data_dirs"]) == (2, roots)
    split = read_split(run_dir)
    assert split.all_roots == tuple(Path(r) for r in roots)
    used = {s.path for part in (split.train, split.val, split.test) for s in part}
    assert sum(field.resolve() in p.parents for p in used) == 8

    outcome = run_main(["train", "--resume", str(run_dir)])
    assert outcome.code == 0, outcome.err
    assert "resuming after epoch 1" in outcome.err
    assert _json(run_dir / "run.json")["data_dirs"] == roots
    assert read_split(run_dir).train == split.train


def test_a_run_that_failed_before_its_first_epoch_resumes_with_other_weights(
    specimens: Path, tmp_path: Path
) -> None:
    """The trap a new user met: ImageNet weights fail to load (offline), the half-made
    run folder stays, and neither a new run nor --resume with --weights none was allowed."""
    run_dir = tmp_path / "run"
    bad = tmp_path / "backbone.weights.h5"
    bad.write_bytes(b"not an HDF5 file: as useless as a failed download")
    quick = ["--epochs", "1", "--fine-tune-epochs", "0"]
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(["train", str(specimens), "--out", str(run_dir), *TINY, *quick,
                         "--weights", str(bad)])  # fmt: skip
        except Exception:  # whatever Keras raises for a bad file
            code = None
    assert code != 0
    assert _json(run_dir / "run.json")["status"] == "training"
    assert f"fieldscope train --resume {run_dir}" in err.getvalue()
    assert "--overwrite" in err.getvalue()

    # A new run into the same folder says each way out.
    outcome = run_main(["train", str(specimens), "--out", str(run_dir), *TINY, *quick])
    assert outcome.code == 2
    assert f"--resume {run_dir}" in outcome.err
    assert "--overwrite" in outcome.err

    outcome = run_main(["train", "--resume", str(run_dir), "--weights", "none", "--epochs", "1"])
    assert outcome.code == 0, outcome.err
    assert "with --weights none, --epochs 1" in outcome.err
    assert _json(run_dir / "config.json")["weights"] == "none"
    assert _json(run_dir / "run.json")["status"] == "complete"
    assert (run_dir / "model.keras").is_file()

    # A complete run keeps the config its model was trained with.
    outcome = run_main(["train", "--resume", str(run_dir), "--epochs", "5"])
    assert outcome.code == 2
    assert "is complete, so its options can no longer change" in outcome.err
    assert _json(run_dir / "config.json")["epochs"] == 1

    # --overwrite starts over in the same folder.
    outcome = run_main(["train", str(specimens), "--out", str(run_dir), *TINY, *quick,
                    "--seed", "3", "--overwrite"])  # fmt: skip
    assert outcome.code == 0, outcome.err
    assert "removed the earlier run" in outcome.err
    assert _json(run_dir / "config.json")["seed"] == 3


def test_cross_validation_reports_mean_and_sd(specimens: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "cv"
    outcome = run_main(
        ["train", str(specimens), "--out", str(run_dir), *TINY, "--image-size", "32",
         "--folds", "2", "--epochs", "1", "--fine-tune-epochs", "0"]
    )  # fmt: skip
    assert outcome.code == 0, outcome.err
    folds = _json(run_dir / "metrics.json")["folds"]
    assert folds["n_folds"] == 2
    accuracy = folds["metrics"]["accuracy"]
    assert len(accuracy["values"]) == 2
    assert accuracy["mean"] == pytest.approx(np.mean(accuracy["values"]))
    tested = []
    for k in (1, 2):
        fold = run_dir / f"fold-{k}"
        assert (fold / "model.keras").is_file()
        tested += [s.path for s in read_split(fold).test]
    assert len(tested) == len(set(tested)) == 30
    assert "2-fold cross-validation: test accuracy" in outcome.out
    assert "±" in outcome.out


def test_a_fixed_seed_reproduces_the_whole_run(specimens: Path, tmp_path: Path) -> None:
    config = TrainConfig(
        backbone="mobilenet_v2", weights="none", alpha=0.35, image_size=32, batch_size=8,
        run_eagerly=True,
        epochs=1, fine_tune_epochs=0, seed=11,
    )  # fmt: skip
    runs = [tmp_path / "a", tmp_path / "b"]
    for run_dir in runs:
        train_run(specimens, run_dir, config)
    first, second = (read_predictions(predictions_path(r, "test")) for r in runs)
    assert first.file_paths == second.file_paths
    assert np.array_equal(first.probs, second.probs)
    assert _json(runs[0] / "history.json")["stages"] == _json(runs[1] / "history.json")["stages"]
