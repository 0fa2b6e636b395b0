"""What the file backends (folder, replay) share: matching names, walking folders,
showing and storing file names that are not UTF-8, saying why a folder gave nothing."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["db_name", "matches", "name_from_db", "no_images_hint", "shown_path", "walk_files"]


def matches(name: str, patterns: Sequence[str]) -> bool:
    lower = name.lower()
    return not name.startswith(".") and any(fnmatch.fnmatchcase(lower, p.lower()) for p in patterns)


def shown_path(path: Path | str) -> str:
    """``path`` as text that can go anywhere: logs, SQLite, JSON, MQTT.

    POSIX file names are bytes; Python hands a name that is not UTF-8 over with lone
    surrogates (``b21_\\udcff.png``), which SQLite, JSON encoders and UTF-8 log streams
    refuse. Those bytes are written as ``\\xff`` escapes instead; a valid UTF-8 name is
    returned unchanged.
    """
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    return text


def db_name(name: str) -> str | bytes:
    """A file name as the state database keeps it: text when it is UTF-8, else the raw
    bytes the OS gave (a BLOB), so every name round-trips exactly to the same file."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name)
    return name


def name_from_db(value: str | bytes) -> str:
    return os.fsdecode(value) if isinstance(value, bytes) else value


def walk_files(
    root: Path, skip: frozenset[str] = frozenset()
) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """Every entry below ``root`` that is not a folder, as (path relative to ``root`` with
    ``/``, entry); hidden folders and the top-level folders in ``skip`` are not entered.
    Raises OSError only for ``root`` itself: a subfolder that vanishes is skipped."""
    stack: list[tuple[str, Path]] = [("", root)]
    first = True
    while stack:
        prefix, folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            if first:
                raise
            continue
        first = False
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir:
                if not entry.name.startswith(".") and not (not prefix and entry.name in skip):
                    stack.append((f"{prefix}{entry.name}/", Path(entry.path)))
            else:
                yield f"{prefix}{entry.name}", entry


def no_images_hint(path: Path, patterns: Sequence[str], recursive: bool, key: str) -> str:
    """Where an empty source looked and what it looked for, and what to change."""
    where = f"{path} and its subfolders" if recursive else f"{path} (not its subfolders)"
    text = f"no images matching {', '.join(patterns)} in {where}"
    if not recursive:
        try:
            deeper = sum(
                1 for rel, e in walk_files(path) if "/" in rel and matches(e.name, patterns)
            )
        except OSError:
            deeper = 0
        if deeper:
            text += f"; {deeper} are in subfolders: set {key}.recursive = true"
    else:
        text += f" (change {key}.patterns or {key}.path)"
    return text
