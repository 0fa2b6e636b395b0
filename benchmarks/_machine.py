"""What every benchmark shares: the machine header, the figures table and ``--json``.

A figure means nothing without the machine it came from and how busy that machine
was, and nothing against a goal without its baseline next to it. So every script
builds a :class:`Report`, adds :class:`Figure` rows (ours, the research-script
baseline, the gain) and calls :meth:`Report.finish`, which prints one header line
naming the machine, the table, and writes the same figures to ``--json PATH`` for
``run_all`` and ``report.py``.

*gain* is always "how many times better ours is than the baseline": ours/baseline
for figures where higher is better (throughput), baseline/ours where lower is
better (latency, memory). Below 1 it is a cost (durability is not free).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

# Distributions whose versions go into the header (first installed name wins).
_PACKAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("TF", ("tensorflow", "tensorflow-cpu")),
    ("Keras", ("keras",)),
    ("LiteRT", ("ai-edge-litert",)),
    ("OpenCV", ("opencv-python-headless", "opencv-python", "opencv-contrib-python")),
    ("numpy", ("numpy",)),
    ("paho", ("paho-mqtt",)),
)


def script_parser(doc: str) -> argparse.ArgumentParser:
    """The command line of a benchmark script: the first paragraph of its docstring
    ``doc`` as the description, laid out as written (the scripts wrap it by hand)."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n", maxsplit=1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """:func:`script_parser` with ``--json`` and ``--quick`` already in it: what every
    benchmark script that run_all runs takes."""
    parser = script_parser(doc)
    add_common_args(parser)
    return parser


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """``--json`` and ``--quick``, the same in every script (run_all and the test use them)."""
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes that finish in seconds: checks the script works, figures are noise",
    )


def positive_int(text: str) -> int:
    """An argparse type: a count of at least 1 (0 or less would measure nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a duration or rate above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.lower().startswith(("model name", "hardware", "cpu model")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024**2
    return None


def _os_name() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return platform.platform()


def _version(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _mosquitto_version() -> str | None:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        return None
    done = subprocess.run([binary, "-h"], capture_output=True, text=True, check=False, timeout=5)
    words = (done.stdout or done.stderr).split()
    return words[2] if len(words) > 2 and words[:2] == ["mosquitto", "version"] else None


def machine_info() -> dict[str, Any]:
    """The machine and software the figures come from (no TensorFlow import: metadata only)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    versions = {label: _version(names) for label, names in _PACKAGES}
    versions["mosquitto"] = _mosquitto_version()
    return {
        "cpu": _cpu_model(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "ram_gib": _ram_gib(),
        "os": _os_name(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


def machine_line(info: dict[str, Any]) -> str:
    """One line: CPU, cores, RAM, OS, Python and the versions that change the figures."""
    ram = f"{info['ram_gib']:.0f} GiB RAM" if info.get("ram_gib") else "RAM unknown"
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    return (
        f"{info['cpu']} ({info['arch']}), {info['cores']} cores, {ram}, {info['os']}, "
        f"Python {info['python']}; {versions}"
    )


def load_average() -> float | None:
    """The 1-minute load average: figures taken at a load near the core count are noisy."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _load_text(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


@dataclass(frozen=True)
class Goal:
    """A target a figure is held to: on its value (``<= 120`` MB) or on its gain (``>= 30``x)."""

    op: Literal[">=", "<="]
    target: float
    on: Literal["value", "gain"] = "value"

    def met(self, value: float, gain: float | None) -> bool | None:
        x = value if self.on == "value" else gain
        if x is None or math.isnan(x):
            return None
        return x >= self.target if self.op == ">=" else x <= self.target

    def text(self, unit: str) -> str:
        if self.on == "gain":
            return f"gain {self.op} {self.target:g}x"
        return f"{self.op} {self.target:g} {unit}".rstrip()


@dataclass(frozen=True)
class Figure:
    """One measured figure, with its baseline (None where the baseline has no such figure)."""

    name: str
    value: float
    unit: str
    baseline: float | None = None
    higher_is_better: bool = True
    goal: Goal | None = None
    note: str = ""

    @property
    def gain(self) -> float | None:
        if self.baseline is None or math.isnan(self.baseline) or math.isnan(self.value):
            return None
        ours, base = self.value, self.baseline
        if self.higher_is_better:
            return ours / base if base else None
        return base / ours if ours else None

    @property
    def met(self) -> bool | None:
        return None if self.goal is None else self.goal.met(self.value, self.gain)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": _finite(self.value),
            "unit": self.unit,
            "baseline": None if self.baseline is None else _finite(self.baseline),
            "gain": None if self.gain is None else _finite(self.gain),
            "higher_is_better": self.higher_is_better,
            "goal": None if self.goal is None else self.goal.text(self.unit),
            "met": self.met,
            "note": self.note,
        }


def _finite(x: float) -> float | None:
    return None if math.isnan(x) or math.isinf(x) else x


def number(x: float | None) -> str:
    """A figure with about three significant digits (``0.0123``, ``1.23``, ``123``, ``12345``)."""
    if x is None or math.isnan(x):
        return "-"
    magnitude = abs(x)
    if magnitude >= 100 or x == int(x):
        return f"{x:,.0f}"
    if magnitude >= 10:
        return f"{x:.1f}"
    if magnitude >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def gain_text(gain: float | None) -> str:
    return "-" if gain is None else f"{gain:.3g}x"


def verdict(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: ""}[met]


def figures_table(figures: list[dict[str, Any]]) -> list[str]:
    """Text table rows for figures in their ``as_dict`` form (also used for latest.json)."""
    head = ("figure", "ours", "baseline", "unit", "gain", "goal")
    rows = [
        (
            f["name"],
            number(f["value"]),
            number(f["baseline"]),
            f["unit"],
            gain_text(f["gain"]),
            f"{f['goal']} {verdict(f['met'])}".strip() if f["goal"] else "",
        )
        for f in figures
    ]
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    right = {1, 2, 4}

    def line(cells: tuple[str, ...]) -> str:
        parts = [
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    return [line(head), line(tuple("-" * w for w in widths)), *(line(r) for r in rows)]


def _command() -> str:
    """How this run was started, to repeat it (without ``--json PATH``, which is per run)."""
    args, kept = sys.argv[1:], []
    while args:
        arg = args.pop(0)
        if arg == "--json":
            args = args[1:]
        elif not arg.startswith("--json="):
            kept.append(arg)
    return shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *kept])


@dataclass
class Report:
    """The figures of one run of one script; :meth:`finish` prints and saves them."""

    script: str
    title: str
    baseline: str
    ours: str
    quick: bool = False
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=machine_info)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    load_start: float | None = field(default_factory=load_average)
    _t0: float = field(default_factory=time.monotonic)

    def header(self) -> None:
        """Print the machine line at the start, so a long run shows where it runs."""
        print(f"== {self.script}: {self.title}")
        print(f"   machine: {machine_line(self.machine)}")
        quick = " (--quick)" if self.quick else ""
        print(f"   load average {_load_text(self.load_start)} at start{quick}")
        sys.stdout.flush()

    @contextlib.contextmanager
    def started(self) -> Iterator[Path]:
        """Print the header, then lend the run a scratch folder (brokers, outboxes,
        bundles) that is removed afterwards, also when the run fails."""
        self.header()
        with tempfile.TemporaryDirectory(prefix=f"fieldscope-bench-{self.script}-") as tmp:
            yield Path(tmp)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def note(self, text: str) -> None:
        self.notes.append(text)

    def as_dict(self) -> dict[str, Any]:
        return {
            "script": self.script,
            "title": self.title,
            "baseline": self.baseline,
            "ours": self.ours,
            "command": _command(),
            "quick": self.quick,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "wall_s": round(time.monotonic() - self._t0, 1),
            "load_average": {"start": self.load_start, "end": load_average()},
            "machine": self.machine,
            "figures": [f.as_dict() for f in self.figures],
            "notes": self.notes,
            "details": self.details,
        }

    def finish(self, json_path: Path | None) -> int:
        """Print the table (ours, baseline, gain, goal) and write ``json_path``; exit status 0."""
        data = self.as_dict()
        print()
        print(f"{self.script}: ours = {self.ours}")
        print(f"{' ' * len(self.script)}  baseline = {self.baseline}")
        for row in figures_table(data["figures"]):
            print(f"  {row}")
        for text in self.notes:
            print(f"  note: {text}")
        print(
            f"  {data['wall_s']:.0f} s; load average {_load_text(self.load_start)} at start, "
            f"{_load_text(data['load_average']['end'])} at the end"
        )
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(data, indent=2) + "\n")
            print(f"  figures written to {json_path}")
        return 0
