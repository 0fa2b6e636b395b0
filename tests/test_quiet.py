"""Quiet by default: what native libraries print on every start stays off the terminal.

A new user saw ``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`` after every
classify/verify/serve, TensorFlow's ``I0000``/``E0000 cuInit`` lines, OpenCV's
``TIFF_Warning`` by the hundred, and ``\\r`` progress in log files. These run the real
commands in a subprocess (native code writes to file descriptor 2, past Python).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SpecimenImages, TinyBundles
from helpers import run_fieldscope

from fieldscope.edge.native_logs import is_noise


def _fieldscope(*args: str) -> subprocess.CompletedProcess[str]:
    # What a user's shell has: none of the switches that this test is about.
    unset = ("TF_CPP_MIN_LOG_LEVEL", "OPENCV_LOG_LEVEL", "PYTHONFAULTHANDLER")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    return run_fieldscope(*args, env=env)


def test_verify_and_classify_do_not_announce_the_xnnpack_delegate(
    tiny_bundles: TinyBundles, specimen_images: SpecimenImages
) -> None:
    verify = _fieldscope("bundle", "verify", str(tiny_bundles.v1))
    assert verify.returncode == 0, verify.stderr
    image = str(specimen_images.sharp[0])
    classify = _fieldscope("edge", "classify", str(tiny_bundles.v1), image)
    assert classify.returncode == 0, classify.stderr
    for run in (verify, classify):
        assert "XNNPACK" not in run.stderr
        assert not [line for line in run.stderr.splitlines() if is_noise(line)], run.stderr
    # With debug logging nothing is filtered: the line is hidden, not gone.
    loud = _fieldscope("-vv", "bundle", "verify", str(tiny_bundles.v1))
    assert loud.returncode == 0, loud.stderr
    assert "Created TensorFlow Lite XNNPACK delegate" in loud.stderr


_NATIVE_WRITES = """
import os
from fieldscope.edge.native_logs import quiet_native_stderr
with quiet_native_stderr():
    os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n")
    os.write(2, b"I0000 00:00:1796615222.815465   19249 cudart_stub.cc:31] Could not find "
                b"cuda drivers on your machine, GPU will not be used.\\n")
    os.write(2, b"E0000 00:00:1796615234.766953   19249 cuda_platform.cc:52] failed call to "
                b"cuInit: INTERNAL: CUDA error\\n")
    os.write(2, b"E0000 00:00:1.2   7 model.cc:9] a real error\\nSegmentation hint\\n")
"""


@pytest.mark.parametrize("faulthandler", [False, True])
def test_only_the_known_lines_are_dropped(faulthandler: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    if faulthandler:
        env["PYTHONFAULTHANDLER"] = "1"  # as deploy/pi-check runs the edge
    result = subprocess.run(
        [sys.executable, "-c", _NATIVE_WRITES],
        capture_output=True, text=True, check=False, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    real = "E0000 00:00:1.2   7 model.cc:9] a real error\nSegmentation hint\n"
    if faulthandler:  # a native crash's traceback must reach the terminal: nothing held back
        assert result.stderr.count("\n") == 5
        assert result.stderr.endswith(real)
    else:
        assert result.stderr == real
    assert not any(is_noise(line) for line in real.splitlines())


def test_opencv_codec_warnings_stay_off_the_terminal(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    image = tmp_path / "odd.tif"
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    # Private tags a microscope vendor writes: libtiff warns about each through OpenCV.
    tifffile.imwrite(image, pixels, extratags=[(65000, "s", 0, "vendor", True)])
    result = _fieldscope("preview", str(image), "--out", str(tmp_path / "out"), "--size", "32")
    assert result.returncode == 0, result.stderr
    assert "TIFF_Warning" not in result.stderr
    assert (tmp_path / "out" / "odd.png").is_file()
    loud = _fieldscope("-v", "preview", str(image), "--out", str(tmp_path / "out2"))
    assert "TIFF_Warning" in loud.stderr  # -v: the libraries speak again


def test_specimens_writes_no_carriage_returns_into_a_log(tmp_path: Path) -> None:
    result = _fieldscope(
        "specimens", str(tmp_path / "data"), "--classes", "2", "--per-class", "3", "--size", "64"
    )
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr + result.stdout
    assert "wrote 6 images in 2 classes" in result.stdout
