"""The Pi check's daemon step: ``fieldscope edge run`` on aarch64, MQTT to the host.

The chroot shares the host's network, so the emulated station publishes to a mosquitto
started here on 127.0.0.1. It replays every image once; each identification must
arrive and agree with ``fieldscope edge classify`` on the same architecture, and
SIGTERM must stop the daemon cleanly (a retained ``stopped`` status).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steps import (
    GUEST_DIR,
    CheckInterruptedError,
    Context,
    Outcome,
    Run,
    Runtime,
    crash_story,
    guest_env,
    in_guest,
    tail,
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """A mosquitto of our own on a free 127.0.0.1 port, stopped by its PID."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise RuntimeError("mosquitto is not installed (apt-get install -y mosquitto)")
        self.port = _free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence false",
            "max_queued_messages 100000",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            *(["user root"] if os.geteuid() == 0 else []),
        ]
        config.write_text("\n".join(lines) + "\n")
        with self.log.open("ab") as fh:
            self.process = subprocess.Popen(
                [binary, "-c", str(config)], stdout=fh, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on 127.0.0.1:{self.port} within 10 s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


class Collector:
    """Subscribes to the station's topics and keeps what arrives (a tiny collect/)."""

    def __init__(self, port: int, topics: Sequence[str]) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[tuple[str, bytes]] = []
        self.cv = threading.Condition()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pi-check")

        def on_message(_c: Any, _u: object, msg: Any) -> None:
            with self.cv:
                self.messages.append((msg.topic, bytes(msg.payload)))
                self.cv.notify_all()

        self.client.on_message = on_message
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([(t, 1) for t in topics])
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("could not subscribe to the test broker")

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float, *, unless: threading.Event
    ) -> bool:
        """Wait until ``predicate()`` holds, ``timeout`` passes or ``unless`` is set.

        Messages wake it at once; a process exit or Ctrl-C, which cannot notify, are
        noticed within half a second."""
        deadline = time.monotonic() + timeout
        with self.cv:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0 or unless.is_set():
                    return False
                self.cv.wait(min(left, 0.5))
            return True

    def on(self, topic: str) -> list[bytes]:
        with self.cv:
            return [p for t, p in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class DaemonRun:
    """What happened to one daemon run."""

    died: int | None  # exit status when it ended before being told to stop
    exit_code: int | None  # after SIGTERM (None: it did not stop)
    arrived: bool  # every identification arrived in time
    stopped: bool  # the retained "stopped" status came (a clean exit)
    payloads: list[bytes]
    output: str
    seconds: float


def _stage_replay(
    ctx: Context, classified: dict[str, dict[str, Any]]
) -> tuple[Path, dict[str, str]]:
    """Copy the images flat into a replay folder; map each file's sha256 to its name."""
    replay = ctx.root / GUEST_DIR.lstrip("/") / "replay"
    replay.mkdir(parents=True, exist_ok=True)
    by_hash: dict[str, str] = {}
    for n, rel in enumerate(sorted(classified)):
        source = ctx.images / rel
        shutil.copyfile(source, replay / f"{n:04d}{source.suffix.lower()}")
        by_hash[hashlib.sha256(source.read_bytes()).hexdigest()] = rel
    return replay, by_hash


def _daemon_config(ctx: Context, bundle: str, replay: Path, topics: Any, port: int) -> Path:
    """An edge.toml: replay every image once, as fast as it goes, to the host's broker."""
    labels = json.loads((ctx.bundles[bundle] / "manifest.json").read_text())["labels"]
    config = ctx.root / GUEST_DIR.lstrip("/") / "daemon" / "edge.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "[device]",
        f"station = {json.dumps(topics.station)}",
        f"id = {json.dumps(topics.device)}",
        f"data_dir = {json.dumps(GUEST_DIR + '/daemon/data')}",
        "[camera]",
        'backend = "replay"',
        "max_rate_hz = 0",
        "[camera.replay]",
        f"path = {json.dumps(ctx.guest(replay))}",
        "rate_hz = 0",
        "[quality]",  # every image is classified, so each can be compared with classify
        "enabled = false",
        "[model]",
        f"bundle = {json.dumps(ctx.guest(ctx.bundles[bundle]))}",
        f"top_k = {len(labels)}",
        "[mqtt]",
        'host = "127.0.0.1"',  # the chroot shares the host's network
        f"port = {port}",
        f"prefix = {json.dumps(topics.prefix)}",
        "[heartbeat]",
        "interval_s = 5.0",
    ]
    config.write_text("\n".join(lines) + "\n")
    return config


def _terminate(daemon: subprocess.Popen[bytes]) -> tuple[int | None, int | None]:
    """SIGTERM a daemon still running; (its exit code if it had died, the final one)."""
    died = daemon.poll()
    exit_code: int | None = died
    if died is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            exit_code = daemon.wait(60)
        except subprocess.TimeoutExpired:
            exit_code = None
    return died, exit_code


def _reap(ctx: Context, daemon: subprocess.Popen[bytes]) -> None:
    if daemon.poll() is None:
        daemon.kill()
        daemon.wait()
    ctx.procs.done(daemon)


def _serve(
    ctx: Context,
    runtime: Runtime,
    config: Path,
    *,
    topics: Any,
    broker: Broker,
    expected: int,
    seconds: float,
    log: Path,
) -> DaemonRun:
    """Start the daemon, wait for ``expected`` identifications, SIGTERM it, collect."""
    began = time.monotonic()
    collector = Collector(broker.port, [topics.identification, topics.status])
    daemon: subprocess.Popen[bytes] | None = None
    try:
        program = f"{runtime.venv}/bin/fieldscope"
        with log.open("wb") as fh:
            daemon = ctx.procs.start(
                in_guest(ctx, program, "edge", "run", "--config", ctx.guest(config)),
                env=guest_env(ctx.cpu),
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        proc = daemon
        arrived = collector.wait_for(
            lambda: len(collector.on(topics.identification)) >= expected or proc.poll() is not None,
            seconds,
            unless=ctx.procs.stopping,
        )
        if ctx.procs.stopping.is_set():
            raise CheckInterruptedError
        died, exit_code = _terminate(daemon)
        stopped = collector.wait_for(
            lambda: b"stopped" in collector.on(topics.status), 5, unless=ctx.procs.stopping
        )
        payloads = collector.on(topics.identification)
    finally:
        if daemon is not None:
            _reap(ctx, daemon)
        collector.close()
    output = log.read_text(errors="replace")
    return DaemonRun(died, exit_code, arrived, stopped, payloads, output, time.monotonic() - began)


def _daemon_problems(
    ctx: Context,
    done: DaemonRun,
    classified: dict[str, dict[str, Any]],
    by_hash: dict[str, str],
    seconds: float,
) -> tuple[list[str], int]:
    """What went wrong (empty: nothing), and how many images were identified."""
    problems: list[str] = []
    if done.died is not None:
        run_ = Run(done.died, done.output, done.output, done.seconds)
        story = crash_story(run_, seconds) or f"exited with status {done.died}"
        problems.append(f"the daemon {story} before the images were identified")
    elif done.exit_code is None:
        problems.append("the daemon did not stop within 60 s of SIGTERM")
    elif done.exit_code != 0:
        problems.append(f"the daemon exited with status {done.exit_code} after SIGTERM")
    elif not done.stopped:
        problems.append("no retained 'stopped' status after SIGTERM (unclean shutdown)")
    if not done.arrived and done.died is None:
        problems.append(
            f"only {len(done.payloads)} of {len(classified)} identifications within {seconds:.0f} s"
        )
    seen: set[str] = set()
    for payload in done.payloads:
        message = json.loads(payload)
        rel = by_hash.get(message["image"]["sha256"])
        if rel is None:
            problems.append(f"an identification for an unknown image {message['image']}")
            continue
        seen.add(rel)
        want = classified[rel]
        score = message["score"]
        if (
            message["status"] != want["status"]
            or message["label"] != want["label"]
            or abs(float(score or 0.0) - float(want["score"])) > max(ctx.tolerance, 1e-6)
        ):
            problems.append(
                f"image {rel}: the daemon published {message['status']} {message['label']!r} "
                f"{score}, classify said {want['status']} {want['label']!r} {want['score']}"
            )
    missing = sorted(set(classified) - seen)
    if missing and not problems:
        problems.append(f"no identification for {', '.join(missing[:5])}")
    return problems, len(seen)


def run_daemon(
    ctx: Context,
    runtime: Runtime,
    bundle: str,
    *,
    label: str,
    classified: dict[str, dict[str, Any]],
    workdir: Path,
    seconds: float,
) -> Outcome:
    """``fieldscope edge run`` on aarch64 replaying every image once: every identification
    must arrive over MQTT and agree with ``edge classify``, and SIGTERM must stop it cleanly."""
    from fieldscope.edge.topics import Topics

    step = "edge run (daemon, MQTT)"
    replay, by_hash = _stage_replay(ctx, classified)
    topics = Topics("pi-check", "pi-check", f"qemu-{ctx.cpu}")
    log = workdir / "daemon.log"
    broker = Broker(workdir / "mosquitto")
    try:
        config = _daemon_config(ctx, bundle, replay, topics, broker.port)
        done = _serve(
            ctx,
            runtime,
            config,
            topics=topics,
            broker=broker,
            expected=len(classified),
            seconds=seconds,
            log=log,
        )
    finally:
        broker.stop()
    problems, seen = _daemon_problems(ctx, done, classified, by_hash, seconds)
    if problems:
        problem = (
            f"daemon with {label} and bundle {bundle} on aarch64: "
            + "; ".join(problems[:5])
            + f"\n      daemon log ({log}):\n      "
            + tail(done.output, 10)
        )
        detail = f"{len(done.payloads)}/{len(classified)} identifications; {problems[0]}"
        return Outcome(step, "arm64", label, bundle, "FAIL", detail, done.seconds, problem)
    detail = f"{seen}/{len(classified)} identifications, matching classify, clean stop"
    return Outcome(step, "arm64", label, bundle, "PASS", detail, done.seconds)
