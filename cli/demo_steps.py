"""The steps of ``fieldscope demo``, in order, and the clean-up of what they start.

Split from :mod:`fieldscope.cli.demo` (the command and its options).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from fieldscope.cli.demo_summary import DemoSummary, summarise

if TYPE_CHECKING:
    from fieldscope.cli.broker import RunningBroker
    from fieldscope.collect.subscriber import Collector
from fieldscope.cli.demo_console import (
    _EpochLines,
    _interrupt_signals,
    _interrupts_ignored,
    _Progress,
    _stderr_to,
)
from fieldscope.cli.demo_settings import (
    _LIVE_PATHS,
    _STATION_STOP_S,
    DEVICE,
    MODEL_NAME,
    MODEL_VERSION,
    PREFIX,
    STATE_FILE,
    STATION,
    SUMMARY_FILE,
    DemoSettings,
)


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
        # The dashboard's login (HTTP Basic, user "demo"): reviews and uploads need one.
        self.users = self.work / "dashboard-users"
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

    def _reused(self, done: list[str], step: str, title: str, what: str) -> bool:
        """Announce ``step``; True (and say what is reused) when an earlier run of the
        same settings finished it, so that it is skipped."""
        self.progress.step(title)
        if step in done:
            self.progress.line(f"reusing {what}")
        return step in done

    def _finished(self, done: list[str], step: str) -> None:
        """Record ``step`` as finished, in memory and in the work folder's state."""
        done.append(step)
        self._save_state(done)

    def make_specimens(self, done: list[str]) -> None:
        s = self.m
        total = s.classes * s.per_class
        title = (
            f"specimens: {s.classes} species × {s.per_class} training images and "
            f"{s.field_per_class} field images each"
        )
        if self._reused(done, "specimens", title, f"{self.specimens} and {self.field}"):
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
        self._finished(done, "specimens")

    def train(self, done: list[str]) -> None:
        s = self.m
        title = (
            f"train: MobileNetV2 α0.35 at {s.model_px} px from random weights, "
            f"{s.epochs} + {s.fine_tune_epochs} epochs (log: {self.log})"
        )
        if self._reused(done, "train", title, f"the run in {self.run_dir}"):
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
        self._finished(done, "train")

    def convert(self, done: list[str]) -> None:
        title = f"convert: full-integer int8 TFLite bundle -> {self.bundle}"
        if self._reused(done, "convert", title, f"the bundle in {self.bundle}"):
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
                # and the float-layer search would only add time.
                float_fallback=self.m.max_accuracy_drop < 100,
                overwrite=True,
            )
        for line in result.lines()[:2]:
            self.progress.line(line)
        self._finished(done, "convert")

    # --- the live system's parts: camera folder, station configuration and process -------

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
                "[archive]",  # the images the model was unsure of: the review queue
                'mode = "uncertain"',
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
        done = self._prepare_workdir()
        self.progress.line(f"work folder: {self.work}", indent="")
        self.make_specimens(done)
        self.train(done)
        self.convert(done)
        broker = self._start_broker(stack)
        collector, url = self._start_collector(stack, broker)
        truth = self._replay_field_images(stack, broker, collector)
        return self._finish(url, self._summary(truth))

    # --- steps 4-7 as _run takes them: broker, collector and dashboard, station, summary ---

    def _start_broker(self, stack: contextlib.ExitStack) -> RunningBroker:
        from fieldscope.cli.broker import start_broker

        self.progress.step("MQTT broker")
        broker = start_broker(self.s.broker, self.work)
        stack.callback(broker.stop)
        self.started.append("the broker")
        self.progress.line(broker.describe())
        return broker

    def _start_collector(
        self, stack: contextlib.ExitStack, broker: RunningBroker
    ) -> tuple[Collector, str]:
        """The collector, subscribed, storing into the demo's database, and the
        dashboard over that database; returns the collector and the dashboard's URL."""
        from fieldscope.cli.broker import DEMO_USERNAME
        from fieldscope.collect.store import open_store
        from fieldscope.collect.subscriber import Collector, CollectorSettings
        from fieldscope.collect.web import Dashboard, DashboardSettings
        from fieldscope.edge.broker import BrokerSettings, MqttProtocol
        from fieldscope.edge.errors import FieldscopeError

        self.progress.step("collector and dashboard")
        store = open_store(str(self.db))
        stack.callback(store.close)
        settings = BrokerSettings(
            host=broker.host,
            port=broker.port,
            prefix=PREFIX,
            client_id="fieldscope-demo-collector",
            username=DEMO_USERNAME,
            session_expiry_s=3600,
            protocol=MqttProtocol(broker.protocol),
        )
        collector = Collector(CollectorSettings(broker=settings), store)
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
        return collector, url

    def _replay_field_images(
        self, stack: contextlib.ExitStack, broker: RunningBroker, collector: Collector
    ) -> dict[str, str]:
        """Start the station on the shuffled field images and wait until the collector
        stored an identification of each; returns sha256 → species of the images."""
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
        return truth

    def _summary(self, truth: dict[str, str]) -> DemoSummary:
        """Join what the collector stored with the truth; print it and keep it as JSON."""
        from fieldscope.collect.store import open_store

        self.progress.step("summary")
        with open_store(str(self.db), create=False) as reader:
            rows = list(reader.iter_identifications())
        summary = summarise(rows, truth)
        (self.work / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
        for line in summary.lines():
            self.progress.line(line, indent="")
        self.progress.write("\n")
        return summary

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
                        auth_file=self._dashboard_users(),
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

    def _dashboard_users(self) -> Path:
        """A ``user:token`` file with one user, ``demo``, made once per work folder and
        readable by its owner only: the review page and uploads need a login."""
        if not self.users.exists():
            token = secrets.token_urlsafe(12)
            fd = os.open(self.users, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(f"demo:{token}\n")
        return self.users

    def _login(self) -> str:
        user, _, token = self.users.read_text(encoding="utf-8").strip().partition(":")
        return f"login for reviews and uploads: user {user}, password {token}"

    def _review_queue(self) -> int:
        """How many images the dashboard's review page offers (uncertain and low-score
        identifications, and its quality-control sample of confident ones)."""
        from fieldscope.collect.store import open_store
        from fieldscope.collect.web.review_api import REVIEW_QC_SHARE

        with open_store(str(self.db), create=False) as reader:
            _, total = reader.review_queue(qc_share=REVIEW_QC_SHARE, limit=1)
        return total

    def _finish(self, url: str, summary: DemoSummary) -> int:
        again = (
            f"fieldscope collect serve --db {self.db} --bundle {self.bundle} "
            f"--archive {self.work / 'station' / 'archive'} --auth-file {self.users}"
        )
        queue = self._review_queue()
        self.progress.line(
            f"review queue: {queue} image(s) waiting for an expert at {url}review "
            "(the uncertain ones the station archived; reviews become training folders with "
            "fieldscope collect export --format folders)",
            indent="",
        )
        if not self.s.serve:
            self.progress.line(
                f"done in {self.progress.elapsed()}. To browse the results later: {again}",
                indent="",
            )
            return 0 if summary.complete else 1
        self.progress.line(self._login())
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
