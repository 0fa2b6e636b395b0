"""What one ``fieldscope demo`` makes and runs: its settings, names and work-folder files.

Split from :mod:`fieldscope.cli.demo`, which re-exports ``FULL``, ``QUICK``,
``DemoSettings`` and ``ModelSettings``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fieldscope.cli.broker import BrokerKind

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
