"""Regression corpus for issue 15 (station side): poison inputs against every edge reader.

Each input that crashed or hung something in the issue's attack run is generated here
(no committed binaries) and fed to the reader that failed on it: the payload readers a
collector uses, the bundle reader and ``bundle verify``, the model slot's reload, the
image decoder and ``edge classify``, the quality gate, the preprocessing recipe and the
configuration checker. The property is always the same: a clear error of our own type
(or a rejection with a reason), quickly and within a memory budget — never another
exception, a hang, or gigabytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from helpers import (
    MINIMAL_EDGE_CONFIG,
    identification_document,
    manifest_document,
    model_info_document,
)

from fieldscope.cli.main import main
from fieldscope.edge.bundle import (
    MANIFEST_FILE,
    MODEL_FILE,
    generate_keypair,
    read_bundle,
    verify_bundle,
)
from fieldscope.edge.classify import Classifier
from fieldscope.edge.config import (
    ConfigFileError,
    ModelConfig,
    PreprocessingOverrides,
    QualityConfig,
    check_config,
    load_config,
)
from fieldscope.edge.decode import _read_header
from fieldscope.edge.errors import BundleError, ImageDecodeError, MessageError, RecipeError
from fieldscope.edge.health import Heartbeat, ModelInfo, PayloadError
from fieldscope.edge.message import Identification
from fieldscope.edge.model_slot import ModelSlot, load_model
from fieldscope.edge.preprocess import (
    MAX_DECODE_BYTES,
    PreprocessRecipe,
    decode_image,
    load_image,
)
from fieldscope.edge.quality import assess

HUGE = "9" * 400  # beyond a double: float() of it raised OverflowError
HUGER = "9" * 5000  # beyond Python's 4300-digit int/str limit: int() raised ValueError
DEEP = "[" * 100_000 + "]" * 100_000  # RecursionError in the parser
SHA = hashlib.sha256(b"model").hexdigest()
RECIPE = PreprocessRecipe(size=(32, 32), resize="stretch")


def _with_raw(data: dict[str, Any], path: str | tuple[str, ...], literal: str) -> bytes:
    """``data`` as JSON with the value at ``path`` (dotted, or a tuple of keys) replaced
    by a raw JSON literal (json.dumps cannot write a 5000-digit integer, or 1e400)."""
    node = data
    *parents, last = path.split(".") if isinstance(path, str) else path
    for key in parents:
        node = node[key]
    node[last] = "@@RAW@@"
    return json.dumps(data).replace('"@@RAW@@"', literal).encode()


# --- item 1: numbers of any size in every payload a collector reads ----------------------


def _heartbeat() -> dict[str, Any]:
    from datetime import UTC, datetime

    from fieldscope.edge.health import CameraState, FrameCounts

    beat = Heartbeat(
        time=datetime(2026, 12, 7, 1, 0, tzinfo=UTC),
        uptime_s=10.0,
        frames=FrameCounts(seen=1, accepted=1, uncertain=0, rejected=0, failed=0),
        fps=1.0,
        outbox_depth=0,
        outbox_dropped=0,
        camera_state=CameraState.OK,
        paused=False,
        disk_free_bytes=None,
        cpu_temperature_c=None,
        model=None,
    )
    parsed: dict[str, Any] = json.loads(beat.to_json())
    return parsed


POISON_NUMBERS = [HUGE, "-" + HUGE, HUGER, "1e400", "-1e400", "NaN", "Infinity", DEEP]


@pytest.mark.parametrize("literal", POISON_NUMBERS, ids=lambda s: s[:12])
@pytest.mark.parametrize(
    "field",
    ["quality.sharpness", "quality.exposure", "timings_ms.capture", "score", "seq", "image.width"],
)
def test_identification_numbers_of_any_size_are_message_errors(field: str, literal: str) -> None:
    payload = _with_raw(identification_document(), field, literal)
    started = time.monotonic()
    with pytest.raises(MessageError) as info:
        Identification.from_json(payload)
    assert time.monotonic() - started < 2.0
    text = str(info.value)
    assert text.startswith("identification message: ")
    assert "\n" not in text
    assert len(text) < 400  # the number is described, not printed


@pytest.mark.parametrize("literal", POISON_NUMBERS, ids=lambda s: s[:12])
def test_heartbeat_and_retained_model_numbers_are_payload_errors(literal: str) -> None:
    with pytest.raises(PayloadError, match="heartbeat: "):
        Heartbeat.from_json(_with_raw(_heartbeat(), "uptime_s", literal))
    # The retained message that stopped even a brand-new collector (issue 15, item 1).
    with pytest.raises(PayloadError, match="model info: "):
        ModelInfo.from_json(_with_raw(model_info_document(), "threshold", literal))


def test_the_issue_retained_model_payload_is_a_clear_error() -> None:
    payload = _with_raw(model_info_document(), "threshold", HUGE)
    with pytest.raises(PayloadError) as info:
        ModelInfo.from_json(payload)
    assert str(info.value) == (
        "model info: payload is not JSON this reader accepts: it contains an integer of "
        "400 digits (no field takes more than 40)"
    )
    # A number that parses but no float holds is still the field's error.
    with pytest.raises(PayloadError, match="threshold must be between 0 and 1"):
        ModelInfo.from_json(_with_raw(model_info_document(), "threshold", "1" + "0" * 39))


def test_an_oversized_payload_is_refused_before_parsing() -> None:
    blob = b'{"version": 1, "pad": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    with pytest.raises(MessageError, match="more than the limit"):
        Identification.from_json(blob)
    with pytest.raises(PayloadError, match="more than the limit"):
        Heartbeat.from_json(blob)


# --- item 4 and 12: bad manifests are BundleErrors, in the reader and `bundle verify` ------


def _manifest(**changes: Any) -> dict[str, Any]:
    data = manifest_document(preprocessing=RECIPE)
    data.update(changes)
    return data


def _bundle_with(folder: Path, manifest: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_FILE).write_bytes(b"model")
    (folder / MANIFEST_FILE).write_bytes(manifest)
    return folder


BAD_MANIFESTS: dict[str, bytes] = {
    "threshold-400-digits": _with_raw(_manifest(), "threshold", HUGE),
    "threshold-5000-digits": _with_raw(_manifest(), "threshold", HUGER),
    "threshold-1e400": _with_raw(_manifest(), "threshold", "1e400"),
    "labels-nested-100000": _with_raw(_manifest(), "labels", DEEP),
    "provenance-nested-100000": _with_raw(
        _manifest(), "provenance.training_metrics", '{"x": ' + DEEP + "}"
    ),
    "scale-400-digits": _with_raw(
        _manifest(quantization={"input": {"scale": 1, "zero_point": 0}, "output": None}),
        "quantization.input.scale",
        HUGE,
    ),
    "scale-1e400": _with_raw(
        _manifest(quantization={"input": {"scale": 1, "zero_point": 0}, "output": None}),
        "quantization.input.scale",
        "1e400",
    ),
    "zero-point-400-digits": _with_raw(
        _manifest(quantization={"input": {"scale": 1, "zero_point": 0}, "output": None}),
        "quantization.input.zero_point",
        HUGE,
    ),
    "ksize-400-digits": _with_raw(
        _manifest(preprocessing={**RECIPE.to_dict(), "denoise": "median"}),
        "preprocessing.denoise_params",
        f'{{"ksize": {HUGE}}}',
    ),
    "nlmeans-999": json.dumps(
        _manifest(
            preprocessing={
                "size": [32, 32],
                "denoise": "nlmeans",
                "denoise_params": {"search_window": 999, "template_window": 99},
                "resize": "stretch",
                "fill": "border",
            }
        )
    ).encode(),
    "size-400-digits": _with_raw(_manifest(), ("files", MODEL_FILE, "size"), HUGE),
    "input-shape-400-digits": _with_raw(_manifest(), "input_shape", f"[1, {HUGE}, 32, 3]"),
    "not-utf8": b'{"schema_version": 1, "model_name": "\xff"}',
    "nan": _with_raw(_manifest(), "threshold", "NaN"),
}


@pytest.mark.parametrize("name", sorted(BAD_MANIFESTS))
def test_every_bad_manifest_is_a_bundle_error(tmp_path: Path, name: str) -> None:
    folder = _bundle_with(tmp_path / "bundle", BAD_MANIFESTS[name])
    for reader in (read_bundle, verify_bundle):
        with pytest.raises(BundleError) as info:
            reader(folder)
        text = str(info.value)
        assert text.startswith(f"bundle {folder}"), text
        assert "\n" not in text, text
        assert len(text) < 600, text


@pytest.mark.parametrize("name", sorted(BAD_MANIFESTS))
def test_bundle_verify_prints_one_line_not_a_traceback(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _bundle_with(tmp_path / "bundle", BAD_MANIFESTS[name])
    assert main(["bundle", "verify", str(folder)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("fieldscope bundle: error: bundle ")
    assert "Traceback" not in err
    assert err.count("\n") == 1


def test_a_huge_manifest_is_refused_before_it_is_read(tmp_path: Path) -> None:
    folder = _bundle_with(tmp_path / "bundle", b"")
    with (folder / MANIFEST_FILE).open("wb") as handle:
        handle.truncate(300 * 1024 * 1024)  # sparse: 300 MB that take no disk
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match="more than the limit"):
            read_bundle(folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024


def test_a_model_linked_to_dev_zero_or_a_fifo_is_refused(tmp_path: Path) -> None:
    folder = _bundle_with(tmp_path / "bundle", json.dumps(_manifest()).encode())
    (folder / MODEL_FILE).unlink()
    (folder / MODEL_FILE).symlink_to("/dev/zero")
    with pytest.raises(BundleError, match=f"{MODEL_FILE} is not a regular file"):
        read_bundle(folder)
    (folder / MODEL_FILE).unlink()
    os.mkfifo(folder / MODEL_FILE)
    with pytest.raises(BundleError, match=f"{MODEL_FILE} is not a regular file"):
        read_bundle(folder)
    (folder / MODEL_FILE).unlink()
    with (folder / MODEL_FILE).open("wb") as handle:  # longer than listed (sparse)
        handle.truncate(100_000_005)
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match=f"{MODEL_FILE} is 100000005 bytes but"):
            read_bundle(folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024


# --- items 3 and 4 with a real model: one buffer verified and loaded; reload survives ----


@pytest.fixture
def float_bundle(tmp_path: Path, tiny_models: Any) -> Path:
    out = tmp_path / "bundle"
    tiny_models.bundle(out, model=tiny_models.float32, recipe=RECIPE)
    return out


@pytest.mark.slow
def test_the_model_served_is_the_model_verified(float_bundle: Path, tiny_models: Any) -> None:
    """Item 3: swapping model.tflite after the checksum must not change what is served."""
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 220
    bundle = verify_bundle(float_bundle)
    expected = Classifier(bundle).classify(red).probabilities
    # Same input and output tensors, other weights (logits): what a swap would serve.
    (float_bundle / MODEL_FILE).write_bytes(tiny_models.logits_float32)
    served = Classifier(bundle)
    assert served.outputs_are_probabilities
    np.testing.assert_array_equal(served.classify(red).probabilities, expected)


@pytest.mark.slow
def test_a_model_swapped_during_verification_is_never_served(
    float_bundle: Path, tiny_models: Any
) -> None:
    """Item 3 as the attacker ran it: a file swapped every few milliseconds while
    `edge classify` verifies and loads. Each load either refuses (checksum) or serves
    exactly the verified weights."""
    model = float_bundle / MODEL_FILE
    good, bad = tiny_models.float32, tiny_models.logits_float32
    stop = threading.Event()

    def swapper() -> None:
        tmp = float_bundle / ".swap"
        while not stop.is_set():
            for data in (bad, good):
                tmp.write_bytes(data)
                tmp.replace(model)
                time.sleep(0.001)

    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 220
    reference = Classifier(verify_bundle(float_bundle)).classify(red).probabilities
    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    served = refused = 0
    try:
        for _ in range(25):
            try:
                bundle = verify_bundle(float_bundle)
                probabilities = Classifier(bundle).classify(red).probabilities
            except BundleError:
                refused += 1
                continue
            served += 1
            np.testing.assert_array_equal(probabilities, reference)
    finally:
        stop.set()
        thread.join()
    assert served + refused == 25


@pytest.mark.slow
def test_reload_with_a_poison_manifest_keeps_the_old_model(
    tmp_path: Path, float_bundle: Path
) -> None:
    """Item 4: the watcher's reload never raises; `current` re-pointed at a poison
    bundle leaves the old model serving, and a start on it is a BundleError."""
    link = tmp_path / "current"
    link.symlink_to(float_bundle)
    cfg = ModelConfig(bundle=link)
    slot = ModelSlot(load_model(cfg, PreprocessingOverrides()))
    for i, name in enumerate(sorted(BAD_MANIFESTS)):
        poison = _bundle_with(tmp_path / f"poison-{i}", BAD_MANIFESTS[name])
        link.unlink()
        link.symlink_to(poison)
        result = slot.reload(cfg, PreprocessingOverrides())
        assert not result.swapped, name
        assert result.error is not None, name
        assert result.error.startswith("bundle "), name
        assert slot.current().bundle.path == float_bundle
        with pytest.raises(BundleError):
            load_model(cfg, PreprocessingOverrides())


# --- item 5: a decode budget in bytes, read from the header ------------------------------


def _png(width: int, height: int, depth: int, colour_type: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height``: tiny, but complete."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(bytes(4096)))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("width", "height", "depth", "colour_type"),
    [(10000, 9999, 16, 6), (20000, 20000, 8, 0), (9000, 9000, 16, 2)],
)
def test_small_files_that_decode_to_gigabytes_are_refused_from_the_header(
    width: int, height: int, depth: int, colour_type: int
) -> None:
    data = _png(width, height, depth, colour_type)
    assert len(data) < 1000
    assert width * height <= 400_000_000
    tracemalloc.start()
    try:
        with pytest.raises(ImageDecodeError, match=r"MiB, more than the limit of 640 MiB"):
            decode_image(data, source="bomb.png", max_pixels=400_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_the_budget_counts_channels_and_bytes_per_sample() -> None:
    rgba16 = np.zeros((100, 100, 4), np.uint16)
    rgba16[..., 3] = 65535
    data = cv2.imencode(".png", rgba16)[1].tobytes()
    assert _read_header(data, "x").decoded_bytes() == 100 * 100 * (4 * 2 + 3)
    with pytest.raises(ImageDecodeError, match="4 channel"):
        decode_image(data, max_bytes=100_000)
    assert decode_image(data, max_bytes=110_000).shape == (100, 100, 3)
    grey8 = cv2.imencode(".png", np.zeros((100, 100), np.uint8))[1].tobytes()
    assert decode_image(grey8, max_bytes=40_000).shape == (100, 100, 3)


def test_decoding_stays_close_to_its_budget() -> None:
    """The 16-bit RGBA conversion used to take 4x the decoded size in temporaries."""
    rgba16 = np.zeros((2000, 2000, 4), np.uint16)
    rgba16[..., 3] = 40000
    rgba16[::7, ::5, :3] = 4000
    data = cv2.imencode(".png", rgba16)[1].tobytes()
    budget = _read_header(data, "x").decoded_bytes()
    tracemalloc.start()
    try:
        image = decode_image(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert image.shape == (2000, 2000, 3)
    assert peak < budget + 16 * 1024 * 1024, (peak, budget)


def test_default_budget_admits_a_100_megapixel_rgb_frame() -> None:
    header = _read_header(_png(10000, 10000, 8, 2), "x")
    assert header.decoded_bytes() <= MAX_DECODE_BYTES


# --- item 6: bounded preprocessing parameters, wherever a recipe comes from ---------------

SLOW_PARAMS = [
    ("nlmeans", {"search_window": 999, "template_window": 99}),
    ("nlmeans", {"search_window": 37}),
    ("nlmeans", {"template_window": 17}),
    ("median", {"ksize": 10001}),
    ("gaussian", {"ksize": 4097}),
    ("gaussian", {"sigma": 1e6}),
    ("bilateral", {"diameter": 999}),
    ("bilateral", {"diameter": 0, "sigma_space": 1000}),
    ("median", {"ksize": int(HUGE)}),
    ("bilateral", {"sigma_color": int(HUGE)}),
]


@pytest.mark.parametrize(("method", "params"), SLOW_PARAMS, ids=lambda v: str(v)[:30])
def test_unbounded_denoise_parameters_are_recipe_errors(
    method: str, params: dict[str, Any]
) -> None:
    with pytest.raises(RecipeError, match="denoise_params"):
        PreprocessRecipe(denoise=method, denoise_params=params)


def test_the_largest_allowed_parameters_still_run_in_seconds() -> None:
    frame = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    for method, params in [
        ("nlmeans", {"search_window": 35, "template_window": 15}),
        ("median", {"ksize": 31}),
        ("gaussian", {"ksize": 63, "sigma": 100}),
        ("bilateral", {"diameter": 31, "sigma_space": 1000, "sigma_color": 1000}),
        ("bilateral", {"diameter": 0, "sigma_space": 10}),
    ]:
        from fieldscope.edge.preprocess import preprocess

        started = time.monotonic()
        preprocess(frame, PreprocessRecipe(size=(32, 32), denoise=method, denoise_params=params))
        assert time.monotonic() - started < 5.0, method


# --- items 7 and 8: the quality gate and special files ------------------------------------


@pytest.mark.parametrize("shape", [(60000, 1, 3), (1, 60000, 3), (30000, 2, 3)])
def test_extreme_aspect_frames_are_rejected_cheaply(shape: tuple[int, int, int]) -> None:
    frame = np.full(shape, 128, np.uint8)
    tracemalloc.start()
    try:
        result = assess(frame, QualityConfig())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not result.ok
    assert result.reason is not None
    assert result.reason.startswith("extreme aspect ratio")
    assert peak < 64 * 1024 * 1024


@pytest.mark.timeout(20)
def test_load_image_refuses_fifos_devices_and_links_to_them(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.png"
    zero.symlink_to("/dev/zero")
    link = tmp_path / "link.png"
    link.symlink_to(fifo)
    for path, kind in ((fifo, "FIFO"), (zero, "character device"), (link, "FIFO")):
        with pytest.raises(ImageDecodeError, match=f"is a {kind}.*not a regular file"):
            load_image(path)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_edge_classify_skips_special_files_and_odd_names(
    tmp_path: Path, float_bundle: Path
) -> None:
    """Item 8 through the real command: a FIFO, a /dev/zero link and a non-UTF-8 name
    in the folder; the good image is classified, the others reported, no hang."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    png = cv2.imencode(".png", np.full((40, 40, 3), 90, np.uint8))[1].tobytes()
    (folder / "ok.png").write_bytes(png)
    (Path(os.fsdecode(bytes(folder) + b"/b21_\xff\xfe.png"))).write_bytes(png)
    os.mkfifo(folder / "fifo.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    command = ["edge", "classify", str(float_bundle), str(folder)]
    proc = subprocess.run(
        [sys.executable, "-m", "fieldscope.cli.main", *command],
        capture_output=True,
        timeout=50,
        env={**os.environ, "PYTHONIOENCODING": "utf-8", "LC_ALL": "C.UTF-8"},
        check=False,
    )
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    assert "fifo.png: is a FIFO (named pipe), not a regular file" in err
    assert "zero.png: is a character device, not a regular file" in err
    assert "2 of 4 inputs failed" in err
    assert "ok.png: " in out
    assert "b21_\\xff\\xfe.png: " in out


# --- item 12 and numbers: the configuration ----------------------------------------------

CONFIG = MINIMAL_EDGE_CONFIG


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        (f"[quality]\nmin_sharpness = {HUGE}\n", "quality.min_sharpness"),
        (f"[heartbeat]\ninterval_s = {HUGE}\n", "heartbeat.interval_s"),
        (f"[camera]\nreopen_backoff_s = [1, {HUGE}]\n", "camera.reopen_backoff_s"),
        (f"[camera.picamera2]\ncontrols = {{ ExposureTime = {HUGE} }}\n", "controls"),
        (f"[outbox]\nmax_bytes = {HUGE}\n", "outbox.max_bytes"),
        (f'[outbox]\nmax_bytes = "{HUGE} GiB"\n', "outbox.max_bytes"),
        (
            '[preprocessing]\ndenoise = "nlmeans"\n'
            "denoise_params = { search_window = 999, template_window = 99 }\n",
            "preprocessing",
        ),
        (f'[preprocessing]\ndenoise = "median"\ndenoise_params = {{ ksize = {HUGE} }}\n', "ksize"),
        (f"[quality]\nmin_sharpness = {HUGER}\n", "thousands of digits"),
        ("[quality]\nmin_sharpness = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ],
    ids=lambda v: v[:20],
)
def test_poison_config_values_are_config_errors(tmp_path: Path, extra: str, key: str) -> None:
    header, body = extra.split("\n", 1)
    text = CONFIG.replace(header + "\n", header + "\n" + body, 1)
    if header not in CONFIG:
        text = CONFIG + "\n" + extra
    with pytest.raises(ConfigFileError) as info:
        load_config(_config(tmp_path, text), environ={})
    assert key in str(info.value)


@pytest.mark.timeout(20)
def test_a_config_that_is_a_fifo_or_huge_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigFileError, match="is a FIFO"):
        load_config(fifo, environ={})
    huge = tmp_path / "huge.toml"
    with huge.open("wb") as handle:
        handle.truncate(300 * 1024 * 1024)
    with pytest.raises(ConfigFileError, match="more than the limit"):
        load_config(huge, environ={})


def test_check_config_refuses_a_private_key_as_public_key(tmp_path: Path) -> None:
    generate_keypair(tmp_path / "private.pem", tmp_path / "public.pem")
    text = CONFIG.replace(
        'bundle = "bundles/current"\n', 'bundle = "bundles/current"\npublic_key = "private.pem"\n'
    )
    with pytest.raises(ConfigFileError, match=r"model\.public_key: .*is a PRIVATE key"):
        check_config(_config(tmp_path, text), environ={})
    (tmp_path / "notakey.pem").write_text("hello\n")
    with pytest.raises(ConfigFileError, match="not a PEM public key"):
        check_config(_config(tmp_path, text.replace("private.pem", "notakey.pem")), environ={})
    assert "public_key" in check_config(
        _config(tmp_path, text.replace("private.pem", "public.pem")), environ={}
    )


def test_check_config_warns_about_a_plain_text_password(tmp_path: Path) -> None:
    plain = CONFIG.replace(
        'host = "127.0.0.1"\n', 'host = "127.0.0.1"\nusername = "u"\npassword = "hunter2"\n'
    )
    report = check_config(_config(tmp_path, plain), environ={})
    assert "# warning: mqtt.password: the password is written in the config file" in report
    assert "hunter2" not in report
    from_env = plain.replace('password = "hunter2"', 'password_env = "FS_PW"')
    report = check_config(_config(tmp_path, from_env), environ={"FS_PW": "hunter2"})
    assert "plain text" not in report
