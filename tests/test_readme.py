"""The README's two commands are what a new user pastes first, and what CI runs.

`.ci/run` reads them with scripts/readme-commands (never a copy), so these tests pin
what makes them work on a stock Debian 12 or Ubuntu 24.04: a virtual environment (PEP
668 refuses `pip install` outside one, and the system Python has no pip), root without
sudo, and the tests run with that venv's Python.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "readme-commands"


def _command(number: int, readme: Path | None = None) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, str(SCRIPT), str(number), *([str(readme)] if readme else [])]
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=30)


def test_command_1_installs_into_a_venv_made_by_the_system_python() -> None:
    result = _command(1)
    assert result.returncode == 0, result.stderr
    install = result.stdout.strip()
    steps = [step.strip() for step in install.replace(";", "&&").split("&&")]
    # Root has no sudo on a stock image; a user needs it: the command decides.
    assert steps[0] == 'SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)'
    assert "$SUDO apt-get install -y python3-venv mosquitto postgresql chromium faketime" in steps
    venv = steps.index("/usr/bin/python3 -m venv .venv")
    pip = next(i for i, s in enumerate(steps) if "pip install" in s)
    assert venv < pip
    # Every pip and fieldscope runs from the venv, never a bare interpreter (PEP 668).
    assert steps[pip].startswith(".venv/bin/pip install -e '.[all,dev]'")
    assert "python3 -m pip" not in install
    assert " sudo " not in f" {install} ", "root has no sudo: use $SUDO"
    assert steps[-1] == ".venv/bin/fieldscope demo"


def test_command_2_runs_the_tests_with_that_venv() -> None:
    result = _command(2)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ".venv/bin/python -m pytest"


def test_dev_extra_pins_what_the_packaging_test_builds_with() -> None:
    """tests/test_packaging.py builds with --no-isolation: the venv itself must hold the
    build requirements, not only CI's upgraded copy (a fresh Debian 12 venv has setuptools
    66, pyproject needs >= 68)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dev = project["project"]["optional-dependencies"]["dev"]
    for requirement in project["build-system"]["requires"]:
        assert requirement in dev or any(d.startswith(requirement) for d in dev), requirement


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("# no block\n", "no ```bash block"),
        ("```bash\n# 1.\nonly-one\n```\n", "holds 1 command(s)"),
        ("```bash\n# 1.\na \\\n  b\n# 2.\nc\n```\n", "continues over lines"),
        ("```bash\na\nb\n", "never closed"),
    ],
)
def test_a_readme_ci_cannot_read_fails_with_one_line(
    tmp_path: Path, text: str, message: str
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(text)
    result = _command(1, readme)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_ci_runs_the_readme_commands_it_reads() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "/usr/bin/python3 scripts/readme-commands 1" in ci
    assert "/usr/bin/python3 scripts/readme-commands 2" in ci
    assert 'bash -e -c "$INSTALL_COMMAND"' in ci
    assert 'bash -c "$TEST_COMMAND"' in ci
    assert "python3 -m pytest" not in ci, "CI must run the README's test command, not its own"
