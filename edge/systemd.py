"""systemd integration without a dependency: ``sd_notify`` over ``$NOTIFY_SOCKET``.

The unit (``deploy/systemd/fieldscope-edge.service``) is ``Type=notify`` with
``WatchdogSec=``. systemd then considers the daemon started only when it sends
``READY=1`` (after the outbox, the model and the threads are up, so a broken bundle
fails the start instead of looking like a running service), and restarts it when
``WATCHDOG=1`` stops arriving for ``WatchdogSec``. The protocol is one datagram of
``KEY=value`` lines to a Unix socket; the stdlib ``socket`` module speaks it, which
keeps ``python-systemd`` (a C extension that is not on PyPI for every Pi) out.

Outside systemd (``NOTIFY_SOCKET`` unset: a terminal, the tests) every call is a
no-op that returns False, so the daemon needs no special case.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier"]

logger = logging.getLogger(__name__)


class Notifier:
    """Sends state changes to systemd; a no-op when not started by systemd.

    ``watchdog_interval_s`` is how often :meth:`watchdog` should be called (half of
    ``WatchdogSec``, as sd_watchdog_enabled(3) recommends), or None when systemd
    does not watch this process.
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address or None
        self.watchdog_interval_s = (
            watchdog_usec / 2e6 if watchdog_usec is not None and watchdog_usec > 0 else None
        )
        self._socket: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for through ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC``.

        ``WATCHDOG_PID``, when set, names the process that must ping; any other
        process (a child started by the daemon) does not.
        """
        env = os.environ if environ is None else environ
        usec: int | None = None
        pid = env.get("WATCHDOG_PID")
        if pid is None or pid == str(os.getpid()):
            try:
                usec = int(env.get("WATCHDOG_USEC", ""))
            except ValueError:
                usec = None
        return cls(env.get("NOTIFY_SOCKET"), usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments in one datagram; False when not sent."""
        if self.address is None or self._failed:
            return False
        target = self.address
        if target.startswith("@"):  # an abstract socket: a leading NUL byte on Linux
            target = "\0" + target[1:]
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
            self._socket.sendto("\n".join(assignments).encode("utf-8"), target)
        except OSError as exc:
            # Never fatal: the service keeps working; systemd may time it out, which
            # is the right outcome when its notification channel is broken.
            logger.warning("cannot notify systemd at %s: %s", self.address, exc)
            self._failed = True
            self.close()
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up is complete: the service is running."""
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        """The daemon is alive and making progress."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """A clean shutdown has begun (systemd then waits for the exit)."""
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status``."""
        return self.notify(f"STATUS={text}")

    def close(self) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()
