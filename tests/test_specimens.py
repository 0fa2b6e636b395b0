"""The synthetic specimen generator: images, dataset folders, determinism, errors, CLI.

The learnability tests pin down what makes the data set useful for testing a
classifier: the species are separable by shape and texture, but not by mean colour
and contrast.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from fieldscope.cli.main import main
from fieldscope.edge.errors import ConfigError
from fieldscope.edge.specimens import render_specimen, species_names, write_dataset


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


# --------------------------------------------------------------------------- render


def test_species_table_offers_eight_label_safe_names() -> None:
    names = species_names()
    assert len(names) == 8
    assert len(set(names)) == 8
    # Names become folder names and model labels.
    assert all(n.isascii() and n.isalpha() and n.islower() for n in names)
    assert names[:4] == ("globigerina", "orbulina", "textularia", "nodosaria")


@pytest.mark.parametrize("species", species_names())
def test_every_species_renders_an_rgb_image_with_a_visible_specimen(species: str) -> None:
    image = render_specimen(species, np.random.default_rng(7), 96)
    assert image.shape == (96, 96, 3)
    assert image.dtype == np.uint8
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    # A specimen on a background: strong contrast somewhere, not just noise.
    background = np.median(gray)
    assert np.mean(np.abs(gray - background) > 40) > 0.03


@pytest.mark.parametrize("size", [32, 64, 256])
def test_render_honours_the_size(size: int) -> None:
    image = render_specimen("elphidium", np.random.default_rng(0), size)
    assert image.shape == (size, size, 3)


def test_render_is_a_function_of_the_generator_state() -> None:
    first = render_specimen("textularia", np.random.default_rng(123), 128)
    again = render_specimen("textularia", np.random.default_rng(123), 128)
    other = render_specimen("textularia", np.random.default_rng(124), 128)
    np.testing.assert_array_equal(first, again)
    assert np.mean(np.abs(first.astype(np.int16) - other.astype(np.int16))) > 5


def test_images_vary_in_pose_lighting_and_mode() -> None:
    images = [render_specimen("nodosaria", np.random.default_rng(i), 64) for i in range(40)]
    means = [float(im.mean()) for im in images]
    # Bright-field and dark-field variants both occur.
    assert min(means) < 80
    assert max(means) > 150


def test_render_rejects_an_unknown_species_and_names_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown species 'amoeba'.*globigerina.*elphidium"):
        render_specimen("amoeba", np.random.default_rng(0))


@pytest.mark.parametrize("size", [16, 31, 2049])
def test_render_rejects_a_size_out_of_range(size: int) -> None:
    with pytest.raises(ConfigError, match=rf"size .*between 32 and 2048, got {size}"):
        render_specimen("orbulina", np.random.default_rng(0), size)


# --------------------------------------------------------------------------- dataset


def test_write_dataset_writes_class_folders_with_counts_and_progress(tmp_path: Path) -> None:
    out = tmp_path / "new" / "specimens"  # parents are created
    calls: list[tuple[int, int]] = []
    counts = write_dataset(
        out,
        classes=3,
        per_class=4,
        size=48,
        seed=5,
        on_progress=lambda done, total: calls.append((done, total)),
    )
    assert counts == {"globigerina": 4, "orbulina": 4, "textularia": 4}
    assert sorted(p.name for p in out.iterdir()) == sorted(counts)
    for name in counts:
        files = sorted(p.name for p in (out / name).iterdir())
        assert files == [f"{name}_{i:04d}.png" for i in range(4)]
        for f in files:
            image = cv2.imread(str(out / name / f), cv2.IMREAD_UNCHANGED)
            assert image is not None
            assert image.shape == (48, 48, 3)
    assert calls == [(i, 12) for i in range(1, 13)]


def test_files_hold_exactly_the_rendered_rgb_pixels(tmp_path: Path) -> None:
    write_dataset(tmp_path, classes=2, per_class=2, size=64, seed=9)
    for c, name in enumerate(species_names()[:2]):
        for i in range(2):
            decoded = cv2.imread(str(tmp_path / name / f"{name}_{i:04d}.png"))
            assert decoded is not None
            expected = render_specimen(name, np.random.default_rng([9, c, i]), 64)
            # Lossless PNG, and RGB converted to OpenCV's BGR on the way out.
            np.testing.assert_array_equal(decoded[..., ::-1], expected)


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(
    tmp_path: Path,
) -> None:
    for folder, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_dataset(tmp_path / folder, classes=2, per_class=3, size=48, seed=seed)
    a, b, c = (_files(tmp_path / f) for f in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)


def test_each_image_is_independent_of_how_many_are_written(tmp_path: Path) -> None:
    write_dataset(tmp_path / "small", classes=2, per_class=2, size=48, seed=1)
    write_dataset(tmp_path / "large", classes=3, per_class=5, size=48, seed=1)
    small, large = _files(tmp_path / "small"), _files(tmp_path / "large")
    assert len(large) == 15
    assert {k: large[k] for k in small} == small


def test_rerun_into_an_earlier_output_replaces_it(tmp_path: Path) -> None:
    write_dataset(tmp_path, classes=3, per_class=3, size=32)
    counts = write_dataset(tmp_path, classes=2, per_class=1, size=32)
    assert counts == {"globigerina": 1, "orbulina": 1}
    assert sorted(_files(tmp_path)) == [
        str(Path("globigerina/globigerina_0000.png")),
        str(Path("orbulina/orbulina_0000.png")),
    ]


@pytest.mark.parametrize(
    "intruder", ["notes.txt", "my_images/a.png", "globigerina/photo.jpg", "orbulina/orbulina_1.png"]
)
def test_refuses_a_folder_with_other_content_and_deletes_nothing(
    tmp_path: Path, intruder: str
) -> None:
    write_dataset(tmp_path, classes=2, per_class=1, size=32)
    path = tmp_path / intruder
    path.parent.mkdir(exist_ok=True)
    path.write_text("precious")
    before = _files(tmp_path)
    with pytest.raises(ConfigError, match=r"already holds .*not an image of an earlier"):
        write_dataset(tmp_path, classes=2, per_class=1, size=32)
    assert path.read_text() == "precious"
    assert _files(tmp_path) == before


def test_refuses_an_output_path_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "data.png"
    target.write_bytes(b"x")
    with pytest.raises(ConfigError, match="is a file"):
        write_dataset(target, classes=1, per_class=1, size=32)
    assert target.read_bytes() == b"x"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": 0}, r"classes \(number of species, at most 8\) must be between 1 and 8"),
        ({"classes": 9}, r"at most 8.*got 9"),
        ({"classes": 2.0}, r"classes .*must be an integer, got 2\.0"),
        ({"per_class": 0}, r"per_class \(images per species\) must be between 1 and"),
        ({"size": 31}, r"size .*between 32 and 2048, got 31"),
        ({"size": 4096}, r"size .*between 32 and 2048, got 4096"),
        ({"seed": -1}, r"seed must be 0 or more, got -1"),
        ({"classes": True}, r"classes .*must be an integer, got True"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message):
        write_dataset(out, **kwargs)  # type: ignore[arg-type]
    assert not out.exists()


# --------------------------------------------------------------------------- CLI


def test_cli_writes_a_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "specimens"
    code = main(["specimens", str(out), "--classes", "3", "--per-class", "2", "--size", "64"])
    assert code == 0
    assert len(list(out.rglob("*.png"))) == 6
    assert sorted(p.name for p in out.iterdir()) == sorted(species_names()[:3])
    assert "wrote 6 images in 3 classes" in capsys.readouterr().out


def test_cli_reports_a_bad_option_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "specimens"
    code = main(["specimens", str(out), "--classes", "99"])
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "classes" in err
    assert "at most 8" in err
    assert "Traceback" not in err
    assert not out.exists()


# --------------------------------------------------------------------------- learnability


def _shape_features(image: np.ndarray) -> np.ndarray:
    """Translation- and rotation-invariant shape/texture descriptors, contrast-normalised:
    the radial profile of the Fourier amplitude (scale of structures), harmonics of
    the gradient-orientation histogram (elongation, symmetry) and gradient quantiles."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    gray = (gray - gray.mean()) / (gray.std() + 1e-6)
    n = gray.shape[0]
    amplitude = np.abs(np.fft.fftshift(np.fft.fft2(gray)))
    yy, xx = np.indices(amplitude.shape) - n // 2
    ring = np.hypot(yy, xx).astype(int).ravel()
    radial = np.bincount(ring, amplitude.ravel())[: n // 2] / np.bincount(ring)[: n // 2]
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1)
    magnitude = np.hypot(gx, gy).ravel()
    orientation = np.minimum((np.arctan2(gy, gx) % np.pi) / np.pi * 18, 17).astype(int).ravel()
    histogram = np.bincount(orientation, magnitude, minlength=18)
    harmonics = np.abs(np.fft.rfft(histogram / histogram.sum()))[1:]
    quantiles = np.quantile(magnitude, [0.5, 0.75, 0.9, 0.97, 0.99])
    return np.concatenate([np.log(radial + 1e-6), harmonics, quantiles])


def _colour_statistics(image: np.ndarray) -> np.ndarray:
    pixels = image.reshape(-1, 3).astype(np.float64)
    return np.concatenate([pixels.mean(axis=0), pixels.std(axis=0)])


@pytest.mark.parametrize("seed", [0, 1])
def test_species_are_learnable_from_shape_but_not_from_colour_statistics(seed: int) -> None:
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes, train, test, size = 4, 60, 40, 64
    images, labels = [], []
    for c, name in enumerate(species_names()[:classes]):
        for i in range(train + test):
            images.append(render_specimen(name, np.random.default_rng([seed, c, i]), size))
            labels.append(c)
    y = np.array(labels)
    is_train = np.tile(np.arange(train + test) < train, classes)

    def accuracy(features: np.ndarray) -> float:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
        model.fit(features[is_train], y[is_train])
        return float(model.score(features[~is_train], y[~is_train]))

    shape = accuracy(np.array([_shape_features(im) for im in images]))
    colour = accuracy(np.array([_colour_statistics(im) for im in images]))
    # Chance is 0.25. Shape and texture separate the species well ...
    assert shape > 0.75, f"shape features reach only {shape:.2f}"
    # ... while mean colour and contrast alone do not: colour is a nuisance variable.
    assert colour < 0.55, f"colour statistics reach {colour:.2f}"
    assert shape - colour > 0.25
