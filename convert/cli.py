"""``fieldscope convert`` and ``fieldscope keys new``.

The parsers import nothing heavy; the convert handler imports TensorFlow only when it
runs, and a missing training stack becomes a one-line hint to install it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from fieldscope.convert import DEFAULT_CALIBRATION_IMAGES

__all__ = ["register"]

_MODES = ("int8", "float16", "dynamic", "float32")


def register(subparsers: Any) -> None:
    """Add ``convert`` and ``keys`` to the ``fieldscope`` parser."""
    p = subparsers.add_parser(
        "convert",
        help="quantise a training run into a verified, optionally signed TFLite bundle",
        description="Convert RUN_DIR's model to TFLite (default: full int8 with uint8 input "
        "and output, calibrated on a stratified sample of the training split), check that "
        "no edge runtime is left out (no Flex ops; runs on tflite-runtime 2.14), run it with "
        "the edge classifier on the test split against the Keras model, and write the "
        "bundle only if the accuracy drop is within --max-accuracy-drop.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, required=True, metavar="BUNDLE_DIR", help="bundle folder")
    _add_convert_arguments(p)
    p.set_defaults(handler=_convert)
    _register_keys(subparsers)


_DATA_DIR_HELP = (
    "where the run's image folder is now, if it has moved (a run trained on several "
    "folders: --data-dir once for each one's new place, in the order given to train)"
)


def _add_convert_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``fieldscope convert`` besides RUN_DIR and --out."""
    p.add_argument(
        "--quantize",
        choices=_MODES,
        default="int8",
        help="int8 (default; smallest, fastest), float16, dynamic or float32",
    )
    p.add_argument("--name", help="model name in the manifest (default: the run folder's name)")
    p.add_argument("--version", help="model version in the manifest (default: UTC date-time)")
    p.add_argument("--sign-key", type=Path, metavar="KEY", help="ed25519 private key to sign with")
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=1.0,
        metavar="POINTS",
        help="refuse when test accuracy falls more than this many percentage points (default 1)",
    )
    p.add_argument(
        "--calibration-images",
        type=int,
        default=DEFAULT_CALIBRATION_IMAGES,
        metavar="N",
        help="int8 calibration sample drawn from the training split, stratified so every "
        f"class is in it (default {DEFAULT_CALIBRATION_IMAGES})",
    )
    p.add_argument(
        "--threshold",
        type=float,
        help="decision threshold for the bundle (default: the one the run chose on validation)",
    )
    p.add_argument("--data-dir", type=Path, action="append", metavar="DIR", help=_DATA_DIR_HELP)
    p.add_argument(
        "--allow-newer-runtime",
        action="store_true",
        help="write a bundle even if tflite-runtime 2.14 cannot run it (it then needs a "
        "recent ai-edge-litert)",
    )
    p.add_argument(
        "--no-float-fallback",
        dest="float_fallback",
        action="store_false",
        help="keep every layer int8 even when the int8 model's top-1 agreement with the "
        "float model is below 0.98 or it loses more than 0.5 points of accuracy (by default "
        "a growing share of the first layers, up to three quarters, is then kept in float "
        "until both hold)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")


def _register_keys(subparsers: Any) -> None:
    k = subparsers.add_parser("keys", help="make ed25519 key pairs for signing bundles")
    keys_sub = k.add_subparsers(dest="keys_command", metavar="ACTION")
    keys_sub.required = True
    n = keys_sub.add_parser(
        "new",
        help="write OUT_PREFIX.key (private, mode 0600) and OUT_PREFIX.pub",
        description="Make an ed25519 key pair: sign bundles with `fieldscope convert "
        "--sign-key OUT_PREFIX.key`; give OUT_PREFIX.pub to the devices, which then refuse "
        "unsigned or wrongly signed bundles. Keep the private key off the devices.",
    )
    n.add_argument("prefix", type=Path, metavar="OUT_PREFIX")
    n.add_argument("--force", action="store_true", help="overwrite existing key files")
    n.set_defaults(handler=_keys_new)


def _progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _convert(args: argparse.Namespace) -> int:
    # TensorFlow's C++ start-up chatter is not for users of a command-line tool. It is
    # imported only once the run, the options and the output folder have been checked.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from fieldscope.edge.native_logs import quiet_native_stderr

    with quiet_native_stderr():  # abseil's lines from before TF sets up its logging
        from fieldscope.convert.run import convert_run

    result = convert_run(
        args.run_dir,
        args.out,
        quantize=args.quantize,
        model_name=args.name,
        model_version=args.version,
        sign_key=args.sign_key,
        max_accuracy_drop=args.max_accuracy_drop,
        calibration_size=args.calibration_images,
        threshold=args.threshold,
        data_dir=args.data_dir,
        allow_newer_runtime=args.allow_newer_runtime,
        float_fallback=args.float_fallback,
        overwrite=args.overwrite,
        progress=_progress,
    )
    for line in result.lines():
        print(line)
    return 0


def _keys_new(args: argparse.Namespace) -> int:
    from fieldscope.convert.keys import new_keypair

    private, public = new_keypair(args.prefix, overwrite=args.force)
    print(f"private key {private} (mode 0600): sign with fieldscope convert --sign-key {private}")
    print(f"public key  {public}: give it to the devices (their config's public key)")
    return 0
