"""The daemon's state file and its log lines (re-exported by :mod:`fieldscope.edge.daemon`).

The state file mirrors the essentials of each heartbeat into
``<data_dir>/daemon-state.json``, for ``fieldscope edge status`` while the daemon holds
the outbox. Log lines are one per event, as journald keeps them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from fieldscope.edge.errors import FieldscopeError

__all__ = [
    "STATE_FILE_NAME",
    "JournalFormatter",
    "configure_logging",
    "read_state_file",
    "write_state_file",
]

logger = logging.getLogger("fieldscope.edge.daemon")

# What `fieldscope edge status` reads while the daemon holds the outbox.
STATE_FILE_NAME = "daemon-state.json"


# --- state file -------------------------------------------------------------------------


def read_state_file(data_dir: Path) -> dict[str, Any] | None:
    """The daemon's last state file in ``data_dir``, or None when there is none."""
    path = Path(data_dir) / STATE_FILE_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise FieldscopeError(f"cannot read the daemon's state file {path}: {exc}") from exc
    return data if isinstance(data, dict) else None


def write_state_file(data_dir: Path, data: Mapping[str, Any]) -> None:
    """Replace the state file atomically; best effort (a full disk only logs)."""
    path = Path(data_dir) / STATE_FILE_NAME
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(json.dumps(data, sort_keys=True) + "\n", encoding="utf-8")
        temporary.replace(path)
    except OSError as exc:
        logger.debug("cannot write %s: %s", path, exc)


# --- logging ----------------------------------------------------------------------------


class JournalFormatter(logging.Formatter):
    """One line per event, as journald keeps it.

    Under systemd (stderr connected to the journal) each line starts with the
    syslog priority (``<4>`` for a warning), which journald turns into the entry's
    priority, and carries no time stamp (journald adds its own). Elsewhere, lines
    carry a UTC time stamp and the level name. A traceback is folded onto the same
    line (`` | `` between its lines), so one event never becomes many entries.
    """

    _PRIORITIES: Mapping[int, int] = {
        logging.DEBUG: 7,
        logging.INFO: 6,
        logging.WARNING: 4,
        logging.ERROR: 3,
        logging.CRITICAL: 2,
    }

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += " | " + self.formatException(record.exc_info)
        message = " | ".join(line for line in message.splitlines() if line.strip())
        if self.journal:
            priority = self._PRIORITIES.get(record.levelno, 6)
            return f"<{priority}>{record.name}: {message}"
        when = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        return f"{when}Z {record.levelname} {record.name}: {message}"


def _stderr_is_journal(stream: TextIO) -> bool:
    """True when ``stream`` is the journal stream systemd named in ``JOURNAL_STREAM``."""
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def configure_logging(level: str, stream: TextIO | None = None) -> None:
    """Send every log record at ``level`` and above to ``stream`` (stderr), one line
    each, replacing handlers installed earlier (the CLI's default)."""
    out = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(out)
    handler.setFormatter(JournalFormatter(_stderr_is_journal(out)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
