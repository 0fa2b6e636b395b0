"""Interpreter selection and the classifier, on real TFLite models converted in the session."""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fieldscope.edge.bundle import MANIFEST_FILE, Bundle, read_bundle, write_bundle
from fieldscope.edge.classify import Classifier, softmax, top_k
from fieldscope.edge.errors import BundleError, ConfigError, MissingDependencyError
from fieldscope.edge.preprocess import PreprocessRecipe
from fieldscope.edge.runtime import RUNTIMES, make_interpreter, runtime_info

# --- runtime selection ---------------------------------------------------------------------


def _block(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make runtimes unimportable the way a missing package is (None in sys.modules)."""
    for spec in RUNTIMES:
        if spec.name in names:
            top = spec.module.split(".")[0]
            monkeypatch.setitem(sys.modules, top, None)
            monkeypatch.setitem(sys.modules, spec.module, None)


def test_default_runtime_is_litert() -> None:
    info = runtime_info()
    assert info.name == "ai_edge_litert"
    assert info.version == importlib.metadata.version("ai-edge-litert")


def test_no_runtime_names_the_package_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    _block(monkeypatch, "ai_edge_litert", "tflite_runtime", "tensorflow")
    with pytest.raises(MissingDependencyError) as info:
        runtime_info()
    message = str(info.value)
    assert "pip install ai-edge-litert" in message
    assert "fieldscope[edge]" in message
    with pytest.raises(MissingDependencyError, match="pip install ai-edge-litert"):
        make_interpreter(b"model")


def test_forced_runtime_that_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    _block(monkeypatch, "tflite_runtime")
    with pytest.raises(MissingDependencyError, match="pip install tflite-runtime"):
        runtime_info(prefer="tflite_runtime")
    with pytest.raises(ConfigError, match="known: ai_edge_litert, tflite_runtime, tensorflow"):
        runtime_info(prefer="onnx")


def test_falls_back_to_tensorflow_lite(tiny_models: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tiny_models.images(2, 1)[0].astype(np.float32)[None]
    results = []
    for blocked in ((), ("ai_edge_litert", "tflite_runtime")):
        monkeypatch.undo()
        _block(monkeypatch, *blocked)
        expected = "tensorflow" if blocked else "ai_edge_litert"
        assert runtime_info().name == expected
        interpreter = make_interpreter(tiny_models.float32)
        index = interpreter.get_input_details()[0]["index"]
        interpreter.set_tensor(index, image)
        interpreter.invoke()
        results.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))
    np.testing.assert_allclose(results[0], results[1], atol=1e-5)


def test_make_interpreter_from_path_and_threads(tiny_models: Any, tmp_path: Path) -> None:
    model = tmp_path / "m.tflite"
    model.write_bytes(tiny_models.int8)
    interpreter = make_interpreter(model, num_threads=1)
    assert list(interpreter.get_input_details()[0]["shape"]) == [1, 32, 32, 3]
    with pytest.raises(ConfigError, match="num_threads must be a positive integer"):
        make_interpreter(model, num_threads=0)
    with pytest.raises(BundleError, match="does not exist"):
        make_interpreter(tmp_path / "missing.tflite")


def test_runtime_errors_become_bundle_errors(tiny_models: Any) -> None:
    with pytest.raises(BundleError, match=r"not a valid Flatbuffer.*is it a \.tflite file"):
        make_interpreter(b"\x00" * 100)
    with pytest.raises(BundleError, match="empty"):
        make_interpreter(b"")


def test_unsupported_op_version_is_a_clear_bundle_error(tiny_models: Any) -> None:
    # What an old runtime on a Pi sees with a model from a newer converter.
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(tiny_models.float32))
    for code in model.operatorCodes:
        code.version = 99
    future = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    with pytest.raises(BundleError) as info:
        make_interpreter(future)
    message = str(info.value)
    assert f"ai_edge_litert {runtime_info().version} cannot load model bytes" in message
    assert "version '99'" in message
    assert "newer TensorFlow" in message
    assert "\n" not in message


# --- top-k and softmax ---------------------------------------------------------------------


def test_top_k_orders_by_score_and_keeps_label_order_on_ties() -> None:
    labels = ["a", "b", "c", "d"]
    assert top_k([0.1, 0.4, 0.1, 0.4], labels, 3) == [("b", 0.4), ("d", 0.4), ("a", 0.1)]
    assert [label for label, _ in top_k([0.3, 0.2, 0.5, 0.0], labels, 10)] == [
        "c",
        "a",
        "b",
        "d",
    ]
    with pytest.raises(ValueError, match="3 probabilities for 4 labels"):
        top_k([0.2, 0.3, 0.5], labels, 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        top_k([0.1, 0.2, 0.3, 0.4], labels, 0)


def test_softmax_is_stable_and_sums_to_one() -> None:
    p = softmax([1000.0, 1000.0, -1000.0])
    np.testing.assert_allclose(p, [0.5, 0.5, 0.0], atol=1e-7)
    assert p.dtype == np.float32


# --- the classifier ------------------------------------------------------------------------


def _bundle(tmp_path: Path, model: bytes, name: str, threshold: float = 0.6) -> Bundle:
    return write_bundle(
        tmp_path / name,
        model,
        model_name="colours",
        model_version="1",
        labels=("red", "green", "blue"),
        preprocessing=PreprocessRecipe(size=(32, 32)),
        threshold=threshold,
    )


def _test_images(tiny_models: Any) -> np.ndarray:
    """18 clear-cut images (6 per colour), then 12 from ambiguous to fairly clear."""
    rng = np.random.default_rng(3)
    graded = rng.integers(0, 150, (12, 32, 32, 3)).astype(np.uint8)
    for i in range(12):
        graded[i, ..., i % 3] += rng.integers(0, 20 + 8 * i, (32, 32)).astype(np.uint8)
    return np.concatenate([*(tiny_models.images(c, 6, seed=40 + c) for c in range(3)), graded])


def test_float_classifier_matches_keras(tiny_models: Any, tmp_path: Path) -> None:
    classifier = Classifier(_bundle(tmp_path, tiny_models.float32, "f"), num_threads=1)
    assert classifier.outputs_are_probabilities
    images = _test_images(tiny_models)
    expected = tiny_models.keras_model.predict(images.astype(np.float32), verbose=0)
    got = np.stack([classifier.classify(image).probabilities for image in images])
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("variant", ["int8", "int8_signed"])
def test_quantised_classifier_agrees_with_keras(
    tiny_models: Any, tmp_path: Path, variant: str
) -> None:
    bundle = _bundle(tmp_path, getattr(tiny_models, variant), variant)
    expected_dtype = "uint8" if variant == "int8" else "int8"
    assert bundle.manifest.input_dtype == expected_dtype
    classifier = Classifier(bundle)
    assert classifier.outputs_are_probabilities
    images = _test_images(tiny_models)
    expected = tiny_models.keras_model.predict(images.astype(np.float32), verbose=0)
    got = np.stack([classifier.classify(image).probabilities for image in images])
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=0.02)
    np.testing.assert_allclose(got, expected, atol=0.05)
    agree = got.argmax(1) == expected.argmax(1)
    assert agree[:18].all()  # clear-cut: always the same answer
    assert agree.mean() >= 0.9  # near-ties may swap after quantisation, but rarely


def test_logits_model_gets_softmax(tiny_models: Any, tmp_path: Path) -> None:
    classifier = Classifier(_bundle(tmp_path, tiny_models.logits_float32, "logits"))
    assert not classifier.outputs_are_probabilities
    images = _test_images(tiny_models)
    logits = tiny_models.keras_logits.predict(images.astype(np.float32), verbose=0)
    got = np.stack([classifier.classify(image).probabilities for image in images])
    np.testing.assert_allclose(got, softmax(logits), atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_prediction_fields_and_top_k_order(tiny_models: Any, tmp_path: Path) -> None:
    classifier = Classifier(_bundle(tmp_path, tiny_models.int8, "b"), k=2)
    for c, name in enumerate(("red", "green", "blue")):
        p = classifier.classify(tiny_models.images(c, 1, seed=c)[0])
        assert p.status == "ok"
        assert p.label == name
        assert len(p.top_k) == 2
        assert p.top_k[0] == (name, p.score)
        assert p.top_k[0][1] >= p.top_k[1][1]
        assert p.score == pytest.approx(float(p.probabilities.max()))
        assert p.probabilities.shape == (3,)
    wide = Classifier(_bundle(tmp_path, tiny_models.int8, "k"), k=10)
    assert len(wide.classify(tiny_models.images(0, 1)[0]).top_k) == 3


def test_below_threshold_is_uncertain(tiny_models: Any, tmp_path: Path) -> None:
    grey = np.full((32, 32, 3), 128, dtype=np.uint8)
    strict = Classifier(_bundle(tmp_path, tiny_models.int8, "strict", threshold=0.6))
    p = strict.classify(grey)  # every colour equal: about 1/3 each
    assert p.status == "uncertain"
    assert p.label is None
    assert p.score < 0.6
    assert len(p.top_k) == 3  # the candidates are still reported
    lenient = Classifier(_bundle(tmp_path, tiny_models.int8, "lenient", threshold=0.0))
    q = lenient.classify(grey)
    assert q.status == "ok"
    assert q.label == q.top_k[0][0]


def test_classify_batch_equals_one_by_one(tiny_models: Any, tmp_path: Path) -> None:
    classifier = Classifier(_bundle(tmp_path, tiny_models.float32, "b"))
    images = _test_images(tiny_models)[:5]
    batch = classifier.classify_batch(images)
    assert [p.label for p in batch] == [classifier.classify(i).label for i in images]
    np.testing.assert_array_equal(
        np.stack([p.probabilities for p in batch]),
        np.stack([classifier.classify(i).probabilities for i in images]),
    )


@pytest.mark.parametrize(
    ("image", "fragment"),
    [
        (np.zeros((32, 32, 3), np.float32), "RGB uint8 image (0-255), got dtype float32"),
        (
            np.zeros((64, 64, 3), np.uint8),
            "expects a 32x32x3 (height x width x RGB) image, got 64x64x3",
        ),
        (np.zeros((32, 32), np.uint8), "got 32x32"),
        (np.zeros((1, 32, 32, 3), np.uint8), "got 1x32x32x3"),
        ([[0] * 3] * 32, "expects a numpy array, got list"),
    ],
)
def test_bad_input_arrays_are_refused_clearly(
    tiny_models: Any, tmp_path: Path, image: Any, fragment: str
) -> None:
    classifier = Classifier(_bundle(tmp_path, tiny_models.int8, "b"))
    with pytest.raises(ValueError, match=re.escape(fragment)):
        classifier.classify(image)


def test_classifier_refuses_a_manifest_that_disagrees_with_the_model(
    tiny_models: Any, tmp_path: Path
) -> None:
    bundle = _bundle(tmp_path, tiny_models.int8, "b")
    manifest = bundle.path / MANIFEST_FILE
    manifest.write_text(manifest.read_text().replace('"blue"', '"blue",\n    "violet"'))
    with pytest.raises(BundleError, match="4 labels but the model outputs 3"):
        Classifier(read_bundle(bundle.path))
