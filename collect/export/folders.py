"""``folders``: the reviewed images as class folders, training data for the next model.

Each reviewed identification's image goes to ``OUT/<validated label>/`` (the label of
its latest review, never the station's prediction); one a reviewer marked "not a
taxon" is left out, or goes to ``OUT/_not_a_taxon/`` with
``ExportOptions.not_a_taxon``. The images are copies of the stations' archives on the
collector's host, found as the dashboard finds them (``--archive DIR``, see
:func:`~fieldscope.collect.archive.resolve_archived`). ``OUT/manifest.csv`` lists
every reviewed identification and what became of it (``written``, ``missing``: the
image is not in the archive, ``not_a_taxon``: left out), so nothing is dropped
silently. An object of a segmenting station is cut from its frame as the station cut
it (:func:`~fieldscope.collect.archive.object_png`; unreadable: ``missing``), so the
folders hold what the station classifies. ``fieldscope train OUT`` reads the folders
as they are (the manifest is no image, so training ignores it).

The folder is written beside ``OUT`` under a temporary name and renamed when
complete: an export that fails leaves no half-filled training set.
"""

from __future__ import annotations

import csv
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from fieldscope.collect.archive import object_png, resolve_archived
from fieldscope.collect.export.base import (
    ExportError,
    ExportFormat,
    ExportOptions,
    ExportSummary,
    escape_formula,
    utc_text,
)
from fieldscope.collect.store import NOT_A_TAXON, AnnotationRow, IdentificationRow
from fieldscope.edge.errors import FieldscopeError

__all__ = ["FORMAT", "MANIFEST", "MANIFEST_COLUMNS", "folder_name", "write_reviewed"]

MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = (
    "identification_id",
    "device",
    "station",
    "seq",
    "captured_at",
    "predicted_label",
    "score",
    "label",
    "reviewer",
    "reviewed_at",
    "outcome",
    "file",
    "archived_path",
)
_UNSAFE = re.compile(r"[\x00-\x1f/\\:*?\"<>|]")


def folder_name(label: str) -> str:
    """A class folder's name for ``label``: path separators and characters that no
    file system takes become ``_``; a name that would be hidden or special gets ``_``."""
    name = _UNSAFE.sub("_", label).strip()
    if not name or name.startswith(".") or name.upper() in ("CON", "PRN", "AUX", "NUL"):
        name = "_" + name
    return name[:120]


def _refuse(rows: Iterable[IdentificationRow], out: Path, options: ExportOptions) -> ExportSummary:
    raise ExportError("the folders format exports reviews: call export() with a store")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(
            f"--out {out} exists and is not an empty folder; give a new folder for the "
            "class folders (an export never mixes with older files)"
        )


def _place(
    row: IdentificationRow, review: AnnotationRow, options: ExportOptions, work: Path
) -> tuple[str, str]:
    """Copy one image into its class folder: (outcome, file relative to the export)."""
    if review.label == NOT_A_TAXON and not options.not_a_taxon:
        return "not_a_taxon", ""
    assert options.archive is not None
    found = (
        None
        if row.archived_path is None
        else resolve_archived(options.archive, row.station, row.device, row.archived_path)
    )
    if found is None:
        return "missing", ""
    name = folder_name(review.label)
    try:
        crop = object_png(found, row)  # an object's row names its whole frame
    except (OSError, FieldscopeError):
        return "missing", ""
    suffix = ".png" if crop is not None else found.suffix.lower()
    target = work / name / f"{folder_name(row.device)}-{row.seq}{suffix}"
    target.parent.mkdir(exist_ok=True)
    if crop is not None:
        target.write_bytes(crop)
    else:
        shutil.copyfile(found, target)
    return "written", f"{name}/{target.name}"


def _manifest_row(
    row: IdentificationRow, review: AnnotationRow, outcome: str, file: str
) -> list[str]:
    return [
        str(row.id),
        escape_formula(row.device),
        escape_formula(row.station),
        str(row.seq),
        utc_text(row.captured_at),
        escape_formula(row.label or ""),
        "" if row.score is None else repr(row.score),
        escape_formula(review.label),
        escape_formula(review.reviewer),
        utc_text(review.reviewed_at),
        outcome,
        escape_formula(file),
        escape_formula(row.archived_path or ""),
    ]


def write_reviewed(
    reviewed: Iterable[tuple[IdentificationRow, AnnotationRow]], out: Path, options: ExportOptions
) -> ExportSummary:
    """Write the class folders and ``manifest.csv`` to the new folder ``out``.

    Raises:
        ExportError: no ``archive`` folder given, ``out`` not a new or empty folder,
            or a file cannot be written.
    """
    if options.archive is None or not options.archive.is_dir():
        raise ExportError(
            "the folders format copies the reviewed images: give --archive DIR, the "
            "folder with copies of the stations' image archives (as for collect serve)"
            + ("" if options.archive is None else f"; {options.archive} is not a folder")
        )
    _check_out(out)
    outcomes: Counter[str] = Counter()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from exc
    try:
        with (work / MANIFEST).open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(MANIFEST_COLUMNS)
            for row, review in reviewed:
                outcome, file = _place(row, review, options, work)
                outcomes[outcome] += 1
                writer.writerow(_manifest_row(row, review, outcome, file))
        work.chmod(0o755)  # mkdtemp's 0700 would hide the export from a training user
        if out.exists():
            out.rmdir()
        work.rename(out)
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _summary(out, outcomes, options)


def _summary(out: Path, outcomes: Counter[str], options: ExportOptions) -> ExportSummary:
    missing, rejected = outcomes["missing"], outcomes["not_a_taxon"]
    why = []
    if missing:
        why.append(f"{missing} image(s) not found in {options.archive}")
    if rejected:
        why.append(f"{rejected} reviewed as not a taxon (--not-a-taxon-folder keeps them)")
    notes = () if sum(outcomes.values()) else ("nothing is reviewed yet: review on /review",)
    return ExportSummary(
        out,
        "folders",
        outcomes["written"],
        skipped=missing + rejected,
        skipped_why="; ".join(why) + f" (see {out / MANIFEST})" if why else "",
        notes=notes,
    )


FORMAT = ExportFormat(
    "folders",
    "",
    _refuse,
    "the reviewed images as class folders (training data) with a manifest",
    reviewed=write_reviewed,
)
