"""The conversion core: a Keras model and labelled images in, a checked bundle out.

Nothing here knows what a training run looks like (that is :mod:`fieldscope.convert.run`):
:func:`convert_model` takes the model, its labels and preprocessing recipe, and images
already preprocessed by the edge's own function, and returns a :class:`ConversionResult`
only when the converted model is safe to ship:

1. export a SavedModel and convert it (:mod:`~fieldscope.convert.quantize`); a model
   that ends in a softmax Dense layer is exported without the softmax (``logits``,
   recorded as the manifest's ``output``), so an int8 model quantises logits with their
   own scale and the edge classifier applies softmax in float: uint8 probabilities in
   steps of 1/256 tie close classes, which costs accuracy on sets of many classes;
2. read the flatbuffer's operators: no Flex/custom ops, and by default nothing that
   tflite-runtime 2.14 cannot run (:mod:`~fieldscope.convert.opcheck`);
3. write a throw-away bundle and run it with the edge :class:`Classifier` on the test
   images, against the Keras model (:mod:`~fieldscope.convert.fidelity`); refuse when the
   accuracy drops too far.

:func:`write_converted_bundle` then writes the real bundle (fidelity, operators and
``min_runtime`` in its manifest), signs it if asked, verifies it with this machine's
runtime, and only then moves it into place, so the output folder never holds a
half-written, unsigned or unverified bundle.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fieldscope.convert.errors import ConversionError
from fieldscope.convert.fidelity import (
    Fidelity,
    check_accuracy_drop,
    compare,
    edge_probabilities,
    keras_probabilities,
    second_runtime_agreement,
)
from fieldscope.convert.float_layers import (
    Checked,
    Progress,
    layer_name,
    note,
    search_float_prefix,
)
from fieldscope.convert.keys import check_private_key
from fieldscope.convert.opcheck import OpReport, check_edge_compatible, min_runtime, read_operators
from fieldscope.convert.quantize import (
    QUANTIZE_MODES,
    convert_saved_model,
    export_saved_model,
)
from fieldscope.edge.bundle import (
    Bundle,
    Provenance,
    Segmentation,
    Taxon,
    read_bundle,
    sign_bundle,
    verify_bundle,
    write_bundle,
)
from fieldscope.edge.bundle_files import swap_into_place
from fieldscope.edge.errors import BundleError
from fieldscope.edge.preprocess import PreprocessRecipe

__all__ = [
    "DEFAULT_MAX_ACCURACY_DROP",
    "ConversionResult",
    "check_output_dir",
    "convert_model",
    "logits_model",
    "write_converted_bundle",
]

log = logging.getLogger(__name__)

# Percentage points of test accuracy the converted model may lose against Keras.
DEFAULT_MAX_ACCURACY_DROP = 1.0


@dataclass(frozen=True)
class ConversionResult:
    """A converted model that passed the operator and fidelity checks."""

    model: bytes
    quantize: str
    labels: tuple[str, ...]
    recipe: PreprocessRecipe
    fidelity: Fidelity
    operators: OpReport
    min_runtime: Mapping[str, str]
    calibration_images: int
    max_accuracy_drop: float
    converter: str
    output: str | None = None
    # Layers (their output tensors) kept in float because int8 strayed too far, out of
    # ``layer_count`` (0: none was kept in float, nothing counted).
    float_layers: tuple[str, ...] = ()
    layer_count: int = 0
    # tflite-runtime 2.14 against LiteRT on the test images (None: not measured).
    second_runtime: Mapping[str, Any] | None = None

    def provenance_fidelity(self) -> dict[str, Any]:
        """What goes into the manifest's ``provenance.fidelity``."""
        return {
            **self.fidelity.to_dict(),
            "max_accuracy_drop_points": self.max_accuracy_drop,
            "calibration_images": self.calibration_images,
            "output": self.output,
            "float_layers": [layer_name(t) for t in self.float_layers],
            "float_layer_share": (
                round(len(self.float_layers) / self.layer_count, 4) if self.layer_count else 0.0
            ),
            "converter": self.converter,
            "operators": self.operators.to_dict()["builtin"],
            **(
                {}
                if self.second_runtime is None
                else {"tflite_runtime_2_14": dict(self.second_runtime)}
            ),
        }


# Why a full-int8 bundle leaves tflite_runtime out of its min_runtime (recorded in
# provenance.fidelity.tflite_runtime_2_14.refused; the edge shows it when refusing).
INT8_NEEDS_LITERT = (
    "full-int8 bundles need LiteRT: tflite-runtime 2.14's int8 kernels round "
    "differently on aarch64 than on x86_64 (on a 24-class plankton bundle every output "
    "moved by one quantisation step and 3 of 48 images changed their top-1 on an "
    "emulated Pi 4), so a station would not give the answers this conversion checked"
)


def logits_model(keras_model: Any) -> tuple[Any, str | None]:
    """``keras_model`` without its final softmax, and what the returned model outputs.

    A model whose last layer is a Dense layer with a softmax activation (every
    ``fieldscope train`` model) is rebuilt with a linear copy of that layer, sharing the
    input and every other layer: ``("logits")``. Any other model is returned as it is,
    with ``None``: the edge classifier then detects what it outputs.
    """
    import keras

    last = keras_model.layers[-1]
    if not isinstance(last, keras.layers.Dense) or last.activation is not keras.activations.softmax:
        return keras_model, None
    config = last.get_config()
    config.update(activation="linear", name=f"{last.name}_logits")
    linear = keras.layers.Dense.from_config(config)
    outputs = linear(last.input)
    linear.set_weights(last.get_weights())
    return keras.Model(keras_model.inputs, outputs, name=f"{keras_model.name}_logits"), "logits"


def _check_images(name: str, images: np.ndarray, recipe: PreprocessRecipe) -> np.ndarray:
    array = np.asarray(images)
    want = (*recipe.size, 3)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != want:
        raise ConversionError(
            f"{name} must be N x {want[0]} x {want[1]} x 3 uint8 images preprocessed with "
            f"the recipe, got {array.dtype} {'x'.join(str(d) for d in array.shape)}"
        )
    return array


def _check_inputs(
    keras_model: Any,
    labels: Sequence[str],
    recipe: PreprocessRecipe,
    eval_images: np.ndarray,
    eval_labels: Sequence[int] | np.ndarray,
) -> np.ndarray:
    outputs = int(keras_model.output_shape[-1])
    if outputs != len(labels):
        raise ConversionError(
            f"the model outputs {outputs} scores but {len(labels)} labels were given"
        )
    model_hw = tuple(keras_model.input_shape[1:3])
    if model_hw != tuple(recipe.size):
        raise ConversionError(
            f"the model takes {model_hw[0]}x{model_hw[1]} images but the preprocessing "
            f"recipe makes {recipe.size[0]}x{recipe.size[1]}"
        )
    y = np.asarray(eval_labels).reshape(-1)
    if y.size != len(eval_images):
        raise ConversionError(f"{len(eval_images)} test images but {y.size} test labels")
    if y.size == 0:
        raise ConversionError(
            "the fidelity check needs test images and there are none; a bundle is never "
            "written without comparing it with the Keras model"
        )
    if y.min() < 0 or y.max() >= len(labels):
        raise ConversionError(f"test labels must be class indices 0..{len(labels) - 1}")
    return y


def convert_model(
    keras_model: Any,
    *,
    labels: Sequence[str],
    recipe: PreprocessRecipe,
    calibration_images: np.ndarray | None,
    eval_images: np.ndarray,
    eval_labels: Sequence[int] | np.ndarray,
    quantize: str = "int8",
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
    allow_newer_runtime: bool = False,
    float_fallback: bool = True,
    progress: Progress | None = None,
) -> ConversionResult:
    """Convert, check the operators, check fidelity on the test images; see the module doc.

    With ``float_fallback``, an int8 model whose top-1 agreement with Keras is below
    ``INT8_AGREEMENT_TARGET`` (or whose accuracy drop exceeds the limit) is quantised
    again with a growing share of its first layers in float
    (:mod:`~fieldscope.convert.float_layers`),
    and the first candidate that holds (else the best) is kept.

    ``calibration_images`` (a stratified sample of the training split) and
    ``eval_images`` (the test split) are RGB uint8 at ``recipe.size``, preprocessed by
    :func:`fieldscope.edge.preprocess.load_and_preprocess`; ``eval_labels`` are class
    indices into ``labels``. ``max_accuracy_drop`` is in percentage points.

    Raises:
        ConversionError: bad inputs, or the converter cannot express the model.
        UnsupportedOpsError: Flex/custom ops, or ops tflite-runtime 2.14 lacks (unless
            ``allow_newer_runtime``).
        FidelityError: the accuracy drop exceeds ``max_accuracy_drop``.
    """
    y, eval_images, calibration = _checked_inputs(
        keras_model,
        labels=labels,
        recipe=recipe,
        quantize=quantize,
        max_accuracy_drop=max_accuracy_drop,
        calibration_images=calibration_images,
        eval_images=eval_images,
        eval_labels=eval_labels,
    )
    with tempfile.TemporaryDirectory(prefix="fieldscope-convert-") as tmp:
        work = _Work(Path(tmp), keras_model, labels, recipe, quantize, eval_images, y, progress)
        work.allow_newer_runtime = allow_newer_runtime
        best, second = _convert_with_fallback(work, calibration, float_fallback, max_accuracy_drop)
    check_accuracy_drop(best.fidelity, max_accuracy_drop)
    return _result(work, best, second, calibration, max_accuracy_drop)


def _convert_with_fallback(
    work: _Work, calibration: np.ndarray | None, float_fallback: bool, max_accuracy_drop: float
) -> tuple[Checked, dict[str, Any] | None]:
    """The best candidate (int8, or int8 with float layers) and the second runtime's check."""
    saved, best = _convert_and_check(work, calibration)
    if float_fallback and calibration is not None:
        best = search_float_prefix(
            best,
            saved,
            calibration,
            work.fidelity_of,
            max_accuracy_drop=max_accuracy_drop,
            allow_newer_runtime=work.allow_newer_runtime,
            progress=work.progress,
        )
    second = second_runtime_agreement(
        best.staged.model_path, work.eval_images, best.edge_probs, work.output
    )
    if second is not None:
        note(work.progress, f"tflite-runtime 2.14 against {best.runtime.name}: {second}")
    return best, second


def _result(
    work: _Work,
    best: Checked,
    second: dict[str, Any] | None,
    calibration: np.ndarray | None,
    max_accuracy_drop: float,
) -> ConversionResult:
    """The conversion's outcome, with the runtimes that can run the chosen model."""
    import tensorflow as tf

    runtime = best.runtime
    litert = runtime.version if runtime.name == "ai_edge_litert" else None
    runtimes = min_runtime(best.operators, litert_version=litert, tensorflow_version=tf.__version__)
    if work.quantize == "int8" and runtimes.pop("tflite_runtime", None) is not None:
        second = {**(second or {"runtime": "tflite_runtime 2.14"}), "refused": INT8_NEEDS_LITERT}
        note(work.progress, "min_runtime leaves tflite_runtime out: " + INT8_NEEDS_LITERT)
    return ConversionResult(
        model=best.model,
        quantize=work.quantize,
        labels=tuple(work.labels),
        recipe=work.recipe,
        fidelity=best.fidelity,
        operators=best.operators,
        min_runtime=runtimes,
        calibration_images=0 if calibration is None else len(calibration),
        max_accuracy_drop=float(max_accuracy_drop),
        converter=f"tensorflow {tf.__version__}",
        output=work.output,
        float_layers=best.float_layers,
        layer_count=best.layer_count,
        second_runtime=second,
    )


def _checked_inputs(
    keras_model: Any,
    *,
    labels: Sequence[str],
    recipe: PreprocessRecipe,
    quantize: str,
    max_accuracy_drop: float,
    calibration_images: np.ndarray | None,
    eval_images: np.ndarray,
    eval_labels: Sequence[int] | np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Labels, test images and calibration images, checked before any slow work."""
    if quantize not in QUANTIZE_MODES:
        raise ConversionError(
            f"unknown quantisation mode {quantize!r} (choose one of {', '.join(QUANTIZE_MODES)})"
        )
    if not max_accuracy_drop >= 0:
        raise ConversionError(f"max_accuracy_drop must be >= 0 points, got {max_accuracy_drop!r}")
    y = _check_inputs(keras_model, labels, recipe, eval_images, eval_labels)
    eval_images = _check_images("test images", eval_images, recipe)
    calibration = None
    if quantize == "int8":
        if calibration_images is None or len(calibration_images) == 0:
            raise ConversionError("int8 quantisation needs calibration images; none were given")
        calibration = _check_images("calibration images", calibration_images, recipe)
    return y, eval_images, calibration


@dataclass
class _Work:
    """One conversion's scratch folder and what every candidate model is checked against."""

    folder: Path
    keras_model: Any
    labels: Sequence[str]
    recipe: PreprocessRecipe
    quantize: str
    eval_images: np.ndarray
    y: np.ndarray
    progress: Progress | None
    output: str | None = None
    keras_probs: np.ndarray | None = None
    allow_newer_runtime: bool = False

    def fidelity_of(self, candidate: bytes, name: str) -> Checked:
        """Stage ``candidate`` as a bundle and compare the edge's answers with Keras's."""
        assert self.keras_probs is not None
        staged = write_bundle(
            self.folder / name,
            candidate,
            model_name="fidelity-check",
            model_version="0",
            labels=self.labels,
            preprocessing=self.recipe,
            output=self.output,
        )
        edge_probs, used = edge_probabilities(staged, self.eval_images)
        result = compare(
            self.keras_probs,
            edge_probs,
            self.y,
            quantize=self.quantize,
            runtime=f"{used.name} {used.version}",
        )
        return Checked(candidate, read_operators(candidate), result, used, staged, edge_probs)


def _convert_and_check(work: _Work, calibration: np.ndarray | None) -> tuple[Path, Checked]:
    """Export, convert, check the operators and the fidelity; the SavedModel and result."""
    note(work.progress, "exporting the Keras model as a SavedModel")
    exported, work.output = logits_model(work.keras_model)
    saved = export_saved_model(exported, work.folder / "saved_model")
    what = (
        f" (calibrating on {len(calibration)} training images)" if calibration is not None else ""
    )
    note(work.progress, f"converting to TFLite {work.quantize}{what}")
    model = convert_saved_model(saved, work.quantize, calibration)
    operators = read_operators(model)
    check_edge_compatible(operators, require_tflite_runtime=not work.allow_newer_runtime)
    note(work.progress, f"checking fidelity on {len(work.eval_images)} test images")
    work.keras_probs = keras_probabilities(work.keras_model, work.eval_images)
    best = work.fidelity_of(model, "fidelity-check")
    note(work.progress, best.fidelity.summary())
    return saved, best


def check_output_dir(out_dir: Path, *, overwrite: bool = False) -> None:
    """Fail before any work when the bundle could not be written to ``out_dir``.

    Raises:
        BundleError: it exists and is a file, or a non-empty folder (without ``overwrite``).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BundleError(f"cannot write the bundle to {out}: it exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise BundleError(
            f"cannot write the bundle to {out}: the folder is not empty (choose a new "
            "--out, or --overwrite to replace it)"
        )


def write_converted_bundle(
    result: ConversionResult,
    out_dir: Path,
    *,
    model_name: str,
    model_version: str,
    threshold: float,
    source_run: str | None = None,
    training_metrics: Mapping[str, Any] | None = None,
    segmentation: Segmentation | None = None,
    taxa: Sequence[Taxon] | None = None,
    sign_key: Path | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Write, sign (with ``sign_key``), verify, then move the bundle into ``out_dir``.

    Raises:
        BundleError: ``out_dir`` is not usable, the key cannot sign, or the written
            bundle does not verify on this machine.
    """
    out = Path(out_dir)
    check_output_dir(out, overwrite=overwrite)
    if sign_key is not None:
        check_private_key(sign_key)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.convert-", dir=out.parent))
    try:
        staged = staging / "bundle"
        _stage(
            staged,
            result,
            model_name=model_name,
            model_version=model_version,
            threshold=threshold,
            source_run=source_run,
            training_metrics=training_metrics,
            segmentation=segmentation,
            taxa=taxa,
        )
        if sign_key is not None:
            sign_bundle(staged, sign_key)
        verify_bundle(staged)
        _move_into_place(staged, out)
    except OSError as exc:
        raise BundleError(f"cannot write the bundle to {out}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote bundle %s", out)
    return read_bundle(out)


def _stage(
    staged: Path,
    result: ConversionResult,
    *,
    model_name: str,
    model_version: str,
    threshold: float,
    source_run: str | None,
    training_metrics: Mapping[str, Any] | None,
    segmentation: Segmentation | None = None,
    taxa: Sequence[Taxon] | None = None,
) -> None:
    """Write the bundle into the staging folder, with the run and fidelity it came from."""
    write_bundle(
        staged,
        result.model,
        model_name=model_name,
        model_version=model_version,
        labels=result.labels,
        preprocessing=result.recipe,
        threshold=threshold,
        provenance=Provenance(
            source_run=source_run,
            training_metrics=dict(training_metrics or {}),
            fidelity=result.provenance_fidelity(),
        ),
        min_runtime=result.min_runtime,
        output=result.output,
        segmentation=segmentation,
        taxa=taxa,
    )


def _move_into_place(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``, replacing an old bundle there (see
    :func:`~fieldscope.edge.bundle_files.swap_into_place`); an empty folder the user
    made for the bundle is simply taken."""
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    swap_into_place(new, target)
