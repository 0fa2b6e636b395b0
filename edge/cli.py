"""Subcommands that need only the edge install: ``specimens``, ``preview``, ``bundle``.

Handlers import their modules lazily so ``fieldscope --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the edge subcommands to the ``fieldscope`` parser."""
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

    p = subparsers.add_parser(
        "preview",
        help="write what the model sees for some images (decode, denoise, resize)",
        description="Apply a preprocessing recipe to images and save the results as PNG, "
        "to choose a denoise filter and resize policy by eye.",
    )
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    p.add_argument("--out", type=Path, required=True, help="folder for the preprocessed PNGs")
    p.add_argument("--size", type=int, default=224, help="model input side (default 224)")
    p.add_argument("--denoise", default="none", help="none|bilateral|median|gaussian|nlmeans")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="denoise parameter, e.g. --param diameter=9 (repeatable)",
    )
    p.add_argument("--resize", default="letterbox", help="stretch|center-crop|letterbox")
    p.add_argument("--fill", default="border", help="letterbox fill: border or R,G,B")
    p.set_defaults(handler=_preview)

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


def _specimens(args: argparse.Namespace) -> int:
    from fieldscope.edge.specimens import write_dataset

    def progress(done: int, total: int) -> None:
        print(f"\r  {done}/{total} images", end="", file=sys.stderr, flush=True)

    counts = write_dataset(
        args.out_dir,
        classes=args.classes,
        per_class=args.per_class,
        size=args.size,
        seed=args.seed,
        on_progress=progress,
    )
    print(file=sys.stderr)
    for label, n in counts.items():
        print(f"{label:>24}  {n} images")
    print(f"wrote {sum(counts.values())} images in {len(counts)} classes to {args.out_dir}")
    return 0


def _preview(args: argparse.Namespace) -> int:
    from fieldscope.edge.errors import FieldscopeError, RecipeError
    from fieldscope.edge.preprocess import PreprocessRecipe, load_image, preprocess, save_png

    params: dict[str, float | int] = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            raise RecipeError(f"--param expects KEY=VALUE, got {item!r}")
        try:
            params[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            raise RecipeError(f"--param {key}: {value!r} is not a number") from None
    fill: str | tuple[int, int, int] = args.fill
    if args.fill != "border":
        parts = args.fill.split(",")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise RecipeError(f"--fill expects 'border' or R,G,B, got {args.fill!r}")
        fill = (int(parts[0]), int(parts[1]), int(parts[2]))
    recipe = PreprocessRecipe(
        size=(args.size, args.size),
        denoise=args.denoise,
        denoise_params=params,
        resize=args.resize,
        fill=fill,
    )
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FieldscopeError(f"cannot create the output folder {args.out}: {exc.strerror}") from exc
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
