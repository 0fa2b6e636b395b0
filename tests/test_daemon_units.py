"""The daemon's parts without a broker: systemd notification, log lines, the outbox's
first seq and source keys, model loading and refusal, the command line, the unit file."""

from __future__ import annotations

import io
import json
import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TinyBundles, toml_document
from helpers import run_fieldscope

from fieldscope.edge import outbox as outbox_module
from fieldscope.edge.bundle import generate_keypair, sign_bundle, write_bundle
from fieldscope.edge.config import ModelConfig, PreprocessingOverrides
from fieldscope.edge.daemon import JournalFormatter, configure_logging
from fieldscope.edge.daemon_cli import EXIT_NOT_RUNNING, main, station_status
from fieldscope.edge.errors import BundleError, ConfigError
from fieldscope.edge.model_slot import ModelSlot, bundle_source, load_model
from fieldscope.edge.outbox import (
    MAX_SOURCE_KEYS,
    Outbox,
    OutboxBusyError,
    OutboxError,
    clock_first_seq,
    peek_stats,
)
from fieldscope.edge.preprocess import PreprocessRecipe
from fieldscope.edge.systemd import Notifier

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "fieldscope-edge.service"


# --- systemd ------------------------------------------------------------------------------------


def _listen(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    return sock


def test_notifier_speaks_sd_notify_on_a_path_and_an_abstract_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with _listen(path) as sock:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"})
        assert notifier.watchdog_interval_s == 15.0  # half of WatchdogSec
        assert notifier.ready("serving tiny 1")
        assert sock.recv(100) == b"READY=1\nSTATUS=serving tiny 1"
        assert notifier.watchdog()
        assert sock.recv(100) == b"WATCHDOG=1"
        assert notifier.stopping()
        assert sock.recv(100) == b"STOPPING=1"
        notifier.close()
    name = f"fieldscope-test-{tmp_path.name}"
    with _listen("\0" + name) as sock:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert notifier.watchdog_interval_s is None
        assert notifier.status("ok")
        assert sock.recv(100) == b"STATUS=ok"
        notifier.close()


def test_notifier_is_a_no_op_outside_systemd_and_for_another_pid(
    caplog: pytest.LogCaptureFixture,
) -> None:
    quiet = Notifier.from_environ({})
    assert not quiet.enabled
    assert quiet.ready() is False
    other = Notifier.from_environ(
        {"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    )
    assert other.watchdog_interval_s is None  # the watchdog is for PID 1, not us
    assert other.watchdog() is False  # an unreachable socket is logged, never raised
    assert "cannot notify systemd" in caplog.text


# --- log lines ----------------------------------------------------------------------------------


def _record(level: int, message: str, exc: BaseException | None = None) -> logging.LogRecord:
    info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("fieldscope.edge.daemon", level, __file__, 1, message, (), info)


def test_log_lines_are_one_per_event_with_journald_priorities() -> None:
    try:
        raise RuntimeError("interpreter\nexploded")
    except RuntimeError as exc:
        error = exc
    journal = JournalFormatter(journal=True)
    line = journal.format(_record(logging.ERROR, "classify failed", error))
    assert "\n" not in line
    assert line.startswith("<3>fieldscope.edge.daemon: classify failed | Traceback")
    assert "RuntimeError: interpreter | exploded" in line
    assert journal.format(_record(logging.WARNING, "w")).startswith("<4>")
    terminal = JournalFormatter(journal=False).format(_record(logging.INFO, "running"))
    assert terminal.endswith("Z INFO fieldscope.edge.daemon: running")


def test_configure_logging_replaces_earlier_handlers() -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        stream = io.StringIO()
        configure_logging("WARNING", stream)
        assert len(root.handlers) == 1
        logging.getLogger("fieldscope.test").info("hidden")
        logging.getLogger("fieldscope.test").warning("shown")
        assert stream.getvalue().count("\n") == 1
        assert "WARNING fieldscope.test: shown" in stream.getvalue()
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)


# --- the outbox's first seq and source keys -----------------------------------------------------


def test_a_new_outbox_starts_at_the_clock_and_an_old_one_continues(tmp_path: Path) -> None:
    assert clock_first_seq(1_795_000_000.123) == 1_795_000_000_123
    assert clock_first_seq(1_795_000_000) < 2**53
    path = tmp_path / "outbox.sqlite"
    with Outbox(path, first_seq=clock_first_seq(1_795_000_000)) as outbox:
        assert outbox.next_seq == 1_795_000_000_000  # persisted before any message
    with Outbox(path, first_seq=clock_first_seq(1_796_000_000)) as outbox:
        assert outbox.add("t", lambda seq: str(seq).encode()).seq == 1_795_000_000_000
    # A re-flashed card: a new file, a later clock, seqs above every earlier one.
    with Outbox(tmp_path / "new.sqlite", first_seq=clock_first_seq()) as fresh:
        assert fresh.next_seq > 1_795_000_000_000
    with pytest.raises(OutboxError, match="first_seq"):
        Outbox(tmp_path / "x.sqlite", first_seq=0)


def test_an_unset_clock_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    assert clock_first_seq(86_400.0) == 86_400_000
    assert "system clock reads 1970-01-02" in caplog.text


def test_source_keys_are_stored_with_the_message_and_outlive_its_ack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "outbox.sqlite"
    with Outbox(path) as outbox:
        entry = outbox.add("t", lambda seq: b"x", source_key="folder:a.png:10:1")
        outbox.add("t", lambda seq: b"y")
        assert outbox.ack_many([1, 2]) == 2
        assert outbox.source_seq("folder:a.png:10:1") == entry.seq
        assert outbox.source_seq("folder:b.png:10:1") is None

        def failing(seq: int) -> bytes:
            raise ValueError("no payload")

        with pytest.raises(ValueError, match="no payload"):
            outbox.add("t", failing, source_key="folder:c.png:1:1")
        assert outbox.source_seq("folder:c.png:1:1") is None  # nothing stored, no key
    with Outbox(path) as outbox:  # survives a restart
        assert outbox.source_seq("folder:a.png:10:1") == entry.seq
        # Only recent keys are kept.
        monkeypatch.setattr(outbox_module, "MAX_SOURCE_KEYS", 3)
        for i in range(5):
            outbox.add("t", lambda seq: b"z", source_key=f"k{i}")
        assert [outbox.source_seq(f"k{i}") for i in range(5)][:2] == [None, None]
        assert outbox.source_seq("k4") is not None
    assert MAX_SOURCE_KEYS >= 1000


def test_peek_stats_reads_a_stopped_outbox_and_knows_a_running_one(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    assert peek_stats(path) is None
    with Outbox(path, first_seq=100) as outbox:
        outbox.add("t", lambda seq: b"x")
        with pytest.raises(OutboxBusyError, match="second daemon"):
            peek_stats(path)
    stats = peek_stats(path)
    assert stats is not None
    assert (stats.depth, stats.next_seq, stats.dropped) == (1, 101, 0)


# --- loading and refusing bundles ----------------------------------------------------------------


def test_load_model_verifies_checks_and_self_tests(
    tiny_bundles: TinyBundles, tmp_path: Path
) -> None:
    link = tmp_path / "current"
    link.symlink_to(tiny_bundles.v1)
    model = load_model(ModelConfig(bundle=link), PreprocessingOverrides(denoise="bilateral"))
    assert model.source.target == tiny_bundles.v1.resolve()
    assert model.bundle.path == tiny_bundles.v1.resolve()  # never the moving link
    assert model.recipe.denoise == "bilateral"
    assert model.recipe.size == (32, 32)  # the size always stays the bundle's
    assert model.info.labels == tiny_bundles.labels
    assert model.ref.version == "1"

    with pytest.raises(BundleError, match="checksum mismatch"):
        load_model(ModelConfig(bundle=tiny_bundles.damaged), PreprocessingOverrides())
    with pytest.raises(BundleError, match="does not exist"):
        load_model(ModelConfig(bundle=tmp_path / "missing"), PreprocessingOverrides())
    with pytest.raises(ConfigError, match=r"model\.runtime"):
        load_model(ModelConfig(bundle=link, runtime="tensorflow"), PreprocessingOverrides())


def test_a_signature_is_required_when_a_key_is_configured(
    tiny_models: object, tiny_bundles: TinyBundles, tmp_path: Path
) -> None:
    private, public = tmp_path / "release.pem", tmp_path / "release.pub.pem"
    generate_keypair(private, public)
    signed = tmp_path / "signed"
    shutil.copytree(tiny_bundles.v2, signed)
    with pytest.raises(BundleError, match="not signed"):
        load_model(ModelConfig(bundle=signed, public_key=public), PreprocessingOverrides())
    sign_bundle(signed, private)
    model = load_model(ModelConfig(bundle=signed, public_key=public), PreprocessingOverrides())
    assert model.info.signed is True


def test_a_bundle_for_another_runtime_is_refused(
    tiny_models: object, tiny_bundles: TinyBundles, tmp_path: Path
) -> None:
    model = (tiny_bundles.v1 / "model.tflite").read_bytes()
    other = write_bundle(
        tmp_path / "other",
        model,
        model_name="tiny-colour",
        model_version="9",
        labels=tiny_bundles.labels,
        preprocessing=PreprocessRecipe(size=(32, 32)),
        min_runtime={"tflite_runtime": "2.14"},
    )
    with pytest.raises(BundleError, match="not known to run on ai_edge_litert"):
        load_model(ModelConfig(bundle=other.path), PreprocessingOverrides())


def test_the_slot_keeps_the_old_model_when_a_reload_fails(
    tiny_bundles: TinyBundles, tmp_path: Path
) -> None:
    link = tmp_path / "current"
    link.symlink_to(tiny_bundles.v1)
    cfg = ModelConfig(bundle=link)
    slot = ModelSlot(load_model(cfg, PreprocessingOverrides()))
    link.unlink()
    link.symlink_to(tiny_bundles.damaged)
    result = slot.reload(cfg, PreprocessingOverrides())
    assert not result.swapped
    assert "checksum mismatch" in (result.error or "")
    assert slot.current().ref.version == "1"
    assert slot.refused_source == bundle_source(link)
    link.unlink()
    link.symlink_to(tiny_bundles.v2)
    result = slot.reload(cfg, PreprocessingOverrides())
    assert result.swapped
    assert (result.previous.ref.version, slot.current().ref.version) == ("1", "2")
    assert slot.refused is None


# --- command line -----------------------------------------------------------------------------


def _config(tmp_path: Path, bundle: Path) -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(
        toml_document(
            {
                "device": {"station": "pond-3", "id": "scope-a", "data_dir": "data"},
                "camera": {"backend": "replay"},
                "camera.replay": {"path": "images"},
                "model": {"bundle": str(bundle)},
                "mqtt": {"host": "127.0.0.1", "prefix": "fs"},
            }
        )
    )
    return path


def test_check_config_and_status_of_a_stopped_station(
    tiny_bundles: TinyBundles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, tiny_bundles.v1)
    assert main(["check-config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "[camera.replay]" in out
    assert "# warning: camera.replay.path" in out  # the image folder is not there yet

    assert main(["status", "--config", str(config)]) == EXIT_NOT_RUNNING
    out = capsys.readouterr().out
    assert "pond-3/scope-a: not running" in out
    assert "model (configured): tiny-colour 1" in out
    with Outbox(tmp_path / "data" / "outbox.sqlite", first_seq=50) as outbox:
        outbox.add("t", lambda seq: b"x")
    assert main(["status", "--config", str(config), "--json"]) == EXIT_NOT_RUNNING
    report = json.loads(capsys.readouterr().out)
    assert report["outbox"] == {"depth": 1, "dropped": 0, "next_seq": 51}
    assert report["running"] is False

    broken = _config(tmp_path, tiny_bundles.damaged)
    assert "checksum mismatch" in station_status(broken)["model_problem"]


def test_expected_failures_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "edge.toml"
    config.write_text('[device]\nstation = "a/b"\n')
    assert main(["check-config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fieldscope edge check-config: error: ")
    assert "device.station" in err
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2  # `run` is implied
    assert "missing.toml" in capsys.readouterr().err


def test_the_fieldscope_command_has_the_daemon_actions_once_wired() -> None:
    from fieldscope.cli.main import build_parser

    parser = build_parser()
    try:
        args = parser.parse_args(["edge", "run", "--config", "edge.toml"])
    except SystemExit:
        pytest.skip("edge/cli.py does not call add_daemon_commands yet")
    assert args.handler.__module__ == "fieldscope.edge.daemon_cli"
    done = run_fieldscope("edge", "status", "--config", "/nonexistent.toml")
    assert done.returncode == 2
    assert "no such file" in done.stderr


# --- the systemd unit ------------------------------------------------------------------------


def test_the_unit_is_a_hardened_notify_service_with_a_watchdog(tmp_path: Path) -> None:
    text = UNIT.read_text()
    settings = [line.strip() for line in text.splitlines() if "=" in line and line[0] != "#"]
    for wanted in (
        "Type=notify",
        "WatchdogSec=60",
        "Restart=on-failure",
        "User=fieldscope",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=fieldscope",
    ):
        assert wanted in settings, wanted
    assert any(s.startswith("ExecStart=") and "edge run --config" in s for s in settings)
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    # systemd's own parser: no unknown directive, no bad value (ExecStart made runnable).
    unit = tmp_path / "fieldscope-edge.service"
    unit.write_text(
        text.replace("/opt/fieldscope/venv/bin/fieldscope", sys.executable + " -m fieldscope.cli")
    )
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "Unknown" not in done.stderr
    assert "fieldscope-edge.service" not in done.stderr, done.stderr
