"""The demo's terminal: numbered steps with elapsed time, epoch lines, and signals.

Split from :mod:`fieldscope.cli.demo`. Ctrl-C, SIGTERM and SIGHUP become one
KeyboardInterrupt, so the demo's clean-up runs whichever way it is stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

# --- running it -----------------------------------------------------------------------------


class _Progress:
    """One line per step with the time since the start; details indented below it."""

    def __init__(self, out: TextIO, steps: int) -> None:
        self.out = out
        self.steps = steps
        self.started = time.monotonic()
        self.number = 0
        # Set when the terminal went away (SSH dropped, window closed): writing to it
        # raises EIO, which must not stop the clean-up of what the demo started.
        self.gone = False

    def elapsed(self) -> str:
        seconds = int(time.monotonic() - self.started)
        return f"{seconds // 60:d}:{seconds % 60:02d}"

    def step(self, text: str) -> None:
        self.number += 1
        self.line(f"[{self.elapsed()}] {self.number}/{self.steps} {text}", indent="")

    def line(self, text: str, *, indent: str = "      ") -> None:
        self.write(f"{indent}{text}\n")

    def write(self, text: str) -> None:
        """Write to the terminal, or nowhere once it has gone (EIO, EPIPE): a lost terminal
        is not an error of the demo's, and the clean-up must still run."""
        if self.gone:
            return
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):  # ValueError: the stream was closed
            self.gone = True


class _EpochLines:
    """A ``FitReporter``: one compact line per epoch and per stage."""

    def __init__(self, progress: _Progress) -> None:
        self.progress = progress
        self.stage_names: dict[int, str] = {}

    def stage_begin(self, stage: int, name: str, epochs: int, first_epoch: int) -> None:
        self.stage_names[stage] = name
        plural = "s" if epochs != 1 else ""
        self.progress.line(
            f"stage {stage} ({name}): {epochs} epoch{plural} (* = lowest val_loss so far, "
            "the checkpoint kept)"
        )

    def batch_end(
        self, stage: int, epoch: int, step: int, steps: int, logs: Mapping[str, float]
    ) -> None:
        pass

    def epoch_end(
        self, stage: int, epoch: int, epochs: int, logs: Mapping[str, float], improved: bool
    ) -> None:
        figures = "  ".join(
            f"{short} {logs[key]:.3f}"
            for key, short in (
                ("loss", "loss"),
                ("accuracy", "acc"),
                ("val_loss", "val_loss"),  # what * follows: shown, so the mark can be checked
                ("val_accuracy", "val_acc"),
            )
            if key in logs
        )
        best = "  *" if improved else ""
        self.progress.line(
            f"  {self.stage_names.get(stage, stage)} epoch {epoch:>2}/{epochs}  {figures}"
            f"{best}  [{self.progress.elapsed()}]"
        )

    def stage_end(self, result: Any) -> None:
        pass


@contextlib.contextmanager
def _stderr_to(log: Path) -> Iterator[None]:
    """Send file descriptor 2 to ``log`` meanwhile: TensorFlow's C++ start-up lines
    (oneDNN, CUDA probing) bypass Python's logging and cannot be switched off otherwise."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with log.open("ab") as fh:
            os.dup2(fh.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


@contextlib.contextmanager
def _interrupt_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP end the demo as Ctrl-C does, so that its clean-up runs."""

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    with _signal_handlers((signal.SIGTERM, signal.SIGHUP), interrupt):
        yield


@contextlib.contextmanager
def _interrupts_ignored() -> Iterator[None]:
    with _signal_handlers((signal.SIGINT, signal.SIGTERM, signal.SIGHUP), signal.SIG_IGN):
        yield


@contextlib.contextmanager
def _signal_handlers(signals: Sequence[signal.Signals], handler: Any) -> Iterator[None]:
    """Install ``handler`` meanwhile (only the main thread may; elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
