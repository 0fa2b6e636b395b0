"""``fieldscope demo``: the whole system on this machine, in one command.

    specimens ─▶ train ─▶ int8 bundle ─▶ broker ─▶ collector + dashboard ─▶ station ─▶ summary

Every step is the real component, called the way its own command calls it:
:func:`fieldscope.edge.specimens.write_dataset`, :func:`fieldscope.train.pipeline.train_run`,
:func:`fieldscope.convert.run.convert_run`, the edge daemon as a child process
(``python -m fieldscope.cli edge run --config station.toml``, the way systemd runs it)
on a replay camera, the collector and its dashboard in this process, and an MQTT
broker (:mod:`fieldscope.cli.broker`: Mosquitto when installed, else amqtt).

The station replays *field* specimens, drawn with another seed than the training set,
from one flat folder. Each message carries the sha256 of the image file the replay
camera read (``image.sha256``), so the summary joins every stored identification to
the species folder its file came from — by content, not by name or order — and
checks that every replayed image was identified exactly once.

Steps 1-3 are kept in the work folder with the settings that made them
(``demo-state.json``): a second ``fieldscope demo`` with the same settings reuses the
trained bundle and runs only the live part (``--fresh`` starts over). Everything
started is stopped in reverse order on any exit — an error, Ctrl-C, SIGTERM — and
children run in their own session, so a Ctrl-C in the terminal reaches only this
process, which stops the station first (it drains its pipeline), then the
collector, then the broker.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from fieldscope.cli.broker import BROKER_KINDS, BrokerKind
from fieldscope.cli.demo_summary import DemoSummary, summarise

if TYPE_CHECKING:
    from fieldscope.cli.broker import RunningBroker

__all__ = [
    "FULL",
    "QUICK",
    "DemoSettings",
    "ModelSettings",
    "register",
    "run_demo",
]

STATE_FILE = "demo-state.json"
QUICK_ENV = "FIELDSCOPE_DEMO_QUICK"
SUMMARY_FILE = "summary.json"
STATION = "demo-lab"
DEVICE = "scope-1"
PREFIX = "fieldscope"
MODEL_NAME = "demo-forams"
MODEL_VERSION = "1.0.0"
# The folders and files of one live run; removed before the next (steps 1-3 stay).
_LIVE_PATHS = (
    "camera",
    "station",
    "station.toml",
    "station.log",
    "collect.sqlite",
    "mosquitto.conf",
    "mosquitto.log",
    "embedded.log",
    "embedded.ready",
    SUMMARY_FILE,
)
_STATION_STOP_S = 15.0


@dataclass(frozen=True)
class ModelSettings:
    """What makes steps 1-3 (specimens, training, bundle). A run with the same values
    reuses them from the work folder; any change trains again."""

    classes: int = 4
    per_class: int = 100
    field_per_class: int = 15
    specimen_px: int = 128
    model_px: int = 96
    epochs: int = 30
    fine_tune_epochs: int = 8
    batch_size: int = 8
    learning_rate: float = 2e-3
    # The specimens are drawn at random angles already; free rotation on top made learning
    # from random weights much slower (measured: 0.85 test accuracy after 30 + 8 epochs
    # without it, ~0.5 validation accuracy after 30 with it).
    rotation: float = 0.0
    run_eagerly: bool = False
    seed: int = 0
    max_accuracy_drop: float = 5.0


@dataclass(frozen=True)
class DemoSettings:
    """One demo: the model it trains and how the live part runs."""

    model: ModelSettings = ModelSettings()
    broker: BrokerKind = "auto"
    rate_hz: float = 10.0
    dashboard_port: int = 8080
    serve: bool = True


# About four minutes on two cores: MobileNetV2 α0.35 at 96 px from random weights
# (no download), ~0.85 test accuracy on 4 synthetic species.
FULL = DemoSettings()
# Seconds of training for tests and a first look. The model is barely better than chance,
# so the conversion's accuracy check is off; eager Keras skips minutes of graph tracing
# that a one-epoch run would never win back.
QUICK = DemoSettings(
    model=ModelSettings(
        classes=3,
        per_class=12,
        field_per_class=4,
        specimen_px=64,
        model_px=32,
        epochs=1,
        fine_tune_epochs=0,
        batch_size=16,
        run_eagerly=True,
        max_accuracy_drop=100.0,
    ),
    rate_hz=0.0,
)


def register(subparsers: Any) -> None:
    """Add ``demo`` to the ``fieldscope`` parser."""
    p = subparsers.add_parser(
        "demo",
        help="the whole system on this machine: specimens, training, bundle, station, "
        "MQTT, collector, dashboard",
        description="Generate synthetic specimens, train a small classifier, convert it to an "
        "int8 bundle, start an MQTT broker (Mosquitto if installed, else an embedded one), "
        "run an edge station on a replay camera and a collector, and print a summary: "
        "images, identified, uncertain, accuracy against the known species, latency per "
        "stage, and the dashboard's address. A few minutes on two cores, offline. Steps 1-3 "
        "are reused by the next run with the same settings.",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("fieldscope-demo"),
        metavar="DIR",
        help="where everything goes (default ./fieldscope-demo)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a tiny, barely trained model in seconds (tests, a first look); "
        f"also set by {QUICK_ENV}=1",
    )
    p.add_argument(
        "--broker",
        choices=BROKER_KINDS,
        default="auto",
        help="auto (default): Mosquitto if installed, else the embedded amqtt broker",
    )
    p.add_argument(
        "--epochs", type=int, help=f"stage 1 training epochs (default {FULL.model.epochs})"
    )
    p.add_argument(
        "--fine-tune-epochs",
        type=int,
        help=f"stage 2 training epochs (default {FULL.model.fine_tune_epochs})",
    )
    p.add_argument(
        "--per-class",
        type=int,
        help=f"training images per species (default {FULL.model.per_class})",
    )
    p.add_argument(
        "--rate",
        type=float,
        metavar="HZ",
        help=f"frames per second of the replay camera (default {FULL.rate_hz:g}; 0 = as fast "
        "as the station goes)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=FULL.dashboard_port,
        help=f"dashboard port (default {FULL.dashboard_port}, another if taken; 0 = any)",
    )
    p.add_argument(
        "--no-serve",
        action="store_true",
        help="exit after the summary (the default when stdout is not a terminal)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start over: do not reuse the specimens and model of an earlier run",
    )
    p.set_defaults(handler=_demo)


def _settings_from(args: argparse.Namespace, *, tty: bool) -> DemoSettings:
    from fieldscope.edge.errors import ConfigError

    # FIELDSCOPE_DEMO_QUICK=1 lets CI run the README's install command as written and
    # still get a demo of seconds.
    quick = args.quick or os.environ.get(QUICK_ENV, "").strip() not in ("", "0")
    base = QUICK if quick else FULL
    model_changes = {
        name: value
        for name, value in (
            ("epochs", args.epochs),
            ("fine_tune_epochs", args.fine_tune_epochs),
            ("per_class", args.per_class),
        )
        if value is not None
    }
    model = dataclasses.replace(base.model, **model_changes)
    settings = dataclasses.replace(
        base,
        model=model,
        broker=args.broker,
        rate_hz=base.rate_hz if args.rate is None else args.rate,
        dashboard_port=args.port,
        serve=tty and not args.no_serve,
    )
    problems = []
    if model.epochs < 1:
        problems.append(f"--epochs must be >= 1, got {model.epochs}")
    if model.fine_tune_epochs < 0:
        problems.append(f"--fine-tune-epochs must be >= 0, got {model.fine_tune_epochs}")
    if not 10 <= model.per_class <= 1000:
        problems.append(
            "--per-class must be 10-1000 (training, validation and test each need images "
            f"of every species), got {model.per_class}"
        )
    if not 0 <= settings.rate_hz <= 1000:  # also refuses NaN
        problems.append(f"--rate must be 0-1000 frames per second, got {settings.rate_hz:g}")
    if not 0 <= settings.dashboard_port <= 65535:
        problems.append(f"--port must be 0-65535, got {settings.dashboard_port}")
    if problems:
        raise ConfigError("; ".join(problems))
    return settings


# Import names of what the demo runs: the training, collector and edge extras.
_NEEDED_MODULES = ("numpy", "cv2", "tensorflow", "keras", "sklearn", "matplotlib", "paho", "jinja2")


def _check_dependencies() -> None:
    """Fail in one line before any work when an extra is missing (not minutes later)."""
    import importlib.util

    from fieldscope.edge.errors import MissingDependencyError

    missing = [name for name in _NEEDED_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(
            f"the demo needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            "not installed: pip install 'fieldscope[demo]'"
        )


def _demo(args: argparse.Namespace) -> int:
    out = sys.stdout
    settings = _settings_from(args, tty=out.isatty())
    _check_dependencies()
    # TensorFlow's and LiteRT's C++ start-up lines (the dashboard loads the bundle too)
    # are not for the user of a command-line tool; the station inherits this.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return run_demo(settings, args.workdir, out=out, fresh=args.fresh)


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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Demo:
    """The steps, in order; :meth:`run` owns the clean-up of whatever they start."""

    def __init__(self, settings: DemoSettings, workdir: Path, out: TextIO, fresh: bool) -> None:
        self.s = settings
        self.m = settings.model
        self.work = workdir.resolve()
        self.fresh = fresh
        self.progress = _Progress(out, steps=7)
        self.specimens = self.work / "specimens"
        self.field = self.work / "field-specimens"
        self.run_dir = self.work / "run"
        self.bundle = self.work / "bundle"
        self.camera = self.work / "camera"
        self.db = self.work / "collect.sqlite"
        # What TensorFlow and LiteRT print past Python's logging, and the training's warnings.
        self.log = self.work / "demo.log"
        self.started: list[str] = []  # what is running, for the closing line

    # --- the work folder and what earlier runs left in it ---------------------------------

    def _state(self) -> dict[str, Any]:
        try:
            data = json.loads((self.work / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save_state(self, done: Sequence[str]) -> None:
        state = {"settings": dataclasses.asdict(self.m), "done": list(done)}
        (self.work / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    def _prepare_workdir(self) -> list[str]:
        """Make the work folder ready; returns the steps an earlier run finished that
        this one reuses. Refuses a non-empty folder that is not a demo's."""
        from fieldscope.edge.errors import ConfigError

        if self.work.exists() and not self.work.is_dir():
            raise ConfigError(f"--workdir {self.work} exists and is not a folder")
        if self.work.is_dir() and any(self.work.iterdir()):
            if not (self.work / STATE_FILE).exists():
                raise ConfigError(
                    f"--workdir {self.work} is not empty and is not a fieldscope demo folder "
                    f"(no {STATE_FILE}); choose a new or empty folder"
                )
            state = self._state()
            if not self.fresh and state.get("settings") == dataclasses.asdict(self.m):
                for name in _LIVE_PATHS:
                    path = self.work / name
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink(missing_ok=True)
                for suffix in ("-wal", "-shm"):
                    (self.work / f"collect.sqlite{suffix}").unlink(missing_ok=True)
                done = state.get("done", [])
                return [str(step) for step in done] if isinstance(done, list) else []
            for child in self.work.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        self.work.mkdir(parents=True, exist_ok=True)
        self._save_state([])
        return []

    # --- steps 1-3: data and model -------------------------------------------------------

    def make_specimens(self, done: list[str]) -> None:
        s = self.m
        total = s.classes * s.per_class
        self.progress.step(
            f"specimens: {s.classes} species × {s.per_class} training images and "
            f"{s.field_per_class} field images each"
        )
        if "specimens" in done:
            self.progress.line(f"reusing {self.specimens} and {self.field}")
            return
        from fieldscope.edge.specimens import write_dataset

        write_dataset(
            self.specimens, classes=s.classes, per_class=s.per_class, size=s.specimen_px,
            seed=s.seed,
        )  # fmt: skip
        # Field specimens: the same species drawn with another seed, never seen in training.
        write_dataset(
            self.field, classes=s.classes, per_class=s.field_per_class, size=s.specimen_px,
            seed=s.seed + 1,
        )  # fmt: skip
        self.progress.line(f"wrote {total} images to {self.specimens}")
        done.append("specimens")
        self._save_state(done)

    def train(self, done: list[str]) -> None:
        s = self.m
        self.progress.step(
            f"train: MobileNetV2 α0.35 at {s.model_px} px from random weights, "
            f"{s.epochs} + {s.fine_tune_epochs} epochs (log: {self.log})"
        )
        if "train" in done:
            self.progress.line(f"reusing the run in {self.run_dir}")
            return
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        shutil.rmtree(self.run_dir, ignore_errors=True)
        with _stderr_to(self.log):
            from fieldscope.train.config import AugmentConfig, TrainConfig
            from fieldscope.train.pipeline import train_run

            config = TrainConfig(
                backbone="mobilenet_v2",
                alpha=0.35,
                weights="none",
                image_size=s.model_px,
                epochs=s.epochs,
                patience=0,
                fine_tune_epochs=s.fine_tune_epochs,
                fine_tune_learning_rate=1e-4,
                fine_tune_layers=60,
                batch_size=s.batch_size,
                learning_rate=s.learning_rate,
                augment=AugmentConfig(rotation=s.rotation),
                seed=s.seed,
                run_eagerly=s.run_eagerly,
            )
            summary = train_run(
                self.specimens, self.run_dir, config, reporter=_EpochLines(self.progress)
            )
        for line in summary.lines()[:2]:
            self.progress.line(line)
        done.append("train")
        self._save_state(done)

    def convert(self, done: list[str]) -> None:
        self.progress.step(f"convert: full-integer int8 TFLite bundle -> {self.bundle}")
        if "convert" in done:
            self.progress.line(f"reusing the bundle in {self.bundle}")
            return
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        with _stderr_to(self.log):
            from fieldscope.convert.run import convert_run

            result = convert_run(
                self.run_dir,
                self.bundle,
                quantize="int8",
                model_name=MODEL_NAME,
                model_version=MODEL_VERSION,
                max_accuracy_drop=self.m.max_accuracy_drop,
                # The quick toy model is barely trained: its int8 agreement means nothing,
                # and the debugger would only add a minute.
                float_fallback=self.m.max_accuracy_drop < 100,
                overwrite=True,
            )
        for line in result.lines()[:2]:
            self.progress.line(line)
        done.append("convert")
        self._save_state(done)

    # --- steps 4-6: the live system -------------------------------------------------------

    def prepare_camera(self) -> dict[str, str]:
        """Copy the field specimens into one flat folder in a shuffled order (the replay
        camera reads name order) and return sha256 → species for each file."""
        from fieldscope.edge.errors import ConfigError

        files = sorted(p for p in self.field.glob("*/*.png"))
        random.Random(self.m.seed).shuffle(files)
        self.camera.mkdir(parents=True, exist_ok=True)
        truth: dict[str, str] = {}
        for i, path in enumerate(files):
            digest = _sha256(path)
            if digest in truth:
                raise ConfigError(f"two field images have the same content: {path}")
            truth[digest] = path.parent.name
            shutil.copyfile(path, self.camera / f"frame-{i:04d}.png")
        if not truth:
            raise ConfigError(f"no field specimens in {self.field}; run again with --fresh")
        return truth

    def station_config(self, broker: RunningBroker) -> Path:
        from fieldscope.cli.broker import DEMO_USERNAME
        from fieldscope.edge.config import load_config

        def q(value: object) -> str:
            return json.dumps(str(value))  # a TOML basic string

        text = "\n".join(
            [
                "# Written by `fieldscope demo`: the station of the demo.",
                "[device]",
                f"station = {q(STATION)}",
                f"id = {q(DEVICE)}",
                f"data_dir = {q(self.work / 'station')}",
                "",
                "[camera]",
                'backend = "replay"',
                # The trigger sets the pace, as it would for a real camera; a paced
                # replay would count its waiting as capture time.
                'trigger = "continuous"',
                f"max_rate_hz = {float(self.s.rate_hz)!r}",
                "",
                "[camera.replay]",
                f"path = {q(self.camera)}",
                "rate_hz = 0.0",
                "loop = false",
                "",
                "[model]",
                f"bundle = {q(self.bundle)}",
                "",
                "[mqtt]",
                f"host = {q(broker.host)}",
                f"port = {broker.port}",
                f"protocol = {q(broker.protocol)}",
                f"username = {q(DEMO_USERNAME)}",
                f"prefix = {q(PREFIX)}",
                "",
                "[archive]",
                'mode = "all"',
                "",
                "[heartbeat]",
                "interval_s = 5.0",
                "",
            ]
        )
        path = self.work / "station.toml"
        path.write_text(text)
        load_config(path)  # a mistake here is ours: fail with its message, before starting
        return path

    def start_station(self, config: Path, stack: contextlib.ExitStack) -> subprocess.Popen[bytes]:
        log = self.work / "station.log"
        with log.open("ab") as fh:
            process = subprocess.Popen(
                [sys.executable, "-m", "fieldscope.cli", "edge", "run", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        stack.callback(self._stop_station, process)
        self.started.append("the station")
        return process

    def _stop_station(self, process: subprocess.Popen[bytes]) -> None:
        """SIGTERM: the daemon drains its pipeline and outbox and publishes ``stopped``."""
        if process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=_STATION_STOP_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def wait_for_identifications(
        self,
        expected: int,
        process: subprocess.Popen[bytes],
        stored: Callable[[], int],
        invalid: Callable[[], str],
    ) -> None:
        from fieldscope.edge.errors import FieldscopeError

        per_frame = 1.0 / self.s.rate_hz if self.s.rate_hz > 0 else 0.0
        timeout = 60.0 + expected * (per_frame + 0.5)
        deadline = time.monotonic() + timeout
        tty = self.progress.out.isatty()
        last_shown = -1
        last_line = time.monotonic()
        while True:
            count = stored()
            now = time.monotonic()
            if count != last_shown and (tty or count >= expected or now - last_line >= 5.0):
                text = (
                    f"      {count}/{expected} identifications stored  [{self.progress.elapsed()}]"
                )
                self.progress.write(f"\r{text}" if tty else f"{text}\n")
                last_shown, last_line = count, now
            if count >= expected:
                if tty:
                    self.progress.write("\n")
                return
            if process.poll() is not None:
                raise FieldscopeError(
                    f"the station exited with status {process.returncode} after {count} of "
                    f"{expected} identifications; see {self.work / 'station.log'}"
                )
            if now > deadline:
                raise FieldscopeError(
                    f"only {count} of {expected} identifications arrived within {timeout:.0f} s; "
                    f"see {self.work / 'station.log'}{invalid()}"
                )
            time.sleep(0.25)

    # --- the whole run -----------------------------------------------------------------------

    def run(self) -> int:
        stack = contextlib.ExitStack()
        with _interrupt_signals():
            try:
                return self._run(stack)
            finally:
                # A second Ctrl-C must not cut the clean-up short and leave children
                # behind; each stop below is bounded in time. The line cannot fail
                # (Progress.write swallows a lost terminal's EIO), so the stack closes.
                with _interrupts_ignored():
                    try:
                        if self.started:
                            self.progress.line(
                                f"stopping {', '.join(reversed(self.started))}", indent=""
                            )
                    finally:
                        stack.close()

    def _run(self, stack: contextlib.ExitStack) -> int:
        from fieldscope.cli.broker import DEMO_USERNAME, start_broker
        from fieldscope.collect.store import open_store
        from fieldscope.collect.subscriber import Collector, CollectorSettings
        from fieldscope.collect.web import Dashboard, DashboardSettings
        from fieldscope.edge.broker import BrokerSettings, MqttProtocol
        from fieldscope.edge.errors import FieldscopeError

        done = self._prepare_workdir()
        self.progress.line(f"work folder: {self.work}", indent="")
        self.make_specimens(done)
        self.train(done)
        self.convert(done)

        self.progress.step("MQTT broker")
        broker = start_broker(self.s.broker, self.work)
        stack.callback(broker.stop)
        self.started.append("the broker")
        self.progress.line(broker.describe())

        self.progress.step("collector and dashboard")
        store = open_store(str(self.db))
        stack.callback(store.close)
        collector = Collector(
            CollectorSettings(
                broker=BrokerSettings(
                    host=broker.host,
                    port=broker.port,
                    prefix=PREFIX,
                    client_id="fieldscope-demo-collector",
                    username=DEMO_USERNAME,
                    session_expiry_s=3600,
                    protocol=MqttProtocol(broker.protocol),
                )
            ),
            store,
        )
        collector.start()
        stack.callback(collector.stop)
        self.started.append("the collector")
        if not collector.wait_subscribed(15):
            raise FieldscopeError(
                f"the collector could not subscribe at {broker.host}:{broker.port} within 15 s "
                f"(broker log: {broker.log})"
            )
        url = self._start_dashboard(stack, Dashboard, DashboardSettings)
        self.progress.line(f"collector subscribed (MQTT {broker.protocol}), storing into {self.db}")
        self.progress.line(f"dashboard: {url}")

        truth = self.prepare_camera()
        config = self.station_config(broker)
        station = self.start_station(config, stack)
        self.progress.step(
            f"station {STATION}/{DEVICE}: replaying {len(truth)} field images "
            f"(pid {station.pid}; log: {self.work / 'station.log'})"
        )
        self.wait_for_identifications(
            len(truth),
            station,
            lambda: collector.stats.stored,
            lambda: (
                f" and the {collector.stats.invalid} message(s) the collector kept apart as "
                "invalid (the dashboard's 'invalid' page)"
                if collector.stats.invalid
                else ""
            ),
        )

        self.progress.step("summary")
        with open_store(str(self.db), create=False) as reader:
            rows = list(reader.iter_identifications())
        summary = summarise(rows, truth)
        (self.work / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
        for line in summary.lines():
            self.progress.line(line, indent="")
        self.progress.write("\n")
        return self._finish(url, summary)

    def _start_dashboard(self, stack: contextlib.ExitStack, dashboard: Any, settings: Any) -> str:
        from fieldscope.edge.errors import FieldscopeError

        def make(port: int) -> Any:
            # Loading the bundle for the upload page makes LiteRT announce its delegate.
            with _stderr_to(self.log):
                return dashboard(
                    settings(
                        db_url=str(self.db),
                        port=port,
                        bundles=(self.bundle,),
                        archive=self.work / "station" / "archive",
                        title="fieldscope demo",
                    )
                )

        board = make(self.s.dashboard_port)
        try:
            host, port = board.start()
        except FieldscopeError:
            if self.s.dashboard_port == 0:
                raise
            board = make(0)
            host, port = board.start()
        stack.callback(board.stop)
        self.started.append("the dashboard")
        return f"http://{host}:{port}/"

    def _finish(self, url: str, summary: DemoSummary) -> int:
        again = (
            f"fieldscope collect serve --db {self.db} --bundle {self.bundle} "
            f"--archive {self.work / 'station' / 'archive'}"
        )
        if not self.s.serve:
            self.progress.line(
                f"done in {self.progress.elapsed()}. To browse the results later: {again}",
                indent="",
            )
            return 0 if summary.complete else 1
        self.progress.line(
            f"done in {self.progress.elapsed()}. Dashboard: {url}  — the station and the "
            "collector keep running; Ctrl-C stops everything.",
            indent="",
        )
        if self.progress.gone:  # nobody left to serve: the terminal closed meanwhile
            return 0 if summary.complete else 1
        try:
            signal.pause()
        except KeyboardInterrupt:
            self.progress.write("\n")
        return 0 if summary.complete else 1


def run_demo(
    settings: DemoSettings, workdir: Path, *, out: TextIO | None = None, fresh: bool = False
) -> int:
    """Run the demo in ``workdir``; returns 0 when every replayed image was identified
    exactly once, 1 otherwise. Progress and the summary go to ``out`` (stdout).

    Raises:
        FieldscopeError: a step failed; the message names it and where its log is.
        KeyboardInterrupt: Ctrl-C, SIGTERM or SIGHUP, after everything was stopped.
    """
    return _Demo(settings, workdir, out or sys.stdout, fresh).run()
