"""``fieldscope segment FRAMES --out CROPS``: frames cut into object crops, as a station would.

People label the crops a station will classify only if both are cut by the same code
with the same settings: this command runs :class:`fieldscope.edge.objects.Segmenter`
over a folder of frames (in name order, so a running-median background sees a flow
cell's frames in sequence), with the ``[objects]`` table of a station's config and/or
flags, and writes one PNG per object plus ``objects.csv`` (measurements in µm) and
``frames.csv`` (per-frame summary) and ``segmentation.toml`` (the ``[objects]`` table
used, every setting: ``fieldscope train`` records it in the run and ``fieldscope
convert`` in the bundle, so a station can say when its own settings differ). It never
overwrites an earlier run unless told to.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fieldscope.edge.errors import ConfigError, FieldscopeError

if TYPE_CHECKING:
    from fieldscope.edge.objects import FrameSummary, ObjectsSettings, SegmentedObject, Segmenter

__all__ = [
    "OBJECT_COLUMNS",
    "SETTINGS_FILE",
    "load_settings",
    "read_settings_file",
    "register",
    "run_segment",
    "settings_toml",
]

log = logging.getLogger(__name__)

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_MAX_TOML_BYTES = 1024 * 1024
SETTINGS_FILE = "segmentation.toml"
_NOT_READY = " (running median not ready yet: no background correction on this frame)"
OBJECT_COLUMNS = (
    "frame",
    "object",
    "crop",
    "x",
    "y",
    "width",
    "height",
    "touches_border",
    "area_px",
    "area_um2",
    "esd_um",
    "perimeter_um",
    "major_axis_um",
    "minor_axis_um",
    "eccentricity",
    "solidity",
    "mean_intensity",
)
_FRAME_COLUMNS = (
    "frame",
    "found",
    "kept",
    "rejected_by_size",
    "touching_border",
    "dropped_at_border",
    "truncated",
    "background_ready",
)
# flag destination -> ObjectsSettings field, for the flags that override the file
_OVERRIDES = (
    "mode",
    "background",
    "blank",
    "median_frames",
    "threshold",
    "polarity",
    "blur_px",
    "open_px",
    "close_px",
    "um_per_px",
    "min_area_um2",
    "max_area_um2",
    "max_objects",
    "pad_px",
    "drop_border",
)


def register(subparsers: Any) -> None:
    """Add ``fieldscope segment`` to the parser (light: no OpenCV until it runs)."""
    p = subparsers.add_parser(
        "segment",
        help="cut frames with many specimens into object crops and measurements",
        description="Segment every image in FRAMES (name order) into objects with the "
        "station's code and settings; write a PNG per object (FRAME-STEM_NNN.png), "
        "objects.csv (measurements in µm), frames.csv (per-frame counts) and "
        "segmentation.toml (the settings, for fieldscope train) into CROPS. "
        "Settings come from --config's [objects] table, then the flags.",
    )
    p.add_argument("frames", type=Path, metavar="FRAMES", help="folder of frame images")
    p.add_argument("--out", type=Path, required=True, metavar="CROPS", help="output folder")
    p.add_argument("--config", type=Path, help="TOML file with an [objects] table")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in CROPS")
    _add_setting_flags(p)
    p.set_defaults(handler=_segment)


def _add_setting_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("segmentation settings (override --config)")
    g.add_argument("--mode", choices=("frame", "segment"), help="default: segment")
    g.add_argument("--background", choices=("none", "blank", "median"))
    g.add_argument("--blank", type=Path, help="image of the empty slide (--background blank)")
    g.add_argument("--median-frames", type=int, help="frames in the running median")
    g.add_argument("--threshold", choices=("otsu", "adaptive"))
    g.add_argument("--polarity", choices=("dark-on-light", "light-on-dark", "auto"))
    g.add_argument("--blur-px", type=int, help="Gaussian blur before the threshold (odd)")
    g.add_argument("--open-px", type=int, help="opening kernel diameter (0 = none)")
    g.add_argument("--close-px", type=int, help="closing kernel diameter (0 = none)")
    g.add_argument("--um-per-px", type=float, help="calibration: µm per pixel")
    g.add_argument("--min-area-um2", type=float, help="smallest object kept, µm²")
    g.add_argument("--max-area-um2", type=float, help="largest object kept, µm²")
    g.add_argument("--max-objects", type=int, help="most objects per frame (largest kept)")
    g.add_argument("--pad-px", type=int, help="field around each crop, pixels")
    g.add_argument(
        "--drop-border",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="leave out objects that touch the frame border",
    )


def _segment(args: argparse.Namespace) -> int:
    overrides = {k: getattr(args, k) for k in _OVERRIDES if getattr(args, k) is not None}
    settings = load_settings(args.config, overrides)
    return run_segment(args.frames, args.out, settings, overwrite=args.overwrite)


def load_settings(config: Path | None, overrides: Mapping[str, Any]) -> ObjectsSettings:
    """``[objects]`` of ``config`` (or the defaults with ``mode = "segment"``), then the
    flags; every problem at once.

    Raises:
        ConfigError: the file cannot be read, or a setting is invalid.
    """
    import msgspec

    from fieldscope.edge.objects import ObjectsSettings, check_settings

    settings = ObjectsSettings(mode="segment")
    if config is not None:
        settings = read_settings_file(config)
    if "blank" in overrides:
        overrides = {**overrides, "blank": Path(overrides["blank"]).expanduser().absolute()}
    try:
        settings = msgspec.structs.replace(settings, **overrides)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid segmentation flags: {exc}") from exc
    return check_settings(settings)


def read_settings_file(path: Path, *, need_blank: bool = True) -> ObjectsSettings:
    """The ``[objects]`` table of a TOML file (an edge.toml, a ``segmentation.toml``) as
    segmenting settings (``mode = "segment"``), validated as a station validates it.

    ``need_blank=False`` accepts a blank frame that is not on this machine: training
    reads the settings of crops cut elsewhere, and a bundle does not carry the blank.

    Raises:
        ConfigFileError: the file cannot be read, has no [objects], or a setting is
            invalid (each problem with the file and line).
    """
    from fieldscope.edge.objects import ObjectsSettings
    from fieldscope.edge.typed import ConfigFileError, ConfigProblem, Reader, problems_of, read_toml

    data, text = read_toml(path, _MAX_TOML_BYTES)
    table = data.get("objects")
    if not isinstance(table, dict):
        message = "has no [objects] table (the segmentation settings)"
        raise ConfigFileError([ConfigProblem("", message, str(path))])
    # The table's mode switches the station between frames and objects; this command
    # always cuts objects (``--mode frame`` says otherwise), with the station's settings.
    table = {**table, "mode": "segment"}
    reader = Reader(path.parent, os.environ)
    settings = reader.read(ObjectsSettings, table, "objects")

    def checks(root: Any) -> list[tuple[str, str]]:
        elsewhere = not need_blank and root.blank is not None and not root.blank.is_file()
        return [
            (f"objects.{key}", message)
            for key, message in problems_of(root)
            if not (elsewhere and key == "blank" and root.background == "blank")
        ]

    problems = reader.located(settings, text, str(path), checks)
    if problems or not isinstance(settings, ObjectsSettings):
        raise ConfigFileError(problems)
    return settings


def _frames(folder: Path) -> list[Path]:
    if not folder.exists():
        raise ConfigError(f"frames folder {folder} does not exist")
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder (give the folder that holds the frames)")
    found = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
    )
    if not found:
        kinds = ", ".join(_IMAGE_SUFFIXES)
        raise ConfigError(f"no images in {folder} (looked for {kinds})")
    return found


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to mix with or silently replace an earlier run; ``--overwrite`` removes the
    files that run listed (and nothing else)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    listing = out / "objects.csv"
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"--out {out} is not empty; choose a new folder or add --overwrite "
                "(which replaces the crops and CSVs of an earlier run)"
            )
        if listing.is_file():
            with listing.open(newline="", encoding="utf-8") as handle:
                for row in csv.DictReader(handle):
                    crop = Path(row.get("crop") or "")
                    if crop.name and crop.parent == Path():
                        (out / crop.name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def run_segment(
    frames: Path, out: Path, settings: ObjectsSettings, *, overwrite: bool = False
) -> int:
    """Segment every frame of ``frames`` into ``out``; 0, or 1 if a frame was unreadable.

    Raises:
        ConfigError: no such folder, no images, an output folder in the way.
    """
    import msgspec

    from fieldscope.edge.objects import Segmenter

    paths = _frames(frames)
    segmenter = Segmenter(settings)  # reads the blank frame: fails before any output
    _prepare_out(out, overwrite)
    (out / SETTINGS_FILE).write_text(settings_toml(settings), encoding="utf-8")
    failed = objects = 0
    with (
        (out / "objects.csv").open("w", newline="", encoding="utf-8") as obj_file,
        (out / "frames.csv").open("w", newline="", encoding="utf-8") as frame_file,
    ):
        obj_rows = csv.DictWriter(obj_file, OBJECT_COLUMNS)
        frame_rows = csv.DictWriter(frame_file, _FRAME_COLUMNS)
        obj_rows.writeheader()
        frame_rows.writeheader()
        for number, path in enumerate(paths, 1):
            try:
                rows, summary = _one_frame(path, out, segmenter)
            except FieldscopeError as exc:
                failed += 1
                _progress(f"{number}/{len(paths)} {path.name}: skipped: {exc}")
                continue
            obj_rows.writerows(rows)
            frame_rows.writerow({"frame": path.name, **msgspec.structs.asdict(summary)})
            objects += len(rows)
            note = "" if summary.background_ready else _NOT_READY
            _progress(f"{number}/{len(paths)} {path.name}: {len(rows)} objects{note}")
    _progress(f"{objects} objects from {len(paths) - failed} frames in {out}")
    if failed:
        _progress(f"{failed} frame(s) could not be read (listed above)")
    return 1 if failed else 0


def settings_toml(settings: ObjectsSettings) -> str:
    """``segmentation.toml``: the ``[objects]`` table that cut the crops, every setting,
    readable by ``fieldscope segment --config``, ``fieldscope train`` and a station."""
    from fieldscope.edge.objects import settings_table

    lines = [
        "# Written by fieldscope segment: the settings that cut these crops. Keep it at the",
        "# top of the training data folder (or give it to fieldscope train --segmentation):",
        "# the bundle records it, and a station warns when its [objects] table differs.",
        "[objects]",
    ]
    for key, value in settings_table(settings).items():
        # JSON's strings, integers and booleans are TOML's; floats keep their repr.
        shown = repr(value) if isinstance(value, float) else json.dumps(value, ensure_ascii=False)
        lines.append(f"{key} = {shown}")
    return "\n".join(lines) + "\n"


def _one_frame(
    path: Path, out: Path, segmenter: Segmenter
) -> tuple[list[dict[str, Any]], FrameSummary]:
    import cv2

    from fieldscope.edge.decode import load_image

    result = segmenter.segment(load_image(path))
    rows = []
    for obj in result.objects:
        name = f"{path.stem}_{obj.index:03d}.png"
        if not cv2.imwrite(str(out / name), cv2.cvtColor(obj.crop, cv2.COLOR_RGB2BGR)):
            raise ConfigError(f"cannot write {out / name}")
        rows.append(dict(_row(path.name, name, obj)))
    return rows, result.summary


def _row(frame: str, crop: str, obj: SegmentedObject) -> Iterator[tuple[str, Any]]:
    import msgspec

    x, y, w, h = obj.bbox
    yield from (("frame", frame), ("object", obj.index), ("crop", crop))
    yield from (("x", x), ("y", y), ("width", w), ("height", h))
    yield ("touches_border", int(obj.touches_border))
    if obj.measurements is not None:
        for key, value in msgspec.structs.asdict(obj.measurements).items():
            yield key, round(value, 4) if isinstance(value, float) else value


def _progress(line: str) -> None:
    print(f"segment: {line}", file=sys.stderr, flush=True)
