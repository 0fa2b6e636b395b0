"""The station's current sample, kept across restarts, and its stamp on every message.

A sample is started and ended by the MQTT ``sample`` command (or starts as ``[sample]``
in edge.toml the first time a station runs). A power cut in the middle of a sample must
not end it, nor make the station fall back to the configured one: the current sample is
written to ``sample.json`` in the data_dir (a temporary file, fsynced, renamed over the
old one, so a crash leaves the old or the new sample, never half of one). ``{"sample":
null}`` records that the last sample was ended; only a missing file means "take
``[sample]``". A file that cannot be read is set aside as ``sample.json.bad`` with an
error in the log, and the station starts with ``[sample]``: it keeps identifying.

The ``sample`` command is carried out here (:func:`sample_command`): ``start`` makes a new
sample current (ending the one before, which the reply names), ``end`` ends it, and no
action reports the current one. A refusal changes nothing and says why in the reply.

Every identification is stamped with the site and the sample current when it is stored
(:func:`stamper`), so one place decides it for frames and for objects alike.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from fieldscope.edge.bundle_files import atomic_path, fsync_dir, write_file
from fieldscope.edge.commands import Command
from fieldscope.edge.errors import FieldscopeError
from fieldscope.edge.health import CommandReply
from fieldscope.edge.message import Identification
from fieldscope.edge.site import Sample, SampleConfig, Site
from fieldscope.edge.wire import compact_json

__all__ = ["SAMPLE_FILE", "Payload", "SampleBook", "sample_command", "stamper"]

logger = logging.getLogger("fieldscope.edge.sample")

SAMPLE_FILE = "sample.json"
_MAX_FILE_BYTES = 64 * 1024
# The builder of a message for the seq the outbox hands out (see pipeline).
Payload = Callable[[int], bytes]


class SampleBook:
    """The current sample (None between samples), thread-safe and kept in ``path``.

    The daemon's command thread starts and ends samples while the pipeline's store
    stage reads the current one; a lock makes each read see a whole sample.
    """

    def __init__(self, path: Path, initial: SampleConfig | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._current = self._load(initial)

    def _load(self, initial: SampleConfig | None) -> Sample | None:
        if not self.path.exists():
            return _from_config(initial)
        try:
            if self.path.stat().st_size > _MAX_FILE_BYTES:
                raise ValueError(f"it is over {_MAX_FILE_BYTES} bytes")
            data = json.loads(self.path.read_bytes())
            if not isinstance(data, dict) or set(data) != {"sample"}:
                raise ValueError('it must be {"sample": {...}} or {"sample": null}')
            raw = data["sample"]
            return None if raw is None else Sample.from_dict(raw)
        except (OSError, ValueError, RecursionError, FieldscopeError) as exc:
            # RecursionError: JSON nested deeper than the parser's stack (a damaged file).
            self._set_aside(exc)
            return _from_config(initial)

    def _set_aside(self, problem: Exception) -> None:
        """Keep an unreadable file for a person to look at, and say so; a file that
        cannot even be moved is overwritten by the next ``sample`` command."""
        bad = self.path.with_name(SAMPLE_FILE + ".bad")
        try:
            self.path.replace(bad)
        except OSError as exc:
            where = f"left it in place (cannot move it: {exc})"
        else:
            where = f"moved it to {bad}"
        logger.error(
            "cannot read the current sample from %s (%s); %s and started with [sample] "
            "from the config",
            self.path,
            problem,
            where,
        )

    def current(self) -> Sample | None:
        """The sample identifications are stamped with now (None: none running)."""
        with self._lock:
            return self._current

    def start(self, sample: Sample) -> Sample | None:
        """Make ``sample`` current (ending any other) and store it; the previous one.

        Raises:
            OSError: it could not be stored; the current sample is unchanged.
        """
        if sample.started_at is None:
            sample = msgspec.structs.replace(sample, started_at=datetime.now(UTC))
        with self._lock:
            self._write(sample)
            previous, self._current = self._current, sample
        return previous

    def end(self) -> Sample | None:
        """End the current sample (identifications then carry none); the ended one."""
        with self._lock:
            self._write(None)
            previous, self._current = self._current, None
        return previous

    def _write(self, sample: Sample | None) -> None:
        data = compact_json({"sample": None if sample is None else sample.to_dict()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            write_file(tmp, data)
        try:
            fsync_dir(self.path.parent)
        except OSError as exc:
            # The new file is in place (and what a restart reads); only its durability
            # across a power cut is in doubt, so the command is not refused for it.
            logger.warning("%s is written but its folder could not be synced: %s", self.path, exc)


def _from_config(initial: SampleConfig | None) -> Sample | None:
    if initial is None or initial.id is None:
        return None
    fields = msgspec.structs.asdict(initial)
    return Sample(**fields)


def stamper(site: Site | None, book: SampleBook) -> Callable[[Payload], Payload]:
    """What the pipeline wraps each message builder in: the message gains ``site`` and
    the sample current now (when it is committed to the outbox). A station with neither
    sends its messages unchanged, byte for byte."""

    def stamp(payload: Payload) -> Payload:
        sample = book.current()
        if site is None and sample is None:
            return payload

        def stamped(seq: int) -> bytes:
            message = Identification.from_json(payload(seq))
            return msgspec.structs.replace(message, site=site, sample=sample).to_json()

        return stamped

    return stamp


def _shown(sample: Sample | None) -> dict[str, object] | None:
    return None if sample is None else sample.to_dict()


def sample_command(command: Command, book: SampleBook) -> CommandReply:
    """Carry out a parsed ``sample`` command; the reply's data is ``{"sample": the current
    one or null}``, with ``"ended"`` (the sample it ended, or null) after start and end."""
    current = book.current()
    if command.action is None:
        return command.reply({"sample": _shown(current)})
    if command.action == "end" and current is None:
        return command.failed("no sample is running, so there is none to end")
    new = command.sample
    if new is not None and current is not None and new.id == current.id:
        return command.failed(
            f"sample {new.id!r} is already running (since {_since(current)}); "
            "end it first, or start the next one under a new id"
        )
    try:
        ended = book.end() if new is None else book.start(new)
    except OSError as exc:
        logger.error("cannot store the current sample in %s: %s", book.path, exc)
        return command.failed(
            f"cannot store the sample in {book.path} ({exc}); the current sample is unchanged"
        )
    now = book.current()
    if now is None:
        logger.info("sample %s ended", None if ended is None else ended.id)
    else:
        logger.info("sample %s started (ended: %s)", now.id, None if ended is None else ended.id)
    return command.reply({"sample": _shown(now), "ended": _shown(ended)})


def _since(sample: Sample) -> str:
    started = sample.started_at
    return "an unknown time" if started is None else started.strftime("%Y-%m-%d %H:%M UTC")
