"""An MQTT broker for ``fieldscope demo``: Mosquitto when installed, else an embedded one.

The demo must run after nothing but ``pip install``, so when no ``mosquitto`` binary
is found (on PATH, or in /usr/sbin and /usr/local/sbin where Debian and Homebrew put
it) it runs amqtt, an asyncio MQTT broker from PyPI (the ``demo`` extra), in a child
process: ``python -m fieldscope.cli.broker --port N``. Either broker listens on
127.0.0.1 only and is stopped with SIGTERM by :meth:`RunningBroker.stop`.

What amqtt 0.12 can and cannot do, checked against our clients (tests/test_demo.py):

* it speaks MQTT 3.1.1 only, so the station and the collector use ``protocol 3.1.1``
  with it (persistent sessions, clean session off);
* it acknowledges QoS 1 publishes (our outbox deletes an entry only on PUBACK) and
  keeps retained messages and last wills;
* it queues QoS 1 messages for an offline persistent session only when the client
  gave a user name (anonymous sessions get nothing while away), so it is configured
  to require one (any name, no password) and the demo's clients send
  :data:`DEMO_USERNAME`;
* it forgets a message it sent to a subscriber if the PUBACK does not come within
  5 s or the connection drops first, and keeps nothing across a restart. That is
  fine for a demo on one machine, and why a real deployment runs Mosquitto (or an
  MQTT cluster, docs/architecture.md#engines-not-home-made-ones), never this one.

The child also watches the process that started it and stops when it is gone, so a
demo killed with SIGKILL leaves no broker behind.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fieldscope.edge.errors import ConfigError, FieldscopeError, MissingDependencyError

__all__ = [
    "BROKER_KINDS",
    "DEMO_USERNAME",
    "BrokerKind",
    "RunningBroker",
    "find_mosquitto",
    "free_port",
    "main",
    "start_broker",
]

logger = logging.getLogger(__name__)

BrokerKind = Literal["auto", "mosquitto", "embedded"]
BROKER_KINDS: tuple[BrokerKind, ...] = ("auto", "mosquitto", "embedded")
# The user name the demo's clients give: the embedded broker requires one (see above).
DEMO_USERNAME = "fieldscope-demo"
# Where mosquitto lives when it is not on PATH (sbin is often missing from a user's PATH).
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin")
_START_TIMEOUT_S = 15.0
_PORT_TRIES = 3
# How often the embedded broker checks that its parent is still alive.
_PARENT_CHECK_S = 1.0


class BrokerError(FieldscopeError):
    """The demo's broker could not be started."""


def find_mosquitto() -> str | None:
    """The mosquitto binary: on PATH, else in an sbin folder; None when not installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for folder in _SBIN_DIRS:
        candidate = Path(folder) / "mosquitto"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (another process may still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class RunningBroker:
    """A broker process the demo started; ``protocol`` is what clients must speak."""

    kind: Literal["mosquitto", "embedded"]
    host: str
    port: int
    protocol: Literal["5", "3.1.1"]
    process: subprocess.Popen[bytes]
    log: Path

    def describe(self) -> str:
        """One line for the progress output."""
        what = "Mosquitto" if self.kind == "mosquitto" else "embedded amqtt broker"
        return f"{what} on {self.host}:{self.port} (MQTT {self.protocol}, pid {self.process.pid})"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; safe to call twice."""
        _terminate(self.process, timeout)


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(timeout=timeout)


def _log_tail(log: Path, lines: int = 5) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _wait_ready(
    process: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    where: str,
    log: Path,
    timeout: float,
) -> bool:
    """True once ``ready()``; False when the process exited first (a port taken)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if ready():
            return True
        time.sleep(0.05)
    _terminate(process, 5.0)
    raise BrokerError(
        f"the MQTT broker did not listen on {where} within {timeout:.0f} s "
        f"(log {log}: {_log_tail(log) or 'empty'})"
    )


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _mosquitto_command(binary: str, workdir: Path, host: str, port: int) -> list[str]:
    config = workdir / "mosquitto.conf"
    lines = [
        f"listener {port} {host}",
        "allow_anonymous true",
        # The default of 1000 silently drops messages for a subscriber that falls behind.
        "max_queued_messages 100000",
        "persistence false",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
    ]
    config.write_text("\n".join(lines) + "\n")
    return [binary, "-c", str(config)]


def _embedded_command(host: str, port: int, ready_file: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fieldscope.cli.broker",
        "--host",
        host,
        "--port",
        str(port),
        "--parent-pid",
        str(os.getpid()),
        "--ready-file",
        str(ready_file),
    ]


def start_broker(kind: BrokerKind, workdir: Path, *, host: str = "127.0.0.1") -> RunningBroker:
    """Start a broker of ``kind`` (``auto``: Mosquitto if installed, else embedded).

    Its config and log go into ``workdir``. The process runs in its own session, so a
    Ctrl-C in the terminal reaches only the demo, which stops its children in order.

    Raises:
        ConfigError: ``kind`` is unknown, or ``mosquitto`` was asked for and is missing.
        MissingDependencyError: the embedded broker is needed and amqtt is not installed.
        BrokerError: the broker exited or did not listen in time.
    """
    binary = _broker_binary(kind)
    workdir.mkdir(parents=True, exist_ok=True)
    name: Literal["mosquitto", "embedded"] = "mosquitto" if binary else "embedded"
    log = workdir / f"{name}.log"
    ready_file = workdir / "embedded.ready"
    ready: Callable[[], bool]
    for _ in range(_PORT_TRIES):
        port = free_port(host)
        ready_file.unlink(missing_ok=True)
        if binary:
            command = _mosquitto_command(binary, workdir, host, port)
            # Mosquitto says nothing when a probe connects and leaves; amqtt logs an error,
            # so it writes a file once it listens instead.
            ready = functools.partial(_accepts, host, port)
        else:
            command = _embedded_command(host, port, ready_file)
            ready = ready_file.exists
        process = _spawn(command, log)
        if _wait_ready(process, ready, f"{host}:{port}", log, _START_TIMEOUT_S):
            return RunningBroker(
                kind=name,
                host=host,
                port=port,
                protocol="5" if binary else "3.1.1",
                process=process,
                log=log,
            )
        logger.warning("the broker exited at start (port %d taken?); trying another port", port)
    raise BrokerError(
        f"the MQTT broker ({name}) exited at start {_PORT_TRIES} times "
        f"(log {log}: {_log_tail(log) or 'empty'})"
    )


def _broker_binary(kind: BrokerKind) -> str | None:
    """The mosquitto binary to run, or None for the embedded broker (checked to exist)."""
    if kind not in BROKER_KINDS:
        raise ConfigError(f"--broker must be one of {', '.join(BROKER_KINDS)}, got {kind!r}")
    binary = find_mosquitto() if kind in ("auto", "mosquitto") else None
    if kind == "mosquitto" and binary is None:
        raise ConfigError(
            "--broker mosquitto: no mosquitto binary on PATH nor in /usr/sbin; install it "
            "(sudo apt-get install mosquitto) or use --broker embedded"
        )
    if binary is None and importlib.util.find_spec("amqtt") is None:
        raise MissingDependencyError(
            "no mosquitto is installed and the embedded broker needs amqtt: "
            "pip install 'fieldscope[demo]' (or sudo apt-get install mosquitto)"
        )
    return binary


def _spawn(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start the broker in its own session, its output appended to ``log``."""
    with log.open("ab") as fh:
        try:
            return subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise BrokerError(f"cannot start {command[0]}: {exc.strerror or exc}") from exc


# --- the embedded broker's own process -------------------------------------------------------


def _amqtt_config(host: str, port: int) -> dict[str, object]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # A user name is required (any, no password): see the module docstring.
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": False}},
    }


def _parent_gone(parent_pid: int | None) -> bool:
    if parent_pid is None:
        return False
    if os.getppid() != parent_pid:
        return True  # re-parented: the demo is gone
    try:
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


async def _serve(host: str, port: int, parent_pid: int | None, ready_file: Path | None) -> None:
    import asyncio

    from amqtt.broker import Broker
    from amqtt.errors import BrokerError as AmqttBrokerError

    broker = Broker(_amqtt_config(host, port))
    # amqtt logs a failed start with a traceback; main()'s one line says it all.
    amqtt_log = logging.getLogger("amqtt")
    amqtt_log.setLevel(logging.CRITICAL)
    try:
        await broker.start()
    except AmqttBrokerError as exc:
        raise OSError(str(exc)) from exc
    finally:
        amqtt_log.setLevel(logging.NOTSET)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logger.info("amqtt broker listening on %s:%d (MQTT 3.1.1)", host, port)
    if ready_file is not None:
        ready_file.write_text(f"{os.getpid()}\n")
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), _PARENT_CHECK_S)
        if _parent_gone(parent_pid):
            logger.warning("the process that started this broker is gone; stopping")
            break
    await broker.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fieldscope.cli.broker``: run the embedded broker until SIGTERM/SIGINT."""
    import asyncio

    parser = argparse.ArgumentParser(
        prog="python -m fieldscope.cli.broker",
        description="The embedded MQTT 3.1.1 broker (amqtt) of `fieldscope demo`. For the "
        "demo only: use Mosquitto for anything real.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="TCP port")
    parser.add_argument("--parent-pid", type=int, help="stop when this process is gone")
    parser.add_argument("--ready-file", type=Path, help="write this file once the broker listens")
    args = parser.parse_args(argv)
    # amqtt logs every connection at INFO; a demo's broker log needs only problems.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logger.setLevel(logging.INFO)
    if importlib.util.find_spec("amqtt") is None:
        print("the embedded broker needs amqtt: pip install 'fieldscope[demo]'", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(args.host, args.port, args.parent_pid, args.ready_file))
    except OSError as exc:
        print(f"embedded broker: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
