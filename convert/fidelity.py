"""How far the converted model is from the Keras model, measured the way the edge runs it.

The converted model is run by the edge's own :class:`~fieldscope.edge.classify.Classifier`
(same runtime selection, same input quantisation, same output dequantisation), on the
run's test split preprocessed by the edge's own function, and compared with the Keras
model on the very same pixels. Accuracy alone hides what quantisation does: an int8
model can keep the float accuracy while swapping its answer on a few percent of
low-confidence images, so top-1 agreement and the probability difference are
reported too, and all of it goes into the bundle manifest.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fieldscope.convert.errors import ConversionError, FidelityError
from fieldscope.edge.bundle import Bundle
from fieldscope.edge.classify import Classifier, softmax
from fieldscope.edge.runtime import RuntimeInfo, runtime_info

__all__ = [
    "Fidelity",
    "accuracy",
    "check_accuracy_drop",
    "compare",
    "edge_probabilities",
    "keras_probabilities",
    "macro_f1",
]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of exact matches."""
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted mean F1 over the classes present in either array (as scikit-learn and
    ``fieldscope.train`` compute it), with F1 = 0 for a class never predicted correctly."""
    y, p = np.asarray(y_true), np.asarray(y_pred)
    scores = []
    for c in np.union1d(y, p):
        tp = float(np.sum((y == c) & (p == c)))
        predicted, actual = float(np.sum(p == c)), float(np.sum(y == c))
        denominator = predicted + actual
        scores.append(2.0 * tp / denominator if denominator else 0.0)
    return float(np.mean(scores)) if scores else 0.0


@dataclass(frozen=True)
class Fidelity:
    """The converted model against the Keras model on the same test images.

    Accuracies and F1 are fractions in 0..1; :attr:`accuracy_drop_points` is the Keras
    accuracy minus the converted one, in percentage points (negative when the converted
    model happens to do better). ``runtime`` is the interpreter that ran it.
    """

    quantize: str
    n_images: int
    top1_agreement: float
    keras_accuracy: float
    edge_accuracy: float
    keras_macro_f1: float
    edge_macro_f1: float
    max_prob_diff: float
    mean_abs_prob_diff: float
    runtime: str

    @property
    def accuracy_drop_points(self) -> float:
        return 100.0 * (self.keras_accuracy - self.edge_accuracy)

    def to_dict(self) -> dict[str, Any]:
        """The manifest form (``provenance.fidelity``)."""
        return {
            "quantization": self.quantize,
            "test_images": self.n_images,
            "top1_agreement": round(self.top1_agreement, 6),
            "keras_accuracy": round(self.keras_accuracy, 6),
            "edge_accuracy": round(self.edge_accuracy, 6),
            "accuracy_drop_points": round(self.accuracy_drop_points, 4),
            "keras_macro_f1": round(self.keras_macro_f1, 6),
            "edge_macro_f1": round(self.edge_macro_f1, 6),
            "max_prob_diff": round(self.max_prob_diff, 6),
            "mean_abs_prob_diff": round(self.mean_abs_prob_diff, 6),
            "runtime": self.runtime,
        }

    def summary(self) -> str:
        """One line for the terminal."""
        change = 100.0 * (self.edge_accuracy - self.keras_accuracy)
        return (
            f"{self.quantize} on {self.n_images} test images ({self.runtime}): top-1 "
            f"agreement {self.top1_agreement:.3f}, accuracy {self.edge_accuracy:.3f} vs "
            f"Keras {self.keras_accuracy:.3f} ({change:+.1f} points), macro-F1 "
            f"{self.edge_macro_f1:.3f} vs {self.keras_macro_f1:.3f}, max probability "
            f"difference {self.max_prob_diff:.4f}"
        )


def _as_probabilities(values: np.ndarray) -> np.ndarray:
    """Rows that are already distributions stay; logits go through softmax (as the edge)."""
    rows_ok = (
        np.all(values >= -1e-4)
        and np.all(values <= 1 + 1e-4)
        and np.allclose(values.sum(1), 1, atol=1e-3)
    )
    return values if rows_ok else softmax(values).astype(np.float64)


def keras_probabilities(model: Any, images: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
    """Class probabilities of the Keras model for uint8 RGB images (fed as float 0-255)."""
    if len(images) == 0:
        return np.zeros((0, int(model.output_shape[-1])))
    out = model.predict(images.astype(np.float32), batch_size=batch_size, verbose=0)
    return _as_probabilities(np.asarray(out, dtype=np.float64))


def edge_probabilities(
    bundle: Bundle,
    images: np.ndarray,
    *,
    num_threads: int | None = None,
    on_progress: ProgressCallback | None = None,
) -> tuple[np.ndarray, RuntimeInfo]:
    """Class probabilities from the edge classifier, and the runtime that produced them."""

    classifier = Classifier(bundle, num_threads)
    rows = []
    for i, image in enumerate(images, 1):
        rows.append(classifier.classify(image).probabilities.astype(np.float64))
        if on_progress is not None:
            on_progress(i, len(images))
    probs = np.stack(rows) if rows else np.zeros((0, len(classifier.labels)))
    return probs, runtime_info()


def compare(
    keras_probs: np.ndarray,
    edge_probs: np.ndarray,
    y_true: Sequence[int] | np.ndarray,
    *,
    quantize: str,
    runtime: str,
) -> Fidelity:
    """Fidelity figures from the two models' probabilities on the same labelled images.

    Raises:
        ConversionError: the arrays do not line up, or there are no images.
    """
    k, e, y = np.asarray(keras_probs), np.asarray(edge_probs), np.asarray(y_true).reshape(-1)
    if k.shape != e.shape or k.ndim != 2 or k.shape[0] != y.size:
        raise ConversionError(
            f"cannot compare predictions of shapes {k.shape} and {e.shape} for {y.size} labels"
        )
    if y.size == 0:
        raise ConversionError("the fidelity check needs at least one test image; none were given")
    k_pred, e_pred = k.argmax(1), e.argmax(1)
    diff = np.abs(k - e)
    return Fidelity(
        quantize=quantize,
        n_images=int(y.size),
        top1_agreement=accuracy(k_pred, e_pred),
        keras_accuracy=accuracy(y, k_pred),
        edge_accuracy=accuracy(y, e_pred),
        keras_macro_f1=macro_f1(y, k_pred),
        edge_macro_f1=macro_f1(y, e_pred),
        max_prob_diff=float(diff.max()),
        mean_abs_prob_diff=float(diff.mean()),
        runtime=runtime,
    )


def check_accuracy_drop(fidelity: Fidelity, max_drop_points: float) -> None:
    """Refuse a converted model whose accuracy fell more than ``max_drop_points``.

    Raises:
        FidelityError: showing both accuracies, the agreement, and what to try instead.
    """
    drop = fidelity.accuracy_drop_points
    if drop <= max_drop_points + 1e-9:
        return
    hint = (
        "try --quantize float16 (float accuracy at half the size)"
        if fidelity.quantize in ("int8", "dynamic")
        else "check the model and the test split"
    )
    raise FidelityError(
        f"refusing to write the bundle: the {fidelity.quantize} model's accuracy on "
        f"{fidelity.n_images} test images is {fidelity.edge_accuracy:.3f} against "
        f"{fidelity.keras_accuracy:.3f} for the Keras model, a drop of {drop:.1f} points "
        f"(limit {max_drop_points:g}; top-1 agreement {fidelity.top1_agreement:.3f}); "
        f"{hint}, or allow a larger drop with --max-accuracy-drop"
    )


# An x86_64 Python with tflite-runtime 2.14 and numpy<2 (what older Pi images run), for
# the optional second-runtime agreement; unset, the check is skipped.
TFLITE_RUNTIME_214_ENV = "FIELDSCOPE_TFLITE_RUNTIME_214_PYTHON"

_TFLITE_214_SCRIPT = """
import json, sys, numpy as np
from tflite_runtime import __version__ as version
from tflite_runtime.interpreter import Interpreter
images = np.load(sys.argv[2])
it = Interpreter(model_path=sys.argv[1], num_threads=1)
it.allocate_tensors()
i, o = it.get_input_details()[0], it.get_output_details()[0]
rows = []
for image in images:
    it.set_tensor(i["index"], image[None].astype(i["dtype"]))
    it.invoke()
    rows.append(it.get_tensor(o["index"])[0].astype(float).tolist())
scale, zero = o["quantization"]
print(json.dumps({"version": version, "rows": rows, "scale": scale, "zero": zero}))
"""


def second_runtime_agreement(
    model_path: Path,
    images: np.ndarray,
    reference: np.ndarray,
    output: str | None,
    *,
    python: str | None = None,
    timeout: float = 600.0,
) -> dict[str, Any] | None:
    """The model under tflite-runtime 2.14 (another venv) against ``reference`` (LiteRT).

    Older Raspberry Pi images run tflite-runtime 2.14, whose int8 kernels are not
    LiteRT's: a bundle's fidelity says how often they agree on the test images. Returns
    ``None`` when ``$FIELDSCOPE_TFLITE_RUNTIME_214_PYTHON`` (or ``python``) is unset,
    else ``{"runtime", "top1_agreement", "max_prob_diff", "images"}``, or
    ``{"runtime", "error"}`` when that runtime cannot run the model (recorded, since the
    operator check already decides whether 2.14 is supported).
    """
    python = python or os.environ.get(TFLITE_RUNTIME_214_ENV)
    if not python:
        return None
    with tempfile.TemporaryDirectory(prefix="fieldscope-tflite214-") as tmp:
        batch = Path(tmp) / "images.npy"
        np.save(batch, images)
        try:
            done = subprocess.run(
                [python, "-c", _TFLITE_214_SCRIPT, str(model_path), str(batch)],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return {"runtime": "tflite_runtime 2.14", "error": f"could not run {python}: {exc}"}
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return {"runtime": "tflite_runtime 2.14", "error": reason[-300:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    values = np.asarray(result["rows"], dtype=np.float64)
    if result["scale"]:
        values = (values - result["zero"]) * result["scale"]
    probs = softmax(values).astype(np.float64) if output == "logits" else values
    ref = np.asarray(reference, dtype=np.float64)
    return {
        "runtime": f"tflite_runtime {result['version']}",
        "images": len(ref),
        "top1_agreement": round(float((probs.argmax(1) == ref.argmax(1)).mean()), 6),
        "max_prob_diff": round(float(np.abs(probs - ref).max()), 6),
    }
