"""Which ``[objects]`` settings cut a training folder's images from frames.

``fieldscope train`` keeps the answer in ``RUN_DIR/segmentation.json``, ``fieldscope
convert`` puts it in the bundle's manifest, and a station warns when its own ``[objects]``
table would cut other crops: a model sees crops unlike its training crops (another scale,
other padding) without any error, only with worse answers.

``fieldscope segment`` writes ``segmentation.toml`` next to its crops. People sort the
crops into class folders under that folder, but may also segment each class's frames, or
train/ and test/, on their own; so the file may sit at the top of DATA_DIR or in any
folder below it (hidden folders aside, as for the images). Every one found is read:

* none: the images are whole frames (or how they were cut is unknown); nothing recorded.
* all alike (``blank``, the path of a workstation's file, aside): that one is recorded,
  the shallowest first.
* some differ: an error naming two files and their differences. A bundle records one
  segmentation and a station cuts one way, so a record would be wrong for part of the
  training data, and the station's warning would say nothing where it should. Re-cut
  the frames with one set of settings, or name the settings the station will use with
  ``--segmentation TOML``: a given file wins, and files under DATA_DIR that differ from
  it only warn (the person chose, and is told what they chose over).
* image folders that no file covers while others are covered: a warning (they are
  taken to be cut like the rest, which only the person can know).

With several data folders (``fieldscope train DATA DATA ...``) the files of all of them
count together: they must agree, and a folder without one (say, reviewed field images
exported as class folders) is named in the warning. The record stays one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from fieldscope.edge.errors import ConfigError
from fieldscope.train.rundir import SegmentationRecord
from fieldscope.train.samples import IMAGE_SUFFIXES

__all__ = ["FoundSegmentation", "find_segmentation"]

# Settings that do not travel to the manifest: mode (always "segment" here) and the
# blank frame's path (each workstation's and each station's own file).
_NOT_COMPARED = ("mode", "blank")
_LISTED = 3  # uncovered folders named in a warning


class FoundSegmentation(NamedTuple):
    """The record to keep (None: whole frames), and one line per thing to tell the user."""

    record: SegmentationRecord | None
    notes: tuple[str, ...]


def find_segmentation(
    data_dir: Path | Sequence[Path], given: Path | None = None
) -> FoundSegmentation:
    """The segmentation of DATA_DIR's images: ``given`` (``--segmentation``), else the
    ``segmentation.toml`` files under DATA_DIR (each of them, when several), which must
    agree (see the module's docstring for why).

    Raises:
        ConfigError: ``given`` does not exist; a file cannot be read or has an invalid
            setting (file and line); two files under DATA_DIR differ and none is given.
    """
    from fieldscope.edge.segment_cli import SETTINGS_FILE

    roots = [Path(data_dir)] if isinstance(data_dir, str | Path) else [Path(d) for d in data_dir]
    existing = [r for r in roots if r.is_dir()]
    files, uncovered = _scan(existing, SETTINGS_FILE)
    root = " + ".join(str(r) for r in roots)
    if given is not None:
        return _given(given, files)
    if not files:
        note = (
            f"none recorded (no {SETTINGS_FILE} in {root} or its folders, no "
            "--segmentation): the bundle will say it was trained on whole frames"
        )
        return FoundSegmentation(None, (note,) if existing else ())
    tables = [(path, _table(path)) for path in files]
    first, objects = tables[0]
    for path, table in tables[1:]:
        differences = _differences(objects, table)
        if differences:
            raise ConfigError(_conflict(root, first, path, differences))
    alike = f"; {len(files) - 1} more alike under DATA_DIR" if len(files) > 1 else ""
    notes = [f"the [objects] settings of {first} (found in DATA_DIR){alike}"]
    if uncovered:
        shown = ", ".join(str(p) for p in uncovered[:_LISTED])
        more = f" and {len(uncovered) - _LISTED} more" if len(uncovered) > _LISTED else ""
        notes.append(
            f"warning: no {SETTINGS_FILE} covers the images in {shown}{more}; they are "
            f"taken to be cut with the same settings (put one at the top of their data "
            "folder if so)"
        )
    record = SegmentationRecord(source=str(first.resolve()), objects=objects)
    return FoundSegmentation(record, tuple(notes))


def _given(given: Path, found: Sequence[Path]) -> FoundSegmentation:
    """``--segmentation``: recorded whatever DATA_DIR holds; a differing file warns."""
    if not given.exists():
        raise ConfigError(
            f"--segmentation {given}: no such file (give the segmentation.toml that "
            "fieldscope segment wrote next to the crops, or a station's edge.toml)"
        )
    objects = _table(given)
    notes = [f"the [objects] settings of {given} (--segmentation)"]
    for path in found:
        differences = _differences(objects, _table(path))
        if differences:
            notes.append(
                f"warning: {path} differs from --segmentation ({'; '.join(differences)}); "
                "recording --segmentation's settings"
            )
    record = SegmentationRecord(source=str(given.resolve()), objects=objects)
    return FoundSegmentation(record, tuple(notes))


def _scan(roots: Sequence[Path], name: str) -> tuple[list[Path], list[Path]]:
    """The settings files under the data folders (each folder's shallowest first, folders
    in the order given), and the folders holding images that none of them covers (none
    when there is no file at all)."""
    settings: list[Path] = []
    image_dirs: list[Path] = []
    for root in roots:
        found: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            folder = Path(dirpath)
            if name in filenames and (folder / name).is_file():
                found.append(folder / name)
            if any(
                not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES
                for f in filenames
            ):
                image_dirs.append(folder)
        settings.extend(sorted(found, key=lambda p: (len(p.parts), str(p))))
    covering = [p.parent for p in settings]
    uncovered = [
        d for d in image_dirs if settings and not any(c == d or c in d.parents for c in covering)
    ]
    return settings, uncovered


def _table(path: Path) -> dict[str, Any]:
    from fieldscope.edge.objects import settings_table
    from fieldscope.edge.segment_cli import read_settings_file

    # The blank frame may be on the workstation that cut the crops, not on this one.
    return settings_table(read_settings_file(path, need_blank=False))


def _differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """``key A vs B`` for each recorded setting in which two tables differ."""
    keys = [k for k in {**a, **b} if k not in _NOT_COMPARED]
    return [f"{k} {_shown(a.get(k))} vs {_shown(b.get(k))}" for k in keys if a.get(k) != b.get(k)]


def _shown(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value) if isinstance(value, str | bool) else str(value)


def _conflict(root: str, first: Path, other: Path, differences: Sequence[str]) -> str:
    return (
        f"the images under {root} were cut with different [objects] settings: {first} vs "
        f"{other} ({'; '.join(differences)}). A bundle records one segmentation and a "
        "station cuts one way: re-cut the frames with one set of settings (fieldscope "
        f"segment --config {first}), or name the settings the station will use with "
        "--segmentation TOML"
    )
