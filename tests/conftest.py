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

    def bundle(
        self,
        out: Path,
        *,
        model: bytes | None = None,
        name: str = "colours",
        version: str = "1",
        recipe: Any = None,
        threshold: float = 0.6,
        **manifest: Any,
    ) -> Any:
        """One of these models (``int8`` unless ``model``) written as a bundle into
        ``out`` with the colour labels; ``recipe`` defaults to a plain 32x32 resize and
        ``manifest`` takes write_bundle's other fields (``min_runtime``, ...)."""
        from fieldscope.edge.bundle import write_bundle
        from fieldscope.edge.preprocess import PreprocessRecipe

        return write_bundle(
            out,
            self.int8 if model is None else model,
            model_name=name,
            model_version=version,
            labels=self.labels,
            preprocessing=recipe or PreprocessRecipe(size=(self.size, self.size)),
            threshold=threshold,
            **manifest,
        )


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


# --- The edge daemon's tests (tests/test_daemon*.py): a recording subscriber, bundles, ----
# --- configuration files ------------------------------------------------------------------

EDGE_PREFIX = "fs"


class MqttRecorder:
    """A subscriber that records everything under ``EDGE_PREFIX`` (what a collector sees).

    ``persistent`` gives it a persistent session (QoS 1), so a broker with persistence
    keeps its messages across a broker restart; it reconnects by itself.
    """

    def __init__(self, broker: Broker, client_id: str = "recorder", *, persistent: bool = False):
        import threading

        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes, bool]] = []
        self._cv = threading.Condition()
        subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=not persistent,
        )

        def on_connect(client: Any, *_: Any) -> None:
            client.subscribe(f"{EDGE_PREFIX}/#", qos=1)

        def on_message(_c: Any, _u: object, msg: Any) -> None:
            with self._cv:
                self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
                self._cv.notify_all()

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = on_message
        self.client.reconnect_delay_set(1, 1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(5), "the recorder could not subscribe"

    def on(self, topic: str) -> list[bytes]:
        with self._cv:
            return [p for t, p, _ in self.messages if t == topic]

    def wait_for(self, predicate: Any, timeout: float = 15.0) -> bool:
        """Wait until ``predicate(self)`` holds (it is called with the lock held)."""
        with self._cv:
            return bool(self._cv.wait_for(lambda: predicate(self), timeout))

    def count(self, topic: str) -> int:
        return sum(1 for t, _, _ in self.messages if t == topic)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained_value(broker: Broker, topic: str, timeout: float = 3.0) -> bytes | None:
    """What a subscriber connecting now gets as the retained message of ``topic``."""
    import threading

    import paho.mqtt.client as mqtt

    got: list[bytes] = []
    event = threading.Event()

    def on_message(_c: Any, _u: object, msg: Any) -> None:
        if msg.retain:
            got.append(bytes(msg.payload))
            event.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe-{time.monotonic_ns()}")
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    try:
        event.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0] if got else None


def toml_document(sections: dict[str, dict[str, Any]]) -> str:
    """A TOML document from ``{"table.sub": {key: value}}`` (strings, numbers, lists)."""
    import json

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str | Path):
            return json.dumps(str(v))
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines: list[str] = []
    for table, entries in sections.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {value(v)}" for key, v in entries.items())
        lines.append("")
    return "\n".join(lines)


@dataclass(frozen=True)
class TinyBundles:
    """Bundles of the tiny colour model: ``v1`` and ``v2`` (same model, two versions)
    and ``damaged`` (its model file changed after the manifest was written)."""

    v1: Path
    v2: Path
    damaged: Path
    labels: tuple[str, ...]


@pytest.fixture(scope="session")
def tiny_bundles(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> TinyBundles:
    from fieldscope.edge.bundle import MODEL_FILE
    from fieldscope.edge.preprocess import PreprocessRecipe

    root = tmp_path_factory.mktemp("tiny_bundles")
    recipe = PreprocessRecipe(size=(32, 32), denoise="median", resize="letterbox")
    made = {
        name: tiny_models.bundle(
            root / name, name="tiny-colour", version=version, recipe=recipe
        ).path
        for name, version in (("v1", "1"), ("v2", "2"), ("damaged", "3"))
    }
    model = made["damaged"] / MODEL_FILE
    model.write_bytes(model.read_bytes()[:-16] + bytes(16))
    return TinyBundles(made["v1"], made["v2"], made["damaged"], tiny_models.labels)


@dataclass(frozen=True)
class SpecimenImages:
    """Synthetic specimen PNGs (``fieldscope specimens``): ``sharp`` ones in name order
    and one ``blurred`` one the quality gate rejects."""

    sharp: tuple[Path, ...]
    blurred: Path

    def copy(self, folder: Path, n: int, *, blurred: bool = False) -> list[Path]:
        """Copy the first ``n`` sharp images (and the blurred one) into ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        chosen = [*self.sharp[:n], *([self.blurred] if blurred else [])]
        out = []
        for path in chosen:
            target = folder / path.name
            target.write_bytes(path.read_bytes())
            out.append(target)
        return out


@pytest.fixture(scope="session")
def specimen_images(tmp_path_factory: pytest.TempPathFactory) -> SpecimenImages:
    import cv2

    from fieldscope.edge.specimens import write_dataset

    root = tmp_path_factory.mktemp("specimens")
    write_dataset(root / "dataset", classes=4, per_class=12, size=96)
    sharp = tuple(sorted((root / "dataset").rglob("*.png"), key=lambda p: p.name))
    blurred = root / "zz_blurred.png"
    image = cv2.imread(str(sharp[0]))
    cv2.imwrite(str(blurred), cv2.GaussianBlur(image, (0, 0), 8))
    return SpecimenImages(sharp, blurred)
