"""The edge daemon: wires the parts of ``fieldscope.edge`` into one headless station.

Start-up reads like a table of contents (:meth:`Daemon.start`): the configuration
was loaded and validated by the caller; then the outbox is opened, the model is
loaded, verified and self-tested, the archive and the camera are prepared, the MQTT
link starts connecting in the background, and the pipeline threads start
(``fieldscope.edge.pipeline``). Only then is systemd told ``READY=1``.

After that the main thread only keeps house (:meth:`Daemon.serve`), waiting on a
socket with a deadline — never a polling sleep — for whichever comes first:

* a signal: SIGTERM/SIGINT stop cleanly, SIGHUP reloads the bundle (signal handlers
  only write a byte to the socket; the work happens here, on the main thread);
* the next heartbeat, published every ``heartbeat.interval_s`` and mirrored into
  ``<data_dir>/daemon-state.json`` for ``fieldscope edge status``;
* the next watchdog ping, sent only while no pipeline stage is stuck on one frame
  (waiting for frames is healthy; an interpreter or a disk that hangs is not, and
  systemd then restarts the service);
* the next look at ``model.bundle``: a deployment that re-points the symlink (or
  replaces the directory) is noticed and the new bundle loaded.

Commands from MQTT arrive on the link's dispatcher thread (:meth:`Daemon.on_command`)
and map to in-process actions only; nothing received can name a file or a program.

A clean stop (:meth:`Daemon.shutdown`): ``STOPPING=1``; the stop event ends
capturing and the frames already taken drain through the pipeline into the outbox;
the link flushes the outbox and publishes the retained ``stopped``; the outbox is
closed. Everything is bounded so it finishes within a few seconds, and whatever was
not delivered stays in the outbox for the next start.
"""

from __future__ import annotations

import contextlib
import logging
import math
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from types import FrameType

from fieldscope.edge.archive import ImageArchive
from fieldscope.edge.capture import Camera, CameraSupervisor, Trigger, make_camera, make_trigger
from fieldscope.edge.commands import Command, CommandError, CommandName, parse_command
from fieldscope.edge.config import EdgeConfig
from fieldscope.edge.daemon_logging import (
    STATE_FILE_NAME,
    JournalFormatter,
    configure_logging,
    read_state_file,
    write_state_file,
)
from fieldscope.edge.daemon_station import (
    StationParts,
    camera_report,
    capture,
    clip,
    drain,
    make_data_dir,
    open_outbox,
    open_uploads_on,
    pause_or_resume,
    reload_reply,
    resend,
    state_record,
    station_warnings,
)
from fieldscope.edge.errors import FieldscopeError
from fieldscope.edge.health import CommandReply, Heartbeat, cpu_temperature_c, disk_free_bytes
from fieldscope.edge.link import MqttLink
from fieldscope.edge.model_slot import (
    LoadedModel,
    ModelSlot,
    ReloadResult,
    bundle_source,
    load_model,
)
from fieldscope.edge.objects import Segmenter
from fieldscope.edge.outbox import Outbox, OutboxError
from fieldscope.edge.pipeline import FrameCounters, Pipeline
from fieldscope.edge.sample_book import SAMPLE_FILE, SampleBook, sample_command, stamper
from fieldscope.edge.site import site_part
from fieldscope.edge.systemd import Notifier
from fieldscope.edge.uploads import ImageUploads

__all__ = [
    "BUNDLE_CHECK_INTERVAL_S",
    "STATE_FILE_NAME",
    "Daemon",
    "JournalFormatter",
    "StationParts",
    "configure_logging",
    "read_state_file",
]

logger = logging.getLogger(__name__)

# How often the bundle path is checked for a new target (a stat of one file).
BUNDLE_CHECK_INTERVAL_S = 2.0
# A clean stop: this long for the frames in the pipeline, then the link's flush.
_DRAIN_S = 3.0
_FLUSH_S = 3.0
# Without systemd's watchdog, a stage busy this long on one frame is reported stuck;
# with it, WatchdogSec, but at least _MIN_STALL_S.
_DEFAULT_STALL_S = 60.0
_MIN_STALL_S = 10.0
_MAX_EVENTS = 16
# A command that arrives while the daemon starts waits this long for it.
_START_WAIT_S = 10.0
_WAKE, _STOP, _RELOAD = b"w", b"s", b"r"
_SIGNAL_BYTES: Mapping[int, bytes] = {
    signal.SIGTERM: _STOP,
    signal.SIGINT: _STOP,
    signal.SIGHUP: _RELOAD,
}


class Daemon:
    """One station: build it from a validated configuration, then :meth:`run` it.

    ``camera`` replaces the configured backend (tests pass a fake that fails on
    purpose); ``notifier`` defaults to the one ``$NOTIFY_SOCKET`` asks for;
    ``stall_limit_s`` is how long a stage may work on one frame before the daemon
    calls it stuck and stops feeding the watchdog (default: see ``_MIN_STALL_S``).
    :meth:`run` blocks until a stop and returns the exit status (0 after a clean
    stop); from another thread, :meth:`request_stop` ends it and ``started`` tells
    when the start-up is complete.
    """

    def __init__(
        self,
        cfg: EdgeConfig,
        *,
        camera: Camera | None = None,
        notifier: Notifier | None = None,
        stall_limit_s: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.topics = cfg.topics
        self.notifier = notifier or Notifier.from_environ()
        self.stop = threading.Event()
        self.started = threading.Event()
        self.counters = FrameCounters(segmenting=cfg.objects.mode == "segment")
        self._camera_override = camera
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._events: deque[str] = deque(maxlen=_MAX_EVENTS)
        self._events_lock = threading.Lock()
        self._started_at = time.monotonic()
        self._model_json: bytes | None = None
        interval = self.notifier.watchdog_interval_s
        if stall_limit_s is None:
            # WatchdogSec, but never so short that a slow frame on a small Pi counts.
            stall_limit_s = (
                _DEFAULT_STALL_S if interval is None else max(_MIN_STALL_S, 2 * interval)
            )
        self._stall_limit_s = stall_limit_s
        self._watchdog_withheld = False
        self._link: MqttLink | None = None  # set as soon as it exists: replies need it
        self._station: StationParts | None = None
        self._reload_lock = threading.Lock()
        self._teardown = contextlib.ExitStack()
        self._shut_down = False

    @property
    def station(self) -> StationParts:
        """The started parts (outbox, slot, link, pipeline, ...)."""
        if self._station is None:
            raise FieldscopeError("the daemon is not started")
        return self._station

    # --- the whole life -------------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until stopped, stop cleanly; 0 on a clean stop.

        Signal handlers are installed when called on the main thread.

        Raises:
            FieldscopeError: start-up failed (no outbox, no valid bundle, bad TLS
                files); what was already started is stopped again.
        """
        restore = self._install_signal_handlers()
        try:
            try:
                self.start()
                self.serve()
            finally:
                self.shutdown()
        finally:
            restore()
        return 0

    def start(self) -> None:
        """The start-up sequence, in order (see the module docstring). Each part
        registers how it is stopped, so :meth:`shutdown` undoes exactly what was
        started, in reverse: pipeline, link, camera, outbox."""
        logger.info("starting station %s (config %s)", self.topics.base, self.cfg.source)
        stack = self._teardown
        make_data_dir(self.cfg.device.data_dir)
        samples = SampleBook(self.cfg.device.data_dir / SAMPLE_FILE, self.cfg.sample)
        outbox = open_outbox(self.cfg)
        stack.callback(outbox.close)
        uploads = open_uploads_on(self.cfg, stack)  # None unless [upload] chooses images
        stack.callback(self._write_state, "stopped")
        slot = ModelSlot(self._load_model(), self.cfg.objects)
        archive = self._open_archive()
        supervisor, trigger = self._open_camera()
        stack.callback(supervisor.close)
        link = self._start_link(outbox, uploads)
        stack.callback(link.stop_clean, _FLUSH_S)
        pipeline = self._start_pipeline(
            supervisor, trigger, slot, outbox, archive, samples=samples, uploads=uploads
        )
        stack.callback(drain, pipeline, _DRAIN_S)
        parts = (outbox, slot, archive, supervisor, trigger, link, pipeline, samples, uploads)
        self._station = StationParts(*parts)
        self._write_state("running")
        self.notifier.ready(f"serving {slot.current().describe()}")
        self.started.set()
        logger.info("station %s is running", self.topics.base)

    def _load_model(self) -> LoadedModel:
        model = load_model(self.cfg.model, self.cfg.preprocessing)
        self._model_json = model.info.to_json()
        logger.info(
            "serving model %s from %s (%s %s)",
            model.describe(),
            model.source.target,
            model.runtime.name,
            model.runtime.version,
        )
        return model

    def _open_archive(self) -> ImageArchive:
        a = self.cfg.archive
        return ImageArchive(a.dir, a.mode, a.max_bytes, a.format)

    def _open_camera(self) -> tuple[CameraSupervisor, Trigger]:
        c = self.cfg.camera
        camera = self._camera_override or make_camera(
            c, self.cfg.device.data_dir, on_problem=self._on_file_problem
        )
        supervisor = CameraSupervisor(
            camera,
            self.stop,
            backoff_min_s=c.reopen_backoff_s[0],
            backoff_max_s=c.reopen_backoff_s[1],
            on_recovered=self._on_camera_recovered,
        )
        logger.info("camera %s, trigger %s", camera.name, c.trigger)
        return supervisor, make_trigger(c)

    def _start_link(self, outbox: Outbox, uploads: ImageUploads | None) -> MqttLink:
        link = MqttLink(
            self.cfg.mqtt,  # its max_in_flight is outbox.batch (the loader sets it)
            self.topics,
            outbox,
            on_command=self.on_command,
            retained_model=lambda: self._model_json,
            stop=self.stop,
            images=None if uploads is None else uploads.queue,
        )
        link.start()
        self._link = link
        return link

    def _start_pipeline(
        self,
        supervisor: CameraSupervisor,
        trigger: Trigger,
        slot: ModelSlot,
        outbox: Outbox,
        archive: ImageArchive,
        *,
        samples: SampleBook,
        uploads: ImageUploads | None,
    ) -> Pipeline:
        pipeline = Pipeline(
            camera=supervisor,
            trigger=trigger,
            slot=slot,
            outbox=outbox,
            archive=archive,
            uploads=uploads,
            quality=self.cfg.quality,
            topics=self.topics,
            stop=self.stop,
            counters=self.counters,
            on_event=self._event,
            # One per daemon: it holds a flow cell's running median of recent frames.
            segmenter=Segmenter(self.cfg.objects) if self.cfg.objects.mode == "segment" else None,
            stamp=stamper(site_part(self.cfg.site), samples),  # every message: site, sample
        )
        pipeline.start()
        return pipeline

    # --- keeping house ------------------------------------------------------------------

    def serve(self) -> None:
        """Keep house until the stop event: heartbeats, watchdog, signals, bundle changes."""
        now = time.monotonic()
        next_heartbeat = now + self.cfg.heartbeat.interval_s
        watchdog_every = self.notifier.watchdog_interval_s
        next_watchdog = now if watchdog_every is not None else math.inf
        next_bundle_check = now + BUNDLE_CHECK_INTERVAL_S
        summary_every = self.cfg.log.summary_interval_s
        next_summary = now + summary_every if summary_every > 0 else math.inf
        while not self.stop.is_set():
            deadline = min(next_heartbeat, next_watchdog, next_bundle_check, next_summary)
            for byte in self._wait(deadline - time.monotonic()):
                if byte == _STOP[0]:
                    logger.info("stop requested")
                    self.stop.set()
                elif byte == _RELOAD[0]:
                    self.reload("SIGHUP")
            if self.stop.is_set():
                break
            now = time.monotonic()
            self.station.pipeline.revive()  # a stage whose thread ended runs again
            if watchdog_every is not None and now >= next_watchdog:
                self._feed_watchdog()
                next_watchdog = now + watchdog_every
            if now >= next_bundle_check:
                self._check_bundle()
                next_bundle_check = time.monotonic() + BUNDLE_CHECK_INTERVAL_S
            if now >= next_heartbeat:
                self.publish_heartbeat()
                next_heartbeat = time.monotonic() + self.cfg.heartbeat.interval_s
            if now >= next_summary:
                self._log_summary()
                next_summary = time.monotonic() + summary_every

    def _log_summary(self) -> None:
        """``log.summary_interval_s``: one line a person reading the journal can act on;
        a station that runs well is otherwise silent until it stops."""
        if self._station is None:
            return
        beat = self.health(drain_events=False)
        f = beat.frames
        link = "connected" if self._station.link.connected else "disconnected"
        logger.info(
            "running: %d frames (%d ok, %d uncertain, %d rejected, %d failed), %.1f/s; "
            "outbox %d waiting; broker %s; camera %s%s",
            f.seen,
            f.accepted,
            f.uncertain,
            f.rejected,
            f.failed,
            beat.fps,
            beat.outbox_depth,
            link,
            beat.camera_state.value,
            "; paused" if beat.paused else "",
        )

    def _wait(self, timeout: float) -> bytes:
        """Block until the wake socket has bytes or ``timeout`` passes; the bytes."""
        readable, _, _ = select.select([self._wake_r], [], [], max(0.0, timeout))
        if not readable:
            return b""
        try:
            return self._wake_r.recv(64)
        except OSError:
            return b""

    def _poke(self, byte: bytes) -> None:
        with contextlib.suppress(OSError):  # closed, or full: it already holds a wake-up
            self._wake_w.send(byte)

    def request_stop(self) -> None:
        """Stop cleanly (from any thread); :meth:`run` then returns."""
        self._poke(_STOP)

    def request_reload(self) -> None:
        """Reload the bundle on the main thread, as SIGHUP does."""
        self._poke(_RELOAD)

    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum: int, _frame: FrameType | None) -> None:
            self._poke(_SIGNAL_BYTES.get(signum, _WAKE))

        previous = {sig: signal.signal(sig, handler) for sig in _SIGNAL_BYTES}

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore

    def _feed_watchdog(self) -> None:
        stalled = self.station.pipeline.stalled(self._stall_limit_s)
        if stalled:
            if not self._watchdog_withheld:
                logger.error(
                    "pipeline stuck: %s; no longer feeding systemd's watchdog, which will "
                    "restart the service",
                    ", ".join(stalled),
                )
            self._watchdog_withheld = True
            return
        if self._watchdog_withheld:
            logger.warning("the pipeline moves again; feeding the watchdog again")
        self._watchdog_withheld = False
        self.notifier.watchdog()

    def _check_bundle(self) -> None:
        slot = self.station.slot
        now = bundle_source(self.cfg.model.bundle)
        if now in (slot.current().source, slot.refused_source):
            return
        if now.manifest_id is None:
            return  # mid-deployment (or gone): keep serving, look again later
        logger.info("the bundle %s changed (now %s); reloading", self.cfg.model.bundle, now.target)
        self.reload(f"{self.cfg.model.bundle} changed")

    # --- model swap ---------------------------------------------------------------------

    def reload(self, why: str) -> ReloadResult:
        """Load, verify, self-test and swap in the configured bundle; the old one keeps
        serving when the new one is refused (the reason is logged and published)."""
        with self._reload_lock:  # a swap and its announcement stay in order
            return self._reload(why)

    def _reload(self, why: str) -> ReloadResult:
        result = self.station.slot.reload(self.cfg.model, self.cfg.preprocessing)
        if result.swapped:
            self._model_json = result.model.info.to_json()
            logger.info(
                "model swapped (%s): %s -> %s",
                why,
                result.previous.describe(),
                result.model.describe(),
            )
            self.station.link.publish_model(self._model_json)
            # `fieldscope edge status` (and a rollout's health check) read the state file:
            # refresh it now rather than at the next heartbeat, up to a minute later.
            self.publish_heartbeat()
        else:
            logger.error(
                "refused the new bundle (%s): %s; still serving %s",
                why,
                result.error,
                result.model.describe(),
            )
            self._event(f"model: refused a new bundle ({why}): {result.error}")
            self.publish_heartbeat()
        return result

    # --- commands -----------------------------------------------------------------------

    def on_command(self, name: str, payload: bytes) -> None:
        """Parse, carry out and answer one MQTT command (on the link's dispatcher thread)."""
        try:
            command = parse_command(name, payload)
        except CommandError as exc:
            logger.warning("refused a command: %s", exc)
            reply = exc.reply()
        else:
            logger.info("command %s (request %s)", command.name.value, command.request_id)
            if not (self.started.wait(_START_WAIT_S) and not self.stop.is_set()):
                reply = command.failed("the station is starting or stopping; try again")
            else:
                try:
                    reply = self._carry_out(command)
                except Exception as exc:  # a bug: the sender still gets an answer
                    logger.exception("command %s failed", command.name.value)
                    reply = command.failed(clip(f"internal error: {exc!r}; see the station's log"))
        if self._link is not None:
            self._link.publish_command_result(name, reply)

    def _carry_out(self, command: Command) -> CommandReply:
        actions: Mapping[CommandName, Callable[[Command], CommandReply]] = {
            CommandName.CAPTURE: lambda c: capture(c, self.station),
            CommandName.PAUSE: lambda c: pause_or_resume(c, self.station),
            CommandName.RESUME: lambda c: pause_or_resume(c, self.station),
            CommandName.RELOAD: lambda c: reload_reply(c, self.reload("reload command")),
            CommandName.STATUS: lambda c: c.reply(self.health(drain_events=False).to_dict()),
            CommandName.RESEND: lambda c: resend(c, self.station, self._link),
            CommandName.SAMPLE: lambda c: sample_command(c, self.station.samples),
        }
        return actions[command.name](command)

    # --- health ---------------------------------------------------------------------------

    def _event(self, text: str) -> None:
        with self._events_lock:
            self._events.append(clip(text))

    def _on_file_problem(self, source: str, reason: str) -> None:
        # The event before the count: a heartbeat that counts it also reports it.
        self._event(f"camera: skipped {source}: {reason}")
        self.counters.add("seen")
        self.counters.add("failed")

    def _on_camera_recovered(self, since: datetime, seconds: float) -> None:
        self._event(f"camera: back after {seconds:.0f} s down (since {since:%H:%M:%S} UTC)")

    def health(self, *, drain_events: bool = True) -> Heartbeat:
        """The current health snapshot; ``drain_events`` consumes the recent events
        (a heartbeat reports each once; a status reply only shows them)."""
        st = self.station
        frames = self.counters.snapshot()  # before the events are drained (see above)
        warnings: list[str] = []
        try:
            stats = st.outbox.stats()
            depth, dropped, age = stats.depth, stats.dropped, stats.oldest_age_s
        except OutboxError as exc:
            depth, dropped, age = st.outbox.depth(), st.outbox.dropped(), None
            warnings.append(clip(f"outbox: {exc}"))
        warnings += station_warnings(st, self._stall_limit_s)
        with self._events_lock:
            warnings.extend(self._events)
            if drain_events:
                self._events.clear()
        state, outage_text = camera_report(st)
        return Heartbeat(
            time=datetime.now(UTC),
            uptime_s=round(time.monotonic() - self._started_at, 3),
            frames=frames,
            fps=round(self.counters.fps(), 3),
            outbox_depth=depth,
            outbox_dropped=dropped,
            outbox_oldest_age_s=None if age is None else round(age, 3),
            camera_state=state,
            camera_outage=outage_text,
            paused=st.pipeline.paused,
            disk_free_bytes=disk_free_bytes(self.cfg.device.data_dir),
            cpu_temperature_c=cpu_temperature_c(),
            model=st.slot.current().ref,
            warnings=tuple(warnings[-32:]),
        )

    def publish_heartbeat(self) -> Heartbeat | None:
        """Publish a heartbeat now (QoS 0: dropped while disconnected) and update the
        state file; the snapshot, or None before start-up completed."""
        if self._station is None:
            return None
        beat = self.health()
        self._station.link.publish_heartbeat(beat)
        f = beat.frames
        held = (
            "; capture held: the outbox cannot store"
            if self._station.pipeline.storage_problem
            else ""
        )
        self.notifier.status(
            f"{f.seen} frames: {f.accepted} ok, {f.uncertain} uncertain, {f.rejected} rejected, "
            f"{f.failed} failed; outbox {beat.outbox_depth}; camera {beat.camera_state.value}{held}"
        )
        self._write_state("running", beat)
        return beat

    def _write_state(self, state: str, beat: Heartbeat | None = None) -> None:
        """Mirror the essentials into the state file, atomically (best effort)."""
        data = state_record(self.cfg, self._station, state, beat)
        write_state_file(self.cfg.device.data_dir, data)

    # --- stopping -----------------------------------------------------------------------

    def shutdown(self) -> None:
        """Drain, flush, publish ``stopped``, close — what was started, in reverse.

        Safe to call twice, and after a start-up that failed half way.
        """
        if self._shut_down:
            return
        self._shut_down = True
        self.notifier.stopping("draining the pipeline and flushing the outbox")
        self.stop.set()
        try:
            self._teardown.close()
        finally:
            self.notifier.close()
            self._wake_r.close()
            self._wake_w.close()
        c = self.counters.snapshot()
        logger.info(
            "stopped: %d frames (%d ok, %d uncertain, %d rejected, %d failed)",
            c.seen,
            c.accepted,
            c.uncertain,
            c.rejected,
            c.failed,
        )


if __name__ == "__main__":
    from fieldscope.edge.daemon_cli import main

    sys.exit(main())
