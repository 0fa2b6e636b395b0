"""The run folder's one owner, fieldscope.train.rundir: names, format version, readers.

Runs are written by hand here (no TensorFlow, no training): what matters is that every
reader agrees on the files, that an old run still reads, and that a damaged or newer
file is reported with the file and what is wrong, by the reader the user ran.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fieldscope.convert.errors import ConversionError
from fieldscope.convert.run import read_run
from fieldscope.train.rundir import (
    RUN_FORMAT_VERSION,
    MetricsRecord,
    RunDir,
    RunDirError,
    RunSummary,
    write_json,
)

LABELS = ["globigerina", "orbulina"]
RECIPE = {"size": [32, 32], "resize": "letterbox", "denoise": "none"}


def _old_run(run: Path, **record: Any) -> Path:
    """A finished run as fieldscope wrote it before run.json had a format_version."""
    run.mkdir(parents=True)
    (run / "run.json").write_text(
        json.dumps(
            {
                "data_dir": "/data/forams",
                "status": "complete",
                "folds": 0,
                "fold": None,
                "started": "2026-11-01T10:00:00+00:00",
                "updated": "2026-11-01T10:05:00+00:00",
                "versions": {"fieldscope": "0.1.0", "tensorflow": "2.16.1", "keras": "3.3.3"},
                **record,
            }
        )
    )
    (run / "config.json").write_text(json.dumps({"seed": 7, "preprocess": RECIPE, "folds": 0}))
    (run / "labels.json").write_text(json.dumps(LABELS))
    split = {
        "data_dir": "/data/forams",
        "labels": LABELS,
        "seed": 7,
        "ratios": [0.7, 0.15, 0.15],
        "fold": None,
        "folds": None,
        "test_source": "split",
        "train": [{"path": "globigerina/a.png", "label": "globigerina"}],
        "val": [{"path": "orbulina/b.png", "label": "orbulina"}],
        "test": [{"path": "orbulina/c.png", "label": "orbulina"}],
        "skipped": [],
    }
    (run / "split.json").write_text(json.dumps(split))
    metrics = {
        "format_version": 1,
        "labels": LABELS,
        "splits": {"test": {"accuracy": 0.9, "macro_f1": 0.88, "n_samples": 1}},
        "threshold": {"threshold": 0.61, "precision": 0.97, "coverage": 0.8, "reached": True},
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "model.keras").write_bytes(b"not read by read_run")
    return run


def test_a_run_without_format_version_reads_as_format_1(tmp_path: Path) -> None:
    run = RunDir(_old_run(tmp_path / "run"))
    record = run.read_record()
    # Format 1 (one data folder) is still what a run of one folder is written as.
    assert record.format_version == 1
    assert record.roots() == ["/data/forams"]
    assert record.status == "complete"
    assert run.read_labels() == LABELS
    assert run.read_config().seed == 7
    assert [e.path for e in run.read_split().test] == ["orbulina/c.png"]
    assert run.read_metrics().threshold == {
        "threshold": 0.61,
        "precision": 0.97,
        "coverage": 0.8,
        "reached": True,
    }


def test_convert_reads_the_run_through_rundir(tmp_path: Path) -> None:
    run = read_run(_old_run(tmp_path / "run"), data_dir=tmp_path / "moved")
    assert run.labels == tuple(LABELS)
    assert run.threshold == pytest.approx(0.61)
    assert run.seed == 7
    assert run.test == ((tmp_path / "moved" / "orbulina/c.png", 1),)
    assert run.metrics["test_accuracy"] == pytest.approx(0.9)
    assert run.metrics["threshold_precision"] == pytest.approx(0.97)


def test_a_run_of_a_newer_format_is_refused_with_what_to_do(tmp_path: Path) -> None:
    path = _old_run(tmp_path / "run", format_version=RUN_FORMAT_VERSION + 1)
    with pytest.raises(ConversionError) as info:
        read_run(path)
    message = str(info.value)
    assert str(path / "run.json") in message
    assert "upgrade fieldscope" in message


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("split.json", {"data_dir": "/d", "labels": LABELS, "train": [], "val": []}, "`test`"),
        ("split.json", "{not json", "cannot read"),
        ("labels.json", {"a": 1}, "Expected `array`"),
        ("run.json", {"data_dir": "/d", "status": "paused"}, "$.status"),
        ("metrics.json", {"accuracy": 0.9}, "not a fieldscope metrics file"),
        ("config.json", {"seed": "seven", "preprocess": RECIPE}, "$.seed"),
    ],
)
def test_a_damaged_file_is_named_with_what_is_wrong(
    tmp_path: Path, name: str, content: Any, fragment: str
) -> None:
    path = _old_run(tmp_path / "run")
    text = content if isinstance(content, str) else json.dumps(content)
    (path / name).write_text(text)
    with pytest.raises(ConversionError) as info:
        read_run(path)
    message = str(info.value)
    assert str(path / name) in message
    assert fragment in message
    assert "\n" not in message


def test_a_missing_file_names_the_run(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "empty")
    with pytest.raises(RunDirError, match=r"labels\.json is missing \(class names\)"):
        run.read_labels()
    assert run.read_progress() is None


def test_written_records_round_trip(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    summary = RunSummary(
        run_dir=str(tmp_path),
        labels=LABELS,
        accuracy=0.9,
        macro_f1=0.8,
        threshold=0.5,
        threshold_reached=True,
        counts={"train": 1, "val": 1, "test": 1},
        skipped=0,
        seconds=1.5,
    )
    write_json(run.summary_file, summary.__dict__)
    assert run.read_summary() == summary
    metrics = MetricsRecord(format_version=1, labels=LABELS, splits={"test": {"accuracy": 1.0}})
    write_json(run.metrics_file, metrics.to_dict())
    assert "threshold" not in json.loads(run.metrics_file.read_text())
    assert run.read_metrics() == metrics
    assert run.fold(2).path == tmp_path / "fold-2"
    assert run.predictions_file("test").name == "predictions_test.csv"
