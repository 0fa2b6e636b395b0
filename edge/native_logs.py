"""Keep the start-up chatter of native libraries off a user's terminal.

TensorFlow, LiteRT and OpenCV write from C++ straight to file descriptor 2, past
Python's logging: ``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`` on every
interpreter, abseil's ``I0000 …`` lines from before TensorFlow configures its logging
(CUDA probing, CPU features), an ``E0000 … cuInit`` on every machine without a GPU.
None of them is about the user's data. :func:`quiet_native_stderr` captures what
native code writes meanwhile and writes back every line that is *not* one of these
known messages, so a real error still reaches the terminal; with debug logging on
(``fieldscope -vv``, ``log.level = "DEBUG"``) nothing is filtered.

The environment variables that switch the rest off (``TF_CPP_MIN_LOG_LEVEL``,
``OPENCV_LOG_LEVEL``) are set by the ``fieldscope`` command (``-v`` keeps them on).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator

__all__ = ["NOISE", "is_noise", "quiet_native_stderr"]

# Lines that native libraries print on every start and that say nothing about the work.
NOISE: tuple[re.Pattern[str], ...] = (
    re.compile(r"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.\s*$"),
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called"),
    re.compile(r"^[IW]0000 [\d:.]+\s+\d+ \S+\.cc:\d+\] "),  # abseil INFO/WARNING before init
    re.compile(r"^E0000 [\d:.]+\s+\d+ cuda_\w+\.cc:\d+\] failed call to cuInit"),  # no GPU
    re.compile(r"^To enable the following instructions: .* rebuild TensorFlow"),
)

# One capture at a time: fd 2 is process-wide, and two threads swapping it in turn could
# restore each other's temporary file.
_CAPTURE_LOCK = threading.Lock()


def is_noise(line: str) -> bool:
    """Whether ``line`` is one of the known start-up messages (see :data:`NOISE`)."""
    return any(pattern.search(line) for pattern in NOISE)


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Meanwhile, drop the known native start-up lines from fd 2; keep everything else.

    What is written meanwhile (also by other threads) is held back and written out
    when the block ends, minus the noise, so nothing real is lost. Nested or concurrent
    uses do not capture twice: the inner one passes through. With :mod:`faulthandler`
    on (``PYTHONFAULTHANDLER``, as deploy/pi-check runs the edge) nothing is captured:
    the traceback of a native crash meanwhile must reach the real stderr.
    """
    if (
        logging.getLogger("fieldscope").isEnabledFor(logging.DEBUG)
        or faulthandler.is_enabled()
        or not _CAPTURE_LOCK.acquire(blocking=False)
    ):
        yield
        return
    try:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no fd 2 (a daemon without stderr): nothing to hide
            yield
            return
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                yield
            finally:
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                capture.seek(0)
                text = capture.read().decode("utf-8", errors="replace")
                kept = [line for line in text.splitlines(keepends=True) if not is_noise(line)]
                if kept:
                    with contextlib.suppress(OSError):
                        os.write(2, "".join(kept).encode("utf-8", errors="replace"))
    finally:
        _CAPTURE_LOCK.release()
