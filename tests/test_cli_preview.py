"""``fieldscope preview``: what the model sees, written as PNGs, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from fieldscope.cli.main import main
from fieldscope.edge.preprocess import load_image


def _specimen(tmp_path: Path, name: str = "slide.jpg") -> Path:
    """A 120x200 photo: grey background, a dark disc in the middle."""
    bgr = np.full((120, 200, 3), 180, np.uint8)
    cv2.circle(bgr, (100, 60), 40, (40, 60, 90), -1)
    noise = np.random.default_rng(0).normal(0, 10, bgr.shape)
    bgr = np.clip(bgr + noise, 0, 255).astype(np.uint8)
    path = tmp_path / name
    assert cv2.imwrite(str(path), bgr)
    return path


def test_preview_writes_a_png_of_the_model_input_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _specimen(tmp_path)
    out = tmp_path / "preview"
    code = main(
        [
            "preview",
            str(image),
            "--out",
            str(out),
            "--size",
            "64",
            "--denoise",
            "median",
            "--denoise-param",  # the spelling train uses
            "ksize=3",
            "--resize",
            "letterbox",
            "--fill",
            "255,255,255",
        ]
    )
    assert code == 0
    written = load_image(out / "slide.png")
    assert written.shape == (64, 64, 3)
    # 200x120 letterboxed into 64x64: white bands above and below, the specimen between.
    assert (written[:10] == 255).all()
    assert (written[-10:] == 255).all()
    assert written[32, 32].max() < 120  # the dark disc is in the centre
    assert f"{image} -> {out / 'slide.png'}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "phrase"),
    [
        (["--denoise", "wavelet"], "denoise must be one of"),
        (["--denoise", "median", "--denoise-param", "ksize=4"], "denoise_params.ksize"),
        (["--denoise", "median", "--denoise-param", "ksize"], "--denoise-param expects KEY="),
        # The old spelling still works.
        (["--denoise", "median", "--param", "diameter=9"], "denoise_params.diameter"),
        (["--resize", "crop"], "resize must be one of"),
        (["--fill", "white"], "--fill expects"),
        (["--size", "3"], "size must be"),
    ],
)
def test_preview_bad_option_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], phrase: str
) -> None:
    image = _specimen(tmp_path)
    code = main(["preview", str(image), "--out", str(tmp_path / "out"), *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("fieldscope preview: error: ")
    assert phrase in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_preview_of_a_broken_file_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _specimen(tmp_path)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(good.read_bytes()[:500])
    code = main(["preview", str(broken), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert str(broken) in err
    assert "truncated JPEG" in err
