"""The Raspberry Pi check's steps, run on the host against a prepared arm64 root.

``deploy/pi-check/run`` builds (or unpacks from its cache) a Debian bookworm arm64 root
filesystem with two venvs, mounts /proc, /sys, /dev and an ARM ``/proc/cpuinfo`` in it,
stages the wheel, bundles and images inside it, and runs this script with the host's
x86_64 LiteRT venv (which has numpy and paho-mqtt). This script does the checking:

1. the emulated CPU is the Pi's (QEMU_CPU really applied), from the guest's HWCAP;
2. the fresh fieldscope wheel installs into each arm64 venv (``pip --no-deps``);
3. per runtime and bundle, on aarch64: ``fieldscope bundle verify``, ``fieldscope edge
   classify``, and the model on the x86_64 input tensors (tensors.py); on x86_64 with
   the same runtime version: the same classify and tensors;
4. the comparisons of compare.py: pixels, kernels on identical input, the whole path;
5. ``fieldscope edge run`` on aarch64 publishing to a mosquitto on the host
   (daemon_step.py);
6. a summary table; exit status 0 when nothing failed, 1 otherwise.

The arm64 venvs and the x86_64 reference run side by side, each step printing a line
when it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compare import WHERE, compare_classify, compare_denoise, compare_tensors
from daemon_step import run_daemon
from steps import (
    EXPECTED_HWCAPS,
    RUNTIME_NAMES,
    Context,
    Outcome,
    Runtime,
    check_cpu,
    classify,
    install_wheel,
    tensors,
    verify,
)

Key = tuple[str, str]  # (runtime key, bundle name)
Records = dict[Key, dict[str, dict[str, Any]]]


@dataclass
class Results:
    """Outcomes in the order they finished, each printed as it comes."""

    rows: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: Outcome) -> Outcome:
        with self.lock:
            self.rows.append(outcome)
            where = f"{outcome.where} {outcome.runtime}".strip()
            bundle = f" [{outcome.bundle}]" if outcome.bundle != "-" else ""
            took = f" ({outcome.seconds:.1f} s)" if outcome.seconds else ""
            print(
                f"  {outcome.status:<4}  {outcome.step}{bundle} on {where}: {outcome.detail}{took}",
                flush=True,
            )
        return outcome


@dataclass
class Plan:
    """What to check: the context, the runtimes, the wheel and the daemon step."""

    ctx: Context
    runtimes: list[Runtime]
    wheel: str
    daemon_seconds: float
    workdir: Path


def parse(argv: Sequence[str] | None) -> Plan:
    p = argparse.ArgumentParser(description="The steps of deploy/pi-check/run (see its --help).")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--cpu", required=True, choices=sorted(EXPECTED_HWCAPS))
    p.add_argument("--wheel", required=True, help="the fieldscope wheel, a path inside the root")
    p.add_argument("--bundle", action="append", required=True, metavar="NAME=DIR")
    p.add_argument("--images", type=Path, required=True, help="inside the root")
    p.add_argument(
        "--runtime", action="append", required=True, metavar="KEY=VENV:PYTHON:PYTHONPATH"
    )
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--max-drift", type=float, default=0.05)
    p.add_argument("--strict", action="store_true", help="every difference fails")
    p.add_argument(
        "--lenient-preprocessing",
        action="store_true",
        help="model-input pixels one grey level apart only warn",
    )
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--daemon-seconds", type=float, default=0.0, help="0: no daemon step")
    p.add_argument("--workdir", type=Path, required=True)
    args = p.parse_args(argv)
    runtimes = []
    for spec in args.runtime:
        key, _, rest = spec.partition("=")
        venv, python, pythonpath = rest.split(":", 2)
        runtimes.append(Runtime(key, *RUNTIME_NAMES[key], venv, python, pythonpath))
    bundles = {name: Path(folder) for name, _, folder in (b.partition("=") for b in args.bundle)}
    ctx = Context(
        root=args.root,
        cpu=args.cpu,
        timeout=args.timeout,
        tolerance=args.tolerance,
        max_drift=args.max_drift,
        strict=args.strict,
        lenient_preprocessing=args.lenient_preprocessing,
        images=args.images,
        bundles=bundles,
    )
    return Plan(ctx, runtimes, args.wheel, args.daemon_seconds, args.workdir)


def _dist_version(site: Path, distribution: str) -> str:
    name = distribution.replace("-", "_")
    for info in site.glob(f"{name}-*.dist-info"):
        return info.name[len(name) + 1 : -len(".dist-info")]
    return "?"


def _host_version(python: str, pythonpath: str, distribution: str) -> str:
    done = subprocess.run(
        [python, "-c", f"import importlib.metadata as m; print(m.version({distribution!r}))"],
        env={**os.environ, "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "?"


def excluded(bundle_dir: Path, runtime: Runtime) -> str | None:
    """Why the bundle's manifest rules this runtime out (None: it does not).

    The edge refuses such a bundle by design, so there is nothing to check."""
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    listed = manifest.get("min_runtime")
    if listed and runtime.name not in listed:
        why = f"the bundle's min_runtime lists only {', '.join(sorted(listed))}"
        # fieldscope convert records why it left a runtime out (int8: tflite-runtime).
        fidelity = (manifest.get("provenance") or {}).get("fidelity") or {}
        refused = next(
            (
                v.get("refused")
                for k, v in fidelity.items()
                if k.startswith(runtime.name + "_") and isinstance(v, dict) and v.get("refused")
            ),
            None,
        )
        return f"{why}: {refused}" if refused else why
    return None


class Check:
    """The arm64 lanes (one per venv) and the x86_64 lane, then the comparisons."""

    def __init__(self, plan: Plan, results: Results) -> None:
        self.plan, self.ctx, self.results = plan, plan.ctx, results
        self.arm_label: dict[str, str] = {}
        self.x86_label: dict[str, str] = {}
        for rt in plan.runtimes:
            lib = self.ctx.root / rt.venv.lstrip("/") / "lib"
            site = next(lib.glob("python3*/site-packages"))
            arm_version = _dist_version(site, rt.distribution)
            x86_version = _host_version(rt.x86_python, rt.x86_pythonpath, rt.distribution)
            self.arm_label[rt.key] = f"{rt.name} {arm_version}"
            self.x86_label[rt.key] = f"{rt.name} {x86_version}"
        self.pairs: list[tuple[Runtime, str]] = [
            (rt, b) for rt in plan.runtimes for b in self.ctx.bundles
        ]
        self.arm_records: Records = {}
        self.x86_records: Records = {}
        self.arm_tensors: dict[Key, Path] = {}
        # The aarch64 model runs on the x86_64 tensors: each arm lane waits for them.
        self.x86_tensors: dict[Key, Future[Path | None]] = {
            (rt.key, b): Future() for rt, b in self.pairs
        }

    def arm_lane(self, rt: Runtime) -> None:
        ctx, label = self.ctx, self.arm_label[rt.key]
        if self.results.add(install_wheel(ctx, rt, self.plan.wheel, label)).status == "FAIL":
            return
        for bundle, folder in ctx.bundles.items():
            why = excluded(folder, rt)
            if why:
                self.results.add(Outcome("bundle verify", "arm64", label, bundle, "SKIP", why))
                continue
            self.results.add(verify(ctx, rt, bundle, label))
            done = classify(ctx, rt, bundle, label, arm=True)
            if self.results.add(done.outcome).status != "PASS":
                continue  # a crash was reported; the same model on tensors would repeat it
            self.arm_records[rt.key, bundle] = done.records
            reference = self.x86_tensors[rt.key, bundle].result()
            if reference is not None:
                out, failure = tensors(ctx, rt, bundle, label, reference=reference)
                if out is not None:
                    self.arm_tensors[rt.key, bundle] = out
                elif failure is not None:
                    self.results.add(failure)
        first = next(iter(ctx.bundles))
        daemon = self.plan.daemon_seconds > 0 and rt.key == "litert"
        if daemon and (rt.key, first) in self.arm_records:
            self.results.add(self.daemon(rt, first, label))

    def daemon(self, rt: Runtime, bundle: str, label: str) -> Outcome:
        try:
            return run_daemon(
                self.ctx,
                rt,
                bundle,
                label=label,
                classified=self.arm_records[rt.key, bundle],
                workdir=self.plan.workdir,
                seconds=self.plan.daemon_seconds,
            )
        except (RuntimeError, OSError) as exc:  # the broker or the subscriber, not the Pi
            problem = f"could not run the daemon step on this host: {exc}"
            step = "edge run (daemon, MQTT)"
            return Outcome(step, "arm64", label, bundle, "FAIL", str(exc), 0.0, problem)

    def x86_lane(self) -> None:
        try:
            for rt, bundle in self.pairs:
                future = self.x86_tensors[rt.key, bundle]
                if excluded(self.ctx.bundles[bundle], rt):
                    future.set_result(None)
                    continue
                label = self.x86_label[rt.key]
                out, failure = tensors(self.ctx, rt, bundle, label)
                future.set_result(out)
                if failure is not None:
                    self.results.add(failure)
                done = classify(self.ctx, rt, bundle, label, arm=False)
                if self.results.add(done.outcome).status == "PASS":
                    self.x86_records[rt.key, bundle] = done.records
        finally:
            for future in self.x86_tensors.values():
                if not future.done():
                    future.set_result(None)

    def run(self) -> None:
        lanes = len(self.plan.runtimes)
        print(f"  running {lanes} arm64 venv(s) and the x86_64 reference side by side")
        with ThreadPoolExecutor(max_workers=lanes + 1) as pool:
            futures = [pool.submit(self.arm_lane, rt) for rt in self.plan.runtimes]
            futures.append(pool.submit(self.x86_lane))
            try:
                for future in futures:
                    future.result()
            except KeyboardInterrupt:
                self.ctx.procs.stop()  # the lanes then end at their next command
                raise
        for rt, bundle in self.pairs:
            if not excluded(self.ctx.bundles[bundle], rt):
                self.compare(rt, bundle)

    def compare(self, rt: Runtime, bundle: str) -> None:
        key, label = (rt.key, bundle), self.arm_label[rt.key]
        x86_file = self.x86_tensors[key].result()
        if key in self.arm_tensors and x86_file is not None:
            preprocess, model = compare_tensors(
                self.ctx, label, bundle, self.arm_tensors[key], x86_file
            )
            self.results.add(preprocess)
            self.results.add(
                compare_denoise(self.ctx, label, bundle, self.arm_tensors[key], x86_file)
            )
            self.results.add(model)
        if key in self.arm_records and key in self.x86_records:
            self.results.add(
                compare_classify(
                    self.ctx,
                    label,
                    bundle,
                    self.arm_records[key],
                    self.x86_records[key],
                )
            )
        else:
            side = "arm64" if key not in self.arm_records else "x86_64"
            why = f"nothing to compare: the {side} run failed"
            if side == "arm64" and key in self.x86_records:
                why += f"; x86_64 runs it with {self.x86_label[rt.key]}: it fails only on the Pi"
            self.results.add(Outcome("classify", WHERE, label, bundle, "SKIP", why))


# The table's order: set-up first, then per bundle and runtime, the steps in this order.
STEP_ORDER = (
    "emulated CPU",
    "pip install --no-deps",
    "bundle verify",
    "edge classify",
    "model on tensors",
    "edge run (daemon, MQTT)",
    "preprocess",
    "denoise filters",
    "model on identical input",
    "classify",
)


def print_table(rows: list[Outcome], title: str, bundles: Sequence[str]) -> None:
    def order(row: Outcome) -> tuple[int, int, str, int, bool]:
        bundle = bundles.index(row.bundle) if row.bundle in bundles else -1
        return (bundle, 0, row.runtime, STEP_ORDER.index(row.step), row.where != "arm64")

    headers = ("STEP", "WHERE", "RUNTIME", "BUNDLE", "RESULT", "DETAIL")
    table = [
        (r.step, r.where, r.runtime or "-", r.bundle, r.status, r.detail)
        for r in sorted(rows, key=order)
    ]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers[:-1])]
    print(f"\n{title}")
    for row in (headers, *table):
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        print("  " + "  ".join(cells) + "  " + row[-1])


def report(results: Results, ctx: Context) -> int:
    """The summary table, then every failure and warning in full; the exit status."""
    count = {s: sum(r.status == s for r in results.rows) for s in ("PASS", "WARN", "FAIL", "SKIP")}
    verdict = "FAIL" if count["FAIL"] else "PASS"
    title = f"Raspberry Pi check ({ctx.cpu}, Debian bookworm arm64 under qemu): {verdict}"
    print_table(results.rows, title, list(ctx.bundles))
    told: set[str] = set()
    for row in results.rows:
        if row.status not in ("FAIL", "WARN") or not row.problem:
            continue
        where = f"{row.where} {row.runtime}".strip()
        head = f"\n  {row.status} {row.step} [{row.bundle}] on {where}:"
        if row.status == "WARN" and row.step in told:
            print(f"{head} {row.detail} (as above)")
            continue
        told.add(row.step)
        print(f"{head}\n      {row.problem}")
    warnings = f"{count['WARN']} warning{'' if count['WARN'] == 1 else 's'}"
    summary = f"{count['PASS']} passed, {warnings}, {count['FAIL']} failed, {count['SKIP']} skipped"
    print(f"\nRESULT: {verdict} ({summary})", flush=True)
    return 1 if count["FAIL"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    plan = parse(argv)
    results = Results()
    try:
        if results.add(check_cpu(plan.ctx)).status != "FAIL":
            Check(plan, results).run()
    except KeyboardInterrupt:
        plan.ctx.procs.stop()
        return 130  # the run script says so
    return report(results, plan.ctx)


if __name__ == "__main__":
    sys.exit(main())
