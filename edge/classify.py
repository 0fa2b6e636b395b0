"""Classification: a bundle's model applied to one preprocessed image.

The :class:`Classifier` builds its interpreter once (construction costs far more than
an inference on a Pi) and is **not thread-safe**: a TFLite interpreter holds its
input and output tensors as state, so two threads calling :meth:`Classifier.classify`
on one instance would overwrite each other's input. Use one classifier per thread.

Probabilities or logits? ``fieldscope convert`` writes models that output logits and
says so in the manifest (``output = "logits"``): softmax runs here, in float64 on the
dequantised logits, so an int8 model does not round close classes' probabilities to the
same uint8 step. For a bundle whose manifest does not say (older bundles, hand-made
ones), the classifier decides once, when it is built, from one probe inference on a
mid-grey image: if the dequantised output is a probability distribution (every value
in [0, 1] and the sum 1 within the output quantisation's rounding), outputs are used as
they are; otherwise softmax is applied. Deciding once keeps the behaviour identical for
every frame, and the probe inference doubles as a self-test that the model really runs
on this device.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from fieldscope.edge.bundle import Bundle, check_model
from fieldscope.edge.errors import BundleError
from fieldscope.edge.runtime import make_interpreter

__all__ = ["Classifier", "Prediction", "softmax", "top_k"]

logger = logging.getLogger(__name__)

Status = Literal["ok", "uncertain"]


@dataclass(frozen=True)
class Prediction:
    """The result for one image.

    ``score`` is the top probability and ``label`` its class, or ``None`` with status
    ``"uncertain"`` when the score is below the bundle's threshold. ``top_k`` lists the
    best labels with their probabilities, best first; ``probabilities`` holds one
    float32 per bundle label, in label order.
    """

    label: str | None
    score: float
    top_k: list[tuple[str, float]]
    probabilities: npt.NDArray[np.float32]
    status: Status


def top_k(probabilities: npt.ArrayLike, labels: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` most probable labels, best first; equal scores keep label order.

    Raises:
        ValueError: ``k`` < 1 or the number of probabilities differs from the labels.
    """
    probs = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if probs.size != len(labels):
        raise ValueError(f"{probs.size} probabilities for {len(labels)} labels")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    order = np.argsort(-probs, kind="stable")[:k]
    return [(labels[i], float(probs[i])) for i in order]


def softmax(logits: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Numerically stable softmax over the last axis."""
    x: npt.NDArray[np.float64] = np.asarray(logits, dtype=np.float64)
    e: npt.NDArray[np.float64] = np.exp(x - x.max(axis=-1, keepdims=True))
    probs: npt.NDArray[np.float32] = (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    return probs


def _is_distribution(values: npt.NDArray[np.float32], tolerance: float) -> bool:
    return bool(
        np.all(values >= -tolerance)
        and np.all(values <= 1.0 + tolerance)
        and abs(float(values.sum()) - 1.0) <= tolerance * max(1, values.size)
    )


class Classifier:
    """Runs a bundle's model on preprocessed RGB uint8 images (one instance per thread).

    Args:
        bundle: a bundle from :func:`~fieldscope.edge.bundle.verify_bundle` (or
            ``read_bundle``); its model is checked against the manifest again here.
        num_threads: interpreter threads (``None``: the runtime's default).
        k: how many labels :attr:`Prediction.top_k` lists (at most the label count).

    Raises:
        BundleError: the model cannot be loaded, disagrees with the manifest, or fails
            its probe inference.
    """

    def __init__(self, bundle: Bundle, num_threads: int | None = None, *, k: int = 3) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.bundle = bundle
        manifest = bundle.manifest
        self.labels: tuple[str, ...] = manifest.labels
        self.threshold = manifest.threshold
        self.k = min(k, len(self.labels))
        # The bytes the bundle's checksum (and signature) covered, not the path again.
        self._interpreter = make_interpreter(bundle.model_source(), num_threads)
        check_model(manifest, self._interpreter)
        inp = self._interpreter.get_input_details()[0]
        out = self._interpreter.get_output_details()[0]
        height, width, channels = (int(d) for d in inp["shape"][1:4])
        self.input_shape: tuple[int, int, int] = (height, width, channels)
        self._in_index: int = inp["index"]
        self._in_dtype = np.dtype(inp["dtype"])
        self._in_scale, self._in_zero = (float(v) for v in inp["quantization"])
        self._out_index: int = out["index"]
        self._out_scale, self._out_zero = (float(v) for v in out["quantization"])
        # Batch > 1 models are run one image at a time with the others zero.
        self._batch = int(inp["shape"][0])
        self.outputs_are_probabilities = self._probe()

    def _probe(self) -> bool:
        grey = np.full(self.input_shape, 128, dtype=np.uint8)
        try:
            raw = self._run(grey)
        except (RuntimeError, ValueError) as exc:
            raise BundleError(
                f"bundle {self.bundle.path}: the model failed its test inference: {exc}"
            ) from exc
        if not np.all(np.isfinite(raw)):
            raise BundleError(
                f"bundle {self.bundle.path}: the model produced non-finite scores on a test image"
            )
        declared = self.bundle.manifest.output
        if declared is not None:
            return declared == "probabilities"
        tolerance = max(1e-3, self._out_scale)
        is_probs = _is_distribution(raw, tolerance)
        logger.debug(
            "bundle %s outputs %s", self.bundle.path, "probabilities" if is_probs else "logits"
        )
        return is_probs

    def _quantize_input(self, image: npt.NDArray[np.uint8]) -> npt.NDArray[Any]:
        if self._in_dtype == np.float32:
            return image.astype(np.float32)
        info = np.iinfo(self._in_dtype)
        if self._in_scale == 0.0:
            values = image.astype(np.float64)
        else:
            values = np.round(image / self._in_scale + self._in_zero)
        return np.clip(values, info.min, info.max).astype(self._in_dtype)

    def _run(self, image: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        batch = np.zeros((self._batch, *self.input_shape), dtype=self._in_dtype)
        batch[0] = self._quantize_input(image)
        self._interpreter.set_tensor(self._in_index, batch)
        self._interpreter.invoke()
        out: npt.NDArray[Any] = np.asarray(self._interpreter.get_tensor(self._out_index))
        scores: npt.NDArray[np.float32] = out[0].reshape(-1).astype(np.float32)
        if self._out_scale != 0.0:
            scores = (scores - np.float32(self._out_zero)) * np.float32(self._out_scale)
        return scores

    def _check_image(self, image: object) -> npt.NDArray[np.uint8]:
        if not isinstance(image, np.ndarray):
            raise ValueError(f"classify expects a numpy array, got {type(image).__name__}")
        if image.dtype != np.uint8:
            raise ValueError(
                f"classify expects an RGB uint8 image (0-255), got dtype {image.dtype}; "
                "preprocess frames with the bundle's recipe first"
            )
        if image.shape != self.input_shape:
            want = "x".join(str(d) for d in self.input_shape)
            got = "x".join(str(d) for d in image.shape)
            raise ValueError(
                f"classify expects a {want} (height x width x RGB) image, got {got}; "
                "preprocess frames with the bundle's recipe first"
            )
        return image

    def classify(self, image: npt.NDArray[np.uint8]) -> Prediction:
        """Identify one preprocessed image (H x W x 3 RGB uint8, the bundle's input size).

        Raises:
            ValueError: the array is not uint8 of the model's input shape — a frame that
                skipped preprocessing is a bug, not a condition to handle.
        """
        raw = self._run(self._check_image(image))
        probs = raw if self.outputs_are_probabilities else softmax(raw)
        best = top_k(probs, self.labels, self.k)
        score = best[0][1]
        if score >= self.threshold:
            return Prediction(best[0][0], score, best, probs, "ok")
        return Prediction(None, score, best, probs, "uncertain")

    def classify_batch(
        self, images: Sequence[npt.NDArray[np.uint8]] | npt.NDArray[np.uint8]
    ) -> list[Prediction]:
        """Identify several images (a list, or an N x H x W x 3 array).

        One inference per image: edge models are converted for batch 1, where TFLite on
        a Pi is fastest per image anyway.
        """
        return [self.classify(image) for image in images]
