"""Data discovery, the seeded split, the preprocessing cache and the bad-data errors.

Images are real PNG/JPEG files written with OpenCV; preprocessing is the edge's own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest

from fieldscope.cli.main import main
from fieldscope.edge.preprocess import PreprocessRecipe, load_and_preprocess
from fieldscope.train.data import (
    DataSplit,
    PreprocessCache,
    check_split_feasible,
    discover,
    kfold_splits,
    load_images,
    make_dataset,
    split_dataset,
)
from fieldscope.train.errors import TrainError


def _image(path: Path, seed: int, size: tuple[int, int] = (40, 56)) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), pixels)
    return path


def _dataset(root: Path, counts: dict[str, int], suffix: str = ".png") -> Path:
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            _image(root / name / f"{name}_{i:03d}{suffix}", seed=100 * c + i)
    return root


def _names(samples: Sequence[object]) -> list[str]:
    return [s.path.name for s in samples]  # type: ignore[attr-defined]


def test_discovery_finds_classes_and_ignores_hidden_and_non_image_files(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", {"b_species": 3, "a_species": 2})
    _image(root / "a_species" / "nested" / "deep.jpg", seed=9)
    _image(root / "a_species" / ".hidden.png", seed=10)
    _image(root / ".thumbnails" / "x.png", seed=11)
    (root / "a_species" / "notes.txt").write_text("not an image")
    (root / "b_species" / "Thumbs.db").write_bytes(b"\0\1")
    (root / "README.md").write_text("dataset")

    index = discover(root)
    assert index.labels == ("a_species", "b_species")
    assert not index.presplit
    names = sorted(_names(index.samples()))
    assert names == sorted(
        [
            "a_species_000.png",
            "a_species_001.png",
            "deep.jpg",
            "b_species_000.png",
            "b_species_001.png",
            "b_species_002.png",
        ]
    )
    assert index.counts()["all"] == {"a_species": 3, "b_species": 3}


def test_presplit_folders_are_kept_and_a_missing_val_is_carved_from_train(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _dataset(root / "train", {"x": 10, "y": 10})
    _dataset(root / "test", {"x": 2, "y": 1})
    index = discover(root)
    assert index.presplit
    split = split_dataset(index, (0.7, 0.15, 0.15), seed=0)
    assert len(split.test) == 3
    assert {s.path.parent.parent.name for s in split.test} == {"test"}
    assert len(split.val) >= 2
    assert {s.label for s in split.val} == {0, 1}
    assert len(split.train) + len(split.val) == 20
    assert not set(split.train) & set(split.val)


def test_a_given_val_without_test_trains_on_every_train_image(tmp_path: Path) -> None:
    """train/ + val/: nothing is carved from train/; the test report is on val/."""
    root = tmp_path / "data"
    _dataset(root / "train", {"x": 10, "y": 10})
    _dataset(root / "val", {"x": 3, "y": 2})
    split = split_dataset(discover(root), (0.7, 0.15, 0.15), seed=0)
    assert len(split.train) == 20
    assert {s.path.parent.parent.name for s in split.val} == {"val"}
    assert split.test == split.val
    assert split.test_source == "val"
    again = type(split).from_dict(json.loads(json.dumps(split.to_dict())))
    assert again.test_source == "val"
    # Only train/: val and test are carved, as before.
    only = tmp_path / "only"
    _dataset(only / "train", {"x": 10, "y": 10})
    carved = split_dataset(discover(only), (0.7, 0.15, 0.15), seed=0)
    assert carved.test_source == "split"
    assert len(carved.train) < 20


def test_split_is_stratified_seeded_and_reproducible(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", {"a": 20, "b": 40, "c": 7})
    index = discover(root)
    first = split_dataset(index, (0.7, 0.15, 0.15), seed=3)
    again = split_dataset(discover(root), (0.7, 0.15, 0.15), seed=3)
    other = split_dataset(index, (0.7, 0.15, 0.15), seed=4)
    assert first.to_dict() == again.to_dict()
    assert first.to_dict()["test"] != other.to_dict()["test"]
    counts = first.counts()
    assert counts["test"] == {"a": 3, "b": 6, "c": 1}
    assert counts["val"] == {"a": 3, "b": 6, "c": 1}
    assert counts["train"] == {"a": 14, "b": 28, "c": 5}
    every = [*first.train, *first.val, *first.test]
    assert sorted(every) == sorted(index.samples())

    # A new class does not move the other classes' files between splits.
    _dataset(root, {"a": 0, "b": 0, "c": 0, "d": 5})
    grown = split_dataset(discover(root), (0.7, 0.15, 0.15), seed=3)
    assert sorted(_names(grown.test))[: len(first.test)] == sorted(_names(first.test))


def test_split_round_trips_through_json(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", {"a": 5, "b": 5})
    split = split_dataset(discover(root), (0.6, 0.2, 0.2), seed=1)
    again = DataSplit.from_dict(split.to_dict())
    assert again == split
    assert all(s.path.is_file() for s in again.train)


def test_kfold_tests_every_image_exactly_once(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", {"a": 9, "b": 6})
    folds = kfold_splits(discover(root), 3, (0.7, 0.15, 0.15), seed=0)
    tested = [s for f in folds for s in f.test]
    assert sorted(tested) == sorted(discover(root).samples())
    for f in folds:
        assert not (set(f.train) | set(f.val)) & set(f.test)
        assert f.counts()["test"] == {"a": 3, "b": 2}
        assert min(f.counts()["val"].values()) >= 1


def test_too_few_images_names_the_class_and_its_count(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", {"big": 10, "tiny": 2})
    with pytest.raises(TrainError) as info:
        check_split_feasible(discover(root), (0.7, 0.15, 0.15))
    message = str(info.value)
    assert "'tiny' has 2 images" in message
    assert "needs at least 3 per class" in message
    assert "'big'" not in message
    with pytest.raises(TrainError, match=r"'tiny' has 2 images.*5-fold"):
        check_split_feasible(discover(root), (0.7, 0.15, 0.15), folds=5)


def test_cache_holds_exactly_the_edge_preprocessing(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", {"a": 3, "b": 3}, suffix=".jpg")
    recipe = PreprocessRecipe(size=(32, 32), denoise="bilateral", resize="letterbox")
    cache = PreprocessCache(tmp_path / "cache", recipe)
    index = discover(root)
    loaded = load_images(index.samples(), cache)
    assert loaded.images.dtype == np.uint8
    assert loaded.images.shape == (6, 32, 32, 3)
    for sample, pixels in zip(loaded.samples, loaded.images, strict=True):
        edge = load_and_preprocess(sample.path, recipe)
        stored = np.load(cache.path_for(sample.path))
        assert np.array_equal(stored, edge)
        assert np.array_equal(pixels, edge)

    # An edited image is preprocessed again, never served stale from the cache.
    path = loaded.samples[0].path
    before = cache.load(path)
    _image(path, seed=999)
    os.utime(path, ns=(1, 1))
    after = cache.load(path)
    assert not np.array_equal(before, after)
    assert np.array_equal(after, load_and_preprocess(path, recipe))

    # Another recipe never reads this recipe's entries.
    other = PreprocessCache(tmp_path / "cache", PreprocessRecipe(size=(32, 32)))
    assert other.path_for(path) != cache.path_for(path)


def test_unreadable_images_are_skipped_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _dataset(tmp_path / "data", {"a": 3, "b": 3})
    broken = root / "a" / "broken.png"
    broken.write_bytes(_image(tmp_path / "whole.png", seed=5).read_bytes()[:60])
    cache = PreprocessCache(tmp_path / "cache", PreprocessRecipe(size=(16, 16)))
    with caplog.at_level("WARNING"):
        loaded = load_images(discover(root).samples(), cache)
    assert [s.path for s in loaded.skipped] == [broken]
    assert len(loaded.samples) == 6
    assert "broken.png" in caplog.text


def test_dataset_batches_float_pixels_and_reshuffles_each_epoch() -> None:
    images = np.arange(20 * 4 * 4 * 3, dtype=np.uint32).reshape(20, 4, 4, 3).astype(np.uint8)
    labels = np.arange(20, dtype=np.int32)
    ds = make_dataset(images, labels, batch_size=8, shuffle_seed=0)
    epochs = [np.concatenate([y.numpy() for _, y in ds]) for _ in range(2)]
    assert sorted(epochs[0]) == list(range(20))
    assert not np.array_equal(epochs[0], epochs[1])
    x, y = next(iter(ds))
    assert x.dtype.name == "float32"
    assert np.array_equal(x.numpy(), images[y.numpy()].astype(np.float32))
    plain = np.concatenate([y.numpy() for _, y in make_dataset(images, labels, batch_size=8)])
    assert np.array_equal(plain, labels)


# --- bad data through the command line: exit 2 and one line -------------------------


def _train_cli(data: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(
        [
            "train",
            str(data),
            "--out",
            str(out),
            "--backbone",
            "mobilenet_v2",
            "--weights",
            "none",
            "--image-size",
            "32",
            "--alpha",
            "0.35",
        ]
    )
    err = capsys.readouterr().err
    return code, err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("fieldscope train: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    ("counts", "needle"),
    [
        ({}, "no images found in"),
        ({"only": 5}, "only one class found in"),
        ({"a": 6, "b": 1}, "'b' has 1 image;"),
    ],
)
def test_bad_data_folders_give_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], counts: dict[str, int], needle: str
) -> None:
    data = _dataset(tmp_path / "data", counts)
    data.mkdir(exist_ok=True)
    code, err = _train_cli(data, tmp_path / "run", capsys)
    assert code == 2
    assert needle in _one_error_line(err)


def test_missing_data_dir_and_images_without_class_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _train_cli(tmp_path / "nowhere", tmp_path / "run", capsys)
    assert code == 2
    assert "does not exist" in _one_error_line(err)
    _image(tmp_path / "flat" / "one.png", seed=1)
    code, err = _train_cli(tmp_path / "flat", tmp_path / "run", capsys)
    assert code == 2
    assert "no class folders" in _one_error_line(err)


def test_out_must_be_a_new_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _dataset(tmp_path / "data", {"a": 4, "b": 4})
    out = tmp_path / "run"
    out.mkdir()
    (out / "something.txt").write_text("keep me")
    code, err = _train_cli(data, out, capsys)
    assert code == 2
    assert "not an empty folder" in _one_error_line(err)
    assert (out / "something.txt").read_text() == "keep me"
