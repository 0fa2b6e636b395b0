"""What the dashboard serves and how it is guarded: settings, limits, the upload error."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from fieldscope.edge.errors import ConfigError, FieldscopeError

__all__ = ["DashboardSettings", "UploadError", "is_loopback"]

PAGE_SIZE = 50
# Beyond this a page number is nonsense (and its offset would overflow the database's
# 64-bit integers): the request gets a 400, not a 500.
MAX_PAGE = 10**9
# The API's page size: its default and the hard maximum a client may ask for.
API_LIMIT = 50
API_MAX_LIMIT = 500
THUMB_SIDE = 160
PREVIEW_SIDE = 480
# Uploaded images: the edge decoder refuses more pixels than this (a 40 MP frame is
# already beyond any microscope camera a station uses).
UPLOAD_MAX_PIXELS = 40_000_000


class UploadError(FieldscopeError):
    """An upload request is malformed, too large or not an image."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


@dataclass(frozen=True)
class DashboardSettings:
    """What ``fieldscope collect serve`` serves.

    ``bundles`` are bundle folders offered on the upload page; ``archive`` is a folder
    holding copies of the stations' image archives (see :func:`resolve_archived`);
    ``images`` is the folder ``collect run --images`` fills (looked in first);
    ``stale_after_s``: a device whose last heartbeat is older is flagged.
    ``request_timeout_s``: a client that sends nothing for this long while the server
    waits for its request (a stalled upload, a slow request line, an idle keep-alive)
    is disconnected. ``auth_file``: tokens for the write endpoints (uploads); required
    when ``host`` is not a loopback address, since anyone on the network could then use
    the CPU of the collector's host.
    """

    db_url: str
    host: str = "127.0.0.1"
    port: int = 8080
    bundles: tuple[Path, ...] = ()
    public_key: Path | None = None
    archive: Path | None = None
    images: Path | None = None
    max_upload_bytes: int = 20 * 1024 * 1024
    stale_after_s: float = 300.0
    title: str = "fieldscope"
    request_timeout_s: float = 30.0
    auth_file: Path | None = None

    def check(self) -> None:
        """Refuse settings that would expose the write endpoints without a login.

        Raises:
            ConfigError: a non-loopback ``host`` without ``auth_file``.
        """
        if self.auth_file is None and not is_loopback(self.host):
            raise ConfigError(
                f"--host {self.host} listens beyond this machine: pass --auth-file FILE "
                "(lines of user:token, or one token) so that uploads need a token, or "
                "bind 127.0.0.1"
            )
