"""The segmentation settings travel with the crops: ``fieldscope segment`` writes them,
``fieldscope train`` records them in the run, ``fieldscope convert`` in the bundle's
manifest, and a station warns when its own ``[objects]`` table would cut other crops.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec
import pytest

from fieldscope.cli.main import main
from fieldscope.edge.objects import ObjectsSettings, segmentation_differences, settings_table
from fieldscope.edge.segment_cli import load_settings
from fieldscope.edge.specimen_frames import FrameRecipe, write_frames


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
