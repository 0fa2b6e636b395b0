"""The int8 fallback: keep the first layers in float until int8 agrees with Keras.

A full-int8 model can keep the float model's accuracy while naming a different species
for several images in a hundred: on images with flat backgrounds, the rounding in the
first layers acts like pixel noise that every later layer amplifies. When the int8
model falls short of ``INT8_AGREEMENT_TARGET`` (or loses more than ``INT8_DROP_TARGET``
points), :func:`float_fallback` quantises it again with a growing share of its first
layers in float, calibrating once (:func:`~fieldscope.convert.quantize.calibrate`), and
keeps the first candidate that holds, or else the best one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fieldscope.convert.fidelity import Fidelity
from fieldscope.convert.opcheck import OpReport, check_edge_compatible, read_operators
from fieldscope.convert.quantize import calibrate, quantize_with_float_layers
from fieldscope.edge.bundle import Bundle
from fieldscope.edge.runtime import RuntimeInfo

__all__ = [
    "FLOAT_PREFIX_SHARES",
    "INT8_AGREEMENT_TARGET",
    "INT8_DROP_TARGET",
    "Checked",
    "Progress",
    "int8_holds",
    "layer_name",
    "note",
    "search_float_prefix",
]

log = logging.getLogger(__name__)

# Below this top-1 agreement with the float model, an int8 conversion keeps its first
# layers in float (the int8 bundle of a many-class set otherwise names a different
# species for a few images in a hundred).
INT8_AGREEMENT_TARGET = 0.98
# ... and above this accuracy drop, in points (the refusal gate, --max-accuracy-drop,
# is looser: a drop between the two is shipped, but only after trying float layers).
INT8_DROP_TARGET = 0.5
# Shares of the network's layers, counted in execution order from the input, tried in
# float in turn until the agreement holds. The first layers, not the ones with the
# largest error in quantisation steps: their rounding acts like pixel noise, which every
# later layer amplifies. On a 24-class plankton model (agreement 0.921 in full int8)
# float blocks up to the 6th of 16 gave 0.977 for +5 % size, while the 20 layers the
# TFLite quantisation debugger blamed most gave 0.963 for +80 %, and float from the
# 12th block to the end gave nothing (0.921). Beyond three quarters little of int8's
# speed would be left: past that the best candidate is kept and the gap reported.
FLOAT_PREFIX_SHARES: tuple[float, ...] = (1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4)

Progress = Callable[[str], None]


def note(progress: Progress | None, message: str) -> None:
    """Log a step, and show it to the person waiting when there is one."""
    log.info("%s", message)
    if progress is not None:
        progress(message)


def layer_name(tensor: str) -> str:
    """The Keras layer behind a converted tensor name, for the manifest and messages.

    TFLite names a fused op's output after every op it fused, joined by ``;`` (e.g.
    ``model/backbone/stem_relu_1/Relu6;...;model/backbone/stem_conv_1/convolution``);
    the layer that holds weights (a convolution or dense layer) names it best.
    """
    layers = [part.split("/")[-2] for part in tensor.split(";") if part.count("/") >= 1]
    layers = [name.removesuffix("_1") for name in layers]
    weighted = [n for n in layers if "conv" in n or "dense" in n or "predictions" in n]
    return (weighted or layers or [tensor])[0]


@dataclass(frozen=True)
class Checked:
    """A converted model with its fidelity check (and, for a mixed one, its float layers)."""

    model: bytes
    operators: OpReport
    fidelity: Fidelity
    runtime: RuntimeInfo
    staged: Bundle
    edge_probs: np.ndarray
    float_layers: tuple[str, ...] = ()
    layer_count: int = 0


def search_float_prefix(
    best: Checked,
    saved: Path,
    calibration: np.ndarray,
    fidelity_of: Callable[[bytes, str], Checked],
    *,
    max_accuracy_drop: float,
    allow_newer_runtime: bool,
    progress: Progress | None,
) -> Checked:
    """Keep a growing share of the first layers in float while int8 falls short.

    Returns the first candidate that holds (the least float that does), else the best
    one seen.
    """
    if int8_holds(best.fidelity, max_accuracy_drop):
        return best
    note(
        progress,
        f"int8 falls short (top-1 agreement {best.fidelity.top1_agreement:.3f}, target "
        f"{INT8_AGREEMENT_TARGET}; accuracy drop {best.fidelity.accuracy_drop_points:.2f} "
        f"points, target {min(INT8_DROP_TARGET, max_accuracy_drop):g}): keeping the first "
        "layers in float, a share at a time",
    )
    calibrated = calibrate(saved, calibration)
    total = len(calibrated.layers)
    counts = sorted({max(1, round(share * total)) for share in FLOAT_PREFIX_SHARES})
    for count in counts:  # a small network maps several shares to one count
        layers = calibrated.layers[:count]
        candidate = quantize_with_float_layers(calibrated, layers)
        check_edge_compatible(
            read_operators(candidate), require_tflite_runtime=not allow_newer_runtime
        )
        mixed = dataclasses.replace(
            fidelity_of(candidate, f"fidelity-check-{len(layers)}"),
            float_layers=tuple(layers),
            layer_count=total,
        )
        note(
            progress,
            f"first {len(layers)} of {total} layers in float (to {layer_name(layers[-1])}, "
            f"{len(candidate) / 1e6:.1f} MB): {mixed.fidelity.summary()}",
        )
        if (mixed.fidelity.top1_agreement, -mixed.fidelity.accuracy_drop_points) > (
            best.fidelity.top1_agreement,
            -best.fidelity.accuracy_drop_points,
        ):
            best = mixed
        if int8_holds(mixed.fidelity, max_accuracy_drop):
            return mixed
    note(
        progress,
        f"int8 still falls short with {FLOAT_PREFIX_SHARES[-1]:.0%} of the layers in "
        f"float; keeping the best (top-1 agreement {best.fidelity.top1_agreement:.3f}, "
        f"{len(best.float_layers)} float layers)",
    )
    return best


def int8_holds(fidelity: Fidelity, max_accuracy_drop: float) -> bool:
    """Whether a candidate is close enough to Keras to stop looking for float layers."""
    return bool(
        fidelity.top1_agreement >= INT8_AGREEMENT_TARGET
        and fidelity.accuracy_drop_points <= min(INT8_DROP_TARGET, max_accuracy_drop)
    )
