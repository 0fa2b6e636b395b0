"""Keras model -> TFLite flatbuffer, in one of four quantisation modes.

The path is ``model.export(dir, format="tf_saved_model")`` once, then
``TFLiteConverter.from_saved_model`` per mode: identical to ``from_keras_model`` but
without its temporary SavedModel and hundreds of log lines, and unlike
``model.export(format="litert")`` it never turns on ``SELECT_TF_OPS`` (Flex), which
the edge runtimes cannot run. Only TFLite builtin ops are allowed, so a model that
needs a TensorFlow op fails here, at conversion, not on a Pi.

Modes (every model takes raw RGB 0-255; normalisation is inside the graph):

``int8``
    Full-integer post-training quantisation, uint8 input and output: the smallest and
    fastest bundle. Activations are calibrated on a representative set of *training*
    images preprocessed exactly as the edge preprocesses frames. With the backbone's
    scaling in the graph, the input takes the edge's uint8 pixels unchanged (scale 1,
    zero point 0).
``float16``
    Weights stored as float16, computation in float32: half the size, float accuracy.
``dynamic``
    Weights int8, activations float, quantised on the fly: no calibration needed.
``float32``
    No quantisation: the reference.

For int8 and dynamic, ``_experimental_disable_per_channel_quantization_for_dense_layers``
is set: TF >= 2.16 otherwise quantises Dense weights per channel, which tflite-runtime
2.14 cannot load (FULLY_CONNECTED version 12, dynamic) or crashes on (int8, aarch64).
Convolutions stay per-channel; that is where per-channel scales matter for accuracy.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fieldscope.convert.errors import ConversionError

__all__ = [
    "QUANTIZE_MODES",
    "Calibrated",
    "calibrate",
    "convert_saved_model",
    "export_saved_model",
    "quantize_with_float_layers",
    "stratified_sample",
]

log = logging.getLogger(__name__)

QUANTIZE_MODES: tuple[str, ...] = ("int8", "float16", "dynamic", "float32")


def stratified_sample(labels: Sequence[int] | np.ndarray, n: int, *, seed: int = 0) -> np.ndarray:
    """Indices of at most ``n`` items, each class in proportion and at least once.

    A calibration set that misses a class calibrates the activation ranges of the
    images the model sees most, so a rare species can saturate in int8; stratifying
    keeps every class's range in the statistics. The choice is seeded and sorted, so a
    conversion is reproducible.
    """
    y = np.asarray(labels).reshape(-1)
    if n < 1:
        raise ConversionError(f"the calibration sample must hold at least 1 image, got {n}")
    if y.size <= n:
        return np.arange(y.size)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    # Largest-remainder apportionment, with a floor of one image per class.
    share = counts / counts.sum() * n
    take = np.maximum(1, np.floor(share)).astype(int)
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    i = 0
    while take.sum() < n:
        c = order[i % len(order)]
        if take[c] < counts[c]:
            take[c] += 1
        i += 1
    while take.sum() > n:  # more classes than n: drop the largest allocations first
        take[int(np.argmax(take))] -= 1
    chosen = [
        rng.choice(np.flatnonzero(y == c), size=int(k), replace=False)
        for c, k in zip(classes, take, strict=True)
        if k > 0
    ]
    return np.sort(np.concatenate(chosen))


def export_saved_model(keras_model: Any, directory: Path) -> Path:
    """Export the Keras model's inference function as a SavedModel in ``directory``.

    Raises:
        ConversionError: the model cannot be traced or written.
    """
    directory = Path(directory)
    try:
        keras_model.export(str(directory), format="tf_saved_model", verbose=False)
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        raise ConversionError(f"cannot export the Keras model as a SavedModel: {exc}") from exc
    return directory


def _representative(images: np.ndarray) -> Any:
    def dataset() -> Iterator[list[np.ndarray]]:
        for image in images:
            yield [image[None].astype(np.float32)]

    return dataset


def convert_saved_model(
    saved_model: Path, mode: str, calibration_images: np.ndarray | None = None
) -> bytes:
    """Convert a SavedModel to a TFLite flatbuffer in quantisation ``mode``.

    ``calibration_images`` (N x H x W x 3 uint8, preprocessed like the edge) is needed
    for ``int8`` and ignored otherwise.

    Raises:
        ConversionError: an unknown mode, missing calibration images, or a model that
            TFLite builtins cannot express (the converter's reason is quoted).
    """
    import tensorflow as tf

    if mode not in QUANTIZE_MODES:
        raise ConversionError(
            f"unknown quantisation mode {mode!r} (choose one of {', '.join(QUANTIZE_MODES)})"
        )
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if mode == "int8":
        if calibration_images is None or len(calibration_images) == 0:
            raise ConversionError("int8 quantisation needs calibration images; none were given")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = _representative(calibration_images)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    elif mode == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif mode == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode in ("int8", "dynamic"):
        # See the module docstring: keeps the bundle loadable by tflite-runtime 2.14.
        converter._experimental_disable_per_channel_quantization_for_dense_layers = True
    log.info("converting %s (%s)", saved_model, mode)
    try:
        model = converter.convert()
    except Exception as exc:  # ConverterError, ValueError, RuntimeError: all mean "cannot"
        raise ConversionError(
            f"TFLite cannot convert the model to {mode}: {_converter_reason(str(exc))}"
        ) from exc
    return bytes(model)


def _int8_converter(saved_model: Path, calibration_images: np.ndarray) -> Any:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = _representative(calibration_images)
    converter._experimental_disable_per_channel_quantization_for_dense_layers = True
    return converter


@dataclass(frozen=True)
class Calibrated:
    """A float TFLite model with its activation ranges recorded, ready to quantise.

    ``layers`` names the output tensor of every operator in execution order: the names
    the quantiser takes to keep layers in float. Calibrating once and quantising many
    times makes a search over float layers cost seconds per candidate, not a new pass
    over the calibration images.
    """

    model: bytes
    layers: tuple[str, ...]


def calibrate(saved_model: Path, calibration_images: np.ndarray) -> Calibrated:
    """Run the calibration images through the float model once and record the ranges.

    Raises:
        ConversionError: the converter cannot express or calibrate the model.
    """
    import tensorflow as tf
    from tensorflow.lite.tools import flatbuffer_utils

    converter = _int8_converter(saved_model, calibration_images)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter._experimental_calibrate_only = True
    try:
        model = bytes(converter.convert())
    except Exception as exc:  # the converter's errors all mean "cannot"
        raise ConversionError(
            f"TFLite cannot calibrate the model: {_converter_reason(str(exc))}"
        ) from exc
    graph = flatbuffer_utils.convert_bytearray_to_object(bytearray(model)).subgraphs[0]
    layers: list[str] = []
    for operator in graph.operators:
        for index in operator.outputs:
            name = graph.tensors[index].name
            layers.append(name.decode() if isinstance(name, bytes) else str(name))
    return Calibrated(model, tuple(layers))


def quantize_with_float_layers(calibrated: Calibrated, float_layers: Sequence[str]) -> bytes:
    """int8 except for the layers producing ``float_layers``, which stay float.

    Selective quantisation: quantize/dequantize ops surround the float layers, every
    other layer is int8 as in full-integer quantisation. The model's input and output
    are float32 (the edge classifier feeds pixels as float and reads logits). Dense
    weights stay per-tensor, as in full int8 (tflite-runtime 2.14, module docstring).

    Raises:
        ConversionError: the quantiser cannot produce the model.
    """
    from tensorflow.lite.python import convert as tflite_convert

    try:
        model = tflite_convert.mlir_quantize(
            calibrated.model,
            disable_per_channel=False,
            fully_quantize=False,
            denylisted_nodes=list(float_layers),
            disable_per_channel_for_dense_layers=True,
        )
    except Exception as exc:
        raise ConversionError(
            f"TFLite cannot convert the model to int8 with float layers: "
            f"{_converter_reason(str(exc))}"
        ) from exc
    return bytes(model)


def _converter_reason(text: str) -> str:
    """The useful part of a converter error, which is mostly MLIR source locations."""
    select = re.search(r"TF Select ops: ([^\n]+)", text)
    custom = re.search(r"Custom ops: ([^\n]+)", text)
    if select or custom:
        ops = ", ".join(m.group(1).strip() for m in (select, custom) if m)
        return (
            f"it uses TensorFlow ops that TFLite has no builtin for ({ops}); the edge "
            "runtimes cannot run them (fieldscope never enables SELECT_TF_OPS/Flex), so "
            "replace the layers that produce them"
        )
    first = " ".join(text.strip().splitlines()[0].split()) if text.strip() else "unknown error"
    return first if len(first) <= 300 else first[:300] + " ..."
