"""The wheel holds every module under ``fieldscope/`` and nothing at the top level.

A subpackage that setup.py forgets works in an editable install and silently drops
out of the wheel, so this builds a real wheel from a copy of the tree and reads it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("edge", "train", "convert", "deploy", "collect", "cli")


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "README.md", *FOLDERS):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    # --no-build-isolation: no network in tests; setuptools and wheel are dev dependencies.
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out)],
        cwd=src,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("fieldscope-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def _in_a_package(path: Path, top: Path) -> bool:
    """Scripts beside the package (deploy/pi-check/, with no __init__.py and a name
    that cannot be imported) are tools of this checkout, not modules of the wheel."""
    return all(
        (folder / "__init__.py").exists() for folder in path.parents if folder.is_relative_to(top)
    )


def test_every_source_module_is_in_the_wheel(wheel_names: set[str]) -> None:
    expected = {
        f"fieldscope/{path.relative_to(ROOT).as_posix()}"
        for folder in FOLDERS
        for path in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in path.parts and _in_a_package(path, ROOT / folder)
    }
    missing = sorted(expected - wheel_names)
    assert not missing, f"modules missing from the wheel: {missing}"


def test_package_data_is_in_the_wheel(wheel_names: set[str]) -> None:
    assert "fieldscope/edge/py.typed" in wheel_names
    schemas = list((ROOT / "edge" / "schemas").glob("*.json"))
    assert schemas, "edge/schemas/ must ship the JSON Schema files"
    for schema in schemas:
        assert f"fieldscope/edge/schemas/{schema.name}" in wheel_names


def test_no_generic_top_level_module(wheel_names: set[str]) -> None:
    tops = {name.split("/", 1)[0] for name in wheel_names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"fieldscope"}
    assert not any(name.startswith("fieldscope/__init__") for name in wheel_names), (
        "fieldscope must stay a namespace package"
    )


def test_console_script_declared(wheel_names: set[str]) -> None:
    (entry_points,) = [n for n in wheel_names if n.endswith(".dist-info/entry_points.txt")]
    assert entry_points
