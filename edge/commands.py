"""Inbound commands: parse and validate what arrives on ``.../command/{name}``.

Pure functions only. Whatever a broker delivers (any topic level, any bytes) is
turned into a :class:`Command` — a closed set of names with typed, range-checked
arguments — or a :class:`CommandError` whose message goes back to the sender in
the error reply. Nothing here executes anything: the daemon maps each
:class:`CommandName` to one of its own in-process actions, so no payload can name
a program, a shell command or a path. ``reload`` in particular takes no path: it
re-reads the bundle the configuration names.

Payloads are empty or a JSON object of at most :data:`MAX_COMMAND_BYTES`::

    fieldscope/pond-3/scope-a/command/capture    {"request_id": "r-17", "count": 3}
    fieldscope/pond-3/scope-a/command/pause      (empty)
    fieldscope/pond-3/scope-a/command/resend     {"first": 1800000000010, "last": 1800000000039}
    fieldscope/pond-3/scope-a/command/sample     {"action": "start", "id": "thau-a"}

``request_id`` (optional, any short string) is echoed in the reply on
``.../command/{name}/result``. A malformed or unknown command changes nothing and
gets an error reply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from fieldscope.edge.errors import FieldscopeError, MessageError
from fieldscope.edge.health import CommandReply
from fieldscope.edge.site import Sample
from fieldscope.edge.topics import segment_problem, show
from fieldscope.edge.untrusted import nests_deeper

__all__ = [
    "COMMAND_ARGUMENTS",
    "MAX_CAPTURE_COUNT",
    "MAX_COMMAND_BYTES",
    "MAX_REQUEST_ID_CHARS",
    "MAX_RESEND",
    "SAMPLE_ACTIONS",
    "Command",
    "CommandError",
    "CommandName",
    "CommandReply",
    "CommandResult",
    "parse_command",
]

# A command is a few bytes; a larger payload is a mistake or an attack, refused unread.
MAX_COMMAND_BYTES = 64 * 1024
MAX_REQUEST_ID_CHARS = 128
MAX_CAPTURE_COUNT = 100
# The most seqs one ``resend`` may ask for (a collector asks again for more).
MAX_RESEND = 10_000
# seq is at most 2**53 - 1 (see fieldscope.edge.message).
_MAX_SEQ = 2**53 - 1
# Deeper JSON than this is no command: refuse before the decoder recurses.
_MAX_NESTING = 32


class CommandName(StrEnum):
    """The commands a station understands."""

    CAPTURE = "capture"  # take ``count`` captures now, whatever the trigger mode
    PAUSE = "pause"  # stop capturing until ``resume``; heartbeats go on
    RESUME = "resume"
    RELOAD = "reload"  # re-read, verify and swap the configured bundle
    STATUS = "status"  # reply with a health snapshot
    RESEND = "resend"  # publish identifications ``first``..``last`` again, if still kept
    SAMPLE = "sample"  # start (with its metadata) or end the current sample; none: show it


# Arguments each command accepts besides ``request_id``.
COMMAND_ARGUMENTS: Mapping[CommandName, tuple[str, ...]] = MappingProxyType(
    {
        CommandName.CAPTURE: ("count",),
        CommandName.PAUSE: (),
        CommandName.RESUME: (),
        CommandName.RELOAD: (),
        CommandName.STATUS: (),
        CommandName.RESEND: ("first", "last"),
        CommandName.SAMPLE: ("action", "id", "volume_l", "operator", "notes"),
    }
)
# What ``sample`` does; without ``action`` it only reports the current sample.
SAMPLE_ACTIONS = ("start", "end")

# The reply payload; "CommandResult" is the name the daemon's wiring uses.
CommandResult = CommandReply


class CommandError(FieldscopeError):
    """A command that cannot be carried out as received; ``str(err)`` says why.

    ``command`` is the name as received and ``request_id`` the sender's id when it
    could be read, so :meth:`reply` can answer the sender even for a bad command.
    """

    def __init__(self, message: str, *, command: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.command = command
        self.request_id = request_id

    def reply(self) -> CommandReply:
        """The error reply for the sender (``ok`` false, ``error`` this message)."""
        name = self.command
        # The reply names the command only if it is a usable name: a topic level (which
        # may be blank, e.g. " ") is not always one.
        if (
            not isinstance(name, str)
            or segment_problem(name) is not None
            or not name.strip()
            or len(name) > 200
        ):
            name = "(invalid)"
        return CommandReply(ok=False, command=name, request_id=self.request_id, error=str(self))


@dataclass(frozen=True)
class Command:
    """One validated command. ``count`` is for ``capture`` (1 for the others);
    ``first`` and ``last`` (inclusive) for ``resend``; ``action`` (``start``, ``end`` or
    None: report) and, to start, ``sample`` for ``sample`` (None for the others)."""

    name: CommandName
    request_id: str | None = None
    count: int = 1
    first: int | None = None
    last: int | None = None
    action: str | None = None
    sample: Sample | None = None

    def reply(self, data: Mapping[str, Any] | None = None) -> CommandReply:
        """The reply once the command was carried out."""
        return CommandReply(ok=True, command=self.name.value, request_id=self.request_id, data=data)

    def failed(self, error: str, data: Mapping[str, Any] | None = None) -> CommandReply:
        """The reply when the command was valid but could not be carried out
        (e.g. ``reload`` found a bad bundle and kept the old one)."""
        return CommandReply(
            ok=False,
            command=self.name.value,
            request_id=self.request_id,
            error=error,
            data=data,
        )


def _known() -> str:
    return ", ".join(c.value for c in CommandName)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {show(key)} appears twice")
        out[key] = value
    return out


def _decode(name: str, payload: object) -> dict[str, Any]:
    def fail(problem: str) -> CommandError:
        return CommandError(f"command {show(name)}: {problem}", command=name)

    if not isinstance(payload, bytes | bytearray | memoryview):
        raise fail(f"payload must be bytes, got {type(payload).__name__}")
    raw = bytes(payload)
    if len(raw) > MAX_COMMAND_BYTES:
        raise fail(f"payload is {len(raw)} bytes, at most {MAX_COMMAND_BYTES} are accepted")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"payload is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        return {}
    if nests_deeper(text, _MAX_NESTING):
        raise fail(f"payload nests deeper than {_MAX_NESTING} levels")
    try:
        decoded = json.loads(
            text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates
        )
    except (ValueError, RecursionError) as exc:
        raise fail(
            f"payload must be empty or a JSON object; it is not valid JSON ({exc})"
        ) from None
    if not isinstance(decoded, dict):
        kind = "null" if decoded is None else type(decoded).__name__
        raise fail(f"payload must be empty or a JSON object, got a JSON {kind}")
    return decoded


def _request_id(name: str, args: Mapping[str, Any]) -> str | None:
    if "request_id" not in args:
        return None
    value = args["request_id"]
    problem = None
    if not isinstance(value, str) or not value:
        problem = f"must be a non-empty string, got {show(value)}"
    elif len(value) > MAX_REQUEST_ID_CHARS:
        problem = f"must be at most {MAX_REQUEST_ID_CHARS} characters, got {len(value)}"
    elif any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        problem = "must not contain control characters or lone surrogates"
    if problem is not None:
        raise CommandError(f"command {show(name)}: request_id {problem}", command=name)
    return str(value)


def _count(name: CommandName, args: Mapping[str, Any], request_id: str | None) -> int:
    value = args.get("count", 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CAPTURE_COUNT:
        raise CommandError(
            f"command {name.value!r}: count must be an integer from 1 to {MAX_CAPTURE_COUNT}, "
            f"got {show(value)}",
            command=name.value,
            request_id=request_id,
        )
    return value


def _seq_range(args: Mapping[str, Any], request_id: str | None) -> tuple[int, int]:
    def fail(problem: str) -> CommandError:
        return CommandError(
            f"command 'resend': {problem}", command=CommandName.RESEND.value, request_id=request_id
        )

    values = []
    for key in ("first", "last"):
        if key not in args:
            raise fail(f"{key} is required (the seq range to publish again, inclusive)")
        value = args[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_SEQ:
            raise fail(f"{key} must be an integer from 0 to {_MAX_SEQ}, got {show(value)}")
        values.append(value)
    first, last = values
    if first > last:
        raise fail(f"first ({first}) must not be above last ({last})")
    if last - first + 1 > MAX_RESEND:
        raise fail(f"at most {MAX_RESEND} seqs per resend, got {last - first + 1}")
    return first, last


def _sample(args: Mapping[str, Any], request_id: str | None) -> Command:
    """``sample``: ``start`` needs ``id`` (the other keys are optional), ``end`` and a
    report take nothing else; values follow the same rules as ``[sample]``."""

    def fail(problem: str) -> CommandError:
        return CommandError(
            f"command 'sample': {problem}", command=CommandName.SAMPLE.value, request_id=request_id
        )

    action = args.get("action")
    fields = {k: v for k, v in args.items() if k not in ("action", "request_id")}
    if action is not None and action not in SAMPLE_ACTIONS:
        raise fail(f"action must be one of {', '.join(SAMPLE_ACTIONS)}, got {show(action)}")
    if action != "start":
        keys = ", ".join(show(k) for k in sorted(fields))
        if fields and action == "end":
            raise fail(f"action 'end' takes no {keys} (a sample's fields go with 'start')")
        if fields:
            raise fail(f"takes {keys} only with action 'start' (without one it only reports)")
        return Command(CommandName.SAMPLE, request_id, action=action)
    if "id" not in fields:
        raise fail("action 'start' needs id (the sample's id, e.g. 'thau-2026-12-07-a')")
    try:
        sample = Sample.from_dict(fields, path="")
    except MessageError as exc:  # "identification message: volume_l must be ..."
        raise fail(str(exc).partition(": ")[2]) from None
    return Command(CommandName.SAMPLE, request_id, action=action, sample=sample)


def parse_command(name: str, payload: bytes) -> Command:
    """The command ``name`` (the topic's last level) with its payload, validated.

    Raises:
        CommandError: unknown name, oversized or malformed payload, unknown or invalid
            argument; the message says which, and :meth:`CommandError.reply` builds
            the error reply (echoing ``request_id`` when it could be read).
    """
    if not isinstance(name, str):
        raise CommandError(
            f"command name must be a string, got {type(name).__name__}", command=show(name)
        )
    args = _decode(name, payload)
    request_id = _request_id(name, args)
    try:
        command = CommandName(name)
    except ValueError:
        raise CommandError(
            f"unknown command {show(name)} (known: {_known()})",
            command=name,
            request_id=request_id,
        ) from None
    allowed = COMMAND_ARGUMENTS[command]
    unknown = sorted(k for k in args if k != "request_id" and k not in allowed)
    if unknown:
        accepted = ", ".join((*allowed, "request_id"))
        raise CommandError(
            f"command {command.value!r} does not take {', '.join(show(k) for k in unknown)} "
            f"(it accepts: {accepted})",
            command=command.value,
            request_id=request_id,
        )
    if command is CommandName.SAMPLE:
        return _sample(args, request_id)
    count = _count(command, args, request_id) if command is CommandName.CAPTURE else 1
    if command is CommandName.RESEND:
        first, last = _seq_range(args, request_id)
        return Command(command, request_id, count, first, last)
    return Command(command, request_id, count)
