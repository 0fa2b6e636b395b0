"""Chaos against a whole station: real mosquitto, edge daemon and collector processes.

Each scenario places N known specimen images in the daemon's watched folder, injects
faults at random points drawn from the session's seed, and ends with the count of
``chaos_harness.Site.finish``: every image identified exactly once in the collector's
store, none lost, none twice, in folder order by ``seq``.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from chaos_harness import Site, check_objects

pytestmark = [pytest.mark.chaos, pytest.mark.mqtt, pytest.mark.slow]

MakeSite = Callable[..., Site]


def test_kill_storm(make_site: MakeSite, chaos_images: list[Path]) -> None:
    """SIGKILLs of the daemon (running, and during its start-up), SIGKILL and SIGTERM of
    the collector, broker restarts — in a random order, at random points of the run."""
    site = make_site(chaos_images[:200], folder={"handled": "move"})
    rng = site.rng
    plan = [
        "daemon kill",
        "daemon kill",
        "daemon kill",
        "daemon kill during start-up",
        "broker restart",
        "broker restart",
        "collector kill",
        "collector restart",
    ]
    rng.shuffle(plan)
    site.report.notes.append("plan: " + ", ".join(plan))
    site.start_collector()
    site.start_daemon()
    for fault in plan:
        site.wait_progress(int(rng.integers(4, 18)))
        time.sleep(float(rng.uniform(0.0, 0.4)))
        if fault == "daemon kill":
            site.kill_daemon(float(rng.uniform(0.0, 1.0)))
        elif fault == "daemon kill during start-up":
            site.stop_daemon(signal.SIGKILL)
            site.start_daemon(wait=False)
            time.sleep(float(rng.uniform(0.2, 1.5)))
            site.kill_daemon()
        elif fault == "broker restart":
            site.restart_broker(float(rng.uniform(0.3, 2.0)))
        elif fault == "collector kill":
            site.stop_collector(signal.SIGKILL)
            time.sleep(float(rng.uniform(0.2, 2.0)))
            site.start_collector()
        else:
            site.stop_collector(signal.SIGTERM)
            time.sleep(float(rng.uniform(0.2, 2.0)))
            site.start_collector()
    site.finish()


def test_kill_storm_on_a_segmenting_station(make_site: MakeSite, tmp_path: Path) -> None:
    """A station that sends one identification per object: SIGKILLs of the daemon (some
    between two objects of one file), a broker restart and a collector kill lose no
    object and store none twice."""
    from fieldscope.edge.objects import ObjectsSettings, Segmenter
    from fieldscope.edge.preprocess import load_image
    from fieldscope.edge.specimen_frames import FrameRecipe, write_frames

    recipe = FrameRecipe(size=256, separated=3, touching_pairs=0, at_border=0, debris=4, tile_px=64)
    frames = write_frames(tmp_path / "frames", 30, seed=5, recipe=recipe)
    objects = {"mode": "segment", "min_area_um2": 200.0, "drop_border": True}
    site = make_site(frames, folder={"handled": "move"}, objects=objects)
    segmenter = Segmenter(ObjectsSettings(**objects))  # type: ignore[arg-type]
    counts = {
        digest: len(segmenter.segment(load_image(path)).objects)
        for digest, path in zip(site.expected, frames, strict=True)
    }
    total = sum(max(1, c) for c in counts.values())
    rng = site.rng
    plan = ["daemon kill", "daemon kill", "daemon kill", "broker restart", "collector kill"]
    rng.shuffle(plan)
    site.report.notes.append(f"{total} objects in {len(frames)} frames; plan: {', '.join(plan)}")
    site.start_collector()
    site.start_daemon()
    for fault in plan:
        target = min(site.seen() + int(rng.integers(5, 15)), total)
        site.wait_until(lambda t=target: site.seen() >= t, 60, f"{target} objects")
        time.sleep(float(rng.uniform(0.0, 0.2)))
        if fault == "daemon kill":
            site.kill_daemon(float(rng.uniform(0.0, 0.5)))
        elif fault == "broker restart":
            site.restart_broker(float(rng.uniform(0.3, 1.5)))
        else:
            site.stop_collector(signal.SIGKILL)
            time.sleep(float(rng.uniform(0.2, 1.0)))
            site.start_collector()
    check_objects(site, counts)


# --- a full disk ----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path | None]:
    """A 2 MiB tmpfs to put the outbox on, or None where mounting is not permitted
    (not root, or a container without CAP_SYS_ADMIN): the scenario then fills the
    outbox's own size cap instead."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    mount = shutil.which("mount")
    done = (
        subprocess.run(
            [mount, "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mountpoint)],
            capture_output=True,
            check=False,
        )
        if mount is not None and os.geteuid() == 0
        else None
    )
    if done is None or done.returncode != 0:
        yield None
        return
    try:
        yield mountpoint
    finally:
        # Lazy: a process of a failed test may still hold a file open until its teardown.
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)


def fill(disk: Path) -> Path:
    """Write a ballast file until the filesystem refuses another byte (ENOSPC)."""
    ballast = disk / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 1 << 12, 1):
            chunk = b"\0" * size
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return ballast


def held_warnings(site: Site) -> list[str]:
    return [w for h in site.heartbeats() for w in h.warnings if "capture is held" in w]


def test_full_disk(small_disk: Path | None, make_site: MakeSite, chaos_images: list[Path]) -> None:
    """The outbox's disk fills up mid-run (and, on tmpfs, the daemon is killed and
    restarted while it is full): the station holds capture, says so in its heartbeat,
    loses nothing and resumes by itself once there is space again."""
    if small_disk is not None:
        outbox: dict[str, Any] = {"path": small_disk / "outbox.sqlite"}
    else:
        # No tmpfs: the outbox's own size cap plays the full disk (reject-new keeps the
        # backlog), and a broker outage fills it; space comes back as the backlog drains.
        outbox = {"max_bytes": 65536, "when_full": "reject-new"}
    site = make_site(chaos_images[:80], outbox=outbox)
    rng = site.rng
    site.report.notes.append(
        "disk: " + ("a 2 MiB tmpfs, filled" if small_disk else "outbox.max_bytes 64 KiB")
    )
    site.start_collector()
    site.start_daemon()
    site.wait_progress(int(rng.integers(8, 25)))
    if small_disk is not None:
        ballast = fill(small_disk)
        site.report.fault("disk full")
    else:
        site.stop_broker()
        site.report.fault("broker down, outbox cap full")
    # The station notices, holds capture and says why in the log (and, with a broker,
    # in its heartbeat); it neither exits nor crash-loops.
    log = site.root / "daemon.log"
    site.wait_until(
        lambda: "capture is held until it can" in log.read_text(),
        30,
        "the daemon to hold capture",
        process=site.daemon,
    )
    if small_disk is not None:
        site.wait_until(lambda: bool(held_warnings(site)), 10, "a heartbeat saying why")
        time.sleep(float(rng.uniform(0.5, 2.0)))
        # Killed and restarted while the disk is still full: it starts, and holds again.
        site.kill_daemon()
        before = len(held_warnings(site))
        site.wait_until(lambda: len(held_warnings(site)) > before, 15, "the restart to hold too")
        held_at = site.stored()
        time.sleep(1.5)
        assert site.stored() == held_at, "identifications were stored on a full disk?"
        assert site.daemon is not None
        assert site.daemon.poll() is None
        ballast.unlink()
        site.report.fault("space freed")
    else:
        time.sleep(float(rng.uniform(1.0, 3.0)))
        assert site.daemon is not None
        assert site.daemon.poll() is None
        site.start_broker()  # the backlog drains, and its space is reused
        site.report.fault("broker back")
    site.wait_until(lambda: "the outbox stores again" in log.read_text(), 60, "the resumption")
    site.finish()
    last = site.heartbeats()[-1]
    assert not any("capture is held" in w for w in last.warnings), last.warnings
    assert last.outbox_dropped == 0, "a held identification was counted as lost"
    if small_disk is not None:
        resumed = [w for h in site.heartbeats() for w in h.warnings if "capture resumed" in w]
        assert resumed, "no heartbeat said that capture resumed"


# --- the wall clock jumps -------------------------------------------------------------------

# libfaketime 0.9.10 (Debian 12's) with the monotonic clock left alone breaks
# Python >= 3.11's time.sleep(): clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME) gets a
# negative time and fails with EINVAL (libfaketime issue #426). Nothing in the daemon
# sleeps, but paho does while it waits to reconnect, so the daemon runs under this
# wrapper, whose only change is a time.sleep() that waits in select() (unaffected).
SLEEP_SHIM = """\
import runpy, select, time
def _sleep(seconds):
    select.select([], [], [], max(0.0, seconds))
time.sleep = _sleep
runpy.run_module("fieldscope.cli", run_name="__main__", alter_sys=True)
"""


def libfaketime() -> Path | None:
    candidates = [
        *Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"),
        Path("/usr/lib/faketime/libfaketimeMT.so.1"),
        Path("/usr/local/lib/faketime/libfaketimeMT.so.1"),
    ]
    return next((p for p in candidates if p.is_file()), None)


# Seeds whose plans once failed this scenario: replayed on every run beside the session's.
# 992018330: every image was captured before the first backward jump (fixed by hold_back).
CLOCK_JUMP_REGRESSION_SEEDS = [992018330]


@pytest.mark.parametrize(
    "regression_seed",
    [None, *CLOCK_JUMP_REGRESSION_SEEDS],
    ids=["session-seed", *(f"seed-{s}" for s in CLOCK_JUMP_REGRESSION_SEEDS)],
)
def test_clock_jumps(
    make_site: MakeSite, chaos_images: list[Path], regression_seed: int | None
) -> None:
    """The daemon's wall clock jumps ±1 h and ±1 day while it runs (as when NTP sets
    the clock of a Pi without RTC), the daemon is killed and restarted under a clock an
    hour behind, and the camera is down across a jump. Timers (heartbeat, reconnect,
    camera backoff) run on the monotonic clock and carry on; seq never comes from the
    clock; nothing is lost or identified twice. Only the daemon's clock jumps
    (libfaketime); the broker and collector keep the real time."""
    lib = libfaketime()
    if lib is None:
        pytest.fail("libfaketime is not installed: run `apt-get install -y faketime`")
    site = make_site(chaos_images[:90], camera={"max_rate_hz": 15})
    # At 15 frames/s the camera may take every image in the folder before the backward
    # jumps below (each jump waits for heartbeats); the check at the end needs captures on
    # both sides of one. So the newest images wait outside the folder: `last` until the
    # camera comes back under a clock a day behind, `before` until the clock is an hour
    # behind. (Without this, FIELDSCOPE_CHAOS_SEED=992018330 failed the final assert.)
    last = site.hold_back(10, "held-last")
    before = site.hold_back(10, "held-before")
    clock = site.root / "faketime"
    clock.write_text("+0\n")
    site.daemon_env = {
        "LD_PRELOAD": str(lib),
        "FAKETIME_TIMESTAMP_FILE": str(clock),
        "FAKETIME_NO_CACHE": "1",  # read the file at every call: a jump is immediate
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",  # as on a real system: only the wall clock
        "NO_FAKE_STAT": "1",  # file times stay real (an NTP jump does not touch them)
    }
    site.daemon_wrapper = ["-c", SLEEP_SHIM]
    rng = site.rng
    log = site.root / "daemon.log"

    def jump(spec: str, offset_s: float) -> None:
        """Set the daemon's clock; wait until its heartbeats carry it and keep coming."""
        before = len(site.heartbeats())
        clock.write_text(f"{spec}\n")
        site.report.fault(f"clock {spec}")

        def stamped() -> bool:
            now = time.time()
            return any(
                abs(h.time.timestamp() - now - offset_s) < 30 for h in site.heartbeats()[before:]
            )

        site.wait_until(stamped, 15, f"a heartbeat from a clock at {spec}", process=site.daemon)
        arrived = len(site.heartbeats())
        site.wait_until(
            lambda: len(site.heartbeats()) >= arrived + 2, 8, f"heartbeats after the jump {spec}"
        )

    site.start_collector()
    site.start_daemon()
    jumps = [("+1d", 86400.0), ("-1d", -86400.0), ("+1h", 3600.0), ("-1h", -3600.0)]
    for i in rng.permutation(len(jumps)):
        site.wait_progress(int(rng.integers(4, 12)))
        jump(*jumps[i])
    jump("-1h", -3600.0)
    before.release()  # captured under a clock an hour behind, and seen so
    site.wait_until(lambda: site.seen_any(before.digests), 30, "an image released at -1h")
    site.wait_progress(int(rng.integers(3, 8)))
    site.kill_daemon()  # starts and continues its seq under a clock an hour behind

    # The camera goes down, the clock jumps a day back, the camera comes back: the
    # reopen backoff does not wait for a day, and the outage lasted seconds, not -1 day.
    site.wait_progress(int(rng.integers(3, 8)))
    away = site.incoming.rename(site.root / "incoming-unplugged")
    site.wait_until(lambda: " is down " in log.read_text(), 15, "the camera outage")
    jump("-1d", -86400.0)
    last.release(into=away)
    away.rename(site.incoming)
    site.report.fault("camera outage across a jump")
    site.wait_until(lambda: " is back after " in log.read_text(), 15, "the camera to come back")
    # Captured under the clock a day behind, before it is set right again.
    site.wait_until(lambda: site.seen_any(last.digests), 30, "an image released at -1d")
    outage = [float(s) for s in re.findall(r" is back after (-?[0-9.]+) s", log.read_text())]
    assert outage, "no outage duration logged"
    assert all(0 <= s < 60 for s in outage), f"outage durations {outage}"
    jump("+0", 0.0)
    site.finish()
    # The jumps reached the messages: in seq order, capture times go back by hours (at
    # least from the images released at -1h to those released at -1d: -23 h).
    times = [t.timestamp() for t in site.captured_at]
    assert min(b - a for a, b in itertools.pairwise(times)) < -3000
