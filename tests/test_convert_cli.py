"""``fieldscope convert``, ``keys new``, ``bundle verify`` and ``bundle inspect`` end to end.

Most tests convert a small run directory laid out as ``fieldscope train`` writes it,
holding the hand-set colour classifier of conftest (fast to convert, confident, known
answers). The last test runs the real thing: ``fieldscope train`` on synthetic
specimens, ``fieldscope convert``, ``fieldscope edge classify``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from fieldscope.cli.main import main
from fieldscope.edge.bundle import (
    MANIFEST_FILE,
    MODEL_FILE,
    SIGNATURE_FILE,
    generate_keypair,
    read_bundle,
)
from fieldscope.edge.objects import ObjectsSettings
from fieldscope.edge.preprocess import PreprocessRecipe
from fieldscope.edge.segment_cli import settings_toml

RECIPE = PreprocessRecipe(size=(32, 32), resize="stretch")
PER_CLASS = {"train": 6, "test": 4}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2))


def make_run(root: Path, tiny_models: Any, *, black_train: bool = False) -> Path:
    """A finished training run of the colour classifier, as ``fieldscope train`` lays it out."""
    data, run = root / "data", root / "colours-run"
    run.mkdir(parents=True)
    split: dict[str, Any] = {
        "data_dir": str(data),
        "labels": list(tiny_models.labels),
        "seed": 0,
        "val": [],
    }
    for part, n in PER_CLASS.items():
        split[part] = []
        for c, label in enumerate(tiny_models.labels):
            (data / label).mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(tiny_models.images(c, n, seed=c + 10 * len(part))):
                pixels = np.zeros_like(image) if black_train and part == "train" else image
                name = f"{label}/{part}-{i}.png"
                cv2.imwrite(str(data / name), cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
                split[part].append({"path": name, "label": label})
    tiny_models.keras_model.save(run / "model.keras")
    _write_json(run / "labels.json", list(tiny_models.labels))
    _write_json(run / "config.json", {"seed": 0, "preprocess": RECIPE.to_dict()})
    _write_json(run / "split.json", split)
    _write_json(run / "run.json", {"data_dir": str(data), "status": "complete", "folds": 0})
    _write_json(
        run / "metrics.json",
        {
            "format_version": 1,
            "labels": list(tiny_models.labels),
            "splits": {"test": {"accuracy": 1.0, "macro_f1": 1.0, "n_samples": 12, "top_k": 3}},
            "threshold": {"threshold": 0.6, "precision": 1.0, "coverage": 0.92, "reached": True},
        },
    )
    return run


COLOUR_TAXA = [
    {"label": "red", "scientific_name": "Rhodophyta", "taxon_rank": "phylum",
     "kingdom": "Plantae", "aphia_id": 852, "is_taxon": True},
    {"label": "blue", "is_taxon": False},
]  # fmt: skip


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory: pytest.TempPathFactory, tiny_models: Any) -> Path:
    run = make_run(tmp_path_factory.mktemp("run"), tiny_models)
    _write_json(run / "taxa.json", COLOUR_TAXA)  # fieldscope train --taxa taxa.csv
    return run


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    prefix = tmp_path_factory.mktemp("keys") / "fleet"
    assert main(["keys", "new", str(prefix)]) == 0
    return prefix.with_name("fleet.key"), prefix.with_name("fleet.pub")


@pytest.fixture(scope="module")
def signed_bundle(
    tmp_path_factory: pytest.TempPathFactory, colour_run: Path, keys: tuple[Path, Path]
) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "signed"
    code = main(["convert", str(colour_run), "--out", str(out), "--sign-key", str(keys[0])])
    assert code == 0
    return out


@pytest.fixture
def bundle_copy(signed_bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(signed_bundle, copy)
    return copy


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# --- convert and keys ------------------------------------------------------------------


def test_keys_new_writes_a_private_key_only_its_owner_can_read(
    keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes()
    assert b"PUBLIC KEY" in public.read_bytes()
    before = private.read_bytes()
    code, _, err = _cli(capsys, "keys", "new", str(private.with_suffix("")))
    assert code == 2
    assert "refusing to overwrite" in err
    assert private.read_bytes() == before
    code, out, _ = _cli(capsys, "keys", "new", str(private.with_suffix("")), "--force")
    assert code == 0
    assert private.read_bytes() != before
    assert str(private) in out


def test_keys_new_makes_its_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(capsys, "keys", "new", str(tmp_path / "keys" / "fleet"))
    assert code == 0, err
    assert (tmp_path / "keys" / "fleet.key").is_file()
    assert (tmp_path / "keys" / "fleet.pub").is_file()


def test_keys_new_where_its_folder_cannot_be_made_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "keys").write_text("a file where the folder should be")
    code, _, err = _cli(capsys, "keys", "new", str(tmp_path / "keys" / "fleet"))
    assert code != 0
    assert f"cannot create the folder for the keys {tmp_path / 'keys'}: " in err
    assert "Traceback" not in err


def test_convert_writes_a_signed_bundle_that_records_where_it_came_from(
    signed_bundle: Path,
    colour_run: Path,
    keys: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = _cli(
        capsys, "bundle", "verify", str(signed_bundle), "--public-key", str(keys[1])
    )
    assert code == 0, err
    assert "signature verified" in out
    m = read_bundle(signed_bundle).manifest
    assert m.model_name == "colours-run"
    assert m.labels == ("red", "green", "blue")
    assert m.taxa is not None  # the run's taxa.json, for the collector's exports
    assert [t.to_dict() for t in m.taxa] == [
        {**COLOUR_TAXA[0]},
        {
            "label": "blue",
            "scientific_name": "",
            "taxon_rank": "",
            "kingdom": "",
            "is_taxon": False,
        },
    ]
    assert m.schema_version == 4
    assert m.threshold == 0.6  # chosen on validation by the run, never re-derived
    assert m.preprocessing == RECIPE
    assert (m.input_dtype, m.output_dtype) == ("uint8", "uint8")
    # Full-int8 bundles need LiteRT: tflite-runtime 2.14's int8 kernels give other
    # answers on aarch64 (deploy/pi-check), so it is left out, with the reason.
    assert m.min_runtime == {
        "ai_edge_litert": "1.2",
        "tensorflow": "2.14",
    }
    p = m.provenance
    assert p.source_run == str(colour_run.resolve())
    assert p.training_metrics["test_accuracy"] == 1.0
    assert p.training_metrics["threshold_precision"] == 1.0
    assert p.fidelity["quantization"] == "int8"
    assert p.fidelity["test_images"] == 12
    assert p.fidelity["calibration_images"] == 18  # every training image: fewer than 200
    assert p.fidelity["top1_agreement"] == 1.0
    assert p.fidelity["edge_accuracy"] == p.fidelity["keras_accuracy"] == 1.0
    assert p.fidelity["max_accuracy_drop_points"] == 1.0
    assert set(p.fidelity["operators"]) >= {"CONV_2D", "FULLY_CONNECTED", "SOFTMAX"}


def test_convert_float16_with_a_name_and_version(
    colour_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "f16"
    code, stdout, err = _cli(
        capsys,
        "convert",
        str(colour_run),
        "--out",
        str(out),
        "--quantize",
        "float16",
        "--name",
        "colours",
        "--version",
        "2026.11.1",
        "--threshold",
        "0.7",
    )
    assert code == 0, err
    assert "float16" in stdout
    assert "unsigned" in stdout
    assert "checking fidelity on 12 test images" in err  # progress goes to stderr
    m = read_bundle(out).manifest
    assert (m.model_name, m.model_version, m.threshold) == ("colours", "2026.11.1", 0.7)
    assert m.quantization is None
    assert m.provenance.fidelity["calibration_images"] == 0
    assert not (out / SIGNATURE_FILE).exists()


def test_calibrating_on_unrepresentative_training_images_writes_no_bundle(
    tmp_path: Path, tiny_models: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run(tmp_path / "black", tiny_models, black_train=True)
    out = tmp_path / "bundle"
    code, _, err = _cli(capsys, "convert", str(run), "--out", str(out))
    assert code == 2
    assert "refusing to write the bundle" in err
    assert "--quantize float16" in err
    assert not out.exists()
    assert not list(tmp_path.glob(".bundle*"))  # no staging folder left behind
    # float16 needs no calibration, so the same run converts.
    code, _, err = _cli(capsys, "convert", str(run), "--out", str(out), "--quantize", "float16")
    assert code == 0, err


def test_a_moved_data_folder(
    colour_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    moved = tmp_path / "moved-run"
    shutil.copytree(colour_run.parent, moved)
    shutil.rmtree(moved / "data")
    shutil.copytree(colour_run.parent / "data", tmp_path / "elsewhere")
    run = moved / "colours-run"
    _edit_json(run / "split.json", lambda d: d.update(data_dir=str(moved / "data")))
    code, _, err = _cli(capsys, "convert", str(run), "--out", str(tmp_path / "b1"))
    assert code == 2
    assert "none of the 18 calibration images could be read" in err
    assert "--data-dir" in err
    code, _, err = _cli(
        capsys,
        "convert",
        str(run),
        "--out",
        str(tmp_path / "b2"),
        "--data-dir",
        str(tmp_path / "elsewhere"),
        "--quantize",
        "float32",
    )
    assert code == 0, err


def _edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


MISTAKES = {
    "missing run": "does not exist or is not a folder",
    "no model": "model.keras is missing",
    "unfinished": "is not finished (status 'training')",
    "cross-validation": "cross-validation run; convert one of its folds",
    "no threshold": "records no decision threshold",
    "bad threshold": "threshold must be in 0..1",
    "no calibration": "calibration images must be >= 1",
    "out not empty": "the folder is not empty",
    "public key to sign": "is a public key",
    "missing key": "cannot read signing key",
}


@pytest.mark.parametrize("case", MISTAKES)
def test_mistakes_are_refused_before_converting(
    case: str,
    colour_run: Path,
    keys: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    shutil.copytree(colour_run, run)
    out = tmp_path / "out"
    extra: list[str] = []
    if case == "missing run":
        run = tmp_path / "nope"
    elif case == "no model":
        (run / "model.keras").unlink()
    elif case == "unfinished":
        _edit_json(run / "run.json", lambda d: d.update(status="training"))
    elif case == "cross-validation":
        _edit_json(run / "run.json", lambda d: d.update(folds=3))
        (run / "fold-1").mkdir()
        (run / "model.keras").rename(run / "fold-1" / "model.keras")
    elif case == "no threshold":
        _edit_json(run / "metrics.json", lambda d: d.update(threshold=None))
    elif case == "bad threshold":
        extra = ["--threshold", "1.5"]
    elif case == "no calibration":
        extra = ["--calibration-images", "0"]
    elif case == "out not empty":
        out.mkdir()
        (out / "something").write_text("keep me")
    elif case == "public key to sign":
        extra = ["--sign-key", str(keys[1])]
    elif case == "missing key":
        extra = ["--sign-key", str(tmp_path / "none.key")]
    code, stdout, err = _cli(capsys, "convert", str(run), "--out", str(out), *extra)
    assert code == 2
    assert MISTAKES[case] in err
    assert len(err.strip().splitlines()) == 1, err  # no progress: nothing was converted
    assert stdout == ""
    assert not out.exists() or (out / "something").read_text() == "keep me"


# --- verification of a signed, converted bundle -------------------------------------------


def _refit_checksums(bundle: Path) -> None:
    """Make manifest.json agree with model.tflite again (a bundle from another tool)."""
    model = (bundle / MODEL_FILE).read_bytes()
    entry = {"sha256": hashlib.sha256(model).hexdigest(), "size": len(model)}
    _edit_json(bundle / MANIFEST_FILE, lambda d: d["files"].update({MODEL_FILE: entry}))


def _patched_conv_version(model: bytes) -> bytes:
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    root = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    for code in root.operatorCodes:
        if max(code.builtinCode, code.deprecatedBuiltinCode) == schema.BuiltinOperator.CONV_2D:
            code.version = 99
    builder = flatbuffers.Builder(0)
    builder.Finish(root.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _tamper(case: str, bundle: Path, keys: tuple[Path, Path], tmp_path: Path) -> list[str]:
    """Damage the bundle as ``case`` says; return the extra ``bundle verify`` arguments."""
    with_key = ["--public-key", str(keys[1])]
    model = bundle / MODEL_FILE
    if case == "model byte flipped":
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0x01
        model.write_bytes(bytes(data))
    elif case == "model truncated":
        model.write_bytes(model.read_bytes()[:-100])
    elif case == "manifest edited":
        _edit_json(bundle / MANIFEST_FILE, lambda d: d.update(threshold=0.1))
    elif case == "signature edited":
        sig = bytearray((bundle / SIGNATURE_FILE).read_bytes())
        sig[0] ^= 0x01
        (bundle / SIGNATURE_FILE).write_bytes(bytes(sig))
    elif case == "signature removed":
        (bundle / SIGNATURE_FILE).unlink()
    elif case == "wrong key":
        generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
        return ["--public-key", str(tmp_path / "other.pub")]
    elif case == "missing key":
        return ["--public-key", str(tmp_path / "nowhere.pub")]
    elif case == "labels too short":
        # Without the taxa too, which would name the dropped label first.
        _edit_json(
            bundle / MANIFEST_FILE, lambda d: (d.update(labels=["red", "green"]), d.pop("taxa"))
        )
        return []
    elif case == "labels too long":
        _edit_json(bundle / MANIFEST_FILE, lambda d: d["labels"].append("violet"))
        return []
    elif case == "op version unsupported":
        model.write_bytes(_patched_conv_version(model.read_bytes()))
        _refit_checksums(bundle)
        return []
    return with_key


DAMAGE = {
    "model byte flipped": ["checksum mismatch for model.tflite"],
    "model truncated": ["model.tflite is", "bytes but manifest.json says"],
    "manifest edited": ["not a valid signature of manifest.json"],
    "signature edited": ["not a valid signature of manifest.json"],
    "signature removed": ["is not signed"],
    "wrong key": ["not a valid signature", "other.pub"],
    "missing key": ["cannot read public key", "nowhere.pub"],
    "labels too short": ["2 labels but the model outputs 3 scores"],
    "labels too long": ["4 labels but the model outputs 3 scores"],
    "op version unsupported": ["cannot load", "CONV_2D", "version"],
}


@pytest.mark.parametrize("case", DAMAGE)
def test_every_kind_of_damage_fails_verification_with_one_clear_line(
    case: str,
    bundle_copy: Path,
    keys: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    extra = _tamper(case, bundle_copy, keys, tmp_path)
    code, out, err = _cli(capsys, "bundle", "verify", str(bundle_copy), *extra)
    assert code == 2
    assert out == ""
    for fragment in DAMAGE[case]:
        assert fragment in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


# --- inspect ---------------------------------------------------------------------------


def test_inspect_shows_the_manifest_in_human_form(
    signed_bundle: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _cli(capsys, "bundle", "inspect", str(signed_bundle))
    assert code == 0
    for fragment in (
        "model        colours-run ",
        "input        1x32x32x3 uint8",
        "quantisation input scale 1 zero point 0; output scale 0.00390625 zero point 0",
        "preprocess   32x32 stretch",
        "threshold    0.6000",
        "ai_edge_litert >= 1.2",
        "can run it",
        "signature    signed (manifest.sig); not checked",
        "      0  red",
        "      2  blue",
        "test_accuracy",
        "top1_agreement",
        "quantization              int8",
    ):
        assert fragment in out, fragment
    code, out, _ = _cli(
        capsys, "bundle", "inspect", str(signed_bundle), "--public-key", str(keys[1])
    )
    assert code == 0
    assert f"signature    valid signature for {keys[1]}" in out


def test_inspect_reports_an_invalid_signature(
    bundle_copy: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _edit_json(bundle_copy / MANIFEST_FILE, lambda d: d.update(threshold=0.1))
    code, out, _ = _cli(capsys, "bundle", "inspect", str(bundle_copy), "--public-key", str(keys[1]))
    assert code == 1
    assert "signature    INVALID: " in out
    (bundle_copy / SIGNATURE_FILE).unlink()
    code, out, _ = _cli(capsys, "bundle", "inspect", str(bundle_copy))
    assert code == 0
    assert "signature    unsigned" in out


# --- the real pipeline -------------------------------------------------------------------


@pytest.mark.slow
def test_train_convert_classify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """fieldscope train (MobileNetV2 0.35, from scratch, one epoch) -> convert -> classify."""
    data, run, bundle = tmp_path / "specimens", tmp_path / "run", tmp_path / "bundle"
    assert (
        main(["specimens", str(data), "--classes", "3", "--per-class", "12", "--size", "64"]) == 0
    )
    # The crops' segmentation.toml at the top of the data folder travels into the bundle.
    cut = ObjectsSettings(mode="segment", um_per_px=0.65, pad_px=12)
    (data / "segmentation.toml").write_text(settings_toml(cut), encoding="utf-8")
    # The labels' taxa.csv too (the first class is debris: no taxon).
    classes = sorted(p.name for p in data.iterdir() if p.is_dir())
    taxa_csv = tmp_path / "taxa.csv"
    rows = [f"{c},Genus{i},genus,Protozoa,,,true" for i, c in enumerate(classes)]
    rows[0] = f"{classes[0]},,,,,,false"
    header = "label,scientificName,taxonRank,kingdom,aphiaID,gbifKey,is_taxon"
    taxa_csv.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    train = ["train", str(data), "--out", str(run), "--backbone", "mobilenet_v2"]
    train += ["--taxa", str(taxa_csv)]
    train += ["--alpha", "0.35", "--weights", "none", "--image-size", "32", "--epochs", "1"]
    train += ["--fine-tune-epochs", "0", "--batch-size", "8", "--run-eagerly"]
    assert main(train) == 0
    assert "segmentation.toml (found in DATA_DIR)" in capsys.readouterr().err
    # One epoch from scratch is at chance, where int8 and float may swap near-ties:
    # this test is about the plumbing, the fidelity gate is tested above.
    code, out, err = _cli(
        capsys, "convert", str(run), "--out", str(bundle), "--max-accuracy-drop", "100"
    )
    assert code == 0, err
    m = read_bundle(bundle).manifest
    assert m.segmentation is not None
    assert m.segmentation.settings() == cut
    assert m.taxa is not None
    assert [(t.label, t.scientific_name, t.is_taxon) for t in m.taxa] == [
        (c, "" if i == 0 else f"Genus{i}", i != 0) for i, c in enumerate(classes)
    ]
    assert m.labels == tuple(json.loads((run / "labels.json").read_text()))
    assert m.input_shape == (1, 32, 32, 3)
    metrics = json.loads((run / "metrics.json").read_text())
    assert m.threshold == pytest.approx(metrics["threshold"]["threshold"])
    assert m.provenance.training_metrics["test_accuracy"] == metrics["splits"]["test"]["accuracy"]
    split = json.loads((run / "split.json").read_text())
    assert m.provenance.fidelity["test_images"] == len(split["test"])
    assert m.min_runtime is not None
    assert "tflite_runtime" not in m.min_runtime  # int8: LiteRT only
    code, out, err = _cli(capsys, "edge", "classify", str(bundle), str(data), "--json")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 36
    assert {r["status"] for r in records} <= {"ok", "uncertain"}
    assert all(r["top_k"][0]["label"] in m.labels for r in records)
