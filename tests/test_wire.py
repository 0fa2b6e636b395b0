"""The wire formats as files: generated schemas stay in step with the models, and payloads
and manifests written by earlier versions still load and are written back byte for byte."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from fieldscope.edge.health import CommandReply, Heartbeat, ModelInfo, PayloadError
from fieldscope.edge.manifest import Manifest
from fieldscope.edge.message import Identification
from fieldscope.edge.wire_schemas import SCHEMAS, main, render

REPO = Path(__file__).resolve().parents[1]
WIRE = Path(__file__).parent / "data" / "wire"
REGENERATE = "python -m fieldscope.edge.wire_schemas"


@pytest.mark.parametrize("doc", SCHEMAS, ids=lambda d: d.filename)
@pytest.mark.parametrize("folder", ["docs", "edge/schemas"])
def test_committed_schemas_are_the_ones_the_models_generate(folder: str, doc: Any) -> None:
    path = REPO / folder / doc.filename
    assert path.is_file(), f"{path} is missing; run `{REGENERATE}` in the checkout"
    text = render(doc)
    assert path.read_text(encoding="utf-8") == text, (
        f"{path} differs from the schema its model generates; run `{REGENERATE}` in the "
        "checkout and commit the result"
    )
    Draft202012Validator.check_schema(json.loads(text))


def test_the_generator_writes_stale_schemas_and_check_mode_reports_them(tmp_path: Path) -> None:
    for folder in ("docs", "edge/schemas"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    stale = tmp_path / "docs" / "heartbeat.schema.json"
    stale.write_text("{}\n", encoding="utf-8")
    assert main(["--repo", str(tmp_path), "--check"]) == 1
    assert stale.read_text(encoding="utf-8") == "{}\n"  # --check writes nothing
    assert main(["--repo", str(tmp_path)]) == 0
    assert main(["--repo", str(tmp_path), "--check"]) == 0
    assert stale.read_text(encoding="utf-8") == render(SCHEMAS[1])


def _json_payload(reader: Callable[[bytes], Any]) -> Callable[[bytes], bytes]:
    def load_and_write(data: bytes) -> bytes:
        payload: bytes = reader(data).to_json()
        return payload + b"\n"

    return load_and_write


def _manifest(data: bytes) -> bytes:
    manifest = Manifest.from_dict(json.loads(data))
    return (json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n").encode()


FIXTURES = [
    (
        "identification-v1.json",
        "identification.schema.json",
        _json_payload(Identification.from_json),
    ),
    (
        "identification-object-v1.json",
        "identification.schema.json",
        _json_payload(Identification.from_json),
    ),
    (
        "identification-site-sample-v1.json",
        "identification.schema.json",
        _json_payload(Identification.from_json),
    ),
    (
        "identification-upload-v1.json",
        "identification.schema.json",
        _json_payload(Identification.from_json),
    ),
    (
        "identification-no-objects-v1.json",
        "identification.schema.json",
        _json_payload(Identification.from_json),
    ),
    ("heartbeat-v1.json", "heartbeat.schema.json", _json_payload(Heartbeat.from_json)),
    ("model-info-v1.json", "model-info.schema.json", _json_payload(ModelInfo.from_json)),
    ("command-reply-v1.json", "command-reply.schema.json", _json_payload(CommandReply.from_json)),
    ("manifest-v1.json", "bundle-manifest.schema.json", _manifest),
    ("manifest-v2.json", "bundle-manifest.schema.json", _manifest),
    ("manifest-v3.json", "bundle-manifest.schema.json", _manifest),
    ("manifest-v4.json", "bundle-manifest.schema.json", _manifest),
]


@pytest.mark.parametrize(("name", "schema", "round_trip"), FIXTURES, ids=[f[0] for f in FIXTURES])
def test_files_written_by_earlier_versions_load_and_are_written_back_unchanged(
    name: str, schema: str, round_trip: Callable[[bytes], bytes]
) -> None:
    # These files were written by fieldscope before the msgspec models (commit 3f1caa0).
    data = (WIRE / name).read_bytes()
    assert round_trip(data) == data
    validator = Draft202012Validator(
        json.loads((REPO / "docs" / schema).read_text(encoding="utf-8")),
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )
    assert [e.message for e in validator.iter_errors(json.loads(data))] == []


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_each_manifest_version_keeps_its_meaning(version: int) -> None:
    manifest = Manifest.from_dict(json.loads((WIRE / f"manifest-v{version}.json").read_bytes()))
    assert manifest.schema_version == version
    assert manifest.output == (None if version == 1 else "logits")
    # Versions 1 and 2 have no resample field: their recipes were trained on INTER_AREA.
    assert manifest.preprocessing.resample == ("exact" if version >= 3 else "area")
    # Only version 4 records the segmentation that cut the training crops.
    assert (manifest.segmentation is not None) == (version == 4)


def test_a_heartbeat_missing_a_frame_count_is_refused() -> None:
    data = json.loads((WIRE / "heartbeat-v1.json").read_bytes())
    del data["frames"]["failed"]
    with pytest.raises(PayloadError, match=r"heartbeat: frames\.failed is required"):
        Heartbeat.from_json(json.dumps(data))
