"""Serving the dashboard with uvicorn: in a background thread, or until a signal.

uvicorn has no timeout for a client that stalls while sending its request (a slow
request line, an upload that stops half-way): :func:`guarded_protocol` closes such a
connection after ``request_timeout_s`` without data, so it cannot be held open
forever; a request whose body has arrived is never cut, however long it runs.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any

from fieldscope.collect.web.app import create_app
from fieldscope.collect.web.pages import Pages
from fieldscope.collect.web.settings import DashboardSettings
from fieldscope.edge.errors import FieldscopeError, MissingDependencyError

__all__ = ["Dashboard", "guarded_protocol"]

logger = logging.getLogger(__name__)


def guarded_protocol(timeout_s: float) -> type[Any]:
    """uvicorn's h11 protocol, closing a connection that waits on its client too long."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _stall_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            self._arm()
            super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._stall_timer is not None:
                self._stall_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._stall_timer is not None:
                self._stall_timer.cancel()
            self._stall_timer = self.loop.call_later(timeout_s, self._on_stall)

        def _on_stall(self) -> None:
            self._stall_timer = None
            cycle = self.cycle
            waiting = cycle is None or cycle.response_complete or cycle.more_body
            if not waiting:  # the request is complete and being answered
                self._arm()
            elif not self.transport.is_closing():
                logger.debug("closing a connection that sent nothing for %.1f s", timeout_s)
                self.transport.close()

    return GuardedH11Protocol


class Dashboard:
    """The dashboard over a collector database; :meth:`start` serves it in a thread."""

    def __init__(self, settings: DashboardSettings) -> None:
        self.settings = settings
        self.pages = Pages(settings)
        self.app = create_app(self.pages)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def _config(self) -> Any:
        try:
            import uvicorn
        except ImportError as exc:
            raise MissingDependencyError(
                "the dashboard needs uvicorn: pip install 'fieldscope[collect]'"
            ) from exc
        return uvicorn.Server(
            uvicorn.Config(
                self.app,
                http=guarded_protocol(self.settings.request_timeout_s),
                lifespan="off",
                log_level="warning",
                access_log=False,
                server_header=False,
                timeout_keep_alive=max(1, round(self.settings.request_timeout_s)),
            )
        )

    def _bind(self) -> socket.socket:
        host, port = self.settings.host, self.settings.port
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(info[0], socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(info[4])
        except OSError as exc:
            raise FieldscopeError(f"cannot listen on {host}:{port}: {exc}") from exc
        sock.set_inheritable(True)
        return sock

    def start(self) -> tuple[str, int]:
        """Serve in a background thread; returns the address (port 0 picks a free one)."""
        sock = self._bind()
        self._server = self._config()
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [sock]},
            name="collect-dashboard",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                raise FieldscopeError("the dashboard did not start within 15 s")
            time.sleep(0.01)
        if not self._server.started:
            raise FieldscopeError(f"the dashboard could not start on {self.settings.host}")
        host, port = sock.getsockname()[:2]
        return str(host), int(port)

    def stop(self) -> None:
        """Stop serving (open connections are closed) and wait for the thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self._server = None
