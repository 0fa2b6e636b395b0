"""The frame pipeline: four threads joined by bounded queues.

::

    capture ──q1──▶ prepare ──q2──▶ classify ──q3──▶ store
    (camera,         (quality gate,  (inference)      (archive, message,
     trigger,         preprocess)                      outbox commit, done)
     image hash)

Each stage runs on its own thread, so while one frame is being classified the next
is denoised and the one after it decoded: on a multi-core Pi the stages overlap
instead of adding up (OpenCV, numpy, the TFLite interpreter and SQLite release the
GIL while they work). The queues are small (a frame is megabytes): a slow stage
makes the ones before it wait, it never piles frames up in memory.

Rules the stages keep:

* one stop event for the daemon; the capture thread stops taking frames when it is
  set, and an end marker then flows down the queues, so every frame already taken
  is finished and stored before the threads exit (the *drain* of a clean stop);
* no polling sleeps: stages block in ``queue.get(timeout=...)``, the trigger, or the
  camera, and the timeouts only bound how late an abort is noticed;
* a frame uses the model it got in ``prepare`` for its inference as well, so a model
  swap falls between two frames (``fieldscope.edge.model_slot``);
* the identification is committed to the outbox (which allocates ``seq``) before
  ``frame.done()`` is called, so a file is never marked handled without its message
  on disk, and a frame whose source key is already in the outbox (stored just before
  a crash) is marked handled instead of being identified a second time;
* one bad frame never stops the pipeline: its exception is logged, counted as
  ``failed``, the frame is quarantined (``Frame.fail``: a watched file goes to
  ``failed/`` and is never offered again) and the stage goes on with the next frame;
* a stage that dies anyway (an error outside any one frame) is restarted in its
  thread with a short backoff, and :meth:`Pipeline.revive` — called by the daemon's
  main loop — starts a new thread for a stage whose thread ended; both are logged and
  reported as events (heartbeat warnings), restarts counted in :attr:`Pipeline.restarts`;
* an outbox that cannot store (a full disk, a read-only or damaged file) *holds* the
  pipeline instead: the store stage keeps the identification in hand and retries with
  backoff, the queues before it fill, and capture stops — a watched folder's files
  simply wait, nothing is taken and thrown away — until a retry succeeds (someone
  freed space); :attr:`Pipeline.storage_problem` tells health about it meanwhile;
* each stage reports progress (:meth:`Pipeline.stalled`): busy on one frame for too
  long means stuck, and the daemon then stops feeding systemd's watchdog. Waiting —
  for a trigger, a frame, or a queue — is idle, not stuck.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

from fieldscope.edge.archive import ImageArchive
from fieldscope.edge.capture import CameraSupervisor, Frame, Trigger
from fieldscope.edge.config import QualityConfig
from fieldscope.edge.health import CameraState
from fieldscope.edge.message import ImageRef
from fieldscope.edge.model_slot import ModelSlot
from fieldscope.edge.objects import Segmenter
from fieldscope.edge.outbox import Entry, Outbox, OutboxError, OutboxFullError
from fieldscope.edge.pipeline_objects import classify_objects, segment_frame, store_objects
from fieldscope.edge.pipeline_parts import (
    _NO_IMAGE,
    FrameCounters,
    StorageProblem,
    _Beat,
    _Blocked,
    _Captured,
    _Prepared,
    message_factory,
)
from fieldscope.edge.preprocess import preprocess
from fieldscope.edge.quality import assess
from fieldscope.edge.topics import TOPIC_SPECS, TopicKind, Topics
from fieldscope.edge.uploads import FrameImages, ImageUploads, source_name

__all__ = ["STAGES", "FrameCounters", "Pipeline", "StorageProblem"]

logger = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("capture", "prepare", "classify", "store")
# How long a blocked get/put/read waits before looking at the abort flag again.
_TICK_S = 0.25
# How long the camera may block in one read before the capture loop looks around.
_READ_TIMEOUT_S = 0.5
# A stage that died is restarted after this long, doubling up to the maximum.
_RESTART_MIN_S = 0.1
_RESTART_MAX_S = 5.0
# While the outbox cannot store, the identification in hand is tried again after this
# long, doubling up to the maximum (a full disk is freed by a person, not in a second).
_STORE_RETRY_MIN_S = 0.5
_STORE_RETRY_MAX_S = 30.0


class _End:
    """The end marker that flows down the queues when the pipeline drains."""


_END: Final = _End()


class Pipeline:
    """Capture, gate, preprocess, classify and store frames until the stop event.

    ``on_event(text)`` hears about things worth a health warning (a message that
    could not be stored, a frame that failed); it must not block.
    """

    def __init__(
        self,
        *,
        camera: CameraSupervisor,
        trigger: Trigger,
        slot: ModelSlot,
        outbox: Outbox,
        archive: ImageArchive,
        uploads: ImageUploads | None = None,
        quality: QualityConfig,
        topics: Topics,
        stop: threading.Event,
        counters: FrameCounters,
        on_event: Callable[[str], None] | None = None,
        queue_sizes: tuple[int, int, int] = (1, 2, 4),
        segmenter: Segmenter | None = None,
        stamp: Callable[[Callable[[int], bytes]], Callable[[int], bytes]] | None = None,
    ) -> None:
        # ``segmenter`` cuts frames into objects (one per daemon: it holds a running median);
        # ``stamp`` wraps each message builder (site and sample: edge.sample_book.stamper).
        self._segmenter = segmenter
        self._stamp = stamp or (lambda payload: payload)
        self._camera = camera
        self._trigger = trigger
        self._slot = slot
        self._outbox = outbox
        self._images = FrameImages(archive, uploads)  # archived, uploaded, described
        self._quality = quality
        self._topics = topics
        self._topic = topics.identification
        self._qos = TOPIC_SPECS[TopicKind.IDENTIFICATION].qos
        self._stop = stop
        self.counters = counters
        self._on_event = on_event or (lambda _text: None)
        self._queues: list[queue.Queue[Any]] = [queue.Queue(n) for n in queue_sizes]
        self._beats = {name: _Beat() for name in STAGES}
        self._abort = threading.Event()
        self._unpaused = threading.Condition()
        self._paused = False
        self._camera_state = CameraState.STARTING
        self._threads: list[threading.Thread] = []
        self._targets: list[Callable[[], None]] = []
        self._restarts = dict.fromkeys(STAGES, 0)
        self._restarts_lock = threading.Lock()
        self._blocked_lock = threading.Lock()
        self._blocked: _Blocked | None = None

    # --- control ------------------------------------------------------------------------

    def start(self) -> None:
        bodies: tuple[Callable[[], None], ...] = (
            self._capture_loop,
            lambda: self._stage("prepare", self._queues[0], self._queues[1], self._prepare),
            lambda: self._stage("classify", self._queues[1], self._queues[2], self._classify),
            lambda: self._stage("store", self._queues[2], None, self._store),
        )
        for name, body in zip(STAGES, bodies, strict=True):
            after = self._capture_ended if name == "capture" else None
            target = functools.partial(self._supervised, name, body, after)
            self._targets.append(target)
            self._threads.append(self._thread(name, target))
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _thread(name: str, target: Callable[[], None]) -> threading.Thread:
        return threading.Thread(target=target, name=f"fieldscope-{name}", daemon=True)

    def _supervised(
        self, name: str, body: Callable[[], None], after: Callable[[], None] | None
    ) -> None:
        """Run a stage's loop; should it die of an error outside any one frame, log it,
        report it and run the loop again (backing off), until the pipeline stops."""
        delay = _RESTART_MIN_S
        try:
            while True:
                try:
                    body()
                    return
                except Exception as exc:
                    if self._stop.is_set() or self._abort.is_set():
                        logger.exception("the %s stage failed while stopping", name)
                        return
                    count = self._count_restart(name)
                    logger.exception(
                        "the %s stage died; restarting it in %.1f s (restart %d)",
                        name,
                        delay,
                        count,
                    )
                    self._report(f"pipeline: the {name} stage died and was restarted: {exc!r}")
                    self._stop.wait(delay)
                    delay = min(2 * delay, _RESTART_MAX_S)
        finally:
            if after is not None:
                after()

    def _count_restart(self, name: str) -> int:
        with self._restarts_lock:
            self._restarts[name] += 1
            return self._restarts[name]

    @property
    def restarts(self) -> dict[str, int]:
        """How often each stage was restarted since the start."""
        with self._restarts_lock:
            return dict(self._restarts)

    def revive(self) -> list[str]:
        """The supervisor of last resort: start a new thread for each stage whose
        thread ended while the pipeline runs (only a ``BaseException`` the stage's own
        guard does not catch can end one). Returns the stages revived. Called by the
        daemon's main loop."""
        revived: list[str] = []
        if self._stop.is_set() or self._abort.is_set():
            return revived
        for i, (name, thread) in enumerate(zip(STAGES, self._threads, strict=True)):
            if thread.is_alive() or self._stop.is_set():
                continue
            count = self._count_restart(name)
            logger.error("the %s stage's thread had ended; starting a new one (%d)", name, count)
            self._report(f"pipeline: the {name} stage's thread had ended and was restarted")
            self._threads[i] = self._thread(name, self._targets[i])
            self._threads[i].start()
            revived.append(name)
        return revived

    def _report(self, text: str) -> None:
        """``on_event``, which must never take a stage down with it."""
        try:
            self._on_event(text)
        except Exception:
            logger.exception("on_event failed")

    @property
    def paused(self) -> bool:
        with self._unpaused:
            return self._paused

    def pause(self) -> None:
        """Stop taking frames (frames already taken are finished); heartbeats go on."""
        with self._unpaused:
            self._paused = True

    def resume(self) -> None:
        with self._unpaused:
            self._paused = False
            self._unpaused.notify_all()

    def wake(self) -> None:
        """Make waiting stages look at the stop event now (call after setting it)."""
        self._trigger.wake()
        with self._unpaused:
            self._unpaused.notify_all()

    def join(self, timeout: float) -> bool:
        """Wait for the drain after the stop event; True when every frame taken was
        finished. On timeout the stages are told to abandon what they hold (a file
        not stored is offered again at the next start)."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        drained = not any(t.is_alive() for t in self._threads)
        if not drained:
            self._abort.set()
            for thread in self._threads:
                thread.join(2 * _TICK_S)
        self._camera_state = CameraState.STOPPED
        return drained

    @property
    def camera_state(self) -> CameraState:
        return self._camera_state

    @property
    def storage_problem(self) -> StorageProblem | None:
        """Why and since when the outbox refuses to store (capture is held), or None."""
        with self._blocked_lock:
            b = self._blocked
            if b is None:
                return None
            return StorageProblem(b.error, b.since, time.monotonic() - b.started, b.attempts)

    def stalled(self, limit_s: float) -> list[str]:
        """Stages that died, or have been busy on one frame for more than ``limit_s``."""
        now = time.monotonic()
        out: list[str] = []
        if not self._threads:
            return out  # not started
        for name, thread in zip(STAGES, self._threads, strict=True):
            since = self._beats[name].busy_since
            if not thread.is_alive() and not self._stop.is_set():
                out.append(f"{name} (thread ended)")
            elif since is not None and now - since > limit_s:
                out.append(f"{name} (busy for {now - since:.0f} s)")
        return out

    # --- the stages ---------------------------------------------------------------------

    def _wait_while_paused(self) -> None:
        with self._unpaused:
            while self._paused and not self._stop.is_set():
                self._unpaused.wait(_TICK_S * 4)

    def _capture_loop(self) -> None:
        beat = self._beats["capture"]
        try:
            while not self._stop.is_set() and not self._abort.is_set():
                beat.idle()
                self._wait_while_paused()
                if not self._trigger.wait(self._stop):
                    break
                if self.paused:
                    continue  # paused while waiting: the frame is not taken
                # A read is bounded (a timeout, a frame period, a stream's 10 s): one
                # that hangs past the stall limit is a stuck driver, not waiting.
                beat.busy()
                started = time.monotonic()
                frame = self._camera.read(_READ_TIMEOUT_S)
                self._camera_state = (
                    CameraState.OK if self._camera.outage is None else CameraState.OUTAGE
                )
                if frame is None:
                    continue
                try:
                    work = self._captured(frame, started)
                except Exception as exc:
                    logger.exception("cannot take the frame from %s; skipping it", frame.source)
                    self.counters.add("failed")
                    self._quarantine(frame, f"capture failed: {exc!r}")
                    continue
                if work is not None:
                    self._put(self._queues[0], work, beat)
        finally:
            beat.idle()

    def _capture_ended(self) -> None:
        """The capture loop is over for good: let the end marker drain the stages."""
        beat = self._beats["capture"]
        beat.idle()
        self._put(self._queues[0], _END, beat)

    def _quarantine(self, frame: Frame | None, reason: str) -> None:
        """Set a frame that failed aside at its source (``Frame.fail``); never raises."""
        if frame is None or frame.fail is None:
            return
        try:
            frame.fail(reason[:500])
        except Exception:
            logger.exception("cannot set %s aside", frame.source)

    def _captured(self, frame: Frame, started: float) -> _Captured | None:
        capture_ms = (time.monotonic() - started) * 1000.0
        if frame.key is not None:
            try:
                seq = self._outbox.source_seq(frame.key)
            except OutboxError as exc:
                logger.warning("cannot look up %s in the outbox: %s", frame.source, exc)
                seq = None
            if seq is not None:
                # Stored just before a crash, not yet marked handled: finish that now.
                logger.info(
                    "%s was already identified (seq %d) before a restart; marking it handled",
                    frame.source,
                    seq,
                )
                if frame.done is not None:
                    frame.done()
                return None
        self.counters.add("seen")
        height, width = frame.image.shape[:2]
        return _Captured(
            source=frame.source,
            key=frame.key,
            done=frame.done,
            captured_at=frame.captured_at,
            digest=frame.digest(),
            width=int(width),
            height=int(height),
            started=started,
            capture_ms=capture_ms,
            image=frame.image,
            frame=frame if self._images.wanted else None,
            source_name=source_name(frame),
            fail=frame.fail,
        )

    def _put(self, q: queue.Queue[Any], item: object, beat: _Beat) -> bool:
        """Hand ``item`` on, waiting (idle) while the next stage is busy."""
        beat.idle()
        while True:
            try:
                q.put(item, timeout=_TICK_S)
                return True
            except queue.Full:
                if self._abort.is_set():
                    return False

    def _stage(
        self,
        name: str,
        inbox: queue.Queue[Any],
        outbox: queue.Queue[Any] | None,
        work: Callable[[Any], Any],
    ) -> None:
        beat = self._beats[name]
        while True:
            beat.idle()
            try:
                item = inbox.get(timeout=_TICK_S)
            except queue.Empty:
                if self._abort.is_set():
                    return
                continue
            if item is _END:
                if outbox is not None:
                    self._put(outbox, _END, beat)
                return
            beat.busy()
            try:
                result = work(item)
            except Exception as exc:
                logger.exception("%s failed on %s; skipping the frame", name, item.source)
                self.counters.add("failed")
                self._report(f"{name} failed on {item.source}: {exc}")
                captured = item.captured if isinstance(item, _Prepared) else item
                self._quarantine(captured.source_frame, f"{name} failed: {exc!r}")
                continue
            if result is not None and outbox is not None and not self._put(outbox, result, beat):
                return

    def _prepare(self, captured: _Captured) -> _Prepared:
        model = self._slot.current()  # this frame's model, for its inference as well
        t0 = time.perf_counter()
        quality = assess(captured.image, self._quality)
        t1 = time.perf_counter()
        tensor, segmented = None, None
        if quality.ok and self._segmenter is not None:
            segmented = segment_frame(self._segmenter, captured.image)
            self.counters.add("objects", len(segmented.objects))
        elif quality.ok:
            tensor = preprocess(captured.image, model.recipe)
        t2 = time.perf_counter()
        captured.image = _NO_IMAGE  # the full frame is not needed any more
        ms = ((t1 - t0) * 1000.0, (t2 - t1) * 1000.0)
        return _Prepared(captured, model, quality, *ms, tensor, segmented=segmented)

    def _classify(self, work: _Prepared) -> _Prepared:
        if work.segmented is not None:
            classify_objects(work.segmented, work.model.recipe, work.model.classifier.classify)
        elif work.tensor is not None:
            t0 = time.perf_counter()
            work.prediction = work.model.classifier.classify(work.tensor)
            work.inference_ms = (time.perf_counter() - t0) * 1000.0
            work.tensor = None
        return work

    def _store(self, work: _Prepared) -> None:
        captured, prediction = work.captured, work.prediction
        status = "rejected" if prediction is None else prediction.status
        if work.segmented is not None:  # the frame's "worst" object decides its archiving
            statuses = {o.prediction.status for o in work.segmented.objects if o.prediction}
            status = next((s for s in ("uncertain", "ok") if s in statuses), "rejected")
        label = prediction.label if prediction is not None else None
        image = self._images.keep(captured, status, label)
        if work.segmented is not None:
            self._store_objects(work, image)
            return
        payload = message_factory(work, self._topics, image)
        entry = self._commit(captured, payload, captured.key)
        if entry is None:
            return
        self.counters.stored_one(status)
        logger.debug("stored %s as seq %d (%s)", captured.source, entry.seq, status)
        if captured.done is not None:
            captured.done()

    def _store_objects(self, work: _Prepared, image: ImageRef) -> None:
        """One message per object; the file is marked handled once all are stored."""
        commit = functools.partial(self._commit, work.captured)
        stored = store_objects(
            work,
            image,
            self._topics,
            commit=commit,
            stored_before=self._stored_before,
            counters=self.counters,
        )
        if stored and work.captured.done is not None:
            work.captured.done()

    def _stored_before(self, key: str) -> bool:
        try:
            return self._outbox.source_seq(key) is not None
        except OutboxError as exc:
            logger.warning("cannot look up %s in the outbox: %s", key, exc)
            return False

    def _commit(
        self, captured: _Captured, payload: Callable[[int], bytes], source_key: str | None
    ) -> Entry | None:
        """Store the message, holding the pipeline while the outbox cannot (see the
        module docstring); None when it was not stored.

        The wait between tries counts as idle, not stuck: a station whose only problem
        is a full disk must not be restarted by the watchdog over and over, it must
        say so in its heartbeat and carry on once there is space.
        """
        beat = self._beats["store"]
        delay = _STORE_RETRY_MIN_S
        payload = self._stamp(payload)  # the sample current now, for frames and objects
        while True:
            try:
                entry = self._outbox.add(
                    self._topic,
                    payload,
                    self._qos,
                    source_key=source_key,
                    lost_if_unstored=False,
                )
            except OutboxFullError as exc:
                # The reject-new policy dropped it (and counted it): by design, no retry.
                # Not marked handled either: a file is offered again after a restart.
                logger.error("the identification of %s was dropped: %s", captured.source, exc)
                self._on_event(f"outbox: {exc}")
                return None
            except OutboxError as exc:
                if self._stop.is_set() or self._abort.is_set():
                    self._give_up(captured, exc)
                    return None
                self._hold(exc, delay)
                beat.idle()
                self._stop.wait(delay)  # a stop ends the wait: one last try, then give up
                beat.busy()
                delay = min(2 * delay, _STORE_RETRY_MAX_S)
                continue
            self._release()
            return entry

    def _hold(self, exc: OutboxError, delay: float) -> None:
        with self._blocked_lock:
            blocked = self._blocked
            if blocked is None:
                self._blocked = _Blocked(str(exc), datetime.now(UTC), time.monotonic(), 1)
            else:
                blocked.error, blocked.attempts = str(exc), blocked.attempts + 1
        if blocked is None:
            logger.error(
                "the outbox cannot store identifications: %s; capture is held until it can "
                "(next try in %.1f s, backing off to %.0f s)",
                exc,
                delay,
                _STORE_RETRY_MAX_S,
            )
        else:
            logger.debug("the outbox still cannot store (try %d): %s", blocked.attempts, exc)

    def _release(self) -> None:
        with self._blocked_lock:
            blocked, self._blocked = self._blocked, None
        if blocked is not None:
            seconds = time.monotonic() - blocked.started
            logger.warning(
                "the outbox stores again after %.0f s (%d tries); capture resumes",
                seconds,
                blocked.attempts,
            )
            self._on_event(
                f"outbox: could not store for {seconds:.0f} s ({blocked.error}); "
                "nothing was lost, capture resumed"
            )

    def _give_up(self, captured: _Captured, exc: OutboxError) -> None:
        """Stopping while the outbox cannot store: the frame in hand is not stored."""
        if captured.done is None:  # a live frame: it cannot be taken again
            self._outbox.note_lost()
            fate = "it is lost (counted in the outbox's dropped)"
        else:
            fate = "its file is taken again at the next start"
        logger.error(
            "stopping with the identification of %s not stored (%s): %s", captured.source, exc, fate
        )
