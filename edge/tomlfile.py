"""Where a configuration problem is: the file, the line, the dotted key.

tomllib reports positions only for syntax errors, yet a user fixing a configuration
needs the line of every problem. This module reads a TOML file (refusing anything that
is not a small regular UTF-8 text file, each refusal one positioned problem) and maps
dotted keys to lines, for :mod:`fieldscope.edge.typed`'s messages::

    edge.toml:12: mqtt.prot: unknown key (did you mean 'port'?)
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from fieldscope.edge.errors import ConfigError
from fieldscope.edge.untrusted import RejectedValueError, read_regular_file

__all__ = [
    "ConfigFileError",
    "ConfigProblem",
    "ProblemsError",
    "key_lines",
    "line_of",
    "read_toml",
]

Problems = list[tuple[str, str]]  # (dotted key relative to the section, message)


# ── problems with positions ───────────────────────────────────────────────────────────


class ConfigProblem(msgspec.Struct, frozen=True):
    """One mistake: the dotted key ("" for the file as a whole), and where it is."""

    key: str
    message: str
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = self.file or "config"
        if self.line is not None:
            where = f"{where}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigFileError(ConfigError):
    """A configuration with one or more problems; ``str()`` has one line per problem."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class ProblemsError(ConfigError):
    """Raised by a Struct's ``__post_init__`` that refuses invalid values; the reader
    turns ``problems`` into positioned lines instead of one long message."""

    def __init__(self, problems: Problems, prefix: str = "") -> None:
        self.problems = list(problems)
        super().__init__(prefix + "; ".join(_joined(k, m) for k, m in self.problems))


def _joined(key: str, message: str) -> str:
    return f"{key} {message}" if key else message


_BARE_KEY = r"[A-Za-z0-9_-]+"
_QUOTED_KEY = r'"(?:[^"\\]|\\.)*"|\'[^\']*\''
_ONE_KEY = rf"(?:{_BARE_KEY}|{_QUOTED_KEY})"
_DOTTED_KEY = rf"{_ONE_KEY}(?:[ \t]*\.[ \t]*{_ONE_KEY})*"
_HEADER = re.compile(rf"^[ \t]*\[\[?[ \t]*({_DOTTED_KEY})[ \t]*\]\]?[ \t]*(?:#.*)?$")
_ASSIGNMENT = re.compile(rf"^[ \t]*({_DOTTED_KEY})[ \t]*=[ \t]*(.*)$")


def _key_parts(dotted: str) -> list[str]:
    parts = []
    for raw in re.findall(_ONE_KEY, dotted):
        if raw.startswith('"'):
            try:
                parts.append(str(json.loads(raw)))
            except ValueError:
                parts.append(raw[1:-1])
        elif raw.startswith("'"):
            parts.append(raw[1:-1])
        else:
            parts.append(raw)
    return parts


def key_lines(text: str) -> dict[str, int]:
    """Line numbers of table headers and keys, by dotted key (first occurrence).

    tomllib reports no positions for valid documents, so the raw text is scanned: a
    header sets the current table, an assignment names a key within it. Lines inside
    multi-line strings and arrays are skipped; keys of an inline table are not
    listed, and a lookup falls back to the enclosing key's line.
    """
    lines: dict[str, int] = {}
    table: list[str] = []
    skip_until: str | None = None
    depth = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if skip_until is not None:
            if skip_until in line:
                skip_until = None
            continue
        if depth > 0:
            depth += line.count("[") - line.count("]")
            continue
        header = _HEADER.match(line)
        if header:
            table = _key_parts(header.group(1))
            lines.setdefault(".".join(table), number)
            continue
        assignment = _ASSIGNMENT.match(line)
        if not assignment:
            continue
        lines.setdefault(".".join(table + _key_parts(assignment.group(1))), number)
        value = assignment.group(2)
        for quote in ('"""', "'''"):
            if value.startswith(quote) and value.count(quote) == 1:
                skip_until = quote
        if value.startswith("["):
            code = value.split("#", 1)[0]
            depth = code.count("[") - code.count("]")
    return lines


def line_of(key: str, lines: Mapping[str, int]) -> int | None:
    """The line of ``key``, else of the nearest enclosing key or table."""
    parts = key.split(".")
    while parts:
        found = lines.get(".".join(parts))
        if found is not None:
            return found
        parts.pop()
    return None


def read_toml(path: Path, max_bytes: int) -> tuple[dict[str, Any], str]:
    """The parsed document and its text; every way to fail is one positioned problem.

    Raises:
        ConfigFileError: missing, not a regular file, too big, not UTF-8, not TOML.
    """
    name = str(path)

    def fail(message: str, line: int | None = None) -> ConfigFileError:
        return ConfigFileError([ConfigProblem("", message, name, line)])

    try:
        text = read_regular_file(path, max_bytes).decode("utf-8")
    except FileNotFoundError:
        raise fail("no such file") from None
    except RejectedValueError as exc:  # a directory, FIFO or device, or far too big
        raise fail("is a directory, not a file" if path.is_dir() else str(exc)) from None
    except UnicodeDecodeError as exc:
        raise fail(f"is not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise fail(f"cannot read it: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text), text
    except RecursionError:
        raise fail("not valid TOML: arrays or tables nested too deeply") from None
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"\(at line (\d+), column \d+\)$", str(exc))
        reason = str(exc)[: found.start()].strip() if found else str(exc)
        raise fail(f"not valid TOML: {reason}", int(found.group(1)) if found else None) from None
    except ValueError:  # an integer of more than 4300 digits, refused by int() itself
        raise fail("not valid TOML for a config: a number with thousands of digits") from None
