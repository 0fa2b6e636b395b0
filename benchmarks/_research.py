"""The research scripts' way of running a model, shared by the baselines the edge
benchmarks measure the daemon against: what the scripts loaded and how they read frames."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def research_start(keras_file: Path, port: int) -> tuple[Any, int, Any]:
    """The research scripts' start-up: the Keras model (full TensorFlow), its input
    side and a plain paho client publishing to the broker at ``port``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import paho.mqtt.client as mqtt

    model = keras.models.load_model(keras_file)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return model, int(model.input_shape[1]), client


def research_frames(frames: Path) -> Iterator[tuple[Path, np.ndarray]]:
    """The PNGs of ``frames`` in name order, round and round (the research loops run
    until killed), each read as RGB."""
    import cv2

    paths = sorted(frames.glob("*.png"))
    if not paths:
        raise ValueError(f"no PNG frames in {frames}: write them first (write_frames)")
    for path in itertools.cycle(paths):
        yield path, cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
