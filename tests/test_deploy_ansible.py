"""The deploy playbooks, run by the real ``ansible-playbook`` against simulated devices.

Three devices in two stations live on this machine: ``ansible_connection=local`` with
each device's filesystem under its own folder (``fieldscope_device_root``). Only apt,
user creation and systemctl are skipped (``fieldscope_manage_system: false``); the
daemon's reload and health are replaced at their command line by fakes: the reload
appends to ``reloads.log``, the health command reports the model of the bundle that
``current`` points at, unless the device holds a ``daemon-broken`` marker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest

from fieldscope.deploy.cli import find_ansible_playbook

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_ansible_playbook() is None, reason="needs ansible-core"),
]

REPO = Path(__file__).resolve().parents[1]
PLAYBOOKS = Path(str(files("fieldscope.deploy") / "ansible"))
DEVICES = {"scope-a": "pond_3", "scope-b": "pond_3", "scope-c": "reef_1"}
DATA_DIR = "var/lib/fieldscope"

FAKE_HEALTH = """\
import json, sys
from pathlib import Path

bundles = Path(sys.argv[1])
if (bundles.parent / "daemon-broken").exists():
    print(json.dumps({"running": False, "model": None}))
    sys.exit(3)
manifest = json.loads((bundles / "current" / "manifest.json").read_text())
model = {
    "name": manifest["model_name"],
    "version": manifest["model_version"],
    "sha256": manifest["files"]["model.tflite"]["sha256"],
}
print(json.dumps({"running": True, "model": model}))
"""


@dataclass(frozen=True)
class Release:
    """Bundles signed with the fleet's key (and one signed with another key)."""

    v1: Path
    v2: Path
    corrupt: Path  # v2 signed, then one byte of its model flipped
    wrong_key: Path  # v2 signed with a key the devices do not trust
    public_key: Path
    wheel: Path


def bundle_id(bundle: Path) -> str:
    import hashlib

    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def release(tiny_bundles: Any, tmp_path_factory: pytest.TempPathFactory) -> Release:
    from fieldscope.edge.bundle import generate_keypair, sign_bundle

    root = tmp_path_factory.mktemp("release")
    generate_keypair(root / "fleet.key", root / "fleet.pub.pem")
    generate_keypair(root / "other.key", root / "other.pub.pem")
    made = {}
    for name, source, key in (
        ("v1", tiny_bundles.v1, "fleet.key"),
        ("v2", tiny_bundles.v2, "fleet.key"),
        ("corrupt", tiny_bundles.v2, "fleet.key"),
        ("wrong_key", tiny_bundles.v2, "other.key"),
    ):
        made[name] = shutil.copytree(source, root / name)
        sign_bundle(made[name], root / key)
    model = made["corrupt"] / "model.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    dist = root / "dist"
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip, "-w", str(dist), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("fieldscope-*.whl")
    return Release(
        made["v1"], made["v2"], made["corrupt"], made["wrong_key"], root / "fleet.pub.pem", wheel
    )


@dataclass
class Fleet:
    root: Path
    inventory: Path
    env: dict[str, str]

    def device(self, name: str) -> Path:
        return self.root / "devices" / name

    def bundles(self, name: str) -> Path:
        return self.device(name) / DATA_DIR / "bundles"

    def current(self, name: str) -> str | None:
        link = self.bundles(name) / "current"
        return str(link.readlink()) if link.is_symlink() else None

    def reloads(self, name: str) -> int:
        log = self.device(name) / "reloads.log"
        return len(log.read_text().splitlines()) if log.exists() else 0

    def play(self, playbook: str, **extra: object) -> subprocess.CompletedProcess[str]:
        command = [
            str(find_ansible_playbook()),
            "-i",
            str(self.inventory),
            str(PLAYBOOKS / playbook),
        ]
        return subprocess.run(
            [*command, "-e", json.dumps(extra)],
            check=False,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )


def recap(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, int]]:
    """The PLAY RECAP counters per host."""
    out = {}
    for line in result.stdout.splitlines():
        m = re.match(r"^(\S+)\s+:\s+(.*)$", line)
        if m and "ok=" in m.group(2):
            out[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return out


def make_fleet(root: Path, release: Release, *, venv: bool = True) -> Fleet:
    """Write the inventory and the hermetic Ansible environment for devices under root."""
    (root / "devices").mkdir(parents=True, exist_ok=True)
    fake = root / "fake_health.py"
    fake.write_text(FAKE_HEALTH)
    stations: dict[str, dict[str, object]] = {}
    for device, station in DEVICES.items():
        hosts = stations.setdefault(station, {"hosts": {}})["hosts"]
        hosts[device] = {"fieldscope_device_root": str(root / "devices" / device)}  # type: ignore[index]
    inventory = {
        "all": {
            "vars": {
                "ansible_connection": "local",
                "ansible_python_interpreter": sys.executable,
                "fieldscope_manage_system": False,
                "fieldscope_python": sys.executable,
                "fieldscope_pip_extra_args": ["--no-index"],
                "fieldscope_camera_backend": "replay",
                "fieldscope_camera_options": {"path": "/srv/specimens", "rate_hz": 0.5},
                "fieldscope_mqtt_host": "broker.test",
                "fieldscope_public_key_file": str(release.public_key),
                "fieldscope_reload_command": "sh -c 'echo reload >> "
                "{{ fieldscope_device_root }}/reloads.log'",
                "fieldscope_health_command": f"{sys.executable} {fake} {{{{ _fs_bundles }}}}",
                "fieldscope_health_retries": 1,
                "fieldscope_health_delay": 0,
            },
            "children": stations,
        }
    }
    if not venv:  # run this interpreter's fieldscope on the device
        inventory["all"]["vars"]["fieldscope_cli"] = f"{sys.executable} -m fieldscope.cli.main"
    path = root / "inventory.json"
    path.write_text(json.dumps(inventory, indent=1))
    temp = root / "ansible-tmp"
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(PLAYBOOKS / "ansible.cfg"),
        "ANSIBLE_HOME": str(temp / "home"),
        "ANSIBLE_LOCAL_TEMP": str(temp / "local"),
        "ANSIBLE_REMOTE_TEMP": str(temp / "remote"),
        "ANSIBLE_HOST_KEY_CHECKING": "False",
        "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_LOCALHOST_WARNING": "False",
    }
    if sys.prefix != sys.base_prefix:
        # The playbook makes the device venv with --system-site-packages (to see apt's
        # picamera2) and installs with --no-index: on a Pi the dependencies come from
        # apt or a wheel folder. When these tests run inside a venv (the README's
        # `.venv`), "system" would be bare Debian Python; the dependencies are this
        # venv's site-packages instead. Only the dependencies: fieldscope itself is
        # editable here (reached through a .pth, which PYTHONPATH entries skip), so the
        # device still runs the wheel the playbook installs.
        purelib = sysconfig.get_paths()["purelib"]
        env["PYTHONPATH"] = os.pathsep.join(p for p in (purelib, os.environ.get("PYTHONPATH")) if p)
    return Fleet(root, path, env)


@pytest.fixture(scope="module")
def provisioned(release: Release, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """Three devices provisioned from the wheel and running v1."""
    fleet = make_fleet(tmp_path_factory.mktemp("fleet"), release)
    result = fleet.play("provision.yml", fieldscope_wheel=str(release.wheel))
    assert result.returncode == 0, result.stdout + result.stderr
    result = fleet.play("rollout.yml", fieldscope_bundle=str(release.v1))
    assert result.returncode == 0, result.stdout + result.stderr
    return fleet


@pytest.fixture
def fleet(provisioned: Fleet, release: Release, tmp_path: Path) -> Fleet:
    """A private copy of the v1 fleet (without the venvs, which rollouts do not use)."""
    shutil.copytree(
        provisioned.root / "devices",
        tmp_path / "devices",
        symlinks=True,
        ignore=shutil.ignore_patterns("venv"),
    )
    fleet = make_fleet(tmp_path, release, venv=False)
    for device in DEVICES:
        (fleet.device(device) / "reloads.log").unlink()
        assert fleet.current(device) == bundle_id(release.v1)
    return fleet


def test_provision_installs_config_unit_and_package(provisioned: Fleet, release: Release) -> None:
    from fieldscope.edge.config import load_config

    unit = (REPO / "deploy" / "systemd" / "fieldscope-edge.service").read_text()
    for device, station in DEVICES.items():
        root = provisioned.device(device)
        cfg = load_config(root / "etc/fieldscope/edge.toml")
        assert (cfg.device.station, cfg.device.id) == (station, device)
        assert cfg.device.data_dir == root / DATA_DIR
        assert cfg.model.bundle == root / DATA_DIR / "bundles/current"
        assert cfg.model.public_key == root / "etc/fieldscope/release.pub.pem"
        assert cfg.camera.backend == "replay"
        assert cfg.mqtt.host == "broker.test"
        assert (root / "etc/fieldscope/release.pub.pem").read_bytes() == (
            release.public_key.read_bytes()
        )
        assert (root / "etc/systemd/system/fieldscope-edge.service").read_text() == unit
        venv_fieldscope = root / "opt/fieldscope/venv/bin/fieldscope"
        # The wheel carries the playbooks (package data), so a device could deploy too.
        assert list(
            (root / "opt/fieldscope/venv/lib").glob(
                "python*/site-packages/fieldscope/deploy/ansible/roles/fieldscope/tasks/rollout.yml"
            )
        )
        config = str(root / "etc/fieldscope/edge.toml")
        status = subprocess.run(
            [str(venv_fieldscope), "edge", "status", "--json", "--config", config],
            check=False,
            env=provisioned.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 3, status.stderr  # installed, configured, not running
        assert json.loads(status.stdout)["model"]["version"] == "1"

    again = provisioned.play("provision.yml", fieldscope_wheel=str(release.wheel))
    assert again.returncode == 0, again.stdout
    assert {h: c["changed"] for h, c in recap(again).items()} == dict.fromkeys(DEVICES, 0)


def test_good_bundle_reaches_every_device_and_can_be_rolled_back(
    fleet: Fleet, release: Release, tmp_path: Path
) -> None:
    from fieldscope.edge.bundle import sign_bundle, write_bundle
    from fieldscope.edge.preprocess import PreprocessRecipe

    # The canary, then the two other devices together.
    batches = [1, 2]
    result = fleet.play("rollout.yml", fieldscope_bundle=str(release.v2), fieldscope_serial=batches)
    assert result.returncode == 0, result.stdout
    for device in DEVICES:
        assert fleet.current(device) == bundle_id(release.v2)
        assert str((fleet.bundles(device) / "previous").readlink()) == bundle_id(release.v1)
        assert fleet.reloads(device) == 1
        assert not list(fleet.bundles(device).glob(".*tmp*"))
        assert not list(fleet.bundles(device).glob(".incoming*"))

    again = fleet.play("rollout.yml", fieldscope_bundle=str(release.v2), fieldscope_serial=batches)
    assert again.returncode == 0, again.stdout
    assert {h: c["changed"] for h, c in recap(again).items()} == dict.fromkeys(DEVICES, 0)
    assert all(fleet.reloads(device) == 1 for device in DEVICES)

    # A third bundle with fieldscope_keep_bundles=2 prunes v1 (neither current nor previous).
    v3 = write_bundle(
        tmp_path / "v3",
        (release.v1 / "model.tflite").read_bytes(),
        model_name="tiny-colour",
        model_version="3",
        labels=("red", "green", "blue"),
        preprocessing=PreprocessRecipe(size=(32, 32)),
    ).path
    sign_bundle(v3, release.public_key.with_name("fleet.key"))
    result = fleet.play(
        "rollout.yml",
        fieldscope_bundle=str(v3),
        fieldscope_keep_bundles=2,
        fieldscope_serial=batches,
    )
    assert result.returncode == 0, result.stdout
    for device in DEVICES:
        kept = {p.name for p in fleet.bundles(device).iterdir() if not p.is_symlink()}
        assert kept == {bundle_id(v3), bundle_id(release.v2)}

    status = fleet.play("status.yml")
    assert status.returncode == 0, status.stdout
    rows = [line for line in status.stdout.splitlines() if "tiny-colour" in line]
    assert len(rows) == 3, status.stdout
    assert all(re.search(r"tiny-colour\s+3\s.*\syes\s+running", row) for row in rows), rows

    result = fleet.play("rollback.yml", fieldscope_serial=batches)
    assert result.returncode == 0, result.stdout
    for device in DEVICES:
        assert fleet.current(device) == bundle_id(release.v2)
        assert str((fleet.bundles(device) / "previous").readlink()) == bundle_id(v3)
        assert fleet.reloads(device) == 3


@pytest.mark.parametrize("bad", ["corrupt", "wrong_key"])
def test_bad_bundle_stops_at_the_canary(fleet: Fleet, release: Release, bad: str) -> None:
    bundle = getattr(release, bad)
    result = fleet.play("rollout.yml", fieldscope_bundle=str(bundle))
    assert result.returncode != 0
    assert "rejected bundle" in result.stdout
    counters = recap(result)
    assert counters["scope-a"]["failed"] == 1
    for device in DEVICES:
        assert fleet.current(device) == bundle_id(release.v1)
        assert fleet.reloads(device) == 0
        assert not list(fleet.bundles(device).glob(f"*{bundle_id(bundle)}"))
    # The batches after the canary never started.
    assert "scope-b" not in counters or counters["scope-b"]["ok"] == 0
    assert "scope-c" not in counters or counters["scope-c"]["ok"] == 0


def test_unhealthy_device_is_rolled_back_and_stops_the_rollout(
    fleet: Fleet, release: Release
) -> None:
    (fleet.device("scope-b") / DATA_DIR / "daemon-broken").write_text("")
    result = fleet.play("rollout.yml", fieldscope_bundle=str(release.v2))
    assert result.returncode != 0
    assert "rolled back" in result.stdout
    assert fleet.current("scope-a") == bundle_id(release.v2)  # the canary was healthy
    assert fleet.current("scope-b") == bundle_id(release.v1)  # switched, unhealthy, back
    assert fleet.reloads("scope-b") == 2
    assert fleet.current("scope-c") == bundle_id(release.v1)  # its batch never ran
    assert fleet.reloads("scope-c") == 0


def test_cli_status_runs_the_playbook(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from fieldscope.cli.main import main

    for key, value in fleet.env.items():
        if key.startswith("ANSIBLE_"):
            monkeypatch.setenv(key, value)
    assert main(["deploy", "status", "-i", str(fleet.inventory), "--limit", "reef_1"]) == 0
    out = capfd.readouterr().out
    assert re.search(r"reef_1\s+scope-c\s+tiny-colour\s+1\s", out), out
    assert "scope-a" not in out
