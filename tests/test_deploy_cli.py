"""``fieldscope deploy``: the wrapper's own checks, before any Ansible runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fieldscope.cli.main import main
from fieldscope.deploy.cli import ansible_command, find_ansible_playbook, playbook_dir


def test_playbooks_ship_with_the_package() -> None:
    for name in ("provision.yml", "rollout.yml", "rollback.yml", "status.yml", "ansible.cfg"):
        assert (playbook_dir() / name).is_file(), name
    assert (playbook_dir() / "roles/fieldscope/templates/edge.toml.j2").is_file()


def test_arguments_after_double_dash_go_to_ansible() -> None:
    from fieldscope.cli.main import build_parser

    args = build_parser().parse_args(
        ["deploy", "rollout", "-i", "inv.yml", "--bundle", "b", "--", "--check", "-vv"]
    )
    assert args.ansible_args == ["--check", "-vv"]
    assert args.bundle == Path("b")


def test_missing_ansible_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    inventory = tmp_path / "inventory.yml"
    inventory.write_text("all: {}\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    # Nor beside the interpreter (where a venv's pip puts it).
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))
    assert main(["deploy", "status", "-i", str(inventory)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "ansible-playbook" in err
    assert "pip install 'fieldscope[deploy]'" in err


@pytest.mark.skipif(find_ansible_playbook() is None, reason="needs ansible-core")
def test_missing_inventory_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deploy", "rollback", "-i", str(tmp_path / "nope.yml")]) == 2
    err = capsys.readouterr().err
    assert "nope.yml does not exist" in err
    assert "inventory.example.yml" in err


@pytest.mark.skipif(find_ansible_playbook() is None, reason="needs ansible-core")
def test_command_line_passes_variables_and_limit(tmp_path: Path) -> None:
    import json

    inventory = tmp_path / "inventory.yml"
    inventory.write_text("all: {}\n")
    command = ansible_command(
        "rollout.yml", inventory, {"fieldscope_bundle": "/b"}, limit="pond_3", passthrough=["-vv"]
    )
    assert command[1:4] == ["-i", str(inventory), str(playbook_dir() / "rollout.yml")]
    assert json.loads(command[command.index("-e") + 1]) == {"fieldscope_bundle": "/b"}
    assert command[-3:] == ["--limit", "pond_3", "-vv"]


@pytest.mark.slow
@pytest.mark.skipif(find_ansible_playbook() is None, reason="needs ansible-core")
def test_rollout_refuses_a_damaged_bundle_before_touching_the_fleet(
    tiny_bundles: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inventory = tmp_path / "inventory.yml"
    inventory.write_text("all: {}\n")
    code = main(["deploy", "rollout", "-i", str(inventory), "--bundle", str(tiny_bundles.damaged)])
    assert code == 2
    err = capsys.readouterr().err
    assert "model.tflite" in err
    assert len(err.strip().splitlines()) == 1


def test_provision_outside_a_source_tree_asks_for_a_wheel(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if find_ansible_playbook() is None:
        pytest.skip("needs ansible-core")
    inventory = tmp_path / "inventory.yml"
    inventory.write_text("all: {}\n")
    code = main(["deploy", "provision", "-i", str(inventory), "--source", str(tmp_path)])
    assert code == 2
    assert "--wheel" in capsys.readouterr().err
