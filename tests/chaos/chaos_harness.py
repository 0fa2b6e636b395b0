"""The chaos suite's harness: a whole station as real processes, faults, and the count.

A :class:`Site` is one scenario's world in its own folder: a mosquitto broker, the
collector (``fieldscope -v collect run``) storing into SQLite, the edge daemon
(``fieldscope edge run``) watching a folder of N known specimen images, and a
passive observer subscribed to everything (a persistent session, so it also sees what
is published while it reconnects). Tests inject faults through the site — SIGKILL or
SIGTERM and restart of each process, a broker restart — and then :meth:`Site.finish`
checks the promise and fills the scenario's :class:`Report`:

* the store holds exactly N identification rows of the device, one per image, none
  missing, no image twice (a repeated ``(device, seq)`` is dropped by the store; an
  image identified twice under two seqs would be two rows and fail the check);
* no ``(device, seq)`` ever arrived with two different payloads (``invalid_messages``);
* ordered by ``seq`` the rows follow the folder's order (the oldest file is taken
  first), whatever the wall clock did: ``seq`` is a counter, never a time;
* no process logged a traceback.

Every process is started through the site and killed in :meth:`Site.close`, which the
fixtures call in their teardown.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from conftest import (
    EDGE_PREFIX,
    Broker,
    MqttRecorder,
    start_mosquitto,
    stop_mosquitto,
    toml_document,
)
from hypothesis import HealthCheck, settings

from fieldscope.edge.health import Heartbeat
from fieldscope.edge.message import Identification
from fieldscope.edge.topics import Topics

# The station every chaos test runs (the names tests/test_daemon.py's configs use).
TOPICS = Topics(EDGE_PREFIX, "pond-3", "scope-a")

# Deterministic fuzzing: the same examples on every run, so CI is stable and a failure
# replays; no example database is written.
FUZZ_SETTINGS = settings(
    derandomize=True,
    database=None,
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SEED_ENV = "FIELDSCOPE_CHAOS_SEED"


@dataclass
class Report:
    """What one scenario reports at the end of the run (see tests/chaos/conftest.py)."""

    scenario: str
    seed: int
    images: int = 0
    stored: int = 0
    duplicates_dropped: int = 0
    lost: int = 0
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    passed: bool = False

    def fault(self, kind: str) -> None:
        self.faults[kind] += 1

    def line(self) -> str:
        faults = ", ".join(f"{kind} x{n}" for kind, n in sorted(self.faults.items())) or "none"
        verdict = "ok" if self.passed else "FAILED"
        text = (
            f"{self.scenario}: {verdict}; images {self.images}, stored {self.stored}, "
            f"duplicates dropped {self.duplicates_dropped}, lost {self.lost}; "
            f"faults: {faults}; {self.seconds:.0f} s, seed {self.seed}"
        )
        return text + "".join(f"\n    {note}" for note in self.notes)


@dataclass
class Tally:
    """Outcome counts of a fuzz test, for the report at the end of the run."""

    name: str
    counts: collections.Counter[str] = field(default_factory=collections.Counter)

    def line(self) -> str:
        total = sum(self.counts.values())
        parts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(self.counts.items()))
        return f"{self.name}: {total} inputs: {parts}"


# The ``chaos_tally`` fixture: the tally of a given name.
TallyOf = Callable[[str], Tally]


def scenario_rng(seed: int, scenario: str) -> np.random.Generator:
    """Each scenario its own stream, so one replays alone with the session's seed."""
    salt = int.from_bytes(hashlib.sha256(scenario.encode()).digest()[:4], "big")
    return np.random.default_rng([seed, salt])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def place_images(sources: list[Path], folder: Path) -> list[str]:
    """Copy ``sources`` into ``folder`` as img-0000.png ... with strictly increasing
    modification times (the folder camera takes the oldest first); their sha256 in
    that order."""
    folder.mkdir(parents=True, exist_ok=True)
    base = time.time_ns() - 10**12  # well in the past: nothing waits to "settle"
    digests = []
    for i, source in enumerate(sources):
        target = folder / f"img-{i:04d}.png"
        shutil.copyfile(source, target)
        os.utime(target, ns=(base + i * 10**6, base + i * 10**6))
        digests.append(sha256(target))
    return digests


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path.name}: missing)"
    return f"--- {path.name} (last {lines} lines) ---\n" + "\n".join(text.splitlines()[-lines:])


@dataclass
class HeldImages:
    """Images :meth:`Site.hold_back` took out of the watched folder."""

    site: Site
    folder: Path
    digests: list[str]

    def release(self, into: Path | None = None) -> None:
        """Put them back into the watched folder (or ``into``, the folder that will be it)."""
        target = into or self.site.incoming
        for path in sorted(self.folder.iterdir()):
            path.rename(target / path.name)
        self.site.held -= len(self.digests)
        self.folder.rmdir()


class Site:
    """One scenario's station, broker and collector as processes (see the module doc)."""

    def __init__(
        self,
        root: Path,
        *,
        bundle: Path,
        images: list[Path],
        report: Report,
        rng: np.random.Generator,
        camera: dict[str, Any] | None = None,
        folder: dict[str, Any] | None = None,
        outbox: dict[str, Any] | None = None,
        objects: dict[str, Any] | None = None,
    ) -> None:
        self.root = root
        self.report = report
        self.rng = rng
        self.started = time.monotonic()
        self.processes: list[subprocess.Popen[bytes]] = []
        self.daemon: subprocess.Popen[bytes] | None = None
        self.collector: subprocess.Popen[bytes] | None = None
        self.daemon_env: dict[str, str] = {}
        self.daemon_wrapper: list[str] = ["-m", "fieldscope.cli"]
        self.captured_at: list[datetime] = []  # of the stored rows in seq order (finish)
        self.incoming = root / "incoming"
        self.expected = place_images(images, self.incoming)
        self.held = 0  # images taken out of the watched folder by hold_back, not yet back
        report.images = len(self.expected)
        self.store_path = root / "collect.sqlite"
        self.broker: Broker = start_mosquitto(root / "mosquitto")
        try:
            self.observer = MqttRecorder(self.broker, "chaos-observer", persistent=True)
        except BaseException:
            stop_mosquitto(self.broker)
            raise
        self.config = root / "edge.toml"
        (root / "bundles").mkdir()
        (root / "bundles" / "current").symlink_to(bundle)
        sections: dict[str, dict[str, Any]] = {
            "device": {"station": "pond-3", "id": "scope-a", "data_dir": "data"},
            "camera": {
                "backend": "folder",
                "trigger": "continuous",
                "max_rate_hz": 25,
                "reopen_backoff_s": [0.2, 1.0],
                **(camera or {}),
            },
            "camera.folder": {
                "path": "incoming",
                "settle_s": 0,
                "scan_interval_s": 0.05,
                **(folder or {}),
            },
            "model": {"bundle": "bundles/current"},
            "mqtt": {
                "host": self.broker.host,
                "port": self.broker.port,
                "prefix": EDGE_PREFIX,
                "keepalive": 5,
                "reconnect_backoff_s": [1, 1],
            },
            "outbox": {**(outbox or {})},
            "objects": {**(objects or {})},
            "heartbeat": {"interval_s": 1},
        }
        self.config.write_text(toml_document({k: v for k, v in sections.items() if v}))

    # --- processes ----------------------------------------------------------------------

    def _spawn(self, argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with log.open("ab") as fh:
            process = subprocess.Popen(
                argv, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **env}
            )
        self.processes.append(process)
        return process

    def start_collector(self) -> None:
        """Start the collector and wait until it is subscribed."""
        log = self.root / "collector.log"
        before = log.read_text().count("connected to") if log.exists() else 0
        self.collector = self._spawn(
            [
                sys.executable,
                "-m",
                "fieldscope.cli",
                "-v",
                "collect",
                "run",
                "--broker",
                f"{self.broker.host}:{self.broker.port}",
                "--db",
                str(self.store_path),
                "--topic-prefix",
                EDGE_PREFIX,
                "--client-id",
                "chaos-collector",
            ],
            log,
            {},
        )
        self.wait_until(
            lambda: log.read_text().count("connected to") > before,
            30,
            "the collector to connect",
            process=self.collector,
        )

    def stop_collector(self, sig: signal.Signals) -> None:
        assert self.collector is not None
        self.collector.send_signal(sig)
        self.collector.wait(30)
        if sig == signal.SIGTERM:
            assert self.collector.returncode == 0, tail(self.root / "collector.log")
        self.report.fault(f"collector {sig.name}")
        self.collector = None

    def start_daemon(self, *, wait: bool = True) -> None:
        """Start the edge daemon; with ``wait``, until its link is online again."""
        online = self._online_count()
        self.daemon = self._spawn(
            [sys.executable, *self.daemon_wrapper, "edge", "run", "--config", str(self.config)],
            self.root / "daemon.log",
            self.daemon_env,
        )
        if wait:
            self.wait_until(
                lambda: self._online_count() > online,
                60,
                "the daemon to come online",
                process=self.daemon,
            )

    def stop_daemon(self, sig: signal.Signals, *, count: bool = True) -> None:
        assert self.daemon is not None
        self.daemon.send_signal(sig)
        code = self.daemon.wait(30)
        if sig == signal.SIGTERM:
            assert code == 0, tail(self.root / "daemon.log")
        if count:
            self.report.fault(f"daemon {sig.name}")
        self.daemon = None

    def kill_daemon(self, down_s: float = 0.0) -> None:
        """A power cut: SIGKILL the daemon, leave it down ``down_s``, start it again
        (until its link is online)."""
        self.stop_daemon(signal.SIGKILL)
        time.sleep(down_s)
        self.start_daemon()

    def stop_broker(self) -> None:
        """A clean broker stop (SIGTERM: it saves its persistence file)."""
        stop_mosquitto(self.broker)

    def start_broker(self) -> None:
        self.broker = start_mosquitto(self.broker.config.parent, port=self.broker.port)

    def restart_broker(self, down_s: float) -> None:
        self.stop_broker()
        time.sleep(down_s)
        self.start_broker()
        self.report.fault("broker restart")

    def _online_count(self) -> int:
        return sum(1 for p in self.observer.on(TOPICS.status) if p == b"online")

    def close(self) -> None:
        """Kill whatever still runs (a failed test must not leave processes behind)."""
        self.observer.close()
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        stop_mosquitto(self.broker)

    # --- watching -----------------------------------------------------------------------

    def wait_until(
        self,
        predicate: Callable[[], bool],
        timeout: float,
        what: str,
        *,
        process: subprocess.Popen[bytes] | None = None,
    ) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if process is not None and process.poll() is not None:
                raise AssertionError(
                    f"waiting for {what}: the process exited with {process.returncode}\n"
                    + self.logs()
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}"
                )
            time.sleep(0.05)

    def logs(self) -> str:
        names = ("daemon.log", "collector.log")
        return "\n".join(tail(self.root / n) for n in names) + f"\nseed {self.report.seed}"

    def seen(self) -> int:
        """Distinct identifications the observer has seen (progress, even while the
        collector is down)."""
        return len(set(self.observer.on(TOPICS.identification)))

    def wait_progress(self, images: int, timeout: float = 60.0) -> None:
        """Wait until ``images`` more distinct identifications went out (fewer when the
        watched folder runs out: images held back cannot be waited for)."""
        target = min(self.seen() + images, len(self.expected) - self.held)
        self.wait_until(lambda: self.seen() >= target, timeout, f"{target} identifications")

    def hold_back(self, count: int, name: str) -> HeldImages:
        """Take the ``count`` newest images still in the watched folder out of it, into
        ``root/name``, so that a scenario knows some are captured after a later fault
        (the camera may otherwise have taken them all before it). Renames keep their
        modification times: back in the folder, they keep the folder order."""
        files = sorted(self.incoming.glob("img-*.png"))[-count:]
        held = self.root / name
        held.mkdir()
        for path in files:
            path.rename(held / path.name)
        self.held += len(files)
        return HeldImages(self, held, [sha256(held / f.name) for f in files])

    def seen_any(self, digests: list[str]) -> bool:
        """Whether the observer has seen an identification of one of these images."""
        wanted = set(digests)
        return any(
            Identification.from_json(p).image.sha256 in wanted
            for p in self.observer.on(TOPICS.identification)
        )

    def heartbeats(self) -> list[Heartbeat]:
        return [Heartbeat.from_json(p) for p in self.observer.on(TOPICS.heartbeat)]

    @contextlib.contextmanager
    def _store(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.store_path, timeout=5.0)
        try:
            yield db
        finally:
            db.close()

    def stored(self) -> int:
        if not self.store_path.exists():
            return 0
        with self._store() as db:
            try:
                row = db.execute(
                    "SELECT count(*) FROM identifications WHERE device = ?", (TOPICS.device,)
                ).fetchone()
            except sqlite3.OperationalError:
                return 0  # not created yet
        return int(row[0])

    # --- the count ----------------------------------------------------------------------

    def stop_when_stored(self, n: int, what: str, timeout: float, *, settle_s: float = 0.0) -> None:
        """Wait until ``n`` rows of the station are stored, then stop the daemon and the
        collector cleanly (``settle_s`` between the two), so the count sees a still store."""
        self.wait_until(lambda: self.stored() >= n, timeout, what)
        if self.daemon is not None:
            self.stop_daemon(signal.SIGTERM, count=False)
        time.sleep(settle_s)
        if self.collector is not None:
            self.collector.send_signal(signal.SIGTERM)
            assert self.collector.wait(30) == 0, tail(self.root / "collector.log")
            self.collector = None

    def stored_rows(self, columns: str, order: str = "") -> tuple[list[Any], int]:
        """The station's stored identifications (``columns``, ``order``) and how many
        messages the collector quarantined."""
        with self._store() as db:
            rows = db.execute(
                f"SELECT {columns} FROM identifications WHERE device = ? {order}",
                (TOPICS.device,),
            ).fetchall()
            invalid = int(db.execute("SELECT count(*) FROM invalid_messages").fetchone()[0])
        return rows, invalid

    def assert_no_traceback(self) -> None:
        """Neither process logged a traceback (a crash the exit codes may not show)."""
        for name in ("daemon.log", "collector.log"):
            text = (self.root / name).read_text(errors="replace")
            assert "Traceback" not in text, tail(self.root / name, 60)

    def finish(self, timeout: float = 90.0) -> None:
        """Let everything settle, stop cleanly, count and check (see the module doc)."""
        n = len(self.expected)
        # settle_s: the last heartbeat/status reach the collector
        self.stop_when_stored(n, f"all {n} images in the store", timeout, settle_s=0.5)
        rows, invalid = self.stored_rows("seq, image_sha256, captured_at, payload", "ORDER BY seq")
        digests = [str(r[1]) for r in rows]
        self.captured_at = [datetime.fromisoformat(str(r[2])) for r in rows]
        counts = collections.Counter(digests)
        r = self.report
        r.stored = len(rows)
        r.lost = len(set(self.expected) - set(digests))
        published = self.observer.on(TOPICS.identification)
        r.duplicates_dropped = len(published) - len(
            {Identification.from_json(p).key for p in published}
        )
        r.seconds = time.monotonic() - self.started
        clean = re.findall(
            r"(?m)^stopped: received (\d+), stored (\d+), duplicates (\d+)",  # the CLI's
            (self.root / "collector.log").read_text(errors="replace"),
        )
        if clean:
            received, stored, dups = (sum(int(c[i]) for c in clean) for i in range(3))
            r.notes.append(
                f"collector runs that stopped cleanly ({len(clean)}): received {received} "
                f"messages, stored {stored} identifications, dropped {dups} duplicates"
            )
        twice = sorted(d[:12] for d, c in counts.items() if c > 1)
        assert r.lost == 0, f"{r.lost} image(s) never reached the store\n{self.logs()}"
        assert not twice, f"image(s) stored under two seqs: {twice}\n{self.logs()}"
        assert set(digests) <= set(self.expected), "the store holds an image nobody placed"
        assert r.stored == n
        assert invalid == 0, f"{invalid} message(s) quarantined (a seq reused with new content?)"
        assert digests == self.expected, "ordered by seq, the images are not in folder order"
        for payload in (bytes(row[3]) for row in rows):
            json.loads(payload)  # stored payloads are intact JSON
        self.assert_no_traceback()
        r.passed = True


def check_objects(site: Site, counts: dict[str, int], timeout: float = 90.0) -> None:
    """:meth:`Site.finish` for a segmenting station (``[objects] mode = "segment"``):
    ``counts`` is how many objects each placed image holds. Every object of every image
    is in the store exactly once, as ``(frame_id, object_index)``; an image without
    objects is its one "no objects" row; nothing quarantined, no traceback."""
    total = sum(max(1, c) for c in counts.values())
    site.stop_when_stored(total, f"all {total} objects stored", timeout)
    rows, invalid = site.stored_rows("image_sha256, object_index, objects_kept, status")
    found: dict[str, list[int | None]] = collections.defaultdict(list)
    for digest, index, _kept, _status in rows:
        found[str(digest)].append(None if index is None else int(index))
    r = site.report
    r.stored = len(rows)
    r.lost = total - len({(d, i) for d, indexes in found.items() for i in indexes})
    r.seconds = time.monotonic() - site.started
    assert set(found) == set(counts), f"frames missing: {set(counts) - set(found)}"
    for digest, count in counts.items():
        want: list[int | None] = list(range(count)) if count else [None]
        got = sorted(found[digest], key=lambda i: -1 if i is None else i)
        assert got == want, f"frame {digest[:12]}: objects {got}, expected {want}\n{site.logs()}"
    assert invalid == 0, f"{invalid} message(s) quarantined"
    site.assert_no_traceback()
    r.passed = True
