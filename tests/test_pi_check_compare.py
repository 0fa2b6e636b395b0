"""The Raspberry Pi check's verdicts on model-input pixels, without emulation.

``deploy/pi-check/compare.py`` decides what a difference between aarch64 and x86_64
means. Since preprocessing is exact (``resample = "exact"``), any pixel difference must
fail by default: one grey level was enough for a 73-class model to name another
species on a Pi. These tests feed it the files ``tensors.py`` writes, on any machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy" / "pi-check"))

from compare import compare_denoise, compare_tensors
from steps import Context


def _context(tmp_path: Path, *, lenient: bool = False, strict: bool = False) -> Context:
    return Context(
        root=tmp_path,
        cpu="cortex-a72",
        timeout=10.0,
        tolerance=1e-4,
        max_drift=0.05,
        strict=strict,
        images=tmp_path,
        bundles={"b": tmp_path},
        lenient_preprocessing=lenient,
    )


def _tensors(path: Path, pixels: np.ndarray, resample: str, bilateral: np.ndarray) -> Path:
    probabilities = np.tile(np.array([0.7, 0.2, 0.1], dtype=np.float32), (len(pixels), 1))
    np.savez(
        path,
        names=np.array([f"img{i}.png" for i in range(len(pixels))]),
        tensors=pixels,
        probabilities=probabilities,
        runtime=np.array("ai_edge_litert 2.3.0"),
        resample=np.array(resample),
        denoise_median=pixels[:2],
        denoise_bilateral=bilateral,
    )
    return path


@pytest.fixture
def pixels() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)


def test_identical_pixels_pass(tmp_path: Path, pixels: np.ndarray) -> None:
    x86 = _tensors(tmp_path / "x86.npz", pixels, "exact", pixels[:2])
    arm = _tensors(tmp_path / "arm.npz", pixels.copy(), "exact", pixels[:2])
    preprocess, model = compare_tensors(_context(tmp_path), "litert", "b", arm, x86)
    assert (preprocess.status, model.status) == ("PASS", "PASS")
    denoise = compare_denoise(_context(tmp_path), "litert", "b", arm, x86)
    assert denoise.status == "PASS"
    assert denoise.detail == "median, bilateral: identical on 2 images"


@pytest.mark.parametrize(("resample", "hint"), [("exact", "denoise filters"), ("area", "retrain")])
def test_one_grey_level_fails_by_default_and_says_why(
    tmp_path: Path, pixels: np.ndarray, resample: str, hint: str
) -> None:
    shifted = pixels.copy()
    shifted[1, 2, 3, 0] += 1
    x86 = _tensors(tmp_path / "x86.npz", pixels, resample, pixels[:2])
    arm = _tensors(tmp_path / "arm.npz", shifted, resample, pixels[:2])
    preprocess, _ = compare_tensors(_context(tmp_path), "litert", "b", arm, x86)
    assert preprocess.status == "FAIL"
    assert preprocess.detail == "1 of 768 pixel values differ (by up to 1) in 1 of 4 images"
    assert hint in preprocess.problem
    lenient, _ = compare_tensors(_context(tmp_path, lenient=True), "litert", "b", arm, x86)
    assert lenient.status == "WARN"
    both, _ = compare_tensors(_context(tmp_path, lenient=True, strict=True), "l", "b", arm, x86)
    assert both.status == "FAIL"


def test_a_denoise_filter_that_differs_on_arm_is_named(
    tmp_path: Path, pixels: np.ndarray
) -> None:
    other = pixels[:2].copy()
    other[0, 0, 0, 0] ^= 1
    x86 = _tensors(tmp_path / "x86.npz", pixels, "exact", pixels[:2])
    arm = _tensors(tmp_path / "arm.npz", pixels, "exact", other)
    row = compare_denoise(_context(tmp_path), "litert", "b", arm, x86)
    assert row.status == "WARN"
    assert row.detail == "differ: bilateral (1 of 384 values, up to 1)"
    assert "choose another filter for Pi stations" in row.problem
    assert compare_denoise(_context(tmp_path, strict=True), "l", "b", arm, x86).status == "FAIL"
