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
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from fieldscope.cli.broker import BROKER_KINDS

# Re-exported: their home was this module before the split.
from fieldscope.cli.demo_console import _EpochLines, _Progress  # noqa: F401
from fieldscope.cli.demo_settings import (
    FULL,
    QUICK,
    QUICK_ENV,
    DemoSettings,
    ModelSettings,
)
from fieldscope.cli.demo_steps import _Demo

__all__ = [
    "FULL",
    "QUICK",
    "DemoSettings",
    "ModelSettings",
    "register",
    "run_demo",
]


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
    _add_model_arguments(p)
    _add_live_arguments(p)
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start over: do not reuse the specimens and model of an earlier run",
    )
    p.set_defaults(handler=_demo)


def _add_live_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the live part: camera rate and the dashboard."""
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


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options that change the trained model (and so retrain it)."""
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
