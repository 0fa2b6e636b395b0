"""Shared fixtures: a real Mosquitto broker on 127.0.0.1, started and stopped by the tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest


@dataclass(frozen=True)
class Broker:
    """A running mosquitto the test may connect to, restart or stop."""

    host: str
    port: int
    process: subprocess.Popen[bytes]
    config: Path
    log: Path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"mosquitto did not listen on {host}:{port} within 10 s")


def start_mosquitto(workdir: Path, port: int | None = None, persistence: bool = True) -> Broker:
    """Start a mosquitto process with a config file written here; tests may call it to restart."""
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if binary is None:
        pytest.fail("mosquitto is not installed: run `apt-get install -y mosquitto` (.ci/run does)")
    port = port or _free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "mosquitto.conf"
    log = workdir / "mosquitto.log"
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        # Mosquitto silently drops messages for slow subscribers past the default 1000.
        "max_queued_messages 1000000",
        "max_inflight_messages 0",
        f"persistence {'true' if persistence else 'false'}",
        f"persistence_location {workdir}/",
        "log_dest stderr",
        # As root, mosquitto drops to the `mosquitto` user, which cannot write into pytest's
        # root-only temp folders, and persistence then silently does nothing.
        *(["user root"] if os.geteuid() == 0 else []),
        "log_type error",
        "log_type warning",
    ]
    config.write_text("\n".join(lines) + "\n")
    with log.open("ab") as fh:
        proc = subprocess.Popen([binary, "-c", str(config)], stdout=fh, stderr=subprocess.STDOUT)
    _wait_for_port("127.0.0.1", port, proc, log)
    return Broker("127.0.0.1", port, proc, config, log)


def stop_mosquitto(broker: Broker) -> None:
    """Stop the broker by its PID, the way systemd would (SIGTERM, then SIGKILL)."""
    if broker.process.poll() is None:
        broker.process.send_signal(signal.SIGTERM)
        try:
            broker.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            broker.process.kill()
            broker.process.wait(timeout=5)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A fresh broker per test, on a free 127.0.0.1 port."""
    broker = start_mosquitto(tmp_path / "mosquitto")
    try:
        yield broker
    finally:
        stop_mosquitto(broker)


# --- Tiny real TFLite models (appended for bundle/runtime/classify tests) ----------------

COLOUR_LABELS: tuple[str, ...] = ("red", "green", "blue")


@dataclass(frozen=True)
class TinyModels:
    """A 32x32 "colour species" classifier in Keras and converted to TFLite.

    Its weights are set by hand, not trained: the class is the dominant colour channel,
    so an image made dominant in one channel gets a confident, known answer, and a grey
    image gets ~1/3 for every class (an uncertain one). The model takes raw 0-255 RGB;
    scaling is the first layer of the graph, as in every fieldscope model.
    """

    keras_model: Any  # softmax head: outputs probabilities
    keras_logits: Any  # the same graph without softmax: outputs logits
    float32: bytes  # float32 in, float32 out
    int8: bytes  # full int8, uint8 in and out (what `convert` ships)
    int8_signed: bytes  # full int8, int8 in and out
    logits_float32: bytes  # float32, no softmax
    labels: tuple[str, ...] = COLOUR_LABELS
    size: int = 32

    def images(self, label: int, n: int, seed: int = 0) -> np.ndarray:
        """``n`` noisy RGB uint8 images dominant in channel ``label``."""
        return colour_images(label, n, seed, self.size)


def colour_images(label: int, n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """``n`` noisy RGB uint8 images dominant in colour channel ``label``."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 90, (n, size, size, 3), dtype=np.uint8)
    images[..., label] = rng.integers(150, 256, (n, size, size), dtype=np.uint8)
    return images


def _convert(saved_model: Path, quantize: str | None, images: np.ndarray) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if quantize is not None:
        dtype = {"uint8": tf.uint8, "int8": tf.int8}[quantize]

        def representative() -> Iterator[list[np.ndarray]]:
            for image in images:
                yield [image[None].astype(np.float32)]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = dtype
        converter.inference_output_type = dtype
    return bytes(converter.convert())


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """Build and convert the tiny models once per session (a few seconds, mostly TF import)."""
    import keras

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    conv = keras.layers.Conv2D(4, 3, padding="same", activation="relu")
    x = keras.layers.GlobalAveragePooling2D()(conv(x))
    dense = keras.layers.Dense(3)
    logits = dense(x)
    probs = keras.layers.Softmax()(logits)
    kernel = rng.normal(0.0, 0.02, (3, 3, 3, 4)).astype(np.float32)
    for c in range(3):
        kernel[1, 1, c, c] += 1.0  # filter c passes colour channel c
    kernel[1, 1, :, 3] += 1.0 / 3.0  # filter 3: brightness
    conv.set_weights([kernel, np.zeros(4, np.float32)])
    weights = np.zeros((4, 3), np.float32)
    weights[:3, :3] = 10.0 * np.eye(3, dtype=np.float32)
    weights[3] = rng.normal(0.0, 0.5, 3)
    dense.set_weights([weights, np.zeros(3, np.float32)])
    keras_model = keras.Model(inputs, probs)
    keras_logits = keras.Model(inputs, logits)

    work = tmp_path_factory.mktemp("tiny_models")
    calibration = np.concatenate(
        [
            *(colour_images(c, 8, seed=100 + c) for c in range(3)),
            rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
        ]
    )
    keras_model.export(str(work / "probs"), format="tf_saved_model", verbose=False)
    keras_logits.export(str(work / "logits"), format="tf_saved_model", verbose=False)
    return TinyModels(
        keras_model=keras_model,
        keras_logits=keras_logits,
        float32=_convert(work / "probs", None, calibration),
        int8=_convert(work / "probs", "uint8", calibration),
        int8_signed=_convert(work / "probs", "int8", calibration),
        logits_float32=_convert(work / "logits", None, calibration),
    )
