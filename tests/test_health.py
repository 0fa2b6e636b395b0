"""Heartbeat, model-info and command-reply payloads; temperature and disk measurements."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest

from fieldscope.edge.health import (
    CameraState,
    CommandReply,
    FrameCounts,
    Heartbeat,
    ModelInfo,
    PayloadError,
    cpu_temperature_c,
    disk_free_bytes,
)
from fieldscope.edge.message import ModelRef
from fieldscope.edge.runtime import runtime_info

SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
MODEL = ModelRef("protists-mnv2", "1.2.0", SHA)
NOW = datetime(2026, 11, 23, 18, 39, 0, 123456, tzinfo=UTC)


def heartbeat(**overrides: Any) -> Heartbeat:
    fields: dict[str, Any] = {
        "time": NOW,
        "uptime_s": 3600.5,
        "frames": FrameCounts(seen=120, accepted=100, uncertain=10, rejected=8, failed=2),
        "fps": 1.5,
        "outbox_depth": 3,
        "outbox_dropped": 0,
        "camera_state": CameraState.OK,
        "paused": False,
        "disk_free_bytes": 12_000_000_000,
        "cpu_temperature_c": 51.2,
        "model": MODEL,
    }
    fields.update(overrides)
    return Heartbeat(**fields)


def test_heartbeat_round_trips_with_a_readable_shape() -> None:
    beat = heartbeat(warnings=("outbox: the disk is full",), outbox_oldest_age_s=12.5)
    data = json.loads(beat.to_json())
    assert data["version"] == 1
    assert data["time"] == "2026-11-23T18:39:00.123456Z"
    assert data["frames"] == {
        "seen": 120,
        "accepted": 100,
        "uncertain": 10,
        "rejected": 8,
        "failed": 2,
    }
    assert data["outbox"] == {"depth": 3, "dropped": 0, "oldest_age_s": 12.5}
    assert data["camera"] == {"state": "ok", "outage": None}
    assert data["model"]["sha256"] == SHA
    assert Heartbeat.from_json(beat.to_json()) == beat


def test_unknown_measurements_are_null_not_missing() -> None:
    beat = heartbeat(
        cpu_temperature_c=None,
        disk_free_bytes=None,
        model=None,
        camera_state="outage",
        camera_outage="/dev/video0 vanished; retrying in 8 s",
    )
    data = json.loads(beat.to_json())
    assert data["cpu_temperature_c"] is None
    assert data["disk_free_bytes"] is None
    assert data["model"] is None
    assert data["camera"] == {"state": "outage", "outage": "/dev/video0 vanished; retrying in 8 s"}
    assert Heartbeat.from_json(beat.to_json()) == beat


def test_readers_ignore_new_fields_and_refuse_new_versions() -> None:
    data = json.loads(heartbeat().to_json())
    data["gpu_temperature_c"] = 40.0
    assert Heartbeat.from_json(json.dumps(data)) == heartbeat()
    data["version"] = 2
    with pytest.raises(PayloadError, match=r"heartbeat: version 2 is not supported .*upgrade"):
        Heartbeat.from_json(json.dumps(data))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"time": datetime(2026, 1, 1)}, "time must be timezone-aware"),
        ({"uptime_s": -1}, "uptime_s must be >= 0, got -1"),
        ({"fps": float("nan")}, "fps must be a finite number"),
        ({"outbox_depth": -3}, "outbox.depth must be >= 0, got -3"),
        ({"camera_state": "on fire"}, "camera.state must be one of starting, ok, outage, stopped"),
        ({"paused": "no"}, "paused must be true or false"),
        ({"warnings": ("",)}, r"warnings\[0\] must not be empty or blank"),
        ({"model": "mnv2"}, "model must be an object or null, got str 'mnv2'"),
    ],
)
def test_an_invalid_heartbeat_names_the_field(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        heartbeat(**overrides)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("frames"), "heartbeat: frames is required"),
        (lambda d: d["frames"].update(seen=-1), r"frames\.seen must be >= 0, got -1"),
        (lambda d: d["outbox"].pop("depth"), r"outbox\.depth is required"),
        (lambda d: d.update(time="2026-11-23 18:39"), "time must be a UTC time like"),
        (lambda d: d["model"].update(sha256="abc"), r"heartbeat: model\.sha256 must be 64"),
    ],
)
def test_a_received_heartbeat_is_checked(edit: Any, message: str) -> None:
    data = json.loads(heartbeat().to_json())
    edit(data)
    with pytest.raises(PayloadError, match=message):
        Heartbeat.from_json(json.dumps(data))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xff", "payload is not UTF-8"),
        (b"[1]", "the payload must be an object"),
        (b'{"version": 1, "uptime_s": Infinity}', "Infinity, which is not a JSON number"),
        (b"{" * 100_000, "payload is not JSON this reader accepts"),
    ],
)
def test_garbage_is_a_payload_error_not_a_crash(payload: bytes, message: str) -> None:
    for reader in (Heartbeat.from_json, ModelInfo.from_json, CommandReply.from_json):
        with pytest.raises(PayloadError, match=message):
            reader(payload)


def test_model_info_round_trips() -> None:
    info = ModelInfo(
        model=MODEL,
        labels=("Amoeba", "Euglena", "Paramecium"),
        threshold=0.6,
        loaded_at=datetime(2026, 11, 23, 20, 0, tzinfo=timezone(timedelta(hours=1))),
        runtime="ai_edge_litert",
        runtime_version="2.3.0",
    )
    data = json.loads(info.to_json())
    assert data["loaded_at"] == "2026-11-23T19:00:00.000000Z"  # converted to UTC
    assert data["runtime"] == {"name": "ai_edge_litert", "version": "2.3.0"}
    assert data["labels"] == ["Amoeba", "Euglena", "Paramecium"]
    assert ModelInfo.from_json(info.to_json()) == info
    with pytest.raises(PayloadError, match="labels must be unique"):
        ModelInfo(**{**msgspec.structs.asdict(info), "labels": ("a", "a")})
    with pytest.raises(PayloadError, match=r"threshold must be between 0 and 1, got 1\.5"):
        ModelInfo(**{**msgspec.structs.asdict(info), "threshold": 1.5})


def test_model_info_from_a_real_bundle(tmp_path: Path, tiny_models: Any) -> None:
    bundle = tiny_models.bundle(tmp_path / "bundle", version="2026.11.1")
    info = ModelInfo.from_bundle(bundle, runtime_info(), loaded_at=NOW)
    assert info.model == ModelRef("colours", "2026.11.1", bundle.sha256)
    assert info.labels == ("red", "green", "blue")
    assert info.threshold == 0.6
    assert info.signed is False
    assert ModelInfo.from_json(info.to_json()) == info


def test_command_reply_rules() -> None:
    ok = CommandReply(ok=True, command="status", request_id="r1", data={"paused": False}, time=NOW)
    assert json.loads(ok.to_json()) == {
        "version": 1,
        "ok": True,
        "command": "status",
        "request_id": "r1",
        "error": None,
        "data": {"paused": False},
        "time": "2026-11-23T18:39:00.123456Z",
    }
    assert CommandReply.from_json(ok.to_json()) == ok
    with pytest.raises(PayloadError, match="error must be null when ok is true"):
        CommandReply(ok=True, command="status", error="x")
    with pytest.raises(PayloadError, match="error must be a non-empty string"):
        CommandReply(ok=False, command="status")
    with pytest.raises(PayloadError, match="data must be JSON-serialisable"):
        CommandReply(ok=True, command="status", data={"when": NOW})
    with pytest.raises(PayloadError, match="data must be at most"):
        CommandReply(ok=True, command="status", data={"blob": "x" * 100_000})


def test_a_reply_cannot_change_after_it_was_validated() -> None:
    data: dict[str, Any] = {"frames": [1, 2]}
    reply = CommandReply(ok=True, command="status", data=data)
    data["frames"].append(float("nan"))
    assert reply.data == {"frames": [1, 2]}
    reply.to_json()  # still valid JSON


def test_cpu_temperature_reads_millidegrees_or_says_unknown(tmp_path: Path) -> None:
    zone = tmp_path / "temp"
    zone.write_text("48312\n")
    assert cpu_temperature_c(zone) == pytest.approx(48.312)
    zone.write_text("garbage")
    assert cpu_temperature_c(zone) is None
    assert cpu_temperature_c(tmp_path / "missing") is None


def test_disk_free_bytes(tmp_path: Path) -> None:
    free = disk_free_bytes(tmp_path)
    assert free is not None
    assert abs(free - shutil.disk_usage(tmp_path).free) < 64 * 1024 * 1024
    assert disk_free_bytes(tmp_path / "no" / "such" / "dir") is None
