"""The segmentation settings travel with the crops: ``fieldscope segment`` writes them,
``fieldscope train`` records them in the run, ``fieldscope convert`` in the bundle's
manifest, and a station warns when its own ``[objects]`` table would cut other crops.
"""

from __future__ import annotations

import json
import logging
import shutil
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
from test_convert_cli import make_run

from fieldscope.cli.main import main
from fieldscope.edge.bundle import MANIFEST_FILE, Manifest, manifest_schema, read_bundle
from fieldscope.edge.config import ModelConfig, PreprocessingOverrides
from fieldscope.edge.errors import BundleError, ConfigError
from fieldscope.edge.model_slot import ModelSlot, load_model
from fieldscope.edge.objects import ObjectsSettings, segmentation_differences, settings_table
from fieldscope.edge.segment_cli import load_settings, settings_toml
from fieldscope.edge.specimen_frames import FrameRecipe, write_frames
from fieldscope.train.cli import _segmentation
from fieldscope.train.rundir import RunDir, SegmentationRecord, write_json
from fieldscope.train.segmentation import find_segmentation

WIRE = Path(__file__).parent / "data" / "wire"


@pytest.fixture(scope="module")
def frame_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("frames")
    write_frames(out, 1, seed=3, recipe=FrameRecipe(size=256, separated=3, tile_px=96))
    return out


def test_segment_writes_the_settings_it_used(frame_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "crops"
    argv = ["segment", str(frame_dir), "--out", str(out), "--min-area-um2", "200"]
    flags = ["--um-per-px", "0.65", "--pad-px", "12", "--max-area-um2", "5e4", "--no-drop-border"]
    assert main([*argv, *flags]) == 0
    written = tomllib.loads((out / "segmentation.toml").read_text(encoding="utf-8"))
    expected = ObjectsSettings(
        mode="segment", min_area_um2=200, um_per_px=0.65, pad_px=12, max_area_um2=5e4
    )
    # Every setting spelled out (a later fieldscope's defaults must not change its meaning);
    # only a blank frame's path is absent when there is none (TOML has no null).
    assert written == {"objects": settings_table(expected)}
    assert set(written["objects"]) == set(ObjectsSettings.__struct_fields__) - {"blank"}
    # The file is a config that `fieldscope segment --config` (and a station) reads back.
    assert load_settings(out / "segmentation.toml", {}) == expected


def test_segment_records_a_blank_frame_path(frame_dir: Path, tmp_path: Path) -> None:
    blank = tmp_path / "blank é.png"
    blank.write_bytes((frame_dir / "frame_000.png").read_bytes())
    out = tmp_path / "crops"
    argv = ["segment", str(frame_dir), "--out", str(out), "--background", "blank"]
    assert main([*argv, "--blank", str(blank)]) == 0
    settings = load_settings(out / "segmentation.toml", {})
    assert settings.background == "blank"
    assert settings.blank == blank.absolute()


def test_differences_name_each_crop_setting_with_both_values() -> None:
    bundle = ObjectsSettings(mode="segment", um_per_px=0.5, pad_px=8, threshold="otsu")
    same = msgspec.structs.replace(bundle, max_objects=7, blank=None)
    assert segmentation_differences(same, bundle) == [], "max_objects does not change a crop"
    station = msgspec.structs.replace(
        bundle, um_per_px=0.65, pad_px=12, polarity="dark-on-light", drop_border=True
    )
    assert segmentation_differences(station, bundle) == [
        'polarity station "dark-on-light" vs bundle "auto"',
        "um_per_px station 0.65 vs bundle 0.5",
        "pad_px station 12 vs bundle 8",
        "drop_border station true vs bundle false",
    ]
    # adaptive_* only matter when either side thresholds adaptively.
    assert (
        segmentation_differences(msgspec.structs.replace(bundle, adaptive_offset=9), bundle) == []
    )
    adaptive = msgspec.structs.replace(bundle, threshold="adaptive", adaptive_offset=9)
    assert segmentation_differences(adaptive, bundle) == [
        'threshold station "adaptive" vs bundle "otsu"',
        "adaptive_offset station 9 vs bundle 5",
    ]
    limited = msgspec.structs.replace(bundle, max_area_um2=900.0)
    assert segmentation_differences(limited, bundle) == ["max_area_um2 station 900 vs bundle unset"]


def test_differences_between_frames_and_crops() -> None:
    framed, segmenting = ObjectsSettings(), ObjectsSettings(mode="segment")
    assert segmentation_differences(framed, None) == []
    assert segmentation_differences(framed, segmenting) == [
        'mode station "frame" (whole frames) vs bundle trained on segmented crops'
    ]
    assert segmentation_differences(segmenting, None) == [
        'mode station "segment" vs bundle trained on whole frames (no segmentation)'
    ]


# --- fieldscope train records it -----------------------------------------------------


def _data_folder(root: Path) -> Path:
    data = root / "data"
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
    return data


def test_train_takes_the_flag_or_the_data_folders_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _data_folder(tmp_path)
    settings = ObjectsSettings(mode="segment", um_per_px=0.65, pad_px=12)
    assert _segmentation(None, data) is None
    assert "segmentation: none recorded (no segmentation.toml in" in capsys.readouterr().err
    (data / "segmentation.toml").write_text(settings_toml(settings), encoding="utf-8")
    found = _segmentation(None, data)
    assert found == SegmentationRecord(
        source=str((data / "segmentation.toml").resolve()), objects=settings_table(settings)
    )
    assert "segmentation.toml (found in DATA_DIR)" in capsys.readouterr().err
    # The flag wins, and takes a station's edge.toml (its mode is the station's business).
    edge = tmp_path / "edge.toml"
    edge.write_text('[device]\nstation = "lake"\n\n[objects]\nmode = "frame"\npad_px = 4\n')
    given = _segmentation(edge, data)
    assert given is not None
    assert given.objects == settings_table(ObjectsSettings(mode="segment", pad_px=4))
    err = capsys.readouterr().err
    assert f"{edge} (--segmentation)" in err
    # ... and says which of DATA_DIR's files it overrides.
    assert f"warning: {data / 'segmentation.toml'} differs from --segmentation" in err
    assert "(um_per_px 1 vs 0.65; pad_px 4 vs 12)" in err


def _write_cut(folder: Path, **settings: Any) -> ObjectsSettings:
    cut = ObjectsSettings(mode="segment", **settings)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "segmentation.toml").write_text(settings_toml(cut), encoding="utf-8")
    return cut


def test_crops_segmented_class_by_class_record_their_common_settings(tmp_path: Path) -> None:
    data = _data_folder(tmp_path)
    # Each class's frames cut on its own, on two workstations with their own blank frames,
    # neither of them on this machine (the bundle does not carry a blank frame).
    cut = _write_cut(data / "a", um_per_px=0.65, background="blank", blank=tmp_path / "x.png")
    _write_cut(data / "b", um_per_px=0.65, background="blank", blank=tmp_path / "y.png")
    for label in ("a", "b"):
        (data / label / "crop_001.png").write_bytes(b"")
    (data / ".trash").mkdir()
    (data / ".trash" / "segmentation.toml").write_text("[objects]\npad_px = 99\n")
    found = find_segmentation(data)
    assert found.record == SegmentationRecord(
        source=str((data / "a" / "segmentation.toml").resolve()), objects=settings_table(cut)
    )
    assert found.notes == (
        f"the [objects] settings of {data / 'a' / 'segmentation.toml'} (found in DATA_DIR); "
        "1 more alike under DATA_DIR",
    )
    with pytest.raises(ConfigError, match=r"x\.png is not a file"):
        load_settings(data / "a" / "segmentation.toml", {})  # cutting needs the blank
    # A class folder of images that no file covers: recorded all the same, with a warning.
    (data / "c").mkdir()
    (data / "c" / "picked.jpg").write_bytes(b"")
    (warning,) = find_segmentation(data).notes[1:]
    assert warning.startswith(f"warning: no segmentation.toml covers the images in {data / 'c'};")
    # One at the top covers every folder below it.
    _write_cut(data, um_per_px=0.65, background="blank", blank=tmp_path / "x.png")
    found = find_segmentation(data)
    assert found.record is not None
    assert found.record.source == str((data / "segmentation.toml").resolve())
    assert found.notes[1:] == ()


def test_train_refuses_crops_cut_two_ways(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _data_folder(tmp_path)
    for part, pad in (("train", 12), ("test", 4)):
        _write_cut(data / part, um_per_px=0.65, pad_px=pad)
    _write_cut(data / "test" / "b", um_per_px=0.65, pad_px=4)
    with pytest.raises(ConfigError) as caught:
        find_segmentation(data)
    message = str(caught.value)
    assert f"{data / 'test' / 'segmentation.toml'} vs {data / 'train' / 'segmentation.toml'}" in (
        message
    )
    assert "(pad_px 4 vs 12)" in message
    assert "--segmentation TOML" in message
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "were cut with different [objects] settings" in err
    assert "Traceback" not in err
    assert not out.exists(), "nothing was started"
    # Naming the station's settings settles it, with a warning per file it overrides.
    found = find_segmentation(data, data / "train" / "segmentation.toml")
    assert found.record is not None
    assert found.record.objects["pad_px"] == 12
    assert [n for n in found.notes if n.startswith("warning:")] == [
        f"warning: {data / 'test' / p} differs from --segmentation (pad_px 12 vs 4); "
        "recording --segmentation's settings"
        for p in ("segmentation.toml", "b/segmentation.toml")
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[objects]\npad_px = -1\n", "{file}:2: objects.pad_px: must be in 0..4096 pixels, got -1"),
        ("[device]\nid = 1\n", "{file}: has no [objects] table"),
        (None, "--segmentation {file}: no such file (give the segmentation.toml that"),
    ],
)
def test_train_refuses_a_bad_segmentation_file_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | None, message: str
) -> None:
    data, file = _data_folder(tmp_path), tmp_path / "seg.toml"
    if text is not None:
        file.write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), "--segmentation", str(file)]) == 2
    err = capsys.readouterr().err
    assert message.format(file=file) in err
    assert "Traceback" not in err
    assert not out.exists(), "nothing was started"


def test_a_resume_keeps_the_runs_segmentation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--resume", str(tmp_path), "--segmentation", str(tmp_path / "s.toml")]
    assert main(argv) == 2
    assert "drop --segmentation" in capsys.readouterr().err


# --- fieldscope convert puts it in the manifest ------------------------------------------


@pytest.fixture(scope="module")
def segmented_run(tmp_path_factory: pytest.TempPathFactory, tiny_models: Any) -> Path:
    run = make_run(tmp_path_factory.mktemp("run"), tiny_models)
    settings = ObjectsSettings(mode="segment", um_per_px=0.65, max_area_um2=5e4, drop_border=True)
    record = SegmentationRecord(source="/data/segmentation.toml", objects=settings_table(settings))
    write_json(RunDir(run).segmentation_file, record)
    return run


def test_convert_records_the_segmentation_in_the_manifest(
    segmented_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundle"
    assert main(["convert", str(segmented_run), "--out", str(out)]) == 0
    data = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
    assert data["schema_version"] == 4
    jsonschema.validate(data, manifest_schema())
    recorded = read_bundle(out).manifest.segmentation
    assert recorded is not None
    expected = ObjectsSettings(mode="segment", um_per_px=0.65, max_area_um2=5e4, drop_border=True)
    assert recorded.settings() == expected
    capsys.readouterr()
    assert main(["bundle", "inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "segmentation [objects] settings that cut the training crops" in shown
    assert "um_per_px          0.65" in shown


def test_convert_refuses_a_damaged_segmentation_record(
    segmented_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(segmented_run, run)
    file = RunDir(run).segmentation_file
    record = json.loads(file.read_text(encoding="utf-8"))
    record["objects"]["polarity"] = "sideways"
    file.write_text(json.dumps(record), encoding="utf-8")
    assert main(["convert", str(run), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert f"{file}: manifest field segmentation.polarity must be one of" in err
    assert "correct the file" in err
    assert not (tmp_path / "b").exists()


def test_a_manifest_below_version_4_cannot_hold_a_segmentation() -> None:
    data = json.loads((WIRE / "manifest-v4.json").read_text(encoding="utf-8"))
    data["schema_version"] = 3
    with pytest.raises(BundleError, match="segmentation needs schema_version 4"):
        Manifest.from_dict(data)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, manifest_schema())
    del data["segmentation"]
    assert Manifest.from_dict(data).schema_version == 3


# --- the whole chain: segment -> labelled folders -> run -> bundle -> station ------------


def test_the_settings_travel_from_segment_to_the_station(
    frame_dir: Path,
    tiny_models: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    crops = tmp_path / "crops"
    argv = ["segment", str(frame_dir), "--out", str(crops), "--min-area-um2", "200"]
    assert main([*argv, "--um-per-px", "0.65", "--pad-px", "12"]) == 0
    # The person sorts the crops into class folders; segmentation.toml stays at the top.
    pngs = sorted(crops.glob("*.png"))
    assert len(pngs) >= 2
    for i, crop in enumerate(pngs):
        folder = crops / ("odd" if i % 2 else "even")
        folder.mkdir(exist_ok=True)
        crop.rename(folder / crop.name)
    cut = load_settings(crops / "segmentation.toml", {})
    found = find_segmentation(crops)
    assert found.record is not None
    assert found.record.objects == settings_table(cut)
    assert found.notes[1:] == (), "the file at the top covers every class folder"
    # fieldscope train keeps it in the run (training itself: test_train_convert_classify).
    run = make_run(tmp_path, tiny_models)
    write_json(RunDir(run).segmentation_file, found.record)
    bundle = tmp_path / "bundle"
    assert main(["convert", str(run), "--out", str(bundle)]) == 0
    capsys.readouterr()
    model = load_model(ModelConfig(bundle=bundle), PreprocessingOverrides())

    def warnings() -> list[str]:
        found = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        return [m for m in found if "[objects] settings differ" in m]

    with caplog.at_level(logging.WARNING):
        ModelSlot(model, cut)  # a station cutting as segment did: nothing to say
        assert warnings() == []
        ModelSlot(model, msgspec.structs.replace(cut, pad_px=8, um_per_px=1.6))
        (line,) = warnings()
    assert line.endswith("um_per_px station 1.6 vs bundle 0.65; pad_px station 8 vs bundle 12")
