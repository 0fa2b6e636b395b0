"""The Pi check's building blocks: running commands in the arm64 root and on the host.

Each step returns an :class:`Outcome`, one row of the summary table, whose ``problem``
tells a failure's whole story: which runtime, which bundle, which architecture, and
for a crash the signal and the Python frame it died in (``PYTHONFAULTHANDLER`` prints
it when a guest process gets SIGSEGV).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Where the check's files live inside the root filesystem.
GUEST_DIR = "/opt/pi-check"
SIGNAL_NAMES = {s.value: s.name for s in signal.Signals}
# arm64 HWCAP bits (linux/arch/arm64/include/uapi/asm/hwcap.h) that tell CPUs apart.
HWCAP_BITS = {"atomics": 8, "asimddp": 20, "sve": 22}
# What a Pi's CPU has: Cortex-A53 (Pi 3, Zero 2 W) and A72 (Pi 4) are ARMv8.0, the
# A76 (Pi 5) ARMv8.2 with atomics and dot product; none has SVE (qemu's "max" has).
EXPECTED_HWCAPS = {
    "cortex-a53": {"atomics": False, "asimddp": False, "sve": False},
    "cortex-a72": {"atomics": False, "asimddp": False, "sve": False},
    "cortex-a76": {"atomics": True, "asimddp": True, "sve": False},
}
AT_HWCAP = 16
# Runtime key (the run script's name) -> fieldscope.edge.runtime's name, pip distribution.
RUNTIME_NAMES = {
    "litert": ("ai_edge_litert", "ai-edge-litert"),
    "tflite214": ("tflite_runtime", "tflite-runtime"),
}


@dataclass(frozen=True)
class Runtime:
    """One TFLite runtime as checked on both architectures."""

    key: str  # litert | tflite214 (the run script's names)
    name: str  # as fieldscope.edge.runtime names it
    distribution: str
    venv: str  # the arm64 venv, a path inside the root
    x86_python: str
    x86_pythonpath: str


@dataclass
class Outcome:
    """One row of the summary table; ``problem`` is the full story of a failure."""

    step: str
    where: str
    runtime: str
    bundle: str
    status: str  # PASS | WARN | FAIL | SKIP (WARN: a difference that is explained, not fatal)
    detail: str
    seconds: float = 0.0
    problem: str | None = None


@dataclass
class Run:
    """A finished command: exit status, output, and how long it took."""

    returncode: int | None  # None: killed at the time limit
    stdout: str
    stderr: str
    seconds: float


class CheckInterruptedError(Exception):
    """Ctrl-C: no new command may start."""


class Processes:
    """The commands running now, so that Ctrl-C ends them (by PID) and starts no more.

    The lanes run in threads, which Python cannot interrupt: without this, they would go
    on starting one emulated command after the other after Ctrl-C."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[Any]] = set()
        self.stopping = threading.Event()

    def start(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        with self._lock:
            if self.stopping.is_set():
                raise CheckInterruptedError
            proc: subprocess.Popen[Any] = subprocess.Popen(cmd, **kwargs)
            self._running.add(proc)
            return proc

    def done(self, proc: subprocess.Popen[Any]) -> None:
        with self._lock:
            self._running.discard(proc)

    def stop(self) -> None:
        with self._lock:
            self.stopping.set()
            for proc in self._running:
                if proc.poll() is None:
                    proc.kill()


@dataclass(frozen=True)
class Context:
    """What every step needs; host paths of the inputs all lie inside the root, so
    both architectures read the very same files."""

    root: Path
    cpu: str
    timeout: float  # seconds per command
    tolerance: float  # probability differences up to this are "the same"
    max_drift: float  # beyond this (or another top-1) a difference fails, else warns
    strict: bool  # every difference beyond the tolerance fails
    images: Path
    bundles: dict[str, Path]  # name -> folder
    # One grey level of model-input pixels only warns (bundles with INTER_AREA recipes).
    lenient_preprocessing: bool = False
    procs: Processes = field(default_factory=Processes)

    def guest(self, path: Path) -> str:
        """The path a host path inside the root has for processes in the chroot."""
        return "/" + str(path.relative_to(self.root))

    @property
    def out(self) -> Path:
        """Where the tensors of both architectures go (inside the root)."""
        path = self.root / GUEST_DIR.lstrip("/") / "out"
        path.mkdir(parents=True, exist_ok=True)
        return path


# --- running things -----------------------------------------------------------------


def run(ctx: Context, cmd: Sequence[str], *, env: dict[str, str]) -> Run:
    """Run a command to its end (or ``ctx.timeout``), capturing its output."""
    began = time.monotonic()
    proc = ctx.procs.start(
        list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=ctx.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        return Run(None, stdout, stderr, time.monotonic() - began)
    finally:
        ctx.procs.done(proc)
    if ctx.procs.stopping.is_set():
        raise CheckInterruptedError  # killed by Ctrl-C: not a result
    return Run(proc.returncode, stdout, stderr, time.monotonic() - began)


def guest_env(cpu: str) -> dict[str, str]:
    """The environment of a process in the chroot.

    QEMU_CPU must be in it: every aarch64 ``execve`` (the ``fieldscope`` script starting
    its Python) starts a new qemu through binfmt_misc, which reads QEMU_CPU from the
    new program's environment; without it qemu falls back to ``max``, whose LiteRT
    results are wrong. PYTHONFAULTHANDLER makes a crash name the Python frame it died in.
    """
    return {
        "QEMU_CPU": cpu,
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "PYTHONFAULTHANDLER": "1",
        "PYTHONUNBUFFERED": "1",
    }


def host_env(runtime: Runtime) -> dict[str, str]:
    """The environment of an x86_64 reference process: the runtime's venv, with the
    wheel under test (and, for tflite-runtime, OpenCV 4.11) on PYTHONPATH."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "PYTHONPATH": runtime.x86_pythonpath,
        "PYTHONFAULTHANDLER": "1",
        "PYTHONNOUSERSITE": "1",
    }


def in_guest(ctx: Context, program: str, *args: str) -> list[str]:
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    return [chroot, str(ctx.root), program, *args]


def tail(text: str, lines: int = 8) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return "\n      ".join(kept) if kept else "(no output)"


def crash_story(result: Run, timeout: float) -> str | None:
    """What killed a process, naming the Python frame; None when it exited normally."""
    if result.returncode is None:
        return f"did not finish within {timeout:.0f} s (hung?); last output:\n      " + tail(
            result.stdout + result.stderr
        )
    code = result.returncode
    signum = -code if code < 0 else code - 128 if code > 128 else None
    if signum is None or signum not in SIGNAL_NAMES:
        return None
    name = SIGNAL_NAMES[signum]
    frames = re.findall(r'File "([^"]+)", line (\d+) in (\S+)', result.stderr)
    where = ""
    if frames:
        path, line, func = frames[0]
        where = f" in {func}() ({_short(path)} line {line})"
        callers = [f"{f}() ({_short(p)})" for p, _, f in frames[1:3]]
        if callers:
            where += ", called from " + " <- ".join(callers)
    return f"crashed with {name}{where}"


def _short(path: str) -> str:
    marker = "site-packages/"
    return path.split(marker, 1)[1] if marker in path else path


# --- steps --------------------------------------------------------------------------


def check_cpu(ctx: Context) -> Outcome:
    """Read the guest's HWCAP from /proc/self/auxv (qemu emulates it for the guest)."""
    code = (
        "import struct\n"
        "data = open('/proc/self/auxv', 'rb').read()\n"
        "pairs = struct.iter_unpack('<QQ', data)\n"
        f"print(dict(pairs).get({AT_HWCAP}, -1))\n"
    )
    result = run(ctx, in_guest(ctx, "/usr/bin/python3", "-c", code), env=guest_env(ctx.cpu))
    step = "emulated CPU"
    if result.returncode != 0:
        problem = f"cannot run Python in the arm64 root: {tail(result.stdout + result.stderr)}"
        return Outcome(step, "arm64", "", "-", "FAIL", "python3 failed", result.seconds, problem)
    hwcap = int(result.stdout.strip().splitlines()[-1])
    have = {name: bool(hwcap >> bit & 1) for name, bit in HWCAP_BITS.items()}
    want = EXPECTED_HWCAPS[ctx.cpu]
    shown = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in have.items())
    if have != want:
        problem = (
            f"the emulated CPU is not a {ctx.cpu}: HWCAP says {shown}, expected "
            + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in want.items())
            + " (is QEMU_CPU reaching qemu? LiteRT gives wrong results on qemu's 'max' CPU)"
        )
        return Outcome(step, "arm64", "", "-", "FAIL", shown, result.seconds, problem)
    return Outcome(step, "arm64", "", "-", "PASS", f"{ctx.cpu} ({shown})", result.seconds)


def install_wheel(ctx: Context, runtime: Runtime, wheel: str, label: str) -> Outcome:
    """``pip install --no-deps`` of the wheel into the arm64 venv, run natively.

    The wheel is pure Python, so the host's pip installs exactly what the venv's own pip
    would (same Python 3.11 layout, byte code included) in a second instead of the ~20 s
    pip takes under emulation. Only the launcher's ``#!`` line names the host's Python;
    it is pointed at the venv's. The venv's dependencies were installed by pip under
    emulation when the cached root filesystem was built.
    """
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q"]
    pip += ["--ignore-installed", "--disable-pip-version-check", "--no-warn-script-location"]
    host_wheel = ctx.root / wheel.lstrip("/")
    cmd = [*pip, "--root", str(ctx.root), "--prefix", runtime.venv, str(host_wheel)]
    # Without PYTHONPATH: pip must not see (nor touch) the x86_64 side's copy of the wheel.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = run(ctx, cmd, env=env)
    step = "pip install --no-deps"
    if result.returncode != 0:
        problem = f"installing {wheel} into {runtime.venv} failed:\n      " + tail(
            result.stdout + result.stderr
        )
        return Outcome(step, "arm64", label, "-", "FAIL", "pip failed", result.seconds, problem)
    host_shebang = f"#!{sys.executable}".encode()
    for script in (ctx.root / runtime.venv.lstrip("/") / "bin").iterdir():
        data = script.read_bytes() if script.is_file() and not script.is_symlink() else b""
        if data.startswith(host_shebang + b"\n"):
            script.write_bytes(f"#!{runtime.venv}/bin/python".encode() + data[len(host_shebang) :])
    return Outcome(step, "arm64", label, "-", "PASS", Path(wheel).name, result.seconds)


def verify(ctx: Context, runtime: Runtime, bundle: str, label: str) -> Outcome:
    program = f"{runtime.venv}/bin/fieldscope"
    path = ctx.guest(ctx.bundles[bundle])
    result = run(ctx, in_guest(ctx, program, "bundle", "verify", path), env=guest_env(ctx.cpu))
    step = "bundle verify"
    story = crash_story(result, ctx.timeout)
    if story is not None:
        problem = f"{label} {story} verifying bundle {bundle} ({path}) on aarch64"
        return Outcome(step, "arm64", label, bundle, "FAIL", story, result.seconds, problem)
    if result.returncode != 0:
        message = tail(result.stderr, 1)
        problem = f"{label} refused bundle {bundle} on aarch64: {message}"
        return Outcome(step, "arm64", label, bundle, "FAIL", message, result.seconds, problem)
    return Outcome(step, "arm64", label, bundle, "PASS", "verified", result.seconds)


@dataclass
class Classified:
    """Per image (path relative to the images folder): the classify JSON record."""

    outcome: Outcome
    records: dict[str, dict[str, Any]]


def classify(ctx: Context, runtime: Runtime, bundle: str, label: str, *, arm: bool) -> Classified:
    """``fieldscope edge classify --json`` on one architecture, parsed per image."""
    where = "arm64" if arm else "x86_64"
    images_root = ctx.guest(ctx.images) if arm else str(ctx.images)
    bundle_path = ctx.guest(ctx.bundles[bundle]) if arm else str(ctx.bundles[bundle])
    # --top larger than any label count: every probability, for the comparison.
    args = ["edge", "classify", bundle_path, images_root, "--json", "--top", "100000"]
    if arm:
        cmd = in_guest(ctx, f"{runtime.venv}/bin/fieldscope", *args)
        env = guest_env(ctx.cpu)
    else:
        cmd = [runtime.x86_python, "-m", "fieldscope.cli", *args]
        env = host_env(runtime)
    result = run(ctx, cmd, env=env)
    step = "edge classify"
    records: dict[str, dict[str, Any]] = {}
    for line in result.stdout.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        records[os.path.relpath(record["file"], images_root)] = record
    story = crash_story(result, ctx.timeout)
    if story is not None:
        problem = (
            f"{label} {story} while classifying with bundle {bundle} ({bundle_path}) on "
            f"{'aarch64 (Raspberry Pi)' if arm else 'x86_64'}, after {len(records)} image(s). "
            f"A Pi with this runtime would crash the same way. Output:\n      "
            + tail(result.stdout + result.stderr, 12)
        )
        return Classified(
            Outcome(step, where, label, bundle, "FAIL", story, result.seconds, problem), records
        )
    errors = [r for r in records.values() if r.get("status") == "error"]
    if result.returncode != 0 or errors or not records:
        message = (
            "; ".join(str(r.get("error")) for r in errors[:3])
            if errors
            else tail(result.stderr, 1)
            if result.returncode != 0
            else "no images were classified"
        )
        problem = f"{label} on {where} failed with bundle {bundle}: {message}"
        return Classified(
            Outcome(step, where, label, bundle, "FAIL", message, result.seconds, problem), records
        )
    labels = [r["label"] or "uncertain" for r in records.values()]
    counts = ", ".join(f"{n} {name}" for name, n in sorted(_count(labels).items()))
    detail = f"{len(records)} images ({counts})"
    return Classified(Outcome(step, where, label, bundle, "PASS", detail, result.seconds), records)


def _count(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def tensors(
    ctx: Context,
    runtime: Runtime,
    bundle: str,
    label: str,
    *,
    reference: Path | None = None,
) -> tuple[Path | None, Outcome | None]:
    """Run tensors.py: the model-input pixels and the model's outputs, as an .npz.

    On x86_64 (``reference`` None) the model runs on its own tensors; on aarch64 on the
    x86_64 ones, so that kernels are compared on identical input. Returns the file, or
    the failure as an outcome.
    """
    where = "x86_64" if reference is None else "arm64"
    out = ctx.out / f"{where}-{runtime.key}-{bundle}.npz"
    script = ctx.root / GUEST_DIR.lstrip("/") / "tensors.py"
    if reference is None:
        args = [str(script), str(ctx.bundles[bundle]), str(ctx.images), str(out)]
        cmd, env = [runtime.x86_python, *args], host_env(runtime)
    else:
        args = [ctx.guest(script), ctx.guest(ctx.bundles[bundle]), ctx.guest(ctx.images)]
        args += [ctx.guest(out), "--reference", ctx.guest(reference)]
        cmd = in_guest(ctx, f"{runtime.venv}/bin/python", *args)
        env = guest_env(ctx.cpu)
    result = run(ctx, cmd, env=env)
    if result.returncode == 0 and out.is_file():
        return out, None
    story = crash_story(result, ctx.timeout) or f"failed (exit status {result.returncode})"
    problem = (
        f"{label} {story} running bundle {bundle} on preprocessed tensors on {where}:\n      "
        + tail(result.stdout + result.stderr, 12)
    )
    step = "model on tensors"
    return None, Outcome(step, where, label, bundle, "FAIL", story, result.seconds, problem)
