"""Contract 2 — the model bundle: what ``convert`` writes and every edge device loads.

A bundle is a directory::

    model.tflite    the model; takes raw RGB 0–255 (normalisation is inside the graph)
    manifest.json   everything needed to use it (labels, input, preprocessing, threshold,
                    provenance) and the sha256 and size of every other file
    manifest.sig    optional: a detached ed25519 signature over the exact manifest bytes

Because the manifest carries the checksums of the other files, signing the manifest
covers the whole bundle, and the signature is a raw 64-byte ed25519 signature that
``openssl pkeyutl -verify -rawin`` can check as well. Labels and preprocessing are read
from here and never re-derived at run time. Input shape, dtypes and quantisation are
taken from the model itself when the bundle is written, and :func:`verify_bundle`
checks them against the model again, so a manifest can never silently disagree with
the graph it describes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fieldscope.edge.bundle_files import (
    atomic_path,
    create_beside,
    fsync_dir,
    read_capped,
    swap_into_place,
    write_file,
)
from fieldscope.edge.errors import BundleError
from fieldscope.edge.manifest import (
    DTYPES,
    MANIFEST_FILE,
    MODEL_FILE,
    OUTPUT_KINDS,
    SCHEMA_VERSION,
    SIGNATURE_FILE,
    SUPPORTED_SCHEMA_VERSIONS,
    FileEntry,
    Manifest,
    Provenance,
    Quantization,
    QuantParams,
    Segmentation,
    Taxon,
    manifest_schema,
)
from fieldscope.edge.preprocess import PreprocessRecipe
from fieldscope.edge.runtime import Interpreter, check_min_runtime, make_interpreter, runtime_info
from fieldscope.edge.signing import check_signature, generate_keypair, load_private_key
from fieldscope.edge.untrusted import RejectedValueError, load_json, show_value

# The manifest's names (edge/manifest.py) and generate_keypair (edge/signing.py) are
# re-exported: this module stays the one import for everything about bundles.
__all__ = [
    "DTYPES",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "OUTPUT_KINDS",
    "SCHEMA_VERSION",
    "SIGNATURE_FILE",
    "SUPPORTED_SCHEMA_VERSIONS",
    "Bundle",
    "FileEntry",
    "Manifest",
    "Provenance",
    "QuantParams",
    "Quantization",
    "Segmentation",
    "Taxon",
    "check_model",
    "generate_keypair",
    "manifest_schema",
    "read_bundle",
    "sign_bundle",
    "verify_bundle",
    "write_bundle",
]

logger = logging.getLogger(__name__)


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


_CHUNK = 1 << 20
# A manifest is a few kilobytes (even 10,000 labels of 200 characters are about 2 MB); a
# bigger one is refused before it is read whole, and so is a model over MAX_MODEL_BYTES.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_MODEL_BYTES = 512 * 1024 * 1024


def _refusal(manifest: Manifest) -> str | None:
    """Why ``fieldscope convert`` left this device's runtime out of min_runtime, if said.

    Recorded as ``provenance.fidelity.<runtime>_<major>_<minor>.refused`` (e.g.
    ``tflite_runtime_2_14``); a free-form field, so anything else there is ignored.
    """
    info = runtime_info()
    parts = info.version.split(".")
    key = f"{info.name}_{'_'.join(parts[:2])}"
    entry = manifest.provenance.fidelity.get(key) if manifest.provenance else None
    reason = entry.get("refused") if isinstance(entry, Mapping) else None
    return reason if isinstance(reason, str) and reason else None


@dataclass(frozen=True)
class Bundle:
    """A bundle on disk whose files matched their checksums when it was read.

    ``sha256`` is the model's checksum (published with every identification).
    ``signed`` is True only when :func:`verify_bundle` checked ``manifest.sig`` against a
    public key; :func:`read_bundle` never checks signatures, so it is False there.
    """

    path: Path
    manifest: Manifest
    model_path: Path
    sha256: str
    signed: bool = False
    # The model's bytes exactly as they were checksummed. An interpreter must be built
    # from these (``model_source()``), never by opening ``model_path`` again: a file
    # swapped in between would otherwise be served under the verified sha256.
    model_content: bytes | None = field(default=None, repr=False, compare=False)

    def model_source(self) -> bytes | Path:
        """What to build the interpreter from: the verified bytes (the path only for a
        ``Bundle`` made by hand without them)."""
        return self.model_path if self.model_content is None else self.model_content


def _file_entry(path: Path) -> FileEntry:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileEntry(digest.hexdigest(), size)


def _dtype_name(detail: Mapping[str, Any]) -> str:
    return str(np.dtype(detail["dtype"]).name)


def _quant_params(detail: Mapping[str, Any]) -> QuantParams | None:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if not scale:
        return None
    return QuantParams(float(scale), int(zero_point))


def _single(details: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    if len(details) != 1:
        raise BundleError(
            f"the model has {len(details)} {kind} tensors; a fieldscope classifier has "
            f"exactly one {kind} (an RGB image in, one score per label out)"
        )
    return details[0]


def _quant_text(params: QuantParams | None) -> str:
    if params is None:
        return "not quantised"
    return f"scale {params.scale:g}, zero point {params.zero_point}"


def _same_quant(a: QuantParams | None, b: QuantParams | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.zero_point == b.zero_point and math.isclose(a.scale, b.scale, rel_tol=1e-6)


def check_model(manifest: Manifest, interpreter: Interpreter) -> None:
    """Refuse a manifest that disagrees with the model it describes.

    A label list one entry short, or a manifest written for another input size, would
    otherwise give confidently wrong identifications rather than an error.

    Raises:
        BundleError: naming what differs (manifest value vs the model's).
    """
    inp = _single(interpreter.get_input_details(), "input")
    out = _single(interpreter.get_output_details(), "output")
    model_shape = tuple(int(d) for d in inp["shape"])
    if model_shape != manifest.input_shape:
        raise BundleError(
            f"manifest input_shape {_shape_text(manifest.input_shape)} does not match the "
            f"model's input {_shape_text(model_shape)}"
        )
    if _dtype_name(inp) != manifest.input_dtype:
        raise BundleError(
            f"manifest input_dtype {manifest.input_dtype} does not match the model's input "
            f"{_dtype_name(inp)}"
        )
    if _dtype_name(out) != manifest.output_dtype:
        raise BundleError(
            f"manifest output_dtype {manifest.output_dtype} does not match the model's output "
            f"{_dtype_name(out)}"
        )
    scores = int(np.prod(out["shape"][1:]))
    if scores != len(manifest.labels):
        raise BundleError(
            f"manifest has {len(manifest.labels)} labels but the model outputs {scores} "
            "scores per image"
        )
    q = manifest.quantization or Quantization(None, None)
    for name, params, detail in (("input", q.input, inp), ("output", q.output, out)):
        actual = _quant_params(detail)
        if not _same_quant(params, actual):
            raise BundleError(
                f"manifest quantization.{name} ({_quant_text(params)}) does not match the "
                f"model's ({_quant_text(actual)})"
            )


def _model_fields(interpreter: Interpreter) -> dict[str, Any]:
    """The manifest fields that describe the model's tensors, read from the model."""
    inp = _single(interpreter.get_input_details(), "input")
    out = _single(interpreter.get_output_details(), "output")
    qin, qout = _quant_params(inp), _quant_params(out)
    return {
        "input_shape": tuple(int(d) for d in inp["shape"]),
        "input_dtype": _dtype_name(inp),
        "output_dtype": _dtype_name(out),
        "quantization": None if qin is None and qout is None else Quantization(qin, qout),
    }


def _manifest_bytes(manifest: Manifest) -> bytes:
    return (json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_bundle(
    out_dir: Path,
    model: bytes | Path,
    *,
    model_name: str,
    model_version: str,
    labels: Sequence[str],
    preprocessing: PreprocessRecipe,
    threshold: float = 0.5,
    provenance: Provenance | Mapping[str, Any] | None = None,
    min_runtime: Mapping[str, str] | None = None,
    output: str | None = None,
    segmentation: Segmentation | None = None,
    taxa: Sequence[Taxon] | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Write a bundle directory; input shape, dtypes and quantisation come from the model.

    ``output``: ``"probabilities"``, ``"logits"`` or ``None`` (the classifier probes);
    ``segmentation`` and ``taxa`` (:mod:`fieldscope.edge.taxa`) make a version 4 manifest.

    The model is loaded first, so a bundle that would not verify is never written; files
    go to a temporary sibling renamed into place: ``out_dir`` is absent, old or whole.

    Raises:
        BundleError: ``out_dir`` is not empty (and not ``overwrite``), the model cannot be
            loaded, or the manifest would be invalid or disagree with the model.
    """
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)
    model_bytes = _model_bytes(model)
    interpreter = make_interpreter(model_bytes)
    manifest = Manifest(
        model_name=model_name,
        model_version=model_version,
        labels=tuple(labels),
        preprocessing=preprocessing,
        threshold=float(threshold),
        provenance=_provenance(provenance),
        min_runtime=min_runtime,
        output=output,
        segmentation=segmentation,
        taxa=None if taxa is None else tuple(taxa),
        files={MODEL_FILE: FileEntry(hashlib.sha256(model_bytes).hexdigest(), len(model_bytes))},
        **_model_fields(interpreter),
    )
    check_model(manifest, interpreter)
    _write_folder(out_dir, model_bytes, manifest)
    logger.info("wrote bundle %s (%s %s)", out_dir, model_name, model_version)
    return read_bundle(out_dir)


def _provenance(given: Provenance | Mapping[str, Any] | None) -> Provenance:
    if isinstance(given, Mapping):
        return Provenance.from_dict(given)
    return given or Provenance()


def _check_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse to write over a file, or over a folder with content unless ``overwrite``."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise BundleError(f"cannot write bundle to {out_dir}: it exists and is not a directory")
    if any(out_dir.iterdir()) and not overwrite:
        raise BundleError(
            f"cannot write bundle to {out_dir}: the directory is not empty "
            "(choose another directory or overwrite it explicitly)"
        )


def _model_bytes(model: bytes | Path) -> bytes:
    if not isinstance(model, Path):
        return bytes(model)
    try:
        return model.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read model {model}: {exc.strerror or exc}") from exc


def _write_folder(out_dir: Path, model_bytes: bytes, manifest: Manifest) -> None:
    """Write the bundle into a temporary sibling folder and rename it into place, so
    ``out_dir`` is the old bundle or the complete new one, never half written."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = create_beside(out_dir, f"tmp-{os.getpid()}", directory=True)
        try:
            write_file(tmp / MODEL_FILE, model_bytes)
            write_file(tmp / MANIFEST_FILE, _manifest_bytes(manifest))
            fsync_dir(tmp)
            swap_into_place(tmp, out_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(out_dir.parent)
    except OSError as exc:
        raise BundleError(f"cannot write bundle to {out_dir}: {exc.strerror or exc}") from exc


def _open(path: Path, public_key: Path | None) -> Bundle:
    path = Path(path)
    if not path.exists():
        raise BundleError(f"bundle {path} does not exist")
    if not path.is_dir():
        raise BundleError(f"bundle {path} is not a directory (a bundle is a folder)")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(f"bundle {path} has no {MANIFEST_FILE}")
    raw = read_capped(path, MANIFEST_FILE, MAX_MANIFEST_BYTES)
    # The signature covers the exact bytes, so check it before trusting any of them.
    if public_key is not None:
        check_signature(path, raw, public_key)
    try:
        data = load_json(raw, max_bytes=MAX_MANIFEST_BYTES)
    except RejectedValueError as exc:
        raise BundleError(f"bundle {path}: {MANIFEST_FILE} {exc}") from None
    try:
        manifest = Manifest.from_dict(data)
    except BundleError as exc:
        raise BundleError(f"bundle {path}: {MANIFEST_FILE}: {exc}") from exc
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # Every field has its own check; this is the boundary's guarantee that a manifest
        # nobody foresaw still ends as a BundleError (the old model keeps serving).
        raise BundleError(
            f"bundle {path}: {MANIFEST_FILE} is invalid ({type(exc).__name__}: "
            f"{show_value(str(exc), 200)})"
        ) from exc
    model_content = _check_files(path, manifest)
    return Bundle(
        path=path,
        manifest=manifest,
        model_path=path / MODEL_FILE,
        sha256=manifest.files[MODEL_FILE].sha256,
        signed=public_key is not None,
        model_content=model_content,
    )


def _check_files(path: Path, manifest: Manifest) -> bytes:
    """Check every listed file's size and checksum; return the model's bytes as checked."""
    model_content = b""
    for name, expected in manifest.files.items():
        file_path = path / name
        if not file_path.is_file():
            if file_path.exists():  # a FIFO, a device, a link to /dev/zero: never read
                raise BundleError(f"bundle {path}: {name} is not a regular file")
            raise BundleError(f"bundle {path} is missing {name} (listed in {MANIFEST_FILE})")
        if name == MODEL_FILE:
            # Read once: these bytes are checksummed *and* loaded (Bundle.model_source).
            model_content = _read_model(path, expected)
            actual = FileEntry(hashlib.sha256(model_content).hexdigest(), len(model_content))
        else:
            actual = _file_entry(file_path)
        if actual.size != expected.size:
            raise _size_mismatch(path, name, actual.size, expected.size)
        if actual.sha256 != expected.sha256:
            raise BundleError(
                f"bundle {path}: checksum mismatch for {name}: {MANIFEST_FILE} says sha256 "
                f"{expected.sha256}, the file has {actual.sha256} (changed or damaged)"
            )
    return model_content


def _size_mismatch(path: Path, name: str, actual: int, expected: int) -> BundleError:
    return BundleError(
        f"bundle {path}: {name} is {actual} bytes but {MANIFEST_FILE} says "
        f"{expected} (truncated or replaced)"
    )


def _read_model(path: Path, expected: FileEntry) -> bytes:
    """The model's bytes, read once; a size other than the manifest's (a replaced file,
    a link to /dev/zero) or over ``MAX_MODEL_BYTES`` is refused before reading."""
    if expected.size > MAX_MODEL_BYTES:
        raise BundleError(
            f"bundle {path}: {MANIFEST_FILE} says {MODEL_FILE} is {expected.size:,} bytes, "
            f"more than the limit of {MAX_MODEL_BYTES:,}"
        )
    try:
        on_disk = (path / MODEL_FILE).stat().st_size
    except OSError as exc:
        raise BundleError(
            f"bundle {path}: cannot read {MODEL_FILE}: {exc.strerror or exc}"
        ) from exc
    if on_disk != expected.size:
        raise _size_mismatch(path, MODEL_FILE, on_disk, expected.size)
    return read_capped(path, MODEL_FILE, expected.size)


def read_bundle(path: Path) -> Bundle:
    """Parse a bundle and check that its files are present and match their checksums.

    It does not load the model or check a signature; use :func:`verify_bundle` before
    trusting a bundle that came from elsewhere.

    Raises:
        BundleError: naming what is wrong (missing file, invalid manifest, checksum).
    """
    return _open(Path(path), None)


def verify_bundle(path: Path, public_key: Path | None = None, *, load_model: bool = True) -> Bundle:
    """Everything :func:`read_bundle` checks, plus the signature and the model itself.

    With ``public_key`` a valid ``manifest.sig`` is required (and the returned bundle is
    ``signed``). With ``load_model`` the model is loaded with this device's runtime and
    its input shape, dtypes, quantisation and output size are compared with the
    manifest; this is what a device runs before swapping in a new bundle.

    Raises:
        BundleError: naming the first problem found.
    """
    path = Path(path)
    bundle = _open(path, public_key)
    if load_model:
        manifest = bundle.manifest
        try:
            check_min_runtime(manifest.min_runtime, runtime_info(), _refusal(manifest))
        except BundleError as exc:
            raise BundleError(f"bundle {path}: {exc}") from exc
        try:
            interpreter = make_interpreter(bundle.model_source())
        except BundleError as exc:
            needs = f" (the bundle asks for {manifest.min_runtime})" if manifest.min_runtime else ""
            raise BundleError(f"bundle {path}: {exc}{needs}") from exc
        try:
            check_model(manifest, interpreter)
        except BundleError as exc:
            raise BundleError(f"bundle {path}: {exc}") from exc
    return bundle


def sign_bundle(bundle_dir: Path, private_key_path: Path) -> Path:
    """Sign a bundle's manifest with an ed25519 private key; returns the signature path.

    The bundle is read (checksums checked) first, so a damaged bundle is never signed.

    Raises:
        BundleError: the bundle is invalid or the key cannot be used.
    """
    bundle_dir = Path(bundle_dir)
    read_bundle(bundle_dir)
    key = load_private_key(private_key_path)
    signature: bytes = key.sign((bundle_dir / MANIFEST_FILE).read_bytes())
    sig_path = bundle_dir / SIGNATURE_FILE
    with atomic_path(sig_path) as tmp:
        write_file(tmp, signature)
    logger.info("signed bundle %s", bundle_dir)
    return sig_path
