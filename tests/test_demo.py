"""``fieldscope demo`` end to end, its embedded MQTT broker, and its summary.

The end-to-end runs use ``--quick`` (a tiny, barely trained model). The first run trains
once per module (with Mosquitto); later runs copy its work folder, so they reuse the
bundle (as a user's second run does) and only run the live part: broker, collector,
station, summary. Every run must leave no process behind.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from helpers import run_fieldscope
from paho.mqtt.enums import CallbackAPIVersion

from fieldscope.cli import broker as broker_module
from fieldscope.cli.broker import DEMO_USERNAME, RunningBroker, start_broker
from fieldscope.cli.demo_summary import summarise
from fieldscope.collect.store import IdentificationRow, open_store

DEMO_TIMEOUT_S = 420

# --- the summary ------------------------------------------------------------------------------


def _row(seq: int, image: str, status: str, top: str | None, **timings: float) -> IdentificationRow:
    captured = datetime(2026, 11, 23, 12, 0, tzinfo=UTC) + timedelta(seconds=seq)
    top_k = () if top is None else ((top, 0.9), ("other", 0.1))
    stages = {"capture": 1.0, "quality": 2.0, "preprocess": 3.0, "inference": 4.0, "total": 10.0}
    stages.update(timings)
    return IdentificationRow(
        id=seq, device="scope-1", station="demo-lab", seq=seq, captured_at=captured,
        received_at=captured + timedelta(milliseconds=20), status=status,
        label=top if status == "ok" else None, score=None if top is None else 0.9, top_k=top_k,
        model_name="m", model_version="1", model_sha256="0" * 64, image_sha256=image,
        image_width=64, image_height=64, archived_path=None, quality_sharpness=None,
        quality_exposure=None, reason=None, capture_ms=stages["capture"],
        quality_ms=stages["quality"], preprocess_ms=stages["preprocess"],
        inference_ms=stages["inference"], total_ms=stages["total"], message_version=1,
        topic="fieldscope/demo-lab/scope-1/identification",
    )  # fmt: skip


def test_summary_joins_by_image_hash_and_counts_each_outcome() -> None:
    truth = {"a": "globigerina", "b": "globigerina", "c": "nodosaria", "d": "nodosaria",
             "e": "textularia"}  # fmt: skip
    rows = [
        _row(0, "a", "ok", "globigerina", inference=2.0),  # right
        _row(1, "b", "ok", "nodosaria", inference=4.0),  # wrong
        _row(2, "c", "uncertain", "nodosaria", inference=6.0),  # best label right, no label
        _row(3, "d", "rejected", None, inference=0.0),  # quality gate: no timings counted
        _row(4, "d", "ok", "nodosaria", inference=8.0),  # the same image a second time
        _row(5, "zz", "ok", "textularia", inference=10.0),  # an image that was not replayed
    ]
    summary = summarise(rows, truth)
    assert (summary.images, summary.stored) == (5, 6)
    assert (summary.identified, summary.identified_correct) == (4, 2)
    assert summary.accuracy == pytest.approx(0.5)
    assert (summary.uncertain, summary.rejected) == (1, 1)
    assert summary.top1_correct == 3  # a, c, d
    assert summary.top1_accuracy == pytest.approx(3 / 5)
    assert (summary.missing, summary.repeated, summary.unknown) == (1, 1, 1)  # e; d; zz
    assert not summary.complete
    latency = {s.stage: s for s in summary.latency}
    # Rejected frames skip inference: their 0 ms must not pull the median down.
    assert latency["inference"].median_ms == pytest.approx(6.0)
    assert latency["inference"].p95_ms == pytest.approx(9.6)
    assert latency["capture → collector"].median_ms == pytest.approx(20.0)
    text = "\n".join(summary.lines())
    assert "missing 1, repeated 1, unknown 1" in text
    assert "50.0 %" in text


def test_summary_of_a_complete_run_says_so_and_survives_json() -> None:
    truth = {"a": "x", "b": "y"}
    summary = summarise([_row(0, "a", "ok", "x"), _row(1, "b", "uncertain", "x")], truth)
    assert summary.complete
    data = json.loads(json.dumps(summary.to_dict()))
    assert data["complete"] is True
    assert data["accuracy"] == 1.0
    assert data["top1_accuracy"] == 0.5
    assert data["latency"]["total (station)"]["median_ms"] == 10.0
    assert "each replayed image exactly once" in "\n".join(summary.lines())


def test_summary_of_nothing_stored_reports_every_image_missing() -> None:
    summary = summarise([], {"a": "x"})
    assert (summary.missing, summary.accuracy, summary.top1_accuracy) == (1, None, None)
    assert summary.latency == ()
    assert "n/a" in "\n".join(summary.lines())


# --- the embedded broker (amqtt) does what our station and collector rely on --------------------


def _client(broker: RunningBroker, client_id: str, *, clean: bool) -> mqtt.Client:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
        clean_session=clean,
    )  # fmt: skip
    client.username_pw_set(DEMO_USERNAME)
    return client


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[RunningBroker]:
    broker = start_broker("embedded", tmp_path / "broker")
    try:
        yield broker
    finally:
        broker.stop()


def test_auto_uses_the_embedded_broker_when_no_mosquitto_is_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(broker_module, "_SBIN_DIRS", (str(tmp_path / "sbin"),))
    assert broker_module.find_mosquitto() is None
    broker = start_broker("auto", tmp_path / "broker")
    try:
        assert (broker.kind, broker.protocol) == ("embedded", "3.1.1")
        assert broker.alive()
    finally:
        broker.stop()
    assert not broker.alive()


def test_auto_prefers_mosquitto_found_outside_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Debian puts mosquitto in /usr/sbin, which a user's PATH often lacks."""
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    fake = sbin / "mosquitto"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(broker_module, "_SBIN_DIRS", (str(sbin),))
    assert broker_module.find_mosquitto() == str(fake)


def test_embedded_broker_acks_qos1_and_queues_for_an_offline_persistent_session(
    embedded: RunningBroker,
) -> None:
    assert (embedded.kind, embedded.protocol) == ("embedded", "3.1.1")
    got: list[tuple[str, bytes]] = []
    lock = threading.Condition()

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with lock:
            got.append((msg.topic, bytes(msg.payload)))
            lock.notify_all()

    # A collector subscribes with a persistent session, then goes away.
    subscribed = threading.Event()
    sub = _client(embedded, "collector", clean=False)
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.connect(embedded.host, embedded.port)
    sub.loop_start()
    sub.subscribe("fs/+/identification", qos=1)
    assert subscribed.wait(5)
    sub.disconnect()
    sub.loop_stop()

    # The station publishes QoS 1: every message is acknowledged (the outbox deletes on it).
    station = _client(embedded, "station", clean=False)
    station.connect(embedded.host, embedded.port)
    station.loop_start()
    infos = [station.publish("fs/s1/identification", f"m{i}", qos=1) for i in range(20)]
    for info in infos:
        info.wait_for_publish(10)
        assert info.is_published()
    station.disconnect()
    station.loop_stop()

    # The collector comes back under the same id and gets everything it missed.
    back = _client(embedded, "collector", clean=False)
    back.on_message = on_message
    back.connect(embedded.host, embedded.port)
    back.loop_start()
    try:
        with lock:
            assert lock.wait_for(lambda: len(got) >= 20, 10), got
        assert sorted(p for _, p in got) == sorted(f"m{i}".encode() for i in range(20))
    finally:
        back.disconnect()
        back.loop_stop()


def test_embedded_broker_keeps_retained_status_and_sends_the_last_will(
    embedded: RunningBroker,
) -> None:
    station = _client(embedded, "station", clean=False)
    station.will_set("fs/s1/status", b"offline", qos=1, retain=True)
    station.connect(embedded.host, embedded.port)
    station.loop_start()
    station.publish("fs/s1/status", b"online", qos=1, retain=True).wait_for_publish(5)

    seen: list[tuple[bytes, bool]] = []
    cv = threading.Condition()

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with cv:
            seen.append((bytes(msg.payload), bool(msg.retain)))
            cv.notify_all()

    watcher = _client(embedded, "watcher", clean=True)
    watcher.on_message = on_message
    watcher.connect(embedded.host, embedded.port)
    watcher.loop_start()
    watcher.subscribe("fs/+/status", qos=1)
    try:
        with cv:
            assert cv.wait_for(lambda: (b"online", True) in seen, 5), seen
        # The station's connection drops without a DISCONNECT: the broker sends the will.
        station.loop_stop()
        station.socket().close()  # type: ignore[union-attr]
        with cv:
            assert cv.wait_for(lambda: any(p == b"offline" for p, _ in seen), 10), seen
    finally:
        watcher.disconnect()
        watcher.loop_stop()


def test_embedded_broker_refuses_a_client_without_a_user_name(embedded: RunningBroker) -> None:
    """Anonymous sessions get no offline queue in amqtt, so the broker requires a name."""
    result: list[Any] = []
    done = threading.Event()

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        result.append(reason)
        done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="anon", protocol=mqtt.MQTTv311)
    client.on_connect = on_connect
    client.connect(embedded.host, embedded.port)
    client.loop_start()
    try:
        assert done.wait(5)
        assert result[0].is_failure
    finally:
        client.loop_stop()


def test_embedded_broker_stops_when_the_process_that_started_it_is_killed(
    tmp_path: Path,
) -> None:
    starter = (
        "import sys, time; from pathlib import Path; "
        "from fieldscope.cli.broker import start_broker; "
        "b = start_broker('embedded', Path(sys.argv[1])); "
        "print(b.process.pid, flush=True); time.sleep(60)"
    )
    with subprocess.Popen(
        [sys.executable, "-c", starter, str(tmp_path)], stdout=subprocess.PIPE, text=True
    ) as parent:
        try:
            assert parent.stdout is not None
            broker_pid = int(parent.stdout.readline())
            assert _alive(broker_pid)
        finally:
            parent.kill()  # SIGKILL: no clean-up code runs in the parent
            parent.wait(5)
    assert _wait_gone([broker_pid], 10), "the embedded broker outlived its parent"


# --- the command line ----------------------------------------------------------------------------


def test_refuses_a_work_folder_that_is_not_a_demos(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("years of work")
    result = run_fieldscope("demo", "--workdir", str(tmp_path), "--no-serve")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "not a fieldscope demo folder" in result.stderr
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--per-class", "3"], "--per-class must be 10-1000"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--rate", "nan"], "--rate must be 0-1000"),
        (["--port", "70000"], "--port must be 0-65535"),
    ],
)
def test_bad_options_give_one_line(tmp_path: Path, flags: list[str], message: str) -> None:
    result = run_fieldscope("demo", "--workdir", str(tmp_path / "w"), "--no-serve", *flags)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(("value", "quick"), [("1", True), ("", False), ("0", False)])
def test_fieldscope_demo_quick_in_the_environment_means_quick(
    monkeypatch: pytest.MonkeyPatch, value: str, quick: bool
) -> None:
    """CI runs the README's `fieldscope demo` as written, with FIELDSCOPE_DEMO_QUICK=1."""
    from fieldscope.cli.demo import FULL, QUICK, _settings_from
    from fieldscope.cli.main import build_parser

    monkeypatch.setenv("FIELDSCOPE_DEMO_QUICK", value)
    args = build_parser().parse_args(["demo", "--no-serve"])
    settings = _settings_from(args, tty=False)
    assert settings.model == (QUICK if quick else FULL).model


# --- end to end ---------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead: only its exit status is left for the parent to collect
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that mention ``text`` (e.g. a work folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and _alive(int(entry.name)):
            found.append(f"{entry.name}: {cmdline}")
    return found


@dataclass(frozen=True)
class DemoRun:
    workdir: Path
    returncode: int
    stdout: str
    stderr: str

    @property
    def pids(self) -> list[int]:
        """The broker's and the station's process ids, as the progress lines print them."""
        return [int(p) for p in re.findall(r"\bpid (\d+)", self.stdout)]

    def summary(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.workdir / "summary.json").read_text())
        return data


def _run_demo(workdir: Path, *flags: str) -> DemoRun:
    result = subprocess.run(
        [sys.executable, "-m", "fieldscope.cli", "demo", "--quick", "--workdir", str(workdir),
         "--no-serve", "--port", "0", *flags],
        capture_output=True, text=True, timeout=DEMO_TIMEOUT_S, check=False,
    )  # fmt: skip
    return DemoRun(workdir, result.returncode, result.stdout, result.stderr)


def _assert_consistent(run: DemoRun) -> None:
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
    summary = run.summary()
    # Every replayed image identified exactly once, and nothing else stored.
    assert summary["images"] == 12  # --quick: 3 species x 4 field images
    assert summary["stored"] == summary["images"]
    assert (summary["missing"], summary["repeated"], summary["unknown"]) == (0, 0, 0)
    assert summary["complete"] is True

    # Checked again from the store itself: each image the camera replayed, exactly once,
    # joined to its species by the folder its file was copied from.
    def sha(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    replayed = sorted(sha(f) for f in (run.workdir / "camera").glob("*.png"))
    species = {sha(f): f.parent.name for f in (run.workdir / "field-specimens").glob("*/*.png")}
    with open_store(str(run.workdir / "collect.sqlite"), create=False) as store:
        rows = list(store.iter_identifications())
    assert sorted(r.image_sha256 for r in rows) == replayed
    assert len({r.seq for r in rows}) == len(rows) == 12
    ok = [r for r in rows if r.status == "ok"]
    assert summary["identified"] == len(ok)
    assert summary["identified_correct"] == sum(r.label == species[r.image_sha256] for r in ok)
    classified = summary["identified"] + summary["uncertain"]
    assert classified + summary["rejected"] == summary["images"]
    assert summary["top1_accuracy"] == pytest.approx(summary["top1_correct"] / classified)
    assert {"capture", "inference", "total (station)", "capture → collector"} <= set(
        summary["latency"]
    )
    for step in ("1/7 specimens", "2/7 train", "3/7 convert", "4/7 MQTT broker",
                 "5/7 collector and dashboard", "6/7 station", "7/7 summary"):  # fmt: skip
        assert step in run.stdout
    assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/", run.stdout)
    _assert_review_queue(run, rows)
    assert "12/12 identifications stored" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr
    # TensorFlow's C++ start-up lines went to demo.log, not to the user's terminal.
    assert "oneDNN" not in run.stderr
    assert "cuda" not in run.stderr.lower()
    # Nothing it started is still running.
    assert len(run.pids) == 2, run.stdout
    assert _wait_gone(run.pids, 10), f"left running: {run.pids}"
    assert not _processes_mentioning(str(run.workdir))


def _assert_review_queue(run: DemoRun, rows: list[IdentificationRow]) -> None:
    """The station archived the uncertain images, and the summary names the review page
    with a queue that is not empty (at least every uncertain or low-score one)."""
    found = re.search(
        r"review queue: (\d+) image\(s\) waiting for an expert at "
        r"http://127\.0\.0\.1:\d+/review\b",
        run.stdout,
    )
    assert found, run.stdout
    urgent = [r for r in rows if r.status == "uncertain" or (r.score is not None and r.score < 0.6)]
    assert int(found.group(1)) >= len(urgent) > 0
    archive = run.workdir / "station" / "archive"
    archived = {hashlib.sha256(p.read_bytes()).hexdigest() for p in archive.rglob("*.png")}
    uncertain = {r.image_sha256 for r in rows if r.status == "uncertain"}
    assert archived == uncertain


@pytest.fixture(scope="module")
def trained_demo(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """One full ``--quick`` run with Mosquitto (it trains; later runs reuse its bundle)."""
    return _run_demo(tmp_path_factory.mktemp("demo") / "work", "--broker", "mosquitto")


def _copy(run: DemoRun, tmp_path: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(run.workdir, work)
    return work


@pytest.mark.slow
@pytest.mark.mqtt
def test_demo_with_mosquitto_identifies_every_replayed_image_once(trained_demo: DemoRun) -> None:
    _assert_consistent(trained_demo)
    assert "Mosquitto on 127.0.0.1" in trained_demo.stdout
    assert "MQTT 5" in trained_demo.stdout
    assert (trained_demo.workdir / "bundle" / "manifest.json").is_file()
    # The store holds exactly what the summary counted, and the dashboard's command works.
    assert "fieldscope collect serve --db" in trained_demo.stdout


@pytest.mark.slow
@pytest.mark.mqtt
def test_demo_on_the_embedded_broker_reuses_the_model(
    trained_demo: DemoRun, tmp_path: Path
) -> None:
    run = _run_demo(_copy(trained_demo, tmp_path), "--broker", "embedded")
    _assert_consistent(run)
    assert "embedded amqtt broker on 127.0.0.1" in run.stdout
    assert "MQTT 3.1.1" in run.stdout
    assert "reusing the bundle" in run.stdout
    # Steps 1-3 were skipped: the bundle is the one the first run wrote.
    assert (run.workdir / "bundle" / "manifest.json").read_bytes() == (
        trained_demo.workdir / "bundle" / "manifest.json"
    ).read_bytes()


@pytest.mark.slow
@pytest.mark.mqtt
def test_on_a_terminal_it_serves_the_dashboard_until_ctrl_c(
    trained_demo: DemoRun, tmp_path: Path
) -> None:
    import pty
    import select
    import urllib.error
    import urllib.request

    work = _copy(trained_demo, tmp_path)
    pid, fd = pty.fork()
    if pid == 0:  # the child: the demo, with a terminal as stdout
        os.execv(sys.executable, [sys.executable, "-m", "fieldscope.cli", "demo", "--quick",
                                  "--workdir", str(work), "--port", "0"])  # fmt: skip
    output = b""

    def read_until(marker: bytes, timeout: float) -> None:
        nonlocal output
        deadline = time.monotonic() + timeout
        while marker not in output and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # the child closed the terminal
                    return
                if not chunk:
                    return
                output += chunk

    try:
        read_until(b"Ctrl-C stops everything", DEMO_TIMEOUT_S)
        found = re.search(rb"Dashboard: (http://127\.0\.0\.1:\d+/)", output)
        assert found, output.decode(errors="replace")
        url = found.group(1).decode()
        # Still serving after the summary: the identifications page lists the station.
        with urllib.request.urlopen(f"{url}identifications", timeout=10) as page:
            assert page.status == 200
            assert "demo-lab" in page.read().decode()
        # The review page needs the login the demo printed (and made for this work folder).
        login = re.search(rb"login for reviews and uploads: user (\S+), password (\S+)", output)
        assert login, output.decode(errors="replace")
        assert (work / "dashboard-users").stat().st_mode & 0o077 == 0
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}review", timeout=10)
        refused.value.close()
        assert refused.value.code == 401
        basic = base64.b64encode(login.group(1) + b":" + login.group(2)).decode()
        request = urllib.request.Request(
            f"{url}review", headers={"Authorization": f"Basic {basic}"}
        )
        with urllib.request.urlopen(request, timeout=10) as page:
            assert page.status == 200
            assert re.search(r"Item 1 of \d+ waiting for review", page.read().decode())
        assert f"at {url}review" in output.decode(errors="replace")
        os.kill(pid, signal.SIGINT)
        read_until(b"\x00never", 60)  # to the end of its output
        _, status = os.waitpid(pid, 0)
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    text = output.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text  # Ctrl-C is how serving ends
    assert "stopping the station, the dashboard, the collector, the broker" in text
    assert "Traceback" not in text
    assert not _processes_mentioning(str(work))


def _interrupt(
    work: Path, *flags: str, at: str, then: Callable[[], bool] = lambda: True
) -> DemoRun:
    """Run the demo, send SIGINT (what Ctrl-C sends) once a line containing ``at`` is
    printed and ``then()`` holds, and return what it printed until it exited."""
    command = [sys.executable, "-u", "-m", "fieldscope.cli", "demo", "--quick", "--workdir",
               str(work), "--no-serve", "--port", "0", *flags]  # fmt: skip
    lines: list[str] = []
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as demo:
        try:
            assert demo.stdout is not None
            for line in demo.stdout:
                lines.append(line)
                if at in line:
                    break
            assert any(at in line for line in lines), "".join(lines)
            deadline = time.monotonic() + 60
            while not then() and time.monotonic() < deadline:
                time.sleep(0.1)
            demo.send_signal(signal.SIGINT)
            rest, stderr = demo.communicate(timeout=120)
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.wait()
    return DemoRun(work, demo.returncode, "".join(lines) + rest, stderr)


@pytest.mark.slow
@pytest.mark.mqtt
@pytest.mark.parametrize("broker", ["mosquitto", "embedded"])
def test_ctrl_c_while_the_station_runs_stops_every_child(
    trained_demo: DemoRun, tmp_path: Path, broker: str
) -> None:
    work = _copy(trained_demo, tmp_path)
    log = work / "station.log"

    def station_running() -> bool:
        return log.exists() and "is running" in log.read_text()

    # At one frame per second the station needs 12 s: it is interrupted mid-replay.
    run = _interrupt(
        work, "--broker", broker, "--rate", "1", at="6/7 station", then=station_running
    )
    assert run.returncode == 130, run.stdout + run.stderr
    assert run.stderr.strip().splitlines() == ["fieldscope demo: interrupted"], run.stderr
    assert "7/7 summary" not in run.stdout
    assert "stopping the station, the dashboard, the collector, the broker" in run.stdout
    assert len(run.pids) == 2, run.stdout
    assert _wait_gone(run.pids, 10), f"left running: {run.pids}"
    assert not _processes_mentioning(str(work))
    # The station stopped cleanly on SIGTERM (its own log says so), not by SIGKILL.
    assert "fieldscope.edge.daemon: stopped:" in log.read_text()


@pytest.mark.slow
def test_ctrl_c_during_training_exits_cleanly(tmp_path: Path) -> None:
    work = tmp_path / "work"
    # One second in: TensorFlow's import or the first epoch, with stderr sent to demo.log.
    seen: list[float] = []

    def a_second_later() -> bool:
        seen.append(time.monotonic())
        return seen[-1] - seen[0] > 1.0

    run = _interrupt(work, at="2/7 train", then=a_second_later)
    assert run.returncode == 130, run.stderr
    # One line, on the terminal: stderr was given back although TensorFlow had it.
    assert run.stderr.strip().splitlines()[-1] == "fieldscope demo: interrupted", run.stderr
    assert "Traceback" not in run.stderr
    assert not _processes_mentioning(str(work))


@pytest.mark.slow
@pytest.mark.mqtt
def test_a_closed_terminal_stops_every_child(trained_demo: DemoRun, tmp_path: Path) -> None:
    """An SSH session that drops or a terminal window that closes: the demo gets SIGHUP and
    every later write to its terminal fails with EIO. The clean-up must still stop the
    station and the broker (it used to die on the 'stopping …' line and orphan both)."""
    import pty
    import select

    work = _copy(trained_demo, tmp_path)
    log = work / "station.log"
    pid, fd = pty.fork()
    if pid == 0:  # the child: the demo, on a terminal of its own (it leads the session)
        os.execv(sys.executable, [sys.executable, "-m", "fieldscope.cli", "demo", "--quick",
                                  "--workdir", str(work), "--port", "0", "--rate", "1",
                                  "--broker", "mosquitto"])  # fmt: skip
    output = b""
    status: int | None = None
    pids: list[int] = []
    try:
        deadline = time.monotonic() + DEMO_TIMEOUT_S
        while time.monotonic() < deadline and not (
            b"6/7 station" in output and log.exists() and "is running" in log.read_text()
        ):
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    output += os.read(fd, 4096)
                except OSError:
                    break
        text = output.decode(errors="replace")
        assert b"6/7 station" in output, text
        pids = [int(p) for p in re.findall(r"\bpid (\d+)", text)]
        assert len(pids) == 2, text
        os.close(fd)  # the terminal goes away mid-replay
        fd = -1
        deadline = time.monotonic() + 60
        while status is None and time.monotonic() < deadline:
            done, raw = os.waitpid(pid, os.WNOHANG)
            status = raw if done else None
            time.sleep(0.1)
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            if status is None:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    assert status is not None, "the demo did not exit after its terminal closed"
    assert os.waitstatus_to_exitcode(status) == 130
    assert _wait_gone(pids, 10), f"left running: {pids}"
    assert not _processes_mentioning(str(work))
    # The station was stopped by the demo (SIGTERM, drained), not left to die later.
    assert "fieldscope.edge.daemon: stopped:" in log.read_text()


def test_epoch_lines_show_the_val_loss_that_the_best_mark_follows() -> None:
    """The * (the checkpoint kept) follows val_loss, which the line did not show."""
    import io

    from fieldscope.cli.demo import _EpochLines, _Progress

    out = io.StringIO()
    lines = _EpochLines(_Progress(out, steps=7))
    lines.stage_begin(1, "head", 2, 0)
    logs = {"loss": 1.0, "accuracy": 0.5, "val_loss": 0.75, "val_accuracy": 0.6}
    lines.epoch_end(1, 1, 2, logs, improved=True)
    lines.epoch_end(1, 2, 2, {**logs, "val_loss": 0.8, "val_accuracy": 0.7}, improved=False)
    first, second = out.getvalue().splitlines()[1:]
    assert "* = lowest val_loss so far" in out.getvalue().splitlines()[0]
    assert "val_loss 0.750" in first
    assert first.rstrip().split("  [")[0].endswith("*")
    assert "val_loss 0.800" in second
    assert "*" not in second
