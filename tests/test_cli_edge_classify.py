"""``fieldscope edge classify``: real bundles, real PNG files, the edge code path only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from fieldscope.cli.main import main
from fieldscope.edge.bundle import MANIFEST_FILE, generate_keypair, sign_bundle
from fieldscope.edge.errors import BundleError
from fieldscope.edge.preprocess import PreprocessRecipe
from fieldscope.edge.runtime import RuntimeInfo, check_min_runtime

COLOURS = ("red", "green", "blue")


@pytest.fixture
def bundle(tmp_path: Path, tiny_models: Any) -> Path:
    """The tiny colour classifier (uint8 int8 model) as a bundle with threshold 0.6."""
    out = tmp_path / "bundle"
    tiny_models.bundle(
        out,
        recipe=PreprocessRecipe(size=(32, 32), resize="stretch"),
        min_runtime={"ai_edge_litert": "1.2", "tflite_runtime": "2.14", "tensorflow": "2.14"},
    )
    return out


@pytest.fixture
def images(tmp_path: Path, tiny_models: Any) -> Path:
    """folder/<colour>/<n>.png (two per colour, larger than the model input) and a grey one."""
    root = tmp_path / "images"
    for c, colour in enumerate(COLOURS):
        (root / colour).mkdir(parents=True)
        for n, image in enumerate(tiny_models.images(c, 2, seed=10 + c)):
            big = cv2.resize(image, (64, 48), interpolation=cv2.INTER_NEAREST)
            cv2.imwrite(str(root / colour / f"{n}.png"), cv2.cvtColor(big, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(root / "grey.png"), np.full((40, 40, 3), 128, np.uint8))
    (root / ".hidden.png").write_bytes(b"not looked at")
    (root / "notes.txt").write_text("not an image")
    return root


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["edge", "classify", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_classifies_a_folder_with_labels_scores_and_top_k(
    bundle: Path, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, str(bundle), str(images))
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 7  # 6 colour images + grey; hidden and .txt files are skipped
    by_file = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in lines}
    for colour in COLOURS:
        for n in range(2):
            text = by_file[str(images / colour / f"{n}.png")]
            assert text.startswith(f"{colour} "), text
            assert "(top 3: " in text
    assert by_file[str(images / "grey.png")].startswith("uncertain (best ")
    assert "< threshold 0.6000" in by_file[str(images / "grey.png")]


def test_json_lines(bundle: Path, images: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        capsys, str(bundle), str(images / "red"), str(images / "grey.png"), "--json", "--top", "2"
    )
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["status"] for r in records] == ["ok", "ok", "uncertain"]
    assert [r["label"] for r in records] == ["red", "red", None]
    for record in records:
        assert len(record["top_k"]) == 2
        assert record["score"] == record["top_k"][0]["score"]
        assert record["top_k"][0]["score"] >= record["top_k"][1]["score"]
    assert records[0]["score"] >= 0.6 > records[2]["score"]


def test_unreadable_images_are_reported_and_skipped(
    bundle: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(cv2.imencode(".png", np.zeros((20, 20, 3), np.uint8))[1].tobytes()[:40])
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = _run(
        capsys,
        str(bundle),
        str(broken),
        str(images / "blue"),
        str(tmp_path / "missing.png"),
        str(empty),
    )
    assert code == 1
    assert len(out.splitlines()) == 2  # both blue images, despite the failures around them
    assert all(" blue " in f" {line.split(': ', 1)[1]}" for line in out.splitlines())
    assert f"error: {broken}" in err
    assert f"{tmp_path / 'missing.png'}: no such file or folder" in err
    assert f"{empty}: no image files" in err
    assert "3 of 5 inputs failed" in err
    assert "Traceback" not in err
    code, out, _ = _run(capsys, str(bundle), str(broken), "--json")
    assert code == 1
    assert json.loads(out)["status"] == "error"


def test_a_public_key_requires_a_valid_signature(
    bundle: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = tmp_path / "k.key", tmp_path / "k.pub"
    generate_keypair(private, public)
    code, _, err = _run(capsys, str(bundle), str(images), "--public-key", str(public))
    assert code == 2
    assert "not signed" in err
    sign_bundle(bundle, private)
    code, out, _ = _run(capsys, str(bundle), str(images / "green"), "--public-key", str(public))
    assert code == 0
    assert len(out.splitlines()) == 2
    other_private, other_public = tmp_path / "o.key", tmp_path / "o.pub"
    generate_keypair(other_private, other_public)
    code, _, err = _run(capsys, str(bundle), str(images), "--public-key", str(other_public))
    assert code == 2
    assert "not a valid signature" in err


@pytest.mark.parametrize(
    ("min_runtime", "fragment"),
    [
        ({"ai_edge_litert": "99.0"}, "needs ai_edge_litert >= 99.0 but this device has"),
        ({"tflite_runtime": "2.14"}, "is not known to run on ai_edge_litert"),
    ],
)
def test_a_bundle_for_another_runtime_is_refused(
    bundle: Path,
    images: Path,
    capsys: pytest.CaptureFixture[str],
    min_runtime: dict[str, str],
    fragment: str,
) -> None:
    manifest = bundle / MANIFEST_FILE
    data = json.loads(manifest.read_text())
    data["min_runtime"] = min_runtime
    manifest.write_text(json.dumps(data))
    code, out, err = _run(capsys, str(bundle), str(images))
    assert code == 2
    assert out == ""
    assert fragment in err
    assert len(err.strip().splitlines()) == 1


def test_a_runtime_the_converter_left_out_is_refused_with_its_reason(
    bundle: Path, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `fieldscope convert` leaves tflite_runtime out of full-int8 bundles and records
    # why; the station must say that, not suggest a converter flag that cannot help.
    from fieldscope.edge.runtime import runtime_info

    info = runtime_info()
    key = f"{info.name}_{'_'.join(info.version.split('.')[:2])}"
    manifest = bundle / MANIFEST_FILE
    data = json.loads(manifest.read_text())
    data["min_runtime"] = {"some_other_runtime": "1.0"}
    data["provenance"]["fidelity"][key] = {"refused": "its int8 kernels round differently"}
    manifest.write_text(json.dumps(data))
    code, out, err = _run(capsys, str(bundle), str(images))
    assert code == 2
    assert out == ""
    assert f"refuses {info.name} {info.version}" in err
    assert "its int8 kernels round differently; install ai-edge-litert" in err
    assert "--allow-newer-runtime" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("option", "fragment"),
    [(["--top", "0"], "--top must be at least 1"), (["--threads", "0"], "num_threads")],
)
def test_bad_options(
    bundle: Path,
    images: Path,
    capsys: pytest.CaptureFixture[str],
    option: list[str],
    fragment: str,
) -> None:
    code, _, err = _run(capsys, str(bundle), str(images), *option)
    assert code == 2
    assert fragment in err


def test_missing_bundle(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, str(tmp_path / "nope"), str(images))
    assert code == 2
    assert "does not exist" in err


def test_threads_option_gives_the_same_answers(
    bundle: Path, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, one, _ = _run(capsys, str(bundle), str(images), "--threads", "1", "--json")
    _, two, _ = _run(capsys, str(bundle), str(images), "--threads", "2", "--json")
    assert one == two


def test_classify_never_imports_tensorflow(bundle: Path, images: Path) -> None:
    code = f"""
import sys
from fieldscope.cli.main import main
rc = main(["edge", "classify", {str(bundle)!r}, {str(images)!r}, "--json"])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
print("HEAVY", heavy, rc)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd="/"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "HEAVY [] 0"


# --- the runtime minimum a bundle states ---------------------------------------------------


def test_check_min_runtime_compares_versions_numerically() -> None:
    litert = RuntimeInfo("ai_edge_litert", "2.3.0")
    for ok in (None, {}, {"ai_edge_litert": "2.3"}, {"ai_edge_litert": "1.2", "x": "9"}):
        check_min_runtime(ok, litert)
    check_min_runtime({"tflite_runtime": "2.14"}, RuntimeInfo("tflite_runtime", "2.14.0"))
    check_min_runtime({"ai_edge_litert": "2.10"}, RuntimeInfo("ai_edge_litert", "2.10.0"))
    with pytest.raises(
        BundleError, match=r"needs ai_edge_litert >= 2\.10 but this device has 2\.3\.0"
    ):
        check_min_runtime({"ai_edge_litert": "2.10"}, litert)  # 10 > 3, not "1" < "3"
    with pytest.raises(BundleError, match="pip install -U tflite-runtime"):
        check_min_runtime({"tflite_runtime": "2.15"}, RuntimeInfo("tflite_runtime", "2.14.0"))
    with pytest.raises(BundleError, match=r"not known to run on tflite_runtime 2\.14\.0"):
        check_min_runtime({"ai_edge_litert": "2.3.0"}, RuntimeInfo("tflite_runtime", "2.14.0"))
    # A runtime built from source reports no version: it is let through, not refused.
    check_min_runtime({"tflite_runtime": "2.14"}, RuntimeInfo("tflite_runtime", "unknown"))
