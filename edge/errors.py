"""Our exception types: an expected failure carries one clear line for the user.

Library errors (OpenCV, json, sqlite, paho) are converted at the boundary with
``raise ... from exc`` so a command-line user sees what was wrong, where, and
what to do, and never a traceback for an expected mistake.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "BundleError",
    "ConfigError",
    "FieldscopeError",
    "ImageDecodeError",
    "MessageError",
    "MissingDependencyError",
    "RecipeError",
    "create_folder",
]


class FieldscopeError(Exception):
    """Base of every expected failure; ``str(err)`` is the message shown to the user."""


class MissingDependencyError(FieldscopeError):
    """An optional dependency is not installed; the message names the pip/apt package."""


class ConfigError(FieldscopeError):
    """A configuration file or option is invalid; the message names the key."""


class ImageDecodeError(FieldscopeError):
    """A file or buffer could not be decoded into an image."""


class RecipeError(FieldscopeError):
    """A preprocessing recipe (denoise method, parameters, resize policy) is invalid."""


class BundleError(FieldscopeError):
    """A model bundle is missing, damaged, tampered with or inconsistent."""


class MessageError(FieldscopeError):
    """An identification message does not match the schema; the message names the field."""


def create_folder(
    path: Path, what: str, error: type[FieldscopeError] = FieldscopeError, *, parents: bool = True
) -> None:
    """Create the folder ``path`` (fine if it exists), or raise ``error`` with one line:
    "cannot create WHAT PATH: the system's reason" (permission denied, a file in the
    way, a read-only or full disk), for the places that make folders for the user."""
    try:
        path.mkdir(parents=parents, exist_ok=True)
    except OSError as exc:
        raise error(f"cannot create {what} {path}: {exc.strerror or exc}") from exc
