"""The benchmark scripts keep working: each runs in its --quick mode and reports its figures.

These tests never look at how fast anything was (the figures of a --quick run on a
busy machine are noise); they check what a person re-running the benchmarks relies
on: every script runs, prints the machine and a table of ours / baseline / gain,
writes the same figures as JSON, run_all gathers them into latest.json and the
README table is generated from it. One figure is a correctness claim rather than a
timing, and is asserted: the outbox loses no message in any incident.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = ("train_input", "edge_latency", "edge_pipeline", "collect_ingest", "publish")
# Not (yet) in run_all and its README table; run by hand, figures in benchmarks/README.md.
OTHER_SCRIPTS = ("edge_objects",)
NEEDS_MOSQUITTO = pytest.mark.skipif(
    shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
    reason="mosquitto is not installed (apt-get install mosquitto; .ci/run does)",
)


def run(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=BENCHMARKS.parent,
    )


def check_result(result: dict[str, Any], script: str, figures: set[str]) -> None:
    """The JSON a script writes: provenance, and every figure with its baseline and gain."""
    assert result["script"] == script
    assert result["quick"] is True
    machine = result["machine"]
    assert machine["cores"] >= 1
    assert machine["cpu"]
    assert machine["python"] == ".".join(map(str, sys.version_info[:3]))
    assert machine["versions"]["LiteRT"]
    names = {f["name"] for f in result["figures"]}
    assert figures <= names, names
    for figure in result["figures"]:
        assert set(figure) >= {"value", "unit", "baseline", "gain", "goal", "met"}
        if figure["baseline"] is not None and figure["value"]:
            assert figure["gain"] is not None
            assert figure["gain"] > 0
        if figure["goal"] is not None:
            assert figure["met"] in (True, False)
    assert result["baseline"]
    assert result["ours"]


def check_output(stdout: str, script: str) -> None:
    assert f"== {script}:" in stdout
    assert "machine: " in stdout
    assert " cores, " in stdout
    header = next(line for line in stdout.splitlines() if line.strip().startswith("figure"))
    assert header.split()[:5] == ["figure", "ours", "baseline", "unit", "gain"]


def run_quick(
    script: str, tmp_path: Path, figures: set[str], timeout: float = 300
) -> dict[str, Any]:
    """Run ``script --quick``, check what it prints and that its JSON has ``figures``;
    the JSON, for the checks particular to the script."""
    out = tmp_path / f"{script}.json"
    done = run(BENCHMARKS / f"{script}.py", "--quick", "--json", out, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    check_output(done.stdout, script)
    result: dict[str, Any] = json.loads(out.read_text())
    check_result(result, script, figures)
    return result


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(s, marks=pytest.mark.slow) if s == "train_input" else s  # imports TF
        for s in (*SCRIPTS, *OTHER_SCRIPTS)
    ],
)
def test_every_script_explains_itself(script: str) -> None:
    done = run(BENCHMARKS / f"{script}.py", "--help", timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--json" in done.stdout
    assert "--quick" in done.stdout


@NEEDS_MOSQUITTO
@pytest.mark.mqtt
@pytest.mark.slow
def test_run_all_gathers_figures_and_writes_the_readme_table(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    shutil.copy(BENCHMARKS / "README.md", readme)
    results = tmp_path / "results"
    done = run(
        BENCHMARKS / "run_all",
        "--quick",
        "--only",
        "collect_ingest",
        "publish",
        "--results",
        results,
        "--note",
        "pytest",
        "--write-readme",
        "--readme",
        readme,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    check_output(done.stdout, "publish")
    check_output(done.stdout, "collect_ingest")
    latest = json.loads((results / "latest.json").read_text())
    assert set(latest["scripts"]) == {"collect_ingest", "publish"}
    assert latest["note"] == "pytest"
    check_result(
        latest["scripts"]["collect_ingest"],
        "collect_ingest",
        {"drain (broker backlog -> SQLite)", "live (publisher process running)"},
    )
    publish = latest["scripts"]["publish"]
    check_result(publish, "publish", {"throughput until all PUBACKed"})
    incidents = publish["details"]["incidents"]
    assert set(incidents) == {"broker restart", "publisher SIGKILL", "SIGKILL during outage"}
    for scenario, ways in incidents.items():
        # The point of the outbox: nothing it accepted is ever lost.
        assert ways["ours"]["produced"] == publish["details"]["count"], scenario
        assert ways["ours"]["lost"] == 0, scenario
    # A plain paho client's memory dies with its process: what it held during the outage.
    assert incidents["SIGKILL during outage"]["baseline"]["lost"] > 0

    text = readme.read_text()
    assert "| publish (--quick) | throughput until all PUBACKed |" in text
    assert "| collect_ingest (--quick) | drain (broker backlog -> SQLite) |" in text
    assert "conditions: pytest" in text
    assert latest["machine"]["cpu"] in text
    check = run(
        BENCHMARKS / "report.py", "--check", "--latest", results / "latest.json", "--readme", readme
    )
    assert check.returncode == 0, check.stdout

    # A README edited by hand is caught.
    readme.write_text(text.replace("| publish (--quick) |", "| publish (edited) |", 1))
    check = run(
        BENCHMARKS / "report.py", "--check", "--latest", results / "latest.json", "--readme", readme
    )
    assert check.returncode == 1
    assert "out of date" in check.stdout


def test_committed_readme_table_matches_latest_json() -> None:
    done = run(BENCHMARKS / "report.py", "--check", timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_report_without_results_says_what_to_do(tmp_path: Path) -> None:
    done = run(BENCHMARKS / "report.py", "--latest", tmp_path / "missing.json", timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"report: {tmp_path / 'missing.json'} does not exist: run benchmarks/run_all first"
    ]


def _edge_latency_details(result: dict[str, Any]) -> None:
    ways = {w["way"] for w in result["details"]["ways"]}
    assert {"keras model.predict", "bundle int8"} <= ways


def _edge_pipeline_details(result: dict[str, Any]) -> None:
    by_name = {f["name"]: f for f in result["figures"]}
    assert by_name["throughput, steady state"]["baseline"] is not None  # the research loop ran
    assert result["details"]["daemon"]["exit_code"] == 0


def _edge_objects_details(result: dict[str, Any]) -> None:
    by_name = {f["name"]: f for f in result["figures"]}
    assert by_name["objects/s, 10 per frame"]["baseline"] is not None  # the research loop ran
    found = {run["objects"]: run["stages_ms"]["n"] for run in result["details"]["runs"]}
    assert found[10] >= 5  # the station found the specimens (median per frame)


def _train_input_details(result: dict[str, Any]) -> None:
    assert result["details"]["images"] > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "figures", "check_details"),
    [
        pytest.param(
            "edge_latency",
            {"latency, bundle int8", "peak RSS, bundle int8 process", "file size, bundle int8"},
            _edge_latency_details,
            id="edge_latency",
        ),
        pytest.param(
            "edge_pipeline",
            {
                "throughput, steady state",
                "peak RSS (VmHWM)",
                "start to first published identification",
            },
            _edge_pipeline_details,
            marks=[NEEDS_MOSQUITTO, pytest.mark.mqtt],
            id="edge_pipeline",
        ),
        pytest.param(
            "edge_objects",
            {"objects/s, 1 per frame", "objects/s, 10 per frame", "peak RSS, 10 per frame"},
            _edge_objects_details,
            marks=[NEEDS_MOSQUITTO, pytest.mark.mqtt],
            id="edge_objects",
        ),
        pytest.param(
            "train_input",
            {"training epoch, after the first", "input pipeline alone, epoch after the first"},
            _train_input_details,
            id="train_input",
        ),
    ],
)
def test_quick_run(
    script: str,
    figures: set[str],
    check_details: Callable[[dict[str, Any]], None],
    tmp_path: Path,
) -> None:
    """Each script's ``--quick`` run prints its table and writes its figures, with the
    details particular to it."""
    check_details(run_quick(script, tmp_path, figures))
