"""The Raspberry Pi check (``deploy/pi-check/run``) on real bundles under arm64 emulation.

x86-only tests miss crashes that happen only on the Pi: tflite-runtime 2.14 segfaults
in ``invoke()`` on aarch64 on a full-int8 model with per-channel-quantised Dense
weights (TensorFlow's default since 2.16), while x86_64 runs the same model. The check
must fail clearly on such a bundle and pass on one converted the way ``fieldscope
convert`` does it.

The check needs root or password-less sudo (chroot, mounts) and its cached arm64 root
filesystem, which ``bash deploy/pi-check/run --prepare`` builds once (minutes, needs the
network). Without them these tests skip, except in CI (``CI=true``), where that is a
failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import COLOUR_LABELS, TinyBundles, TinyModels, colour_images

from fieldscope.convert.opcheck import min_runtime, read_operators
from fieldscope.convert.quantize import convert_saved_model, export_saved_model
from fieldscope.edge.bundle import write_bundle
from fieldscope.edge.preprocess import PreprocessRecipe

pytestmark = [pytest.mark.pi_check, pytest.mark.slow]

RUN = Path(__file__).resolve().parents[1] / "deploy" / "pi-check" / "run"
IMAGES_PER_COLOUR = 3


def _run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(RUN), *args],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )


@pytest.fixture(scope="module")
def pi_check_ready() -> None:
    """Skip (fail in CI) unless this machine can run the check with its cache."""
    problem = None
    sudo = shutil.which("sudo")
    if os.geteuid() != 0 and (
        sudo is None or subprocess.run([sudo, "-n", "true"], check=False).returncode != 0
    ):
        problem = "the Raspberry Pi check needs root or password-less sudo (chroot, mounts)"
    else:
        status = _run_check("--status")
        if status.returncode != 0:
            tarball = status.stdout.split("tarball ", 1)[-1].split("\n", 1)[0]
            problem = (
                f"no cached arm64 root filesystem for the Raspberry Pi check ({tarball}); "
                "build it once with `bash deploy/pi-check/run --prepare`"
            )
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)


@pytest.fixture(scope="module")
def colour_pngs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images the tiny colour model answers confidently: ``<colour>/<n>.png``."""
    root = tmp_path_factory.mktemp("pi_check_images")
    for index, label in enumerate(COLOUR_LABELS):
        (root / label).mkdir()
        for n, image in enumerate(colour_images(index, IMAGES_PER_COLOUR, seed=7, size=48)):
            assert cv2.imwrite(str(root / label / f"{n}.png"), image[..., ::-1])
    return root


@pytest.fixture(scope="module")
def good_bundle(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny colour model converted like ``fieldscope convert`` converts: per-tensor
    Dense weights, with the ``min_runtime`` the operator check derives."""
    work = tmp_path_factory.mktemp("pi_check_good")
    saved = export_saved_model(tiny_models.keras_model, work / "saved")
    calibration = np.concatenate([tiny_models.images(c, 8, seed=30 + c) for c in range(3)])
    model = convert_saved_model(saved, "int8", calibration)
    report = read_operators(model)
    assert not report.per_channel_dense
    return write_bundle(
        work / "colour-int8",
        model,
        model_name="tiny-colour",
        model_version="1",
        labels=tiny_models.labels,
        preprocessing=PreprocessRecipe(size=(32, 32), denoise="median"),
        threshold=0.6,
        min_runtime=min_runtime(report, litert_version=None, tensorflow_version=None),
    ).path


def _table(out: str) -> list[dict[str, str]]:
    """The summary table's rows (columns are separated by two or more spaces)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  STEP "))
    headers = lines[start].split()
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        rows.append(dict(zip(headers, re.split(r"\s{2,}", line.strip(), maxsplit=5), strict=True)))
    return rows


def _row(rows: list[dict[str, str]], step: str, where: str, runtime: str) -> dict[str, str]:
    found = [r for r in rows if (r["STEP"], r["WHERE"]) == (step, where)]
    found = [r for r in found if r["RUNTIME"].startswith(runtime)]
    assert len(found) == 1, (step, where, runtime, rows)
    return found[0]


def test_a_bundle_that_crashes_tflite_runtime_on_the_pi_fails_the_check(
    pi_check_ready: None,
    tiny_models: TinyModels,
    tiny_bundles: TinyBundles,
    colour_pngs: Path,
) -> None:
    # conftest converts with TensorFlow's defaults, bypassing our converter's refusal:
    # per-channel Dense weights, and a manifest that makes no min_runtime claim.
    assert read_operators(tiny_models.int8).per_channel_dense
    bundle = tiny_bundles.v1
    done = _run_check("--bundle", str(bundle), "--images", str(colour_pngs), "--no-daemon")
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert "RESULT: FAIL (" in out
    rows = _table(out)
    crashed = _row(rows, "edge classify", "arm64", "tflite_runtime 2.14.0")
    assert crashed["RESULT"] == "FAIL"
    assert crashed["DETAIL"].startswith("crashed with SIGSEGV in invoke()"), crashed
    # Only aarch64 with tflite-runtime fails: LiteRT there and both runtimes on x86_64 run it.
    for where, runtime in (
        ("arm64", "ai_edge_litert"),
        ("x86_64", "ai_edge_litert"),
        ("x86_64", "tflite_runtime"),
    ):
        assert _row(rows, "edge classify", where, runtime)["RESULT"] == "PASS", (where, runtime)
    skipped = _row(rows, "classify", "arm64 vs x86_64", "tflite_runtime")
    assert "it fails only on the Pi" in skipped["DETAIL"]
    # The story names the runtime, the crash, the bundle and the architecture.
    story = next(
        line.strip()
        for line in out.splitlines()
        if line.strip().startswith("tflite_runtime 2.14.0 crashed")
    )
    assert "with SIGSEGV in invoke()" in story
    assert f"with bundle {bundle.name} (" in story
    assert "on aarch64 (Raspberry Pi)" in story


def test_a_bundle_converted_like_fieldscope_convert_passes_on_the_pi(
    pi_check_ready: None, good_bundle: Path, colour_pngs: Path
) -> None:
    done = _run_check("--bundle", str(good_bundle), "--images", str(colour_pngs))
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "RESULT: PASS (" in out
    rows = _table(out)
    # Every row passes, except that a denoise filter this bundle does not use may warn:
    # OpenCV's bilateral filter rounds one value in thousands differently on aarch64
    # (seen with OpenCV 4.11); this bundle's own recipe (median) must be exact.
    others = [r for r in rows if r["STEP"] != "denoise filters"]
    assert all(r["RESULT"] == "PASS" for r in others), out
    for row in (r for r in rows if r["STEP"] == "denoise filters"):
        assert row["RESULT"] == "PASS" or row["DETAIL"].startswith("differ: bilateral ("), out
    for runtime in ("ai_edge_litert", "tflite_runtime"):
        preprocess = _row(rows, "preprocess", "arm64 vs x86_64", runtime)
        assert preprocess["DETAIL"].endswith("identical pixels"), preprocess
    n = IMAGES_PER_COLOUR * len(COLOUR_LABELS)
    # Each runtime gives the same answers on aarch64 as on x86_64, image by image; this
    # model's input pixels and outputs are even bit-identical.
    for runtime in ("ai_edge_litert", "tflite_runtime"):
        model = _row(rows, "model on identical input", "arm64 vs x86_64", runtime)
        assert model["DETAIL"] == f"{n} images: same top-1, max |Δp| 0.000000"
        whole = _row(rows, "classify", "arm64 vs x86_64", runtime)
        assert whole["DETAIL"].startswith(f"{n} images: same top-1"), whole
    # The daemon on aarch64 published one identification per image to the host's broker.
    daemon = _row(rows, "edge run (daemon, MQTT)", "arm64", "ai_edge_litert")
    assert daemon["DETAIL"] == f"{n}/{n} identifications, matching classify, clean stop"
