"""What the daemon does with its started parts: answer commands, report their health.

Split from :mod:`fieldscope.edge.daemon`, which re-exports :class:`StationParts`.
Commands map to in-process actions only; nothing received can name a file or a program.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fieldscope.edge.archive import ImageArchive
from fieldscope.edge.capture import CameraSupervisor, Trigger
from fieldscope.edge.commands import Command, CommandName
from fieldscope.edge.config import EdgeConfig
from fieldscope.edge.errors import FieldscopeError
from fieldscope.edge.health import CameraState, CommandReply, Heartbeat
from fieldscope.edge.link import MqttLink
from fieldscope.edge.model_slot import ModelSlot, ReloadResult
from fieldscope.edge.outbox import DEFAULT_KEEP_SENT, Outbox, OutboxError, clock_first_seq
from fieldscope.edge.pipeline import Pipeline
from fieldscope.edge.sample_book import SampleBook
from fieldscope.edge.uploads import ImageUploads, open_uploads

__all__ = [
    "StationParts",
    "camera_report",
    "capture",
    "clip",
    "drain",
    "make_data_dir",
    "open_outbox",
    "open_uploads_on",
    "pause_or_resume",
    "reload_reply",
    "resend",
    "state_record",
    "station_warnings",
]

logger = logging.getLogger("fieldscope.edge.daemon")

_MAX_TEXT = 900  # a warning line in the heartbeat (the payload allows 1000)


@dataclass(frozen=True)
class StationParts:
    """The parts of a started daemon (:attr:`Daemon.station`)."""

    outbox: Outbox
    slot: ModelSlot
    archive: ImageArchive
    supervisor: CameraSupervisor
    trigger: Trigger
    link: MqttLink
    pipeline: Pipeline
    samples: SampleBook  # the current sample, which the ``sample`` command changes
    uploads: ImageUploads | None = None  # images to the collector (``[upload]``)


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"


def clip(text: str) -> str:
    """One line of at most ``_MAX_TEXT`` characters, for a heartbeat warning or reply."""
    text = " ".join(text.split())
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"


def station_warnings(st: StationParts, stall_limit_s: float) -> list[str]:
    """The standing problems of the parts: refused bundle, held storage, stuck stages."""
    warnings: list[str] = []
    if st.slot.refused is not None:
        warnings.append(clip(f"model: the configured bundle is refused: {st.slot.refused}"))
    blocked = st.pipeline.storage_problem
    if blocked is not None:
        warnings.append(
            clip(
                f"outbox: cannot store identifications for {blocked.seconds:.0f} s "
                f"({blocked.attempts} tries), capture is held until it can: {blocked.error}"
            )
        )
    stalled = st.pipeline.stalled(stall_limit_s)
    if stalled:
        warnings.append(clip(f"pipeline stuck: {', '.join(stalled)}"))
    if st.archive.errors:
        warnings.append(f"archive: {st.archive.errors} write error(s) so far")
    lost_images = None if st.uploads is None else st.uploads.problem()
    if lost_images is not None:
        warnings.append(clip(lost_images))
    return warnings


def camera_report(st: StationParts) -> tuple[CameraState, str | None]:
    """The camera's state for the heartbeat, and its outage in words if it is down.

    The supervisor knows first whether the camera is down or back.
    """
    outage = st.supervisor.outage
    state = st.pipeline.camera_state
    if state is not CameraState.STOPPED:
        if outage is not None:
            state = CameraState.OUTAGE
        elif state is CameraState.OUTAGE:
            state = CameraState.OK
    if outage is None:
        return state, None
    return state, clip(
        f"{outage.error} (down since {outage.since:%Y-%m-%dT%H:%M:%SZ}, {outage.attempts} tries)"
    )


def resend(command: Command, st: StationParts, link: MqttLink | None) -> CommandReply:
    """Put kept sent identifications back in the outbox (a collector found a gap)."""
    assert command.first is not None
    assert command.last is not None
    outbox = st.outbox
    try:
        moved, queued = outbox.requeue(command.first, command.last)
        kept = outbox.kept_range()
    except OutboxError as exc:
        return command.failed(clip(f"outbox: {exc}"))
    if moved and link is not None:
        link.rewind()
    wanted = command.last - command.first + 1
    data = {
        "requeued": moved,
        "already_queued": queued,
        "not_kept": wanted - moved - queued,
        "kept": None if kept is None else {"first": kept[0], "last": kept[1]},
    }
    logger.info(
        "resend %d..%d: %d requeued, %d still queued, %d no longer kept",
        command.first,
        command.last,
        moved,
        queued,
        wanted - moved - queued,
    )
    return command.reply(data)


def capture(command: Command, st: StationParts) -> CommandReply:
    """Fire the trigger ``count`` times, unless paused or the queue is full."""
    if st.pipeline.paused:
        return command.failed("the station is paused; send resume first")
    queued = sum(st.trigger.fire() for _ in range(command.count))
    if queued == 0:
        return command.failed("too many captures are already waiting; try again later")
    return command.reply({"requested": command.count, "queued": queued})


def pause_or_resume(command: Command, st: StationParts) -> CommandReply:
    """Stop or restart taking frames; what is in the pipeline still finishes."""
    pause = command.name is CommandName.PAUSE
    if pause:
        st.pipeline.pause()
    else:
        st.pipeline.resume()
    logger.info("%s", "paused: no frames are taken until resume" if pause else "resumed")
    return command.reply({"paused": pause})


def reload_reply(command: Command, result: ReloadResult) -> CommandReply:
    """The answer to ``reload``: the model now serving, and whether it changed."""
    data = {"model": result.model.ref.to_dict(), "swapped": result.swapped}
    if result.error is not None:
        return command.failed(f"kept the old model: {result.error}", data)
    return command.reply(data)


def drain(pipeline: Pipeline, within_s: float) -> None:
    """A clean stop: let the frames already taken reach the outbox, for ``within_s``."""
    pipeline.wake()
    if not pipeline.join(within_s):
        logger.warning(
            "the pipeline did not drain within %.0f s; frames not stored are taken again "
            "at the next start",
            within_s,
        )


def make_data_dir(data_dir: Path) -> None:
    """Create the data directory, or say who should (systemd's StateDirectory=)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FieldscopeError(
            f"device.data_dir: cannot create {data_dir}: {exc.strerror or exc} (it must be "
            "writable by the daemon's user; systemd's StateDirectory= creates it)"
        ) from exc


def open_outbox(cfg: EdgeConfig) -> Outbox:
    """The configured outbox, keeping sent messages for ``resend``; logs its backlog."""
    o = cfg.outbox
    outbox = Outbox(
        o.path,
        max_messages=o.max_messages,
        when_full=o.when_full,
        max_bytes=o.max_bytes,
        first_seq=clock_first_seq(),
        keep_sent=DEFAULT_KEEP_SENT,  # for the resend command
    )
    logger.info(
        "outbox %s: %d message(s) waiting, next seq %d", o.path, outbox.depth(), outbox.next_seq
    )
    return outbox


def open_uploads_on(cfg: EdgeConfig, stack: contextlib.ExitStack) -> ImageUploads | None:
    """The station's image uploads (None when ``[upload] policy`` is ``none``), closed
    by ``stack``."""
    uploads = open_uploads(cfg.upload, cfg.device.data_dir, cfg.topics)
    if uploads is not None:
        stack.callback(uploads.close)
    return uploads


def state_record(
    cfg: EdgeConfig, station: StationParts | None, state: str, beat: Heartbeat | None
) -> dict[str, Any]:
    """What the state file says: who, which model, the outbox and the last heartbeat."""
    data: dict[str, Any] = {
        "state": state,
        "pid": os.getpid(),
        "updated_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "station": cfg.device.station,
        "device": cfg.device.id,
    }
    if station is not None:
        data["model"] = station.slot.current().ref.to_dict()
        with contextlib.suppress(OutboxError):
            stats = station.outbox.stats()
            data["outbox"] = {
                "depth": stats.depth,
                "dropped": stats.dropped,
                "next_seq": stats.next_seq,
            }
    if beat is not None:
        data["frames"] = beat.frames.to_dict()
        data["camera"] = beat.camera_state.value
        data["paused"] = beat.paused
    return data
