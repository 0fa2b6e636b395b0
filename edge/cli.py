"""Subcommands that need only the edge install: ``specimens``, ``preview``, ``bundle``, ``edge``.

Handlers import their modules lazily so ``fieldscope --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fieldscope.edge.bundle import Bundle
    from fieldscope.edge.classify import Classifier, Prediction
    from fieldscope.edge.preprocess import PreprocessRecipe

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the edge subcommands to the ``fieldscope`` parser."""
    for add in (_add_specimens, _add_preview, _add_bundle, _add_edge):
        add(subparsers)


def _add_specimens(subparsers: Any) -> None:
    """The ``specimens`` command: a synthetic dataset."""
    p = subparsers.add_parser(
        "specimens",
        help="generate a synthetic microscope specimen dataset (class folders)",
        description="Write seeded, microscope-like images of visually distinct synthetic "
        "'species' as OUT_DIR/<class>/<n>.png, for trying the pipeline without real data.",
    )
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    p.add_argument("--classes", type=int, default=4, help="number of species (default 4, max 8)")
    p.add_argument("--per-class", type=int, default=50, help="images per species (default 50)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(handler=_specimens)


def _add_preview(subparsers: Any) -> None:
    """The ``preview`` command: a recipe applied to images, saved as PNG."""
    p = subparsers.add_parser(
        "preview",
        help="write what the model sees for some images (decode, denoise, resize)",
        description="Apply a preprocessing recipe to images and save the results as PNG, "
        "to choose a denoise filter and resize policy by eye.",
    )
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    p.add_argument("--out", type=Path, required=True, help="folder for the preprocessed PNGs")
    p.add_argument("--size", type=int, default=224, help="model input side (default 224)")
    from fieldscope.edge.denoise import DENOISE_METHODS  # the filter registry, light

    p.add_argument("--denoise", default="none", help="|".join(DENOISE_METHODS))
    p.add_argument(
        "--denoise-param",
        "--param",  # the old spelling, kept; train and the config say --denoise-param
        dest="param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="denoise parameter, e.g. --denoise-param diameter=9 (repeatable; as in train)",
    )
    p.add_argument("--resize", default="letterbox", help="stretch|center-crop|letterbox")
    p.add_argument("--fill", default="border", help="letterbox fill: border or R,G,B")
    p.set_defaults(handler=_preview)


def _add_bundle(subparsers: Any) -> None:
    """The ``bundle`` commands: verify, info, inspect."""
    p = subparsers.add_parser("bundle", help="inspect and verify model bundles")
    bundle_sub = p.add_subparsers(dest="bundle_command", metavar="ACTION")
    bundle_sub.required = True
    v = bundle_sub.add_parser(
        "verify",
        help="check files, checksums, schema, labels/shape against the model, signature",
    )
    v.add_argument("bundle_dir", type=Path, metavar="BUNDLE_DIR")
    v.add_argument("--public-key", type=Path, help="ed25519 public key (PEM); requires a signature")
    v.set_defaults(handler=_bundle_verify)
    i = bundle_sub.add_parser("info", help="print the manifest of a bundle as JSON")
    i.add_argument("bundle_dir", type=Path, metavar="BUNDLE_DIR")
    i.set_defaults(handler=_bundle_info)
    n = bundle_sub.add_parser(
        "inspect",
        help="show a bundle in human form: labels, input, quantisation, fidelity, signature",
        description="Describe a bundle: model, labels, input and quantisation, preprocessing, "
        "threshold, the runtimes it runs on (and whether this machine's does), training "
        "metrics, float-vs-converted fidelity and signature status. `bundle info` prints "
        "the same manifest as JSON.",
    )
    n.add_argument("bundle_dir", type=Path, metavar="BUNDLE_DIR")
    n.add_argument(
        "--public-key", type=Path, help="ed25519 public key (PEM) to check the signature"
    )
    n.set_defaults(handler=_bundle_inspect)


def _add_edge(subparsers: Any) -> None:
    """The ``edge`` commands: the daemon's (run, check-config, status) and classify."""
    p = subparsers.add_parser("edge", help="run the edge code path on this machine")
    edge_sub = p.add_subparsers(dest="edge_command", metavar="ACTION")
    edge_sub.required = True
    # run, check-config, status: the daemon's own module owns them (it stays light to import).
    from fieldscope.edge.daemon_cli import add_daemon_commands

    add_daemon_commands(edge_sub)
    c = edge_sub.add_parser(
        "classify",
        help="classify image files with a bundle, exactly as a field station would",
        description="Verify BUNDLE, preprocess each image with the bundle's recipe and "
        "classify it with the edge runtime. Prints the label and score (or 'uncertain' "
        "below the bundle's threshold) and the top-k. Folders are searched recursively "
        "for PNG, JPEG, TIFF and BMP files. An unreadable image is reported and skipped; "
        "the exit status is 1 if any image failed. Needs only fieldscope[edge].",
    )
    c.add_argument("bundle_dir", type=Path, metavar="BUNDLE")
    c.add_argument("inputs", type=Path, nargs="+", metavar="IMAGE_OR_DIR")
    c.add_argument("--json", action="store_true", help="one JSON object per image (JSON Lines)")
    c.add_argument(
        "--public-key", type=Path, help="ed25519 public key (PEM); requires a valid signature"
    )
    c.add_argument("--threads", type=int, help="interpreter threads (default: the runtime's)")
    c.add_argument("--top", type=int, default=3, help="how many labels to list (default 3)")
    c.set_defaults(handler=_edge_classify)


def _specimens(args: argparse.Namespace) -> int:
    from fieldscope.edge.specimens import write_dataset

    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        # A counter redrawn in place only on a terminal: in a log file each \r would be
        # one more line of noise.
        if tty:
            print(f"\r  {done}/{total} images", end="", file=sys.stderr, flush=True)

    counts = write_dataset(
        args.out_dir,
        classes=args.classes,
        per_class=args.per_class,
        size=args.size,
        seed=args.seed,
        on_progress=progress,
    )
    if tty:
        print(file=sys.stderr)
    for label, n in counts.items():
        print(f"{label:>24}  {n} images")
    print(f"wrote {sum(counts.values())} images in {len(counts)} classes to {args.out_dir}")
    return 0


def _preview(args: argparse.Namespace) -> int:
    from fieldscope.edge.errors import create_folder
    from fieldscope.edge.preprocess import load_image, preprocess, save_png
    from fieldscope.edge.recipe import RecipeTable, parse_fill, parse_params

    table = RecipeTable(
        denoise=args.denoise,
        denoise_params=parse_params("--denoise-param", args.param),
        resize=args.resize,
        fill=parse_fill("--fill", args.fill),
    )
    recipe = table.recipe((args.size, args.size))
    create_folder(args.out, "the output folder")
    for path in args.images:
        out = args.out / f"{path.stem}.png"
        save_png(out, preprocess(load_image(path), recipe))
        print(f"{path} -> {out}")
    return 0


def _bundle_verify(args: argparse.Namespace) -> int:
    from fieldscope.edge.bundle import verify_bundle

    bundle = verify_bundle(args.bundle_dir, public_key=args.public_key)
    m = bundle.manifest
    signed = "signature verified" if args.public_key else "signature not checked"
    print(
        f"OK {args.bundle_dir}: {m.model_name} {m.model_version}, {len(m.labels)} labels, "
        f"input {'x'.join(str(d) for d in m.input_shape)} {m.input_dtype}, {signed}"
    )
    return 0


def _bundle_info(args: argparse.Namespace) -> int:
    from fieldscope.edge.bundle import read_bundle

    bundle = read_bundle(args.bundle_dir)
    print(json.dumps(bundle.manifest.to_dict(), indent=2))
    return 0


# --- bundle inspect ------------------------------------------------------------------


def _signature_status(bundle_dir: Path, public_key: Path | None) -> tuple[str, bool]:
    """A line about the signature, and whether it is acceptable (False: invalid)."""
    from fieldscope.edge.bundle import SIGNATURE_FILE, verify_bundle
    from fieldscope.edge.errors import BundleError

    signed = (bundle_dir / SIGNATURE_FILE).is_file()
    if public_key is None:
        if signed:
            return f"signed ({SIGNATURE_FILE}); not checked, give --public-key to check it", True
        return "unsigned", True
    try:
        verify_bundle(bundle_dir, public_key=public_key, load_model=False)
    except BundleError as exc:
        return f"INVALID: {exc}", False
    return f"valid signature for {public_key}", True


def _runtime_status(min_runtime: Any) -> str:
    from fieldscope.edge.errors import FieldscopeError
    from fieldscope.edge.runtime import check_min_runtime, runtime_info

    try:
        info = runtime_info()
    except FieldscopeError as exc:
        return f"this machine: {exc}"
    try:
        check_min_runtime(min_runtime, info)
    except FieldscopeError as exc:
        return f"this machine ({info.name} {info.version}) cannot run it: {exc}"
    return f"this machine ({info.name} {info.version}) can run it"


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(data: Any, indent: str = "    ") -> list[str]:
    if not isinstance(data, dict) or not data:
        return [f"{indent}(none)"]
    width = max(len(str(k)) for k in data)
    lines = []
    for key, value in data.items():
        text = (
            ", ".join(f"{k} {_number(v)}" for k, v in value.items())
            if isinstance(value, dict)
            else _number(value)
        )
        lines.append(f"{indent}{key:<{width}}  {text}")
    return lines


def _describe(bundle: Bundle, signature: str, runtime: str) -> list[str]:
    m = bundle.manifest
    shape = "x".join(str(d) for d in m.input_shape)
    lines = [
        f"bundle       {bundle.path}",
        f"model        {m.model_name} {m.model_version} (manifest schema {m.schema_version})",
        f"file         model.tflite, {m.files['model.tflite'].size / 1024:.0f} KiB, "
        f"sha256 {bundle.sha256}",
        f"input        {shape} {m.input_dtype} (raw RGB 0-255); output {m.output_dtype}",
    ]
    q = m.quantization
    if q is None:
        lines.append("quantisation none (float model)")
    else:
        parts = [
            f"{name} scale {p.scale:g} zero point {p.zero_point}"
            for name, p in (("input", q.input), ("output", q.output))
            if p is not None
        ]
        lines.append(f"quantisation {'; '.join(parts) or 'float input and output'}")
    r = m.preprocessing
    params = ", ".join(f"{k}={v}" for k, v in r.denoise_params.items())
    fill = r.fill if isinstance(r.fill, str) else ",".join(str(c) for c in r.fill)
    lines.append(
        f"preprocess   {r.size[0]}x{r.size[1]} {r.resize} (fill {fill}), denoise "
        f"{r.denoise}{f' ({params})' if params else ''}"
    )
    lines.append(f"threshold    {m.threshold:.4f} (scores below it are reported as uncertain)")
    if m.segmentation is None:
        lines.append("segmentation none recorded (trained on whole frames)")
    else:
        lines.append("segmentation [objects] settings that cut the training crops")
        lines += _table(m.segmentation.to_dict())
    runs_on = ", ".join(f"{k} >= {v}" for k, v in sorted((m.min_runtime or {}).items()))
    lines.append(f"runtimes     {runs_on or 'not recorded'}; {runtime}")
    lines.append(f"signature    {signature}")
    lines.append(f"labels       {len(m.labels)}")
    lines += [f"    {i:>3}  {label}" for i, label in enumerate(m.labels)]
    p = m.provenance
    lines.append(f"created      {p.created_at} from {p.source_run or 'an unrecorded source'}")
    lines.append("training metrics")
    lines += _table(p.training_metrics)
    lines.append("fidelity (converted model vs Keras, on the test split)")
    lines += _table(p.fidelity)
    return lines


def _bundle_inspect(args: argparse.Namespace) -> int:
    from fieldscope.edge.bundle import read_bundle

    bundle = read_bundle(args.bundle_dir)
    signature, ok = _signature_status(args.bundle_dir, args.public_key)
    for line in _describe(bundle, signature, _runtime_status(bundle.manifest.min_runtime)):
        print(line)
    return 0 if ok else 1


# --- edge classify -------------------------------------------------------------------

# What fieldscope.edge.preprocess.decode_image reads; used only to search folders.
_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})


def _image_files(inputs: list[Path]) -> Iterator[tuple[Path, str | None]]:
    """(file, None) per image to classify, or (input, why) for an input that gives none.

    A file named on the command line is tried whatever its suffix; folders are searched
    recursively for image suffixes, hidden files and folders skipped, in sorted order.
    """
    for item in inputs:
        if item.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(item):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found += [
                    Path(dirpath) / name
                    for name in filenames
                    if not name.startswith(".") and Path(name).suffix.lower() in _IMAGE_SUFFIXES
                ]
            if not found:
                yield item, f"{item}: no image files (PNG, JPEG, TIFF, BMP) in this folder"
            yield from ((path, None) for path in sorted(found))
        elif item.exists():
            yield item, None
        else:
            yield item, f"{item}: no such file or folder"


def _shown(path: Path) -> str:
    """A path as text that any terminal or JSON reader takes: a name that is not UTF-8
    (``b21_\\xff\\xfe.png``, which Python holds with surrogates) is written with
    backslash escapes instead of failing the print with UnicodeEncodeError."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _prediction_record(path: Path, prediction: Prediction) -> dict[str, Any]:
    return {
        "file": _shown(path),
        "status": prediction.status,
        "label": prediction.label,
        "score": round(prediction.score, 6),
        "top_k": [{"label": label, "score": round(score, 6)} for label, score in prediction.top_k],
    }


def _prediction_text(path: Path, prediction: Prediction, threshold: float) -> str:
    top = ", ".join(f"{label} {score:.3f}" for label, score in prediction.top_k)
    if prediction.label is None:
        best = prediction.top_k[0][0]
        return (
            f"{_shown(path)}: uncertain (best {best} {prediction.score:.4f} < threshold "
            f"{threshold:.4f}; top {len(prediction.top_k)}: {top})"
        )
    shown = _shown(path)
    return (
        f"{shown}: {prediction.label} {prediction.score:.3f} (top {len(prediction.top_k)}: {top})"
    )


def _classify_file(
    classifier: Classifier, path: Path, recipe: PreprocessRecipe
) -> Prediction | str:
    """The prediction for one file, or why it could not be classified (naming the file)."""
    from fieldscope.edge.errors import FieldscopeError
    from fieldscope.edge.preprocess import load_and_preprocess

    try:
        return classifier.classify(load_and_preprocess(path, recipe))
    except FieldscopeError as exc:  # the message names the path: show it printable too
        return str(exc).replace(str(path), _shown(path))


def _edge_classify(args: argparse.Namespace) -> int:
    from fieldscope.edge.bundle import verify_bundle
    from fieldscope.edge.classify import Classifier
    from fieldscope.edge.errors import ConfigError

    if args.top < 1:
        raise ConfigError(f"--top must be at least 1, got {args.top}")
    bundle = verify_bundle(args.bundle_dir, public_key=args.public_key)
    classifier = Classifier(bundle, args.threads, k=args.top)
    recipe = bundle.manifest.preprocessing
    done = failed = 0
    for path, problem in _image_files(args.inputs):
        result = _classify_file(classifier, path, recipe) if problem is None else problem
        if isinstance(result, str):
            failed += 1
            if args.json:
                print(json.dumps({"file": _shown(path), "status": "error", "error": result}))
            print(f"error: {result}", file=sys.stderr)
            continue
        done += 1
        if args.json:
            print(json.dumps(_prediction_record(path, result)), flush=True)
        else:
            print(_prediction_text(path, result, classifier.threshold), flush=True)
    if failed:
        print(f"{failed} of {done + failed} inputs failed", file=sys.stderr)
        return 1
    return 0
