"""The bundle contract: write, read, verify (files, checksums, schema, model) and signing."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from fieldscope.cli.main import main
from fieldscope.edge.bundle import (
    MANIFEST_FILE,
    MODEL_FILE,
    SCHEMA_VERSION,
    SIGNATURE_FILE,
    Bundle,
    Manifest,
    QuantParams,
    generate_keypair,
    manifest_schema,
    read_bundle,
    sign_bundle,
    verify_bundle,
    write_bundle,
)
from fieldscope.edge.errors import BundleError
from fieldscope.edge.preprocess import PreprocessRecipe

# INTER_AREA resampling: what version 1 and 2 manifests hold (see the version 3 tests).
RECIPE = PreprocessRecipe(size=(32, 32), denoise="median", resize="letterbox", resample="area")


def _write(out: Path, model: bytes, **overrides: Any) -> Bundle:
    fields: dict[str, Any] = {
        "model_name": "colours",
        "model_version": "2026.11.1",
        "labels": ("red", "green", "blue"),
        "preprocessing": RECIPE,
        "threshold": 0.6,
        "provenance": {
            "source_run": "runs/colours-1",
            "training_metrics": {"top1": 0.97},
            "fidelity": {"top1_agreement": 0.99},
            "created_at": "2026-11-02T10:15:00Z",
        },
        "min_runtime": {"ai_edge_litert": "1.2"},
    }
    fields.update(overrides)
    return write_bundle(out, model, **fields)


@pytest.fixture
def bundle_dir(tmp_path: Path, tiny_models: Any) -> Path:
    """A valid uint8-quantised bundle, freshly written."""
    out = tmp_path / "bundle"
    _write(out, tiny_models.int8)
    return out


def _edit_manifest(bundle: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Change manifest.json in place without fixing anything else (a tampered/bad bundle)."""
    path = bundle / MANIFEST_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def _refused(bundle: Path, *fragments: str, **kwargs: Any) -> str:
    with pytest.raises(BundleError) as info:
        verify_bundle(bundle, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message
    return message


# --- writing and reading --------------------------------------------------------------


def test_round_trip_keeps_the_manifest_and_reads_the_model_fields(
    bundle_dir: Path, tiny_models: Any
) -> None:
    written = read_bundle(bundle_dir)
    verified = verify_bundle(bundle_dir)
    m = verified.manifest
    assert written.manifest == m
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    # Written without ``output``: version 1, which stations of every version read.
    assert m.schema_version == 1 < SCHEMA_VERSION
    assert m.output is None
    assert m.labels == ("red", "green", "blue")
    assert m.preprocessing == RECIPE
    assert m.threshold == 0.6
    assert m.provenance.training_metrics == {"top1": 0.97}
    assert m.min_runtime == {"ai_edge_litert": "1.2"}
    # Shapes, dtypes and quantisation come from the model, not from the caller.
    assert m.input_shape == (1, 32, 32, 3)
    assert (m.input_dtype, m.output_dtype) == ("uint8", "uint8")
    assert m.quantization is not None
    assert m.quantization.input == QuantParams(1.0, 0)
    assert m.quantization.output is not None
    digest = hashlib.sha256(tiny_models.int8).hexdigest()
    assert m.files[MODEL_FILE].sha256 == digest == verified.sha256
    assert m.files[MODEL_FILE].size == len(tiny_models.int8)
    assert verified.model_path == bundle_dir / MODEL_FILE
    assert verified.model_path.read_bytes() == tiny_models.int8
    assert not verified.signed


def test_written_manifest_matches_the_published_json_schema(bundle_dir: Path) -> None:
    data = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    jsonschema.validate(data, manifest_schema())
    version2 = {**data, "schema_version": 2, "output": "logits"}
    jsonschema.validate(version2, manifest_schema())
    assert Manifest.from_dict(version2).output == "logits"
    for bad in (
        {**data, "output": "logits"},  # version 1 has no output
        {**data, "schema_version": 2},  # version 2 requires it
        {**version2, "output": "scores"},
        {**data, "labels": "red"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, manifest_schema())
        with pytest.raises(BundleError):
            Manifest.from_dict(bad)


def test_exact_resampling_makes_a_version_3_manifest_older_stations_refuse(
    tmp_path: Path, tiny_models: Any
) -> None:
    # The pixels an exact recipe gives differ (by a grey level) from INTER_AREA's, so a
    # station that only knows INTER_AREA must not run it: version 3 says so up front.
    exact = PreprocessRecipe(size=(32, 32), denoise="median")
    assert exact.resample == "exact"
    bundle = _write(tmp_path / "b", tiny_models.int8, preprocessing=exact)
    data = json.loads((bundle.path / MANIFEST_FILE).read_text())
    assert data["schema_version"] == 3 < SCHEMA_VERSION
    assert data["preprocessing"]["resample"] == "exact"
    assert "output" not in data  # optional in version 3, as in version 1
    jsonschema.validate(data, manifest_schema())
    assert verify_bundle(bundle.path).manifest.preprocessing == exact
    with_output = {**data, "output": "logits"}
    jsonschema.validate(with_output, manifest_schema())
    assert Manifest.from_dict(with_output).output == "logits"
    older = {**data, "schema_version": 2, "output": "logits"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(older, manifest_schema())
    with pytest.raises(BundleError, match=r"preprocessing\.resample needs schema_version 3"):
        Manifest.from_dict(older)
    # A version 1 or 2 manifest (no resample) keeps INTER_AREA, as it was trained.
    legacy = {
        **older,
        "preprocessing": {k: v for k, v in data["preprocessing"].items() if k != "resample"},
    }
    assert Manifest.from_dict(legacy).preprocessing.resample == "area"
    with pytest.raises(BundleError, match="resample 'exact' needs schema_version 3"):
        Manifest(**{**msgspec.structs.asdict(Manifest.from_dict(with_output)), "schema_version": 2})


def test_float_bundle_has_no_quantization(tmp_path: Path, tiny_models: Any) -> None:
    bundle = _write(tmp_path / "b", tiny_models.float32, provenance=None)
    m = verify_bundle(bundle.path).manifest
    assert m.quantization is None
    assert (m.input_dtype, m.output_dtype) == ("float32", "float32")
    assert m.provenance.created_at.endswith("Z")


def test_model_can_be_given_as_a_path(tmp_path: Path, tiny_models: Any) -> None:
    model = tmp_path / "m.tflite"
    model.write_bytes(tiny_models.float32)
    assert _write(tmp_path / "b", model).sha256 == hashlib.sha256(tiny_models.float32).hexdigest()
    with pytest.raises(BundleError, match="cannot read model"):
        _write(tmp_path / "c", tmp_path / "missing.tflite")


def test_write_refuses_a_non_empty_directory_unless_overwrite(
    bundle_dir: Path, tiny_models: Any
) -> None:
    with pytest.raises(BundleError, match="not empty"):
        _write(bundle_dir, tiny_models.float32)
    assert verify_bundle(bundle_dir).manifest.input_dtype == "uint8"  # untouched
    replaced = _write(bundle_dir, tiny_models.float32, overwrite=True)
    assert replaced.manifest.input_dtype == "float32"
    assert [p.name for p in bundle_dir.parent.iterdir()] == [bundle_dir.name]  # no leftovers
    empty = bundle_dir.parent / "empty"
    empty.mkdir()
    assert _write(empty, tiny_models.float32).path == empty
    a_file = bundle_dir.parent / "file"
    a_file.write_text("x")
    with pytest.raises(BundleError, match="not a directory"):
        _write(a_file, tiny_models.float32)


def test_failed_write_leaves_no_half_written_bundle(
    bundle_dir: Path, tiny_models: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(BundleError, match="No space left on device"):
        _write(bundle_dir.parent / "new", tiny_models.float32)
    with pytest.raises(BundleError, match="No space left on device"):
        _write(bundle_dir, tiny_models.float32, overwrite=True)
    monkeypatch.undo()
    assert [p.name for p in bundle_dir.parent.iterdir()] == [bundle_dir.name]
    assert verify_bundle(bundle_dir).manifest.input_dtype == "uint8"  # old one still whole


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"labels": ("red", "green")}, "2 labels but the model outputs 3"),
        ({"labels": ("red", "red", "blue")}, "labels must be unique, repeated: red"),
        ({"preprocessing": PreprocessRecipe(size=(64, 64))}, "preprocessing.size 64x64"),
        ({"threshold": 1.5}, "threshold must be between 0 and 1"),
        ({"model_version": ""}, "model_version must be a non-empty string"),
        ({"provenance": {"created_at": "yesterday"}}, "provenance.source_run is required"),
    ],
)
def test_write_refuses_a_bundle_that_would_not_verify(
    tmp_path: Path, tiny_models: Any, overrides: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(BundleError, match=fragment.replace(".", r"\.")):
        _write(tmp_path / "b", tiny_models.int8, **overrides)
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_a_file_that_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a valid Flatbuffer"):
        _write(tmp_path / "b", b"not a model at all")
    assert list(tmp_path.iterdir()) == []


# --- verification failures --------------------------------------------------------------


def test_refuses_what_is_not_a_bundle(tmp_path: Path) -> None:
    _refused(tmp_path / "nothing", "does not exist")
    (tmp_path / "file").write_text("x")
    _refused(tmp_path / "file", "is not a directory")
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", "has no manifest.json")


def test_refuses_missing_model(bundle_dir: Path) -> None:
    (bundle_dir / MODEL_FILE).unlink()
    _refused(bundle_dir, "is missing model.tflite")


def test_refuses_invalid_json(bundle_dir: Path) -> None:
    (bundle_dir / MANIFEST_FILE).write_text('{"schema_version": 1,\n "labels": [}')
    _refused(bundle_dir, "manifest.json is not JSON this reader accepts", "line 2")
    (bundle_dir / MANIFEST_FILE).write_bytes(b"\xff\xfe")
    _refused(bundle_dir, "not UTF-8")
    (bundle_dir / MANIFEST_FILE).write_text("[1, 2]")
    _refused(bundle_dir, "must be a JSON object")


def test_refuses_a_changed_model(bundle_dir: Path) -> None:
    model = bundle_dir / MODEL_FILE
    expected = hashlib.sha256(model.read_bytes()).hexdigest()
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    _refused(bundle_dir, "checksum mismatch for model.tflite", expected, actual)
    model.write_bytes(bytes(data[:-10]))
    _refused(bundle_dir, "model.tflite is", "truncated")


def test_refuses_unknown_schema_version(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, lambda d: d.update(schema_version=5, new_field=1))
    _refused(bundle_dir, "schema_version 5", "reads version 1, 2, 3, 4")
    _edit_manifest(bundle_dir, lambda d: d.update(schema_version="1"))
    _refused(bundle_dir, "schema_version must be an integer")


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda d: d.pop("threshold"), "threshold is required"),
        (lambda d: d.update(colour="red"), "manifest field colour is not a known field"),
        (lambda d: d.update(labels="red,green,blue"), "labels must be a list of strings"),
        (lambda d: d.update(threshold="high"), "threshold must be a number"),
        (lambda d: d.update(input_shape=[1, 32, 32]), "input_shape must be [batch, height"),
        (lambda d: d.update(input_dtype="float16"), "input_dtype must be one of"),
        (lambda d: d["files"]["model.tflite"].update(sha256="abc"), "files.model.tflite.sha256"),
        (lambda d: d["files"].update({"../x": d["files"]["model.tflite"]}), "plain file names"),
        (lambda d: d["provenance"].pop("fidelity"), "provenance.fidelity is required"),
        (lambda d: d["quantization"].update(input={"scale": 0}), "quantization.input"),
        (lambda d: d["preprocessing"].update(denoise="blur"), "preprocessing: invalid"),
    ],
)
def test_refuses_missing_or_mistyped_fields(
    bundle_dir: Path, edit: Callable[[dict[str, Any]], None], fragment: str
) -> None:
    _edit_manifest(bundle_dir, edit)
    _refused(bundle_dir, "manifest.json", fragment)


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (
            lambda d: d.update(labels=["red", "green", "blue", "violet"]),
            "4 labels but the model outputs 3",
        ),
        (
            lambda d: d.update(input_shape=[1, 48, 48, 3], preprocessing={"size": [48, 48]}),
            "input_shape 1x48x48x3 does not match the model's input 1x32x32x3",
        ),
        (
            lambda d: d.update(input_dtype="float32"),
            "input_dtype float32 does not match the model's input uint8",
        ),
        (
            lambda d: d.update(output_dtype="int8"),
            "output_dtype int8 does not match the model's output uint8",
        ),
        (
            lambda d: d["quantization"]["output"].update(zero_point=7),
            "quantization.output",
        ),
    ],
)
def test_refuses_a_manifest_that_disagrees_with_the_model(
    bundle_dir: Path, edit: Callable[[dict[str, Any]], None], fragment: str
) -> None:
    _edit_manifest(bundle_dir, edit)
    read_bundle(bundle_dir)  # files and schema are fine: only the model can tell
    verify_bundle(bundle_dir, load_model=False)
    _refused(bundle_dir, str(bundle_dir), fragment)


def test_refuses_preprocessing_size_that_differs_from_the_model_input(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, lambda d: d["preprocessing"].update(size=[40, 32]))
    _refused(bundle_dir, "preprocessing.size 40x32 does not match the model input", "32x32")


def test_refuses_a_model_the_runtime_cannot_load(bundle_dir: Path) -> None:
    junk = b"\0" * 64
    (bundle_dir / MODEL_FILE).write_bytes(junk)
    _edit_manifest(
        bundle_dir,
        lambda d: d["files"]["model.tflite"].update(
            sha256=hashlib.sha256(junk).hexdigest(), size=len(junk)
        ),
    )
    read_bundle(bundle_dir)
    _refused(bundle_dir, "cannot load", "the bundle asks for {'ai_edge_litert': '1.2'}")


# --- signatures ---------------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private, public = tmp_path / "keys" / "bundle.key", tmp_path / "keys" / "bundle.pub"
    private.parent.mkdir()
    generate_keypair(private, public)
    return private, public


def test_keypair_files(keys: tuple[Path, Path]) -> None:
    private, public = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    with pytest.raises(BundleError, match="refusing to overwrite"):
        generate_keypair(private, public)
    before = public.read_bytes()
    generate_keypair(private, public, overwrite=True)
    assert public.read_bytes() != before
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


@pytest.mark.parametrize(("umask", "shared"), [(0o022, 0o644), (0o027, 0o640)])
def test_bundle_files_follow_the_umask_and_only_the_private_key_is_0600(
    tmp_path: Path, tiny_models: Any, umask: int, shared: int
) -> None:
    """A web server or the deploy user reads bundles and signatures as another user."""
    previous = os.umask(umask)
    try:
        out = tmp_path / "bundle"
        _write(out, tiny_models.int8)
        private, public = tmp_path / "fleet.key", tmp_path / "fleet.pub"
        generate_keypair(private, public)
        sign_bundle(out, private)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (*out.iterdir(), private, public)}
    assert modes == {
        MODEL_FILE: shared,
        "manifest.json": shared,
        SIGNATURE_FILE: shared,
        "fleet.pub": shared,
        "fleet.key": 0o600,
    }
    assert stat.S_IMODE(out.stat().st_mode) == shared | 0o111 & ~umask


def test_signed_bundle_verifies_with_its_key(bundle_dir: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    sig = sign_bundle(bundle_dir, private)
    assert sig == bundle_dir / SIGNATURE_FILE
    assert len(sig.read_bytes()) == 64
    assert verify_bundle(bundle_dir, public_key=public).signed
    assert not verify_bundle(bundle_dir).signed  # no key: the signature is not checked


def test_tampered_manifest_fails_the_signature(bundle_dir: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    sign_bundle(bundle_dir, private)
    _edit_manifest(bundle_dir, lambda d: d.update(threshold=0.01))
    verify_bundle(bundle_dir)  # still a valid bundle, but no longer the signed one
    _refused(bundle_dir, "manifest.sig is not a valid signature", public_key=public)


def test_wrong_key_fails_the_signature(
    bundle_dir: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    sign_bundle(bundle_dir, keys[0])
    other_private, other_public = tmp_path / "other.key", tmp_path / "other.pub"
    generate_keypair(other_private, other_public)
    _refused(bundle_dir, "not a valid signature", str(other_public), public_key=other_public)


def test_missing_signature_is_refused_when_a_key_is_given(
    bundle_dir: Path, keys: tuple[Path, Path]
) -> None:
    _refused(bundle_dir, "is not signed (no manifest.sig)", public_key=keys[1])


def test_bad_key_files(bundle_dir: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    private, _ = keys
    sign_bundle(bundle_dir, private)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    _refused(bundle_dir, "is not a PEM public key", public_key=garbage)
    _refused(bundle_dir, "is a private key", public_key=private)
    _refused(bundle_dir, "cannot read public key", public_key=tmp_path / "none.pub")
    with pytest.raises(BundleError, match="is not a PEM private key"):
        sign_bundle(bundle_dir, garbage)
    # The easy mix-up: the .pub where the .key belongs; the message says which to give.
    with pytest.raises(BundleError, match=r"is a public key; sign with the private key"):
        sign_bundle(bundle_dir, keys[1])


def test_a_damaged_bundle_is_never_signed(bundle_dir: Path, keys: tuple[Path, Path]) -> None:
    (bundle_dir / MODEL_FILE).write_bytes(b"x")
    with pytest.raises(BundleError, match=r"model\.tflite is 1 bytes"):
        sign_bundle(bundle_dir, keys[0])
    assert not (bundle_dir / SIGNATURE_FILE).exists()


# --- command line ---------------------------------------------------------------------------


def test_cli_verify_ok(
    bundle_dir: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bundle", "verify", str(bundle_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK {bundle_dir}: colours 2026.11.1, 3 labels, input 1x32x32x3 uint8")
    sign_bundle(bundle_dir, keys[0])
    assert main(["bundle", "verify", str(bundle_dir), "--public-key", str(keys[1])]) == 0
    assert "signature verified" in capsys.readouterr().out


def test_cli_verify_bad_bundle_prints_one_line(
    bundle_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit_manifest(bundle_dir, lambda d: d.update(labels=["a", "b"]))
    assert main(["bundle", "verify", str(bundle_dir)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("fieldscope bundle: error: bundle ")
    assert "2 labels but the model outputs 3" in lines[0]


def test_cli_info_prints_the_manifest(bundle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bundle", "info", str(bundle_dir)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == read_bundle(bundle_dir).manifest.to_dict()
    assert main(["bundle", "info", str(bundle_dir / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
