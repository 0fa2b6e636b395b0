"""The conversion core: four quantisation modes, fidelity, operator checks, calibration.

The model is a small inverted-residual CNN (MobileNetV2's op set: 1x1 and depthwise
convolutions, folded BatchNorm, ReLU6, residual adds, global pooling, dense softmax)
trained for a few seconds on the synthetic specimens until it clearly beats chance:
a MobileNetV2 from scratch stays at chance for minutes on two cores, and a model at
chance has near-uniform outputs, on which agreement between float and int8 says
nothing. The real MobileNetV2 path is exercised end to end in test_convert_cli.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fieldscope.convert.errors import ConversionError, FidelityError, UnsupportedOpsError
from fieldscope.convert.fidelity import (
    Fidelity,
    check_accuracy_drop,
    compare,
    macro_f1,
    second_runtime_agreement,
)
from fieldscope.convert.opcheck import (
    TFLITE_RUNTIME_2_14,
    check_edge_compatible,
    min_runtime,
    read_operators,
)
from fieldscope.convert.pipeline import ConversionResult, convert_model, write_converted_bundle
from fieldscope.convert.quantize import (
    QUANTIZE_MODES,
    convert_saved_model,
    export_saved_model,
    stratified_sample,
)
from fieldscope.edge.bundle import verify_bundle
from fieldscope.edge.classify import Classifier, softmax
from fieldscope.edge.preprocess import PreprocessRecipe, load_and_preprocess
from fieldscope.edge.specimens import write_dataset
from fieldscope.train.backbones import fit_mini_mobilenet

SIZE = 48
TFLITE_214_ENV = "FIELDSCOPE_TFLITE_RUNTIME_214_PYTHON"


@dataclass(frozen=True)
class Trained:
    model: Any
    labels: tuple[str, ...]
    recipe: PreprocessRecipe
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A model trained on 4 synthetic species (about 20 s on two cores)."""

    root = tmp_path_factory.mktemp("specimens")
    write_dataset(root, classes=4, per_class=40, size=96, seed=3)
    recipe = PreprocessRecipe(size=(SIZE, SIZE), resize="letterbox")
    labels = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    train_x, train_y, test_x, test_y = [], [], [], []
    for index, label in enumerate(labels):
        for i, path in enumerate(sorted((root / label).glob("*.png"))):
            image = load_and_preprocess(path, recipe)
            (test_x if i % 10 < 3 else train_x).append(image)
            (test_y if i % 10 < 3 else train_y).append(index)
    x, y = np.stack(train_x), np.asarray(train_y)
    model = fit_mini_mobilenet(x, y, len(labels))
    return Trained(model, labels, recipe, x, y, np.stack(test_x), np.asarray(test_y))


@pytest.fixture(scope="module")
def conversions() -> dict[str, ConversionResult]:
    """Conversions made so far in this module, by mode (each costs a few seconds)."""
    return {}


def _converted(
    conversions: dict[str, ConversionResult], trained: Trained, mode: str
) -> ConversionResult:
    if mode not in conversions:
        picked = stratified_sample(trained.train_y, 64, seed=0)
        conversions[mode] = convert_model(
            trained.model,
            labels=trained.labels,
            recipe=trained.recipe,
            calibration_images=trained.train_x[picked],
            eval_images=trained.test_x,
            eval_labels=trained.test_y,
            quantize=mode,
            max_accuracy_drop=100.0,  # this test checks agreement itself, more strictly
            # Each mode as it is; the float-layer search has its own test below.
            float_fallback=False,
        )
    return conversions[mode]


# Lower bounds of top-1 agreement and upper bounds of the probability difference with
# Keras, per mode, on 48 test images.
AGREEMENT = {"float32": 1.0, "float16": 0.97, "dynamic": 0.9, "int8": 0.9}
MAX_DIFF = {"float32": 1e-4, "float16": 0.02, "dynamic": 0.2, "int8": 0.2}


@pytest.mark.slow
def test_the_fixture_model_learned_something(trained: Trained) -> None:
    probs = trained.model.predict(trained.test_x.astype(np.float32), verbose=0)
    assert (probs.argmax(1) == trained.test_y).mean() >= 0.5  # chance is 0.25


@pytest.mark.slow
@pytest.mark.parametrize("mode", QUANTIZE_MODES)
def test_each_mode_runs_on_the_edge_and_agrees_with_keras(
    mode: str, trained: Trained, conversions: dict[str, ConversionResult], tmp_path: Path
) -> None:
    result = _converted(conversions, trained, mode)
    bundle = write_converted_bundle(
        result, tmp_path / mode, model_name="specimens", model_version="1", threshold=0.5
    )
    verified = verify_bundle(bundle.path)

    # Run it the way a field station does, independently of the fidelity figures.
    classifier = Classifier(verified)
    edge = np.stack([classifier.classify(image).probabilities for image in trained.test_x])
    keras_probs = trained.model.predict(trained.test_x.astype(np.float32), verbose=0)
    agreement = float((edge.argmax(1) == keras_probs.argmax(1)).mean())
    assert agreement >= AGREEMENT[mode]
    assert float(np.abs(edge - keras_probs).max()) <= MAX_DIFF[mode]
    assert result.fidelity.top1_agreement == pytest.approx(agreement)
    assert result.fidelity.runtime.startswith("ai_edge_litert ")

    m = verified.manifest
    fidelity = m.provenance.fidelity
    assert fidelity["quantization"] == mode
    assert fidelity["test_images"] == len(trained.test_y)
    assert fidelity["top1_agreement"] == pytest.approx(agreement, abs=1e-6)
    assert {"keras_accuracy", "edge_accuracy", "keras_macro_f1", "edge_macro_f1"} <= set(fidelity)
    assert fidelity["max_prob_diff"] == pytest.approx(result.fidelity.max_prob_diff, abs=1e-6)
    if mode == "int8":  # tflite-runtime 2.14's int8 kernels round differently on ARM
        assert m.min_runtime == {"ai_edge_litert": "1.2", "tensorflow": "2.14"}
        assert "aarch64" in fidelity["tflite_runtime_2_14"]["refused"]
    else:
        assert m.min_runtime == {
            "ai_edge_litert": "1.2",
            "tensorflow": "2.14",
            "tflite_runtime": "2.14",
        }
    assert not result.operators.per_channel_dense
    assert result.operators.tflite_runtime_2_14_problems() == []
    if mode == "int8":
        assert (m.input_dtype, m.output_dtype) == ("uint8", "uint8")
        assert m.quantization is not None
        assert m.quantization.input is not None
        # Normalisation is in the graph, so the model takes the edge's pixels as they are.
        assert (m.quantization.input.scale, m.quantization.input.zero_point) == (1.0, 0)
        assert fidelity["calibration_images"] == 64
    else:
        assert (m.input_dtype, m.output_dtype) == ("float32", "float32")
        assert m.quantization is None


def test_int8_that_falls_short_keeps_its_first_layers_in_float(
    trained: Trained, conversions: dict[str, ConversionResult], tmp_path: Path
) -> None:
    """The default conversion: where full int8 disagrees with Keras, a bundle with its
    first layers in float (float input) that agrees better; the edge runs it and gets
    the figures the manifest records."""
    full = _converted(conversions, trained, "int8")
    picked = stratified_sample(trained.train_y, 64, seed=0)
    result = convert_model(
        trained.model, labels=trained.labels, recipe=trained.recipe,
        calibration_images=trained.train_x[picked], eval_images=trained.test_x,
        eval_labels=trained.test_y, quantize="int8", max_accuracy_drop=100.0,
    )  # fmt: skip
    if full.fidelity.top1_agreement >= 0.98 and full.fidelity.accuracy_drop_points <= 0.5:
        pytest.skip("full int8 already holds on this fixture: nothing to fall back from")
    assert result.float_layers, "int8 fell short, so some layers must be in float"
    assert result.fidelity.top1_agreement >= full.fidelity.top1_agreement
    bundle = verify_bundle(
        write_converted_bundle(
            result, tmp_path / "mixed", model_name="specimens", model_version="1",
            threshold=0.5,
        ).path
    )  # fmt: skip
    m = bundle.manifest
    assert (m.input_dtype, m.output_dtype) == ("float32", "float32")
    fidelity = m.provenance.fidelity
    assert fidelity["quantization"] == "int8"
    assert 0 < fidelity["float_layer_share"] <= 0.75
    assert fidelity["float_layers"][0].startswith("rescaling")  # the in-graph normalisation
    classifier = Classifier(bundle)
    edge = np.stack([classifier.classify(image).probabilities for image in trained.test_x])
    keras_probs = trained.model.predict(trained.test_x.astype(np.float32), verbose=0)
    agreement = float((edge.argmax(1) == keras_probs.argmax(1)).mean())
    assert fidelity["top1_agreement"] == pytest.approx(agreement, abs=1e-6)


@pytest.mark.slow
def test_overwrite_replaces_the_bundle_whole_and_leaves_nothing_beside_it(
    trained: Trained, conversions: dict[str, ConversionResult], tmp_path: Path
) -> None:
    """An empty folder made for the bundle is taken; --overwrite swaps a new bundle in
    for the old one, and neither the staging nor the old bundle stays behind."""
    result = _converted(conversions, trained, "float32")
    out = tmp_path / "bundles" / "current"
    out.mkdir(parents=True)
    for version in ("1", "2"):
        write_converted_bundle(
            result, out, model_name="specimens", model_version=version, threshold=0.5,
            overwrite=True,
        )  # fmt: skip
        assert verify_bundle(out).manifest.model_version == version
    assert [p.name for p in out.parent.iterdir()] == ["current"]


@pytest.mark.slow
def test_quantisation_makes_smaller_bundles(
    trained: Trained, conversions: dict[str, ConversionResult]
) -> None:
    size = {mode: len(_converted(conversions, trained, mode).model) for mode in QUANTIZE_MODES}
    assert size["int8"] < size["float16"] < size["float32"]
    assert size["dynamic"] < size["float16"]


@pytest.mark.slow
def test_calibrating_on_unrepresentative_images_is_refused(trained: Trained) -> None:
    # Black frames (a capped lens) as calibration: the activation ranges are wrong for
    # real specimens, which is exactly what the fidelity check is there to catch.
    black = np.zeros((16, SIZE, SIZE, 3), np.uint8)
    with pytest.raises(FidelityError) as info:
        convert_model(
            trained.model,
            labels=trained.labels,
            recipe=trained.recipe,
            calibration_images=black,
            eval_images=trained.test_x,
            eval_labels=trained.test_y,
        )
    message = str(info.value)
    assert "refusing to write the bundle" in message
    assert "for the Keras model" in message
    assert "--quantize float16" in message
    assert "\n" not in message


@pytest.mark.slow
def test_tflite_runtime_2_14_gives_the_same_answers(
    trained: Trained, conversions: dict[str, ConversionResult], tmp_path: Path
) -> None:
    """Each bundle under tflite-runtime 2.14 + numpy<2 (a separate venv) vs ai-edge-litert.

    Installing that venv needs the network, which tests may not use; point
    FIELDSCOPE_TFLITE_RUNTIME_214_PYTHON at its python (``python -m venv V &&
    V/bin/pip install tflite-runtime==2.14.0 'numpy<2'``) to run this.
    """
    python = os.environ.get(TFLITE_214_ENV)
    if not python:
        pytest.skip(f"set {TFLITE_214_ENV} to a python with tflite-runtime 2.14 and numpy<2")
    from ai_edge_litert.interpreter import Interpreter

    for mode in QUANTIZE_MODES:
        path = tmp_path / f"{mode}.tflite"
        path.write_bytes(_converted(conversions, trained, mode).model)
        it = Interpreter(model_path=str(path), num_threads=1)
        it.allocate_tensors()
        i, o = it.get_input_details()[0], it.get_output_details()[0]
        scale = o["quantization"][0] or 1.0
        rows = []
        for image in trained.test_x:
            it.set_tensor(i["index"], image[None].astype(i["dtype"]))
            it.invoke()
            rows.append(it.get_tensor(o["index"])[0].astype(float))
        # The bundles output logits (softmax runs on the edge): compare probabilities,
        # as the fidelity check of a conversion does (second_runtime_agreement).
        reference = softmax(np.stack(rows) * scale)
        got = second_runtime_agreement(path, trained.test_x, reference, "logits", python=python)
        assert got is not None
        assert "error" not in got, got
        # Float kernels agree to rounding. The quantised kernels of the two runtimes
        # (XNNPACK in LiteRT) round differently: the same answers, with probabilities
        # apart by up to 0.055 (int8) and 0.022 (dynamic) as measured here.
        quantised = mode in ("int8", "dynamic")
        assert got["top1_agreement"] >= (0.95 if quantised else 1.0), (mode, got)
        assert got["max_prob_diff"] <= (0.1 if quantised else 1e-5), (mode, got)


# --- calibration sample ------------------------------------------------------------------


def test_stratified_sample_keeps_every_class_in_proportion() -> None:
    labels = np.array([0] * 100 + [1] * 50 + [2] * 3)
    picked = stratified_sample(labels, 30, seed=1)
    counts = np.bincount(labels[picked], minlength=3)
    assert len(picked) == 30 == len(set(picked.tolist()))
    assert counts[2] >= 1  # the rare class is never left out
    assert abs(counts[0] - 2 * counts[1]) <= 2
    assert np.array_equal(picked, stratified_sample(labels, 30, seed=1))
    assert not np.array_equal(picked, stratified_sample(labels, 30, seed=2))
    assert np.array_equal(stratified_sample(labels, 500), np.arange(len(labels)))


def test_stratified_sample_with_more_classes_than_images() -> None:
    picked = stratified_sample(np.arange(10), 4)
    assert len(picked) == 4
    with pytest.raises(ConversionError, match="at least 1 image"):
        stratified_sample(np.arange(10), 0)


# --- fidelity figures --------------------------------------------------------------------


def test_macro_f1_matches_scikit_learn() -> None:
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        y, p = rng.integers(0, 5, 40), rng.integers(0, 4, 40)
        assert macro_f1(y, p) == pytest.approx(f1_score(y, p, average="macro", zero_division=0))


def test_compare_reports_agreement_accuracy_and_probability_difference() -> None:
    keras_probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3]])
    edge_probs = np.array([[0.8, 0.2], [0.55, 0.45], [0.2, 0.8], [0.7, 0.3]])
    f = compare(keras_probs, edge_probs, [0, 1, 1, 1], quantize="int8", runtime="x 1")
    assert f.top1_agreement == 0.75
    assert (f.keras_accuracy, f.edge_accuracy) == (0.75, 0.5)
    assert f.accuracy_drop_points == pytest.approx(25.0)
    assert f.max_prob_diff == pytest.approx(0.15)
    with pytest.raises(ConversionError, match="cannot compare"):
        compare(keras_probs, edge_probs[:2], [0, 1, 1, 1], quantize="int8", runtime="x")


def _fidelity(keras_accuracy: float, edge_accuracy: float, mode: str = "int8") -> Fidelity:
    return Fidelity(mode, 200, 0.95, keras_accuracy, edge_accuracy, 0.9, 0.88, 0.2, 0.01, "r 1")


def test_accuracy_drop_gate() -> None:
    check_accuracy_drop(_fidelity(0.900, 0.891), 1.0)  # 0.9 points: allowed
    check_accuracy_drop(_fidelity(0.900, 0.950), 0.0)  # better than Keras: allowed
    with pytest.raises(FidelityError) as info:
        check_accuracy_drop(_fidelity(0.900, 0.880), 1.0)
    message = str(info.value)
    assert "0.880 against 0.900" in message
    assert "drop of 2.0 points (limit 1" in message
    assert "--quantize float16" in message
    with pytest.raises(FidelityError) as info:
        check_accuracy_drop(_fidelity(0.9, 0.5, "float16"), 1.0)
    assert "--quantize float16" not in str(info.value)


# --- operators ---------------------------------------------------------------------------


def _patch_version(model: bytes, op: str, version: int) -> bytes:
    """The same model with one operator code's version changed (a model from the future)."""
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    root = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    codes = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    for code in root.operatorCodes:
        if codes[max(code.builtinCode, code.deprecatedBuiltinCode)] == op:
            code.version = version
    builder = flatbuffers.Builder(0)
    builder.Finish(root.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def test_table_holds_what_tflite_runtime_2_14_registers() -> None:
    assert TFLITE_RUNTIME_2_14["FULLY_CONNECTED"] == (1, 10)
    assert TFLITE_RUNTIME_2_14["CONV_2D"] == (1, 7)
    assert TFLITE_RUNTIME_2_14["BROADCAST_TO"] == (2, 3)
    assert all(1 <= low <= high for low, high in TFLITE_RUNTIME_2_14.values())


def test_an_op_version_newer_than_tflite_runtime_2_14_is_caught(tiny_models: Any) -> None:
    report = read_operators(_patch_version(tiny_models.float32, "CONV_2D", 99))
    assert ("CONV_2D", 99) in [(op.name, op.version) for op in report.operators]
    problems = report.tflite_runtime_2_14_problems()
    assert problems == ["CONV_2D version 99 (tflite-runtime 2.14 has versions 1-7)"]
    with pytest.raises(UnsupportedOpsError) as info:
        check_edge_compatible(report)
    assert "CONV_2D version 99" in str(info.value)
    assert "--allow-newer-runtime" in str(info.value)
    check_edge_compatible(report, require_tflite_runtime=False)
    assert min_runtime(report, litert_version="2.3.0", tensorflow_version="2.21.0") == {
        "ai_edge_litert": "2.3.0",
        "tensorflow": "2.21.0",
    }


def test_per_channel_dense_weights_are_caught_and_avoided(tiny_models: Any, tmp_path: Path) -> None:
    # conftest converts without the converter flag, as TF >= 2.16 does by default.
    default = read_operators(tiny_models.int8)
    assert default.per_channel_dense
    assert any("aarch64" in p for p in default.tflite_runtime_2_14_problems())
    saved = export_saved_model(tiny_models.keras_model, tmp_path / "saved")
    ours = read_operators(
        convert_saved_model(saved, "int8", np.stack(list(tiny_models.images(0, 8))))
    )
    assert not ours.per_channel_dense
    assert ours.tflite_runtime_2_14_problems() == []


def test_flex_ops_are_refused(tmp_path: Path) -> None:
    import tensorflow as tf

    def determinant(x: Any) -> Any:
        return tf.reshape(tf.linalg.det(tf.reshape(x, (-1, 2, 2))), (-1, 1))

    fn = tf.function(determinant, input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    converter.target_spec.supported_ops = [
        tf.lite.OpsSet.TFLITE_BUILTINS,
        tf.lite.OpsSet.SELECT_TF_OPS,
    ]
    report = read_operators(converter.convert())
    assert report.custom_ops == ("FlexMatrixDeterminant",)
    with pytest.raises(UnsupportedOpsError, match="Flex"):
        check_edge_compatible(report, require_tflite_runtime=False)


def test_a_model_needing_tensorflow_ops_does_not_convert(tiny_models: Any) -> None:
    import keras
    import tensorflow as tf

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Lambda(lambda t: tf.reshape(tf.linalg.det(t[:, :2, :2, 0]), (-1, 1)))(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    images = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ConversionError) as info:
        convert_model(
            model,
            labels=("a", "b"),
            recipe=PreprocessRecipe(size=(8, 8)),
            calibration_images=images,
            eval_images=images,
            eval_labels=[0, 1],
            quantize="float32",
        )
    message = str(info.value)
    assert "MatrixDeterminant" in message
    assert "\n" not in message
    assert len(message) < 400


def test_not_a_model() -> None:
    with pytest.raises(ConversionError, match="not a TFLite model"):
        read_operators(b"PK\x03\x04 a zip file, say")


# --- inputs refused before any conversion ------------------------------------------------


@pytest.fixture
def colour_inputs(tiny_models: Any) -> dict[str, Any]:
    x = np.concatenate([tiny_models.images(c, 4, seed=c) for c in range(3)])
    return {
        "labels": tiny_models.labels,
        "recipe": PreprocessRecipe(size=(32, 32), resize="stretch"),
        "calibration_images": x,
        "eval_images": x,
        "eval_labels": np.repeat(np.arange(3), 4),
    }


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"labels": ("a", "b")}, "outputs 3 scores but 2 labels"),
        ({"recipe": PreprocessRecipe(size=(48, 48))}, "takes 32x32 images but"),
        ({"eval_labels": [0, 1]}, "12 test images but 2 test labels"),
        ({"eval_images": np.zeros((0, 32, 32, 3), np.uint8), "eval_labels": []}, "needs test"),
        ({"eval_images": np.zeros((12, 32, 32, 3), np.float32)}, "must be N x 32 x 32 x 3 uint8"),
        ({"calibration_images": None}, "needs calibration images"),
        ({"quantize": "int4"}, "unknown quantisation mode 'int4'"),
        ({"max_accuracy_drop": -1.0}, "max_accuracy_drop must be >= 0"),
    ],
)
def test_bad_inputs_are_refused_before_converting(
    tiny_models: Any, colour_inputs: dict[str, Any], change: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ConversionError, match=fragment.replace("(", r"\(")):
        convert_model(tiny_models.keras_model, **{**colour_inputs, **change})


def test_fidelity_reports_tflite_runtime_2_14_agreement_when_it_is_available(
    tiny_models: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate runs the bundle under tflite-runtime 2.14 too and records the agreement.

    Older Pi images run tflite-runtime 2.14, whose int8 kernels are not LiteRT's: the
    manifest's provenance.fidelity says how often they give the same answer.
    """

    model = tmp_path / "int8.tflite"
    model.write_bytes(tiny_models.int8)
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    for i in range(12):
        images[i, :, :, i % 3] = 250  # a dominant colour: a confident, known answer
    bundle = tiny_models.bundle(tmp_path / "b")
    litert = np.stack([Classifier(bundle).classify(im).probabilities for im in images])
    python = os.environ.get(TFLITE_214_ENV) or _cached_tflite_214_python()  # before delenv
    monkeypatch.delenv(TFLITE_214_ENV, raising=False)
    assert second_runtime_agreement(model, images, litert, None) is None
    broken = second_runtime_agreement(model, images, litert, None, python="/bin/false")
    assert broken is not None
    assert broken["error"] == "exit status 1"
    if python is None:
        pytest.skip(f"set {TFLITE_214_ENV} to a python with tflite-runtime 2.14 and numpy<2")
    found = second_runtime_agreement(model, images, litert, None, python=python)
    assert found is not None
    assert found["runtime"] == "tflite_runtime 2.14.0", found
    assert found["images"] == 12
    assert found["top1_agreement"] == 1.0
    assert found["max_prob_diff"] < 0.05


def _cached_tflite_214_python() -> str | None:
    """The pi-check's x86_64 tflite-runtime 2.14 venv, if this machine has built it."""
    cache = Path(os.environ.get("FIELDSCOPE_CACHE") or Path.home() / ".cache/fieldscope")
    for python in sorted((cache / "pi-check").glob("x86_64-tflite214-*/bin/python")):
        return str(python)
    return None
