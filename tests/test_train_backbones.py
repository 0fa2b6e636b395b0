"""Backbones take raw RGB 0-255: their own normalisation is inside the model.

The check is against Keras's own ``preprocess_input`` for each family, so a backbone
that silently got the wrong scaling (the classic "/255 here, -1..1 there") fails.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from fieldscope.train.augment import build_augmenter
from fieldscope.train.backbones import (
    BACKBONES,
    backbone_of,
    build_classifier,
    set_fine_tune_layers,
)
from fieldscope.train.config import AugmentConfig
from fieldscope.train.errors import TrainError

# Keras's own preprocessing for each family: what the backbone expects in front of it.
KERAS_PREPROCESS = {
    "mobilenet_v2": keras.applications.mobilenet_v2.preprocess_input,
    "mobilenet_v3_small": keras.applications.mobilenet_v3.preprocess_input,
    "mobilenet_v3_large": keras.applications.mobilenet_v3.preprocess_input,
    "efficientnet_b0": keras.applications.efficientnet.preprocess_input,
    "efficientnet_v2_b0": keras.applications.efficientnet_v2.preprocess_input,
    "resnet50": keras.applications.resnet.preprocess_input,
    "resnet101": keras.applications.resnet.preprocess_input,
}


# Siblings built by the same Keras module as a checked backbone, with the same input
# handling; building them (3-4 s each) would add time, not coverage.
SIBLINGS = {"mobilenet_v3_large": "mobilenet_v3_small", "resnet101": "resnet50"}


def test_every_registered_backbone_has_a_reference() -> None:
    # The ported backbones are checked against their source networks in test_offline_weights.
    assert {n for n, s in BACKBONES.items() if not s.ported} == set(KERAS_PREPROCESS)
    assert len(BACKBONES) >= 7
    for name, sibling in SIBLINGS.items():
        mine, theirs = BACKBONES[name], BACKBONES[sibling]
        assert mine.normalisation == theirs.normalisation
        assert mine.include_preprocessing == theirs.include_preprocessing
        assert KERAS_PREPROCESS[name] is KERAS_PREPROCESS[sibling]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(KERAS_PREPROCESS) - set(SIBLINGS)))
def test_model_on_raw_pixels_equals_backbone_on_its_preprocess_input(name: str) -> None:
    keras.utils.set_random_seed(0)
    size = 32
    model = build_classifier(name, num_classes=3, image_size=size, weights="none", dropout=0.0)
    backbone = backbone_of(model)
    raw = np.random.default_rng(1).integers(0, 256, (2, size, size, 3)).astype("float32")
    # The pooled features the classifier sees, from raw pixels at the model's input.
    features = keras.Model(model.inputs, model.get_layer("predictions").input)
    ours = keras.ops.convert_to_numpy(features(raw, training=False))
    theirs = keras.ops.convert_to_numpy(
        backbone(KERAS_PREPROCESS[name](raw.copy()), training=False)
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
    assert model.output_shape == (None, 3)


@pytest.mark.slow
def test_weights_file_is_loaded_into_the_backbone(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    donor = build_classifier(
        "mobilenet_v2", num_classes=2, image_size=32, alpha=0.35, weights="none"
    )
    path = tmp_path / "backbone.weights.h5"
    backbone_of(donor).save_weights(path)
    keras.utils.set_random_seed(1)
    model = build_classifier(
        "mobilenet_v2", num_classes=2, image_size=32, alpha=0.35, weights=str(path)
    )
    for mine, theirs in zip(backbone_of(model).weights, backbone_of(donor).weights, strict=True):
        assert np.array_equal(mine.numpy(), theirs.numpy())
    broken = tmp_path / "broken.weights.h5"
    broken.write_bytes(b"not hdf5")
    with pytest.raises(TrainError, match="could not load backbone weights from"):
        build_classifier(
            "mobilenet_v2", num_classes=2, image_size=32, alpha=0.35, weights=str(broken)
        )


def test_fine_tuning_unfreezes_the_top_layers_but_never_batchnorm() -> None:
    model = build_classifier(
        "mobilenet_v2", num_classes=2, image_size=32, alpha=0.35, weights="none"
    )
    backbone = backbone_of(model)
    unfrozen = set_fine_tune_layers(model, 20)
    top, rest = backbone.layers[-20:], backbone.layers[:-20]
    assert unfrozen > 0
    assert all(not layer.trainable for layer in rest)
    for layer in top:
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        assert layer.trainable == (not is_bn), layer.name
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in top)


def test_augmentation_changes_training_batches_only_and_keeps_the_pixel_range() -> None:
    augmenter = build_augmenter(AugmentConfig(), seed=0)
    assert augmenter is not None
    batch = np.random.default_rng(0).integers(0, 256, (8, 24, 24, 3)).astype("float32")
    out = keras.ops.convert_to_numpy(augmenter(batch, training=True))
    assert out.shape == batch.shape
    assert not np.allclose(out, batch)
    assert out.min() >= 0.0
    assert out.max() <= 255.0
    same = keras.ops.convert_to_numpy(augmenter(batch, training=False))
    assert np.array_equal(same, batch)
    off = AugmentConfig(
        flip=False, rotate90=False, rotation=0, zoom=0, contrast=0, brightness=0, noise=0
    )
    assert build_augmenter(off, seed=0) is None


def test_camera_noise_is_rounded_clipped_and_of_varying_strength() -> None:
    """Noise like a sensor's: whole grey levels, never above white, some images almost
    clean and some noisy, and nothing at evaluation."""
    config = AugmentConfig(
        flip=False, rotate90=False, rotation=0, zoom=0, contrast=0, brightness=0, noise=4.0
    )
    augmenter = build_augmenter(config, seed=0)
    assert augmenter is not None
    batch = np.full((64, 32, 32, 3), 255.0, dtype="float32")  # a scanned white background
    batch[:, 8:24, 8:24] = 90.0  # and a dark specimen
    out = keras.ops.convert_to_numpy(augmenter(batch, training=True))
    assert np.array_equal(out, np.round(out))
    assert out.min() >= 0.0
    assert out.max() <= 255.0
    inside = out[:, 8:24, 8:24] - 90.0
    spread = inside.reshape(64, -1).std(axis=1)
    assert spread.min() < 1.0
    assert 2.0 < spread.max() <= 4.5
    assert (out[:, :4] < 255).mean() > 0.1  # the background gets darker pixels
    same = keras.ops.convert_to_numpy(augmenter(batch, training=False))
    assert np.array_equal(same, batch)


def _dihedral(image: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetries of a square image: 4 turns, each optionally mirrored."""
    turns = [np.rot90(image, k) for k in range(4)]
    return turns + [np.fliplr(t) for t in turns]


@pytest.mark.parametrize(
    ("flip", "rotate90", "expected"),
    [
        (False, True, {0, 1, 2, 3}),  # quarter turns only
        (True, False, {0, 2, 4, 6}),  # identity, flip rows, flip columns, both (= 180°)
        (True, True, set(range(8))),  # every symmetry of the square
    ],
)
def test_flips_and_quarter_turns_are_lossless_symmetries(
    flip: bool, rotate90: bool, expected: set[int]
) -> None:
    config = AugmentConfig(
        flip=flip, rotate90=rotate90, rotation=0, zoom=0, contrast=0, brightness=0, noise=0
    )
    augmenter = build_augmenter(config, seed=3)
    assert augmenter is not None
    image = np.random.default_rng(2).integers(0, 256, (16, 16, 3)).astype("float32")
    symmetries = _dihedral(image)
    out = keras.ops.convert_to_numpy(augmenter(np.repeat(image[None], 64, axis=0)))
    seen = set()
    for result in out:
        matches = [k for k, s in enumerate(symmetries) if np.array_equal(result, s)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == expected
