"""The one dependency rule: a Pi installs ``fieldscope[edge]`` and never TensorFlow.

Importing every module of ``fieldscope.edge`` in a fresh interpreter must leave
TensorFlow and Keras out of ``sys.modules``, and no edge module may import our
other packages (statically, anywhere in the file).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EDGE = ROOT / "edge"
FORBIDDEN_OURS = (
    "fieldscope.train",
    "fieldscope.convert",
    "fieldscope.deploy",
    "fieldscope.collect",
    "fieldscope.cli",
)
FORBIDDEN_HEAVY = ("tensorflow", "keras", "tf_keras", "torch")


def _imports(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """(module, line, at_module_level) for every import statement in a file."""
    found: list[tuple[str, int, bool]] = []
    top_level = {id(node) for node in getattr(tree, "body", [])}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((a.name, node.lineno, id(node) in top_level) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno, id(node) in top_level))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append(("." * node.level + (node.module or ""), node.lineno, True))
    return found


def test_edge_imports_nothing_of_ours_nor_tensorflow_statically() -> None:
    problems = []
    for path in sorted(EDGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for module, line, top in _imports(tree):
            where = f"{path.relative_to(ROOT)}:{line}"
            if module.startswith("."):
                problems.append(f"{where}: relative import {module!r}; use fieldscope.edge.*")
            if module.startswith(FORBIDDEN_OURS) or module.split(".")[0] in {
                "train",
                "convert",
                "deploy",
                "collect",
                "edge",
                "cli",
            }:
                problems.append(f"{where}: edge/ imports {module}")
            # The interpreter fallback may import tensorflow.lite lazily, inside a function.
            lazy_fallback = not top and path.name == "runtime.py"
            if module.split(".")[0] in FORBIDDEN_HEAVY and not lazy_fallback:
                problems.append(f"{where}: edge/ imports {module}")
    assert not problems, "\n".join(problems)


def test_importing_every_edge_module_leaves_tensorflow_out() -> None:
    # Module names come from the source tree, not the installed package, so a module that
    # the installation does not know about fails here instead of being skipped.
    names = [
        "fieldscope."
        + ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in sorted(EDGE.rglob("*.py"))
        if path.name != "__main__.py"
    ]
    code = f"""
import importlib, json, sys
names = {names!r}
for name in names:
    importlib.import_module(name)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "torch"))
print(json.dumps({{"modules": names, "heavy": heavy}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd="/"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["modules"]) >= 3, report
    assert report["heavy"] == [], f"edge pulled in: {report['heavy'][:5]}"


def test_cli_help_does_not_import_tensorflow() -> None:
    code = """
import json, sys
from fieldscope.cli.main import build_parser
build_parser().format_help()
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd="/"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
