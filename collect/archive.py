"""Where the collector finds a station's archived image (the dashboard's thumbnails,
the review page, the ``folders`` export)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

__all__ = ["resolve_archived"]


def resolve_archived(archive: Path, station: str, device: str, archived_path: str) -> Path | None:
    """The local copy of a station's archived image, or None.

    A station archives ``<its archive dir>/<UTC day>/<file>``; the collector's host
    keeps copies of the archives as ``ARCHIVE/<station>/<device>/<day>/<file>``
    (e.g. rsync of each station's folder), or ``ARCHIVE/<device>/<day>/<file>``, or
    all in one ``ARCHIVE/<day>/<file>``. Only the day folder and the file name of the
    station's path are used, and the result must lie inside ``archive``.
    """
    parts = PurePosixPath(archived_path.replace("\\", "/")).parts[-2:]
    if not parts or any(p in ("", ".", "..") for p in parts):
        return None
    root = archive.resolve()
    candidates = []
    for base in (root / station / device, root / device, root):
        candidates.append(base.joinpath(*parts))
        candidates.append(base / parts[-1])
    for candidate in candidates:
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError):
            continue
        if resolved.is_relative_to(root) and resolved.is_file():
            return resolved
    return None
