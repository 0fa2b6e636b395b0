"""Backbones by name, each with its own input normalisation built into the model.

The registry is plain data (no TensorFlow at import) so the CLI can list and validate
backbones instantly. ``build_classifier`` imports Keras and assembles
``raw RGB 0-255 -> normalisation -> backbone -> dropout -> softmax``: every model takes
raw pixels, so the converted TFLite model takes the edge's uint8 pixels unchanged and
nobody re-implements ``preprocess_input`` (docs/architecture.md#the-four-contracts, 1).

Most backbones come from ``keras.applications``, whose ImageNet weights are downloaded
on first use. The ``ported`` ones (``efficientnet_lite0``, ``mobilenet_v2_torchvision``)
are rebuilt in ``fieldscope.train.ported`` and take their ImageNet weights from
installed pip packages, so they work with no internet at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fieldscope.train.errors import TrainError

if TYPE_CHECKING:
    import keras

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "backbone_of",
    "build_classifier",
    "check_backbone_options",
    "fit_mini_mobilenet",
    "mini_mobilenet",
    "set_fine_tune_layers",
]


# BatchNorm momentum for backbones trained from scratch (see build_classifier).
SCRATCH_BN_MOMENTUM = 0.9

# ImageNet mean of the Caffe-style backbones (ResNet), in BGR order as they expect.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one ``keras.applications`` backbone and feed it raw pixels.

    ``normalisation`` is what the backbone expects on top of raw RGB 0-255:
    ``"mobilenet"`` scales to [-1, 1]; ``"caffe"`` swaps to BGR and subtracts the ImageNet
    mean; ``"builtin"`` means the Keras model already normalises inside (EfficientNet,
    MobileNetV3/EfficientNetV2 with ``include_preprocessing=True``, the ported ones).
    ``ported`` backbones are built by ``fieldscope.train.ported.build_ported`` under
    their registry name (``constructor`` is that name) and get ImageNet weights offline.
    """

    constructor: str
    normalisation: str
    takes_alpha: bool = False
    imagenet_alphas: tuple[float, ...] = ()
    include_preprocessing: bool = False
    ported: bool = False


def _mobilenet_v3(constructor: str) -> BackboneSpec:
    """Both MobileNetV3 sizes alike: a width multiplier with ImageNet weights at 0.75 and
    1.0, and their own rescaling inside the model."""
    return BackboneSpec(
        constructor,
        "builtin",
        takes_alpha=True,
        imagenet_alphas=(0.75, 1.0),
        include_preprocessing=True,
    )


BACKBONES: Mapping[str, BackboneSpec] = {
    "mobilenet_v2": BackboneSpec(
        "MobileNetV2",
        "mobilenet",
        takes_alpha=True,
        imagenet_alphas=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
    ),
    "mobilenet_v3_small": _mobilenet_v3("MobileNetV3Small"),
    "mobilenet_v3_large": _mobilenet_v3("MobileNetV3Large"),
    "efficientnet_b0": BackboneSpec("EfficientNetB0", "builtin"),
    "efficientnet_v2_b0": BackboneSpec("EfficientNetV2B0", "builtin", include_preprocessing=True),
    "resnet50": BackboneSpec("ResNet50", "caffe"),
    "resnet101": BackboneSpec("ResNet101", "caffe"),
    # ImageNet weights from pip packages (extra `offline-weights`), no download.
    "efficientnet_lite0": BackboneSpec("efficientnet_lite0", "builtin", ported=True),
    "mobilenet_v2_torchvision": BackboneSpec("mobilenet_v2_torchvision", "builtin", ported=True),
}


def check_backbone_options(name: str, alpha: float, weights: str) -> list[str]:
    """Problems with a backbone name, its alpha and the weights option, naming the key."""
    spec = BACKBONES.get(name)
    if spec is None:
        return [f"unknown backbone {name!r} (known: {', '.join(BACKBONES)})"]
    problems: list[str] = []
    if not alpha > 0:
        problems.append(f"alpha must be > 0, got {alpha!r}")
    elif not spec.takes_alpha and alpha != 1.0:
        takes = ", ".join(n for n, s in BACKBONES.items() if s.takes_alpha)
        problems.append(f"alpha applies only to {takes}; {name} has no width multiplier")
    elif weights == "imagenet" and spec.takes_alpha and alpha not in spec.imagenet_alphas:
        options = ", ".join(f"{a:g}" for a in spec.imagenet_alphas)
        problems.append(
            f"ImageNet weights for {name} exist only for alpha {options}, got {alpha:g} "
            "(or use --weights none)"
        )
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        problems.append(
            f"weights file {weights} does not exist (use imagenet, none, or a .weights.h5 path)"
        )
    return problems


def build_classifier(
    name: str,
    *,
    num_classes: int,
    image_size: int,
    alpha: float = 1.0,
    weights: str = "imagenet",
    dropout: float = 0.2,
) -> keras.Model:
    """raw RGB 0-255 (float) -> the backbone's normalisation -> backbone -> softmax.

    The backbone is the one nested model (``backbone_of``). With pretrained weights it
    is called with ``training=False`` so its BatchNorm layers stay in inference mode even
    when fine-tuning. With ``weights="none"`` a frozen random backbone yields features of
    ~1e-11 (measured: MobileNetV2 at initialisation in inference mode), so the network
    is meant to be trained whole: BatchNorm follows the training flag.
    """
    import keras

    problems = check_backbone_options(name, alpha, weights)
    if problems:
        raise TrainError("; ".join(problems))
    spec = BACKBONES[name]
    shape = (image_size, image_size, 3)
    backbone = _build_backbone(name, spec, shape=shape, alpha=alpha, weights=weights)

    pretrained = weights != "none"
    if not pretrained:
        # From scratch there are no statistics to protect, and the applications' BatchNorm
        # momentum (0.999 in MobileNetV2) would need thousands of steps before the moving
        # averages used at inference mean anything; 0.9 converges within an epoch or two.
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = SCRATCH_BN_MOMENTUM

    inputs = keras.Input(shape=shape, dtype="float32", name="image")
    x = inputs
    if spec.normalisation != "builtin":
        x = _normalisation(spec.normalisation, keras)(x)
    # Pretrained: BatchNorm always in inference mode, even while fine-tuning (the Keras
    # transfer-learning recipe). From scratch: BatchNorm must learn, so it follows fit.
    x = backbone(x, training=False) if pretrained else backbone(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs, name=f"fieldscope_{name}")
    if spec.normalisation == "caffe":
        _set_caffe_weights(model.get_layer("caffe_normalisation"))
    return model


def mini_mobilenet(size: int, classes: int) -> keras.Model:
    """Four inverted-residual blocks like MobileNetV2's, raw RGB 0-255 in, softmax out.

    Not a backbone for real work: a model with MobileNetV2's operator set (1x1 and
    depthwise convolutions, BatchNorm, ReLU6, residual adds, global pooling) that
    trains from scratch in seconds on two cores until it tells the synthetic species
    (``fieldscope.edge.specimens``) apart. The conversion tests and the Raspberry Pi
    check (``deploy/pi-check/make_bundles.py``) need such a model: one at chance has
    near-uniform outputs, on which agreement between float and int8 says nothing.
    """
    import keras

    layers = keras.layers

    def norm(x: Any) -> Any:
        return layers.BatchNormalization(momentum=SCRATCH_BN_MOMENTUM)(x)

    def block(x: Any, channels: int, stride: int) -> Any:
        shortcut, width = x, int(x.shape[-1])
        x = layers.Conv2D(width * 3, 1, use_bias=False)(x)
        x = layers.ReLU(6.0)(norm(x))
        x = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False)(x)
        x = layers.ReLU(6.0)(norm(x))
        x = norm(layers.Conv2D(channels, 1, use_bias=False)(x))
        return layers.Add()([shortcut, x]) if stride == 1 and width == channels else x

    inputs = keras.Input((size, size, 3), name="image")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
    x = layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(x)
    x = layers.ReLU(6.0)(norm(x))
    for channels, stride in ((16, 1), (24, 2), (24, 1), (32, 2)):
        x = block(x, channels, stride)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def fit_mini_mobilenet(images: Any, labels: Any, classes: int) -> keras.Model:
    """:func:`mini_mobilenet` trained from seed 0 on ``images`` (N, S, S, 3, raw RGB)
    and their class indices, for 6 epochs on the 8 flips/rotations of each image:
    specimens lie in any orientation, so the views are 8x the data for free and the
    model generalises instead of memorising a hundred images."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    model = mini_mobilenet(int(images.shape[1]), classes)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    views = [np.rot90(v, k, axes=(1, 2)) for v in (images, images[:, ::-1]) for k in range(4)]
    model.fit(
        np.concatenate(views).astype(np.float32),
        np.tile(labels, len(views)),
        epochs=6,
        batch_size=32,
        verbose=0,
    )
    return model


def _build_backbone(
    name: str, spec: BackboneSpec, *, shape: tuple[int, int, int], alpha: float, weights: str
) -> keras.Model:
    """The bare backbone (pooled features), with the weights asked for."""
    if spec.ported:
        from fieldscope.train.ported import build_ported

        # Raises MissingWeightsError naming the pip package when it is not installed.
        return build_ported(
            spec.constructor,
            input_shape=shape,
            weights=None if weights == "none" else weights,
            pooling="avg",
        )
    import keras

    kwargs: dict[str, Any] = {
        "input_shape": shape,
        "include_top": False,
        "weights": None if weights == "none" else weights,
        "pooling": "avg",
    }
    if spec.takes_alpha:
        kwargs["alpha"] = alpha
    if spec.include_preprocessing:
        kwargs["include_preprocessing"] = True
    constructor = getattr(keras.applications, spec.constructor)
    try:
        return constructor(**kwargs)
    except Exception as exc:  # keras raises bare Exception for a failed download
        raise TrainError(_weights_failure(name, weights, exc)) from exc


def _normalisation(kind: str, keras: Any) -> Any:
    if kind == "mobilenet":
        return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="mobilenet_normalisation")
    # A fixed 1x1 convolution both swaps RGB->BGR and subtracts the mean: a standard,
    # serialisable, quantisable op, where a Lambda(preprocess_input) would need unsafe
    # deserialisation and a custom layer would need registering wherever it is loaded.
    return keras.layers.Conv2D(3, 1, trainable=False, name="caffe_normalisation")


def _set_caffe_weights(layer: Any) -> None:
    import numpy as np

    kernel = np.zeros((1, 1, 3, 3), dtype="float32")
    for out_channel in range(3):
        kernel[0, 0, 2 - out_channel, out_channel] = 1.0
    bias = -np.asarray(_CAFFE_MEAN_BGR, dtype="float32")
    layer.set_weights([kernel, bias])


def _weights_failure(name: str, weights: str, exc: Exception) -> str:
    if weights == "imagenet":
        offline = ", ".join(n for n, s in BACKBONES.items() if s.ported)
        return (
            f"could not get ImageNet weights for {name} ({exc}); keras downloads them once "
            "into ~/.keras/models, so connect once, use --weights none / --weights PATH, "
            f"or a backbone with offline ImageNet weights ({offline})"
        )
    if weights != "none":
        return f"could not load backbone weights from {weights} into {name}: {exc}"
    return f"could not build backbone {name}: {exc}"


def backbone_of(model: keras.Model) -> keras.Model:
    """The backbone inside a classifier from ``build_classifier``: its one nested model.

    Found by type, not by name: some constructors (EfficientNetV2) derive their
    architecture from their ``name`` argument, so the name cannot be ours to choose.
    """
    import keras

    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(nested) != 1:
        raise TrainError(f"{model.name} is not a fieldscope classifier (no single backbone)")
    return nested[0]


def set_fine_tune_layers(model: keras.Model, top_layers: int) -> int:
    """Unfreeze the top ``top_layers`` backbone layers, BatchNorm excepted; returns how many.

    BatchNorm stays frozen because its running statistics, re-estimated from small
    microscope batches, would wreck the pretrained features. Recompile afterwards.
    """
    import keras

    backbone = backbone_of(model)
    backbone.trainable = True
    layers = backbone.layers
    cut = max(0, len(layers) - top_layers)
    unfrozen = 0
    for i, layer in enumerate(layers):
        trainable = i >= cut and not isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = trainable
        unfrozen += int(trainable and bool(layer.weights))
    return unfrozen
