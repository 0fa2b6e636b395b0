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


# --- convert/ and the training run folder ----------------------------------------------------

CONVERT = ROOT / "convert"
RUNDIR = ROOT / "train" / "rundir.py"
# The run folder's files: only fieldscope.train.rundir may spell these names.
RUN_FOLDER_NAMES = (
    "run.json",
    "config.json",
    "labels.json",
    "split.json",
    "metrics.json",
    "history.json",
    "model.keras",
    "progress.json",
    "classification_report.txt",
)


def test_convert_imports_of_train_only_the_run_folder_reader() -> None:
    problems = []
    for path in sorted(CONVERT.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for module, line, _top in _imports(tree):
            if module.startswith("fieldscope.train") and module != "fieldscope.train.rundir":
                problems.append(f"{path.relative_to(ROOT)}:{line}: convert/ imports {module}")
    assert not problems, "\n".join(problems)


def test_rundir_imports_no_tensorflow_nor_other_training_modules() -> None:
    tree = ast.parse(RUNDIR.read_text(), filename=str(RUNDIR))
    for module, line, _top in _imports(tree):
        assert module.split(".")[0] not in FORBIDDEN_HEAVY, f"rundir.py:{line} imports {module}"
        assert not module.startswith("fieldscope.train"), f"rundir.py:{line} imports {module}"
    code = """
import json, sys
import fieldscope.train.rundir
import fieldscope.convert.run
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd="/"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def _string_constants(tree: ast.AST) -> list[tuple[str, int]]:
    """Every string literal that is not a docstring, with its line."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.value, node.lineno)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        if id(node) not in docstrings
    ]


def test_no_module_but_rundir_spells_a_run_folder_file_name() -> None:
    problems = []
    for folder in ("train", "convert", "cli", "deploy", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == RUNDIR:
                continue
            tree = ast.parse(path.read_text(), filename=str(path))
            for text, line in _string_constants(tree):
                if text in RUN_FOLDER_NAMES:
                    problems.append(f"{path.relative_to(ROOT)}:{line}: {text!r}")
    assert not problems, "use fieldscope.train.rundir:\n" + "\n".join(problems)
