"""Bounded readers for values that come from outside: payloads, manifests, config files.

Python's ``json`` and ``tomllib`` accept integers of any size and nesting of any
depth. Each is harmless until something uses it: ``float()`` of a 400-digit integer
raises ``OverflowError``, ``repr()`` of a 5000-digit one raises ``ValueError``,
``json.loads("1e400")`` quietly gives ``inf``, and an array nested 100,000 deep
raises ``RecursionError``. None of those is the reader's own error type, so one
number could escape every ``except MessageError`` and stop a collector or a
station's model watcher for good.

This module is the one place that bounds them. Every payload, manifest and config
reader takes its numbers through :func:`read_number` / :func:`read_integer` and its
JSON through :func:`load_json`; each raises :class:`RejectedValueError` (a
``FieldscopeError``), whose text the caller prefixes with the field's name and
re-raises as its own error type, so a bad value always becomes a clear validation
error ("threshold must be a finite number between 0 and 1, got an integer of 400
digits") and never a library exception.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

from fieldscope.edge.errors import FieldscopeError

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_NUMBER_DIGITS",
    "MAX_PAYLOAD_BYTES",
    "RejectedValueError",
    "load_json",
    "nests_deeper",
    "read_integer",
    "read_number",
    "read_regular_file",
    "show_value",
]

# No field of any fieldscope format nests deeper than about 5 levels; 64 leaves free-form
# objects (training metrics, command arguments) room while refusing a stack bomb early.
MAX_JSON_DEPTH = 64
# The largest integer any field takes is a byte count or a sequence number (< 2**63, 19
# digits). Anything much longer is refused while parsing, before a float is made of it.
MAX_NUMBER_DIGITS = 40

# An MQTT payload of any fieldscope topic: an identification is about 1 KB, a retained
# model message with 10,000 labels about 2 MB. The cap is checked before decoding.
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024

_NOT_ACCEPTED = "is not JSON this reader accepts"

# Characters that matter for nesting: string delimiters, escapes and brackets.
_JSON_STRUCTURE = re.compile(r'["\\\[\]{}]')


class RejectedValueError(FieldscopeError):
    """One outside value is unacceptable; ``str()`` says what it must be and what it was,
    without the field's name (the caller adds that and re-raises its own error type)."""


def _int_digits(value: int) -> int:
    """Decimal digits of ``abs(value)`` without converting it to text (which fails past
    4300 digits); exact to within one digit, which is all a message needs."""
    return max(1, math.ceil(abs(value).bit_length() * math.log10(2)))


def show_value(value: object, limit: int = 80) -> str:
    """``repr(value)`` shortened to ``limit`` characters; never raises.

    A huge integer is described ("an integer of 400 digits") rather than printed: its
    ``repr`` is unreadable in a log line, and past 4300 digits Python refuses to make one.
    """
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        return f"an integer of {_int_digits(value)} digits"
    try:
        text = repr(value)
    except ValueError:  # a container holding an integer over Python's digit limit
        return f"a {type(value).__name__} too large to show"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bounds(low: float, high: float) -> str:
    if high == math.inf:
        return f">= {low:g}"
    if low == -math.inf:
        return f"<= {high:g}"
    return f"between {low:g} and {high:g}"


def read_number(value: object, low: float = -math.inf, high: float = math.inf) -> float:
    """``value`` as a finite float in ``low..high`` (JSON/TOML integers are accepted).

    Raises:
        RejectedValueError: not a number (booleans are not numbers), not finite, too large to
            be a float at all, or outside the bounds.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        kind = "null" if value is None else type(value).__name__
        raise RejectedValueError(f"must be a number, got {kind} {show_value(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond 1.8e308
        raise RejectedValueError(
            f"must be a finite number {_bounds(low, high)}, got {show_value(value)}"
        ) from None
    if not math.isfinite(number) or not low <= number <= high:
        raise RejectedValueError(
            f"must be a finite number {_bounds(low, high)}, got {show_value(value)}"
        )
    return number


def read_integer(value: object, low: int, high: int) -> int:
    """``value`` as an integer in ``low..high`` (an integral float is not accepted).

    Raises:
        RejectedValueError: not an integer (booleans are not integers) or outside the bounds.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "null" if value is None else type(value).__name__
        raise RejectedValueError(f"must be an integer, got {kind} {show_value(value)}")
    if not low <= value <= high:
        raise RejectedValueError(
            f"must be an integer between {low} and {high}, got {show_value(value)}"
        )
    return value


def nests_deeper(text: str, max_depth: int) -> bool:
    """Whether brackets outside strings nest deeper than ``max_depth`` (linear time).

    Checked before parsing because the parser recurses per level: a few hundred
    kilobytes of ``[`` would otherwise raise RecursionError from deep inside it.
    """
    depth, in_string, skip_to = 0, False, -1
    for match in _JSON_STRUCTURE.finditer(text):
        pos = match.start()
        if pos < skip_to:  # the character after a backslash inside a string
            continue
        char = match.group()
        if in_string:
            if char == "\\":
                skip_to = pos + 2
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > max_depth:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_NUMBER_DIGITS:
        raise RejectedValueError(
            f"{_NOT_ACCEPTED}: it contains an integer of {digits} digits "
            f"(no field takes more than {MAX_NUMBER_DIGITS})"
        )
    return int(text)


def _parse_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise RejectedValueError(
            f"{_NOT_ACCEPTED}: it contains the number {show_value(text)}, beyond a double"
        )
    return number


def _reject_constant(name: str) -> Any:
    raise RejectedValueError(f"contains {name}, which is not a JSON number")


def load_json(
    data: bytes | bytearray | str, *, max_bytes: int, max_depth: int = MAX_JSON_DEPTH
) -> Any:
    """Parse JSON from outside, bounded in size, depth and number magnitude.

    Refused, each with a one-line reason: more than ``max_bytes`` (checked before
    decoding), not UTF-8, nesting deeper than ``max_depth``, an integer of more than
    :data:`MAX_NUMBER_DIGITS` digits, a float beyond a double (``1e400``), the
    non-standard ``NaN``/``Infinity`` constants, and anything that is not JSON.

    Raises:
        RejectedValueError: naming the problem (the caller adds which payload or file).
    """
    if len(data) > max_bytes:
        raise RejectedValueError(f"is {len(data):,} bytes, more than the limit of {max_bytes:,}")
    if isinstance(data, bytes | bytearray):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RejectedValueError(f"is not UTF-8 ({exc})") from None
    else:
        text = data
    if nests_deeper(text, max_depth):
        raise RejectedValueError(
            f"{_NOT_ACCEPTED}: nested too deeply (more than {max_depth} levels of arrays/objects)"
        )
    try:
        return json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_reject_constant,
        )
    except json.JSONDecodeError as exc:
        raise RejectedValueError(
            f"{_NOT_ACCEPTED}: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:  # belt and braces: nests_deeper should have caught it
        raise RejectedValueError(f"{_NOT_ACCEPTED}: nested too deeply") from None
    except ValueError as exc:  # e.g. a lone surrogate escape a str cannot encode later
        raise RejectedValueError(f"{_NOT_ACCEPTED}: {exc}") from None


def read_regular_file(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, read without blocking.

    A FIFO would block the reader forever, and ``/dev/zero`` (or a symlink to it named
    ``x.png``) never ends: both are refused before any byte is read. The type is checked
    with ``os.stat`` before opening (so a FIFO is never opened) and again with
    ``fstat`` on the open descriptor (so a file swapped for one in between is refused
    too); the size is checked before reading and enforced while reading, in case the
    file grows meanwhile.

    Raises:
        RejectedValueError: not a regular file (names what it is), or larger than ``max_bytes``.
        OSError: the file cannot be opened or read (missing, permissions, I/O).
    """
    _check_regular(Path(path).stat(), max_bytes)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        size = _check_regular(os.fstat(fd), max_bytes)
        # Ask for what fstat promised (a buffer of max_bytes would be allocated up front),
        # then for the rest of the allowance only if the file turned out longer.
        data = handle.read(size + 1)
        if len(data) > size:
            data += handle.read(max_bytes + 1 - len(data))
    if len(data) > max_bytes:
        raise RejectedValueError(f"grew past the limit of {max_bytes:,} bytes while being read")
    return data


def _check_regular(st: os.stat_result, max_bytes: int) -> int:
    mode = st.st_mode
    if not stat.S_ISREG(mode):
        kinds = (
            (stat.S_ISDIR, "a directory"),
            (stat.S_ISFIFO, "a FIFO (named pipe)"),
            (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"),
            (stat.S_ISSOCK, "a socket"),
        )
        kind = next((name for test, name in kinds if test(mode)), "a special file")
        raise RejectedValueError(f"is {kind}, not a regular file; refusing to read it")
    if st.st_size > max_bytes:
        raise RejectedValueError(f"is {st.st_size:,} bytes, more than the limit of {max_bytes:,}")
    return st.st_size
