"""``fieldscope train DATA [DATA ...]``: several data folders merged by class name.

What a user relies on: a class may come from several folders, two folders' files never
collide, the split is stratified over the union and reproduced from split.json, the run
records every folder (and an old run of one folder still reads), the segmentation files
of all folders agree or the error names them, and a missing or empty folder is named.
No TensorFlow here: discovery, split and the run files are pure.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import run_main

from fieldscope.convert.errors import ConversionError
from fieldscope.convert.run import read_run
from fieldscope.edge.errors import ConfigError
from fieldscope.train.data import DataSplit, read_split, split_dataset
from fieldscope.train.errors import TrainError
from fieldscope.train.roots import discover_roots
from fieldscope.train.rundir import RunDir, SplitRecord
from fieldscope.train.segmentation import find_segmentation


def _dataset(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            path = root / name / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng([seed, c, i]).integers(0, 256, (8, 8, 3), np.uint8)
            assert cv2.imwrite(str(path), pixels)
    return root


def test_classes_merge_by_folder_name_and_files_keep_their_folder(tmp_path: Path) -> None:
    original = _dataset(tmp_path / "original", {"aedes": 10, "culex": 10})
    field = _dataset(tmp_path / "field", {"culex": 4, "anopheles": 3}, seed=1)
    index = discover_roots([original, field])
    assert index.labels == ("aedes", "anopheles", "culex")
    assert index.all_roots == (original.resolve(), field.resolve())
    assert index.counts()["all"] == {"aedes": 10, "anopheles": 3, "culex": 14}
    # The same file name in two folders is two images.
    culex = index.labels.index("culex")
    names = [s.path for s in index.parts["all"] if s.label == culex and s.path.name == "000.png"]
    assert sorted(names) == [
        field.resolve() / "culex/000.png",
        original.resolve() / "culex/000.png",
    ]


def test_the_split_is_stratified_over_the_union_and_written_with_every_folder(
    tmp_path: Path,
) -> None:
    original = _dataset(tmp_path / "original", {"aedes": 20, "culex": 20})
    field = _dataset(tmp_path / "field", {"culex": 20}, seed=1)
    index = discover_roots([original, field])
    split = split_dataset(index, (0.5, 0.25, 0.25), seed=3)
    counts = split.counts()
    assert counts["test"] == {"aedes": 5, "culex": 10}
    assert counts["train"] == {"aedes": 10, "culex": 20}
    doc = split.to_dict()
    assert doc["data_dirs"] == [str(original.resolve()), str(field.resolve())]
    assert {e["root"] for e in doc["test"] if e["label"] == "culex"} == {0, 1}
    assert all(not Path(e["path"]).is_absolute() for e in doc["train"])
    run = tmp_path / "run"
    run.mkdir()
    split.write(run)
    again = read_split(run)
    assert again.all_roots == split.all_roots
    assert (again.train, again.val, again.test) == (split.train, split.val, split.test)


def test_one_folder_writes_the_split_as_before(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data", {"aedes": 5, "culex": 5})
    doc = split_dataset(discover_roots([data]), seed=0).to_dict()
    assert "data_dirs" not in doc
    assert all(set(e) == {"path", "label"} for e in doc["train"])


def test_split_folders_keep_their_parts_and_class_folders_join_train(tmp_path: Path) -> None:
    given = tmp_path / "given"
    _dataset(given / "train", {"aedes": 8, "culex": 8})
    _dataset(given / "test", {"aedes": 2, "culex": 2}, seed=2)
    field = _dataset(tmp_path / "field", {"culex": 6}, seed=1)
    index = discover_roots([given, field])
    assert index.presplit
    assert index.counts()["train"] == {"aedes": 8, "culex": 14}
    split = split_dataset(index, (0.7, 0.15, 0.15), seed=0)
    assert split.test_source == "test"
    assert {s.path.parent.parent.parent for s in split.test} == {given.resolve()}
    field_files = {s.path for s in index.parts["train"] if field.resolve() in s.path.parents}
    assert field_files <= {s.path for s in (*split.train, *split.val)}


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda t: t / "absent", "does not exist"),
        (lambda t: (t / "empty" / "culex").mkdir(parents=True) or t / "empty", "no images found"),
    ],
    ids=["missing", "empty"],
)
def test_a_missing_or_empty_folder_is_named(tmp_path: Path, make: object, fragment: str) -> None:
    good = _dataset(tmp_path / "good", {"aedes": 3, "culex": 3})
    bad = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(TrainError) as info:
        discover_roots([good, bad])
    assert fragment in str(info.value)
    assert str(bad.name) in str(info.value)


def test_a_folder_given_twice_or_inside_another_is_refused(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data", {"aedes": 3, "culex": 3})
    with pytest.raises(TrainError, match="given twice"):
        discover_roots([data, tmp_path / "data" / ".." / "data"])
    outer = tmp_path / "outer"
    _dataset(outer, {"aedes": 2})
    inner = _dataset(outer / "more", {"culex": 2})
    with pytest.raises(TrainError, match="inside data folder"):
        discover_roots([outer, inner])


def test_one_class_over_all_folders_is_refused_naming_them(tmp_path: Path) -> None:
    a = _dataset(tmp_path / "a", {"culex": 3})
    b = _dataset(tmp_path / "b", {"culex": 3}, seed=1)
    with pytest.raises(TrainError, match="only one class") as info:
        discover_roots([a, b])
    assert str(a.resolve()) in str(info.value)
    assert str(b.resolve()) in str(info.value)


def test_a_damaged_root_index_in_split_json_is_named(tmp_path: Path) -> None:
    record = {
        "data_dir": "/a",
        "data_dirs": ["/a", "/b"],
        "labels": ["x"],
        "train": [{"path": "x/1.png", "label": "x", "root": 2}],
        "val": [],
        "test": [],
    }
    (tmp_path / "split.json").write_text(json.dumps(record))
    with pytest.raises(TrainError, match=r"x/1\.png has root 2, but there are 2 data folders"):
        read_split(tmp_path)
    with pytest.raises(TrainError, match="root 2"):
        DataSplit.from_dict(record)


def _hand_made_run(run: Path, split: dict[str, object], **record: object) -> Path:
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"status": "complete", **record}))
    (run / "config.json").write_text(
        json.dumps({"preprocess": {"size": [8, 8], "resize": "stretch", "denoise": "none"}})
    )
    (run / "labels.json").write_text(json.dumps(split["labels"]))
    (run / "split.json").write_text(json.dumps(split))
    (run / "model.keras").write_bytes(b"not read")
    return run


def test_convert_reads_every_folder_and_moves_each_with_data_dir(tmp_path: Path) -> None:
    split = {
        "data_dir": "/a",
        "data_dirs": ["/a", "/b"],
        "labels": ["x", "y"],
        "train": [{"path": "x/1.png", "label": "x"}, {"path": "y/1.png", "label": "y", "root": 1}],
        "val": [],
        "test": [{"path": "y/2.png", "label": "y", "root": 1}],
    }
    path = _hand_made_run(
        tmp_path / "run", split, format_version=2, data_dir="/a", data_dirs=["/a", "/b"]
    )
    assert RunDir(path).read_record().roots() == ["/a", "/b"]
    run = read_run(path)
    assert run.train == ((Path("/a/x/1.png"), 0), (Path("/b/y/1.png"), 1))
    moved = read_run(path, data_dir=[tmp_path / "A", tmp_path / "B"])
    assert moved.test == ((tmp_path / "B" / "y/2.png", 1),)
    with pytest.raises(ConversionError, match="trained on 2 data folder"):
        read_run(path, data_dir=tmp_path / "A")


def test_an_old_split_json_of_one_folder_still_reads(tmp_path: Path) -> None:
    record = SplitRecord(data_dir="/d", labels=["x"], train=[], val=[], test=[])
    assert record.roots() == ["/d"]
    old = {"data_dir": "/d", "labels": ["x"], "train": [{"path": "x/a.png", "label": "x"}]}
    (tmp_path / "split.json").write_text(json.dumps({**old, "val": [], "test": []}))
    assert read_split(tmp_path).train[0].path == Path("/d/x/a.png")


def _settings(folder: Path, min_area: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "segmentation.toml").write_text(
        f'[objects]\nmode = "segment"\nmin_area_um2 = {min_area}\n'
    )


def test_segmentation_files_of_all_folders_must_agree(tmp_path: Path) -> None:
    a = _dataset(tmp_path / "a", {"x": 2})
    b = _dataset(tmp_path / "b", {"y": 2}, seed=1)
    _settings(a, 30)
    _settings(b, 30)
    found = find_segmentation([a, b])
    assert found.record is not None
    assert found.record.objects["min_area_um2"] == 30
    _settings(b, 60)
    with pytest.raises(ConfigError) as info:
        find_segmentation([a, b])
    assert str(a / "segmentation.toml") in str(info.value)
    assert str(b / "segmentation.toml") in str(info.value)


def test_a_folder_without_segmentation_is_named_in_the_warning(tmp_path: Path) -> None:
    a = _dataset(tmp_path / "a", {"x": 2})
    reviewed = _dataset(tmp_path / "reviewed", {"y": 2}, seed=1)
    _settings(a, 30)
    found = find_segmentation([a, reviewed])
    assert found.record is not None
    (warning,) = found.notes[1:]
    assert str(reviewed / "y") in warning


def test_the_command_names_a_missing_folder_before_any_work(tmp_path: Path) -> None:
    good = _dataset(tmp_path / "good", {"aedes": 3, "culex": 3})
    outcome = run_main(["train", str(good), str(tmp_path / "typo"), "--out", str(tmp_path / "r")])
    assert outcome.code == 2
    assert f"DATA_DIR {tmp_path / 'typo'} does not exist" in outcome.err
    assert not (tmp_path / "r").exists()
