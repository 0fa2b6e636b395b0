"""Preprocess images with a bundle's recipe and run its model, for the Pi check.

``picheck.py`` runs this with each venv's Python on both architectures, to tell apart
the two ways in which a Raspberry Pi's answers can differ from a workstation's:

* **preprocessing**: the model-input pixels themselves (OpenCV's x86 and ARM builds do
  not round every operation alike), compared pixel by pixel;
* **the runtime's kernels**: the model run on *identical* input tensors (the x86_64
  ones, given as ``--reference``), where int8 kernels must agree exactly.

Only numpy and ``fieldscope.edge`` (the wheel under test) are needed.

Usage: python tensors.py BUNDLE IMAGES OUT.npz [--reference X86.npz]
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

# How many images each denoise filter is compared on (nlmeans is slow under emulation).
DENOISE_IMAGES = 6
# What `fieldscope edge classify` searches folders for.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})


def image_files(root: Path) -> list[str]:
    """Image paths relative to ``root``, sorted, hidden files and folders skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            os.path.relpath(Path(dirpath) / name, root)
            for name in filenames
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES
        ]
    return sorted(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("images", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--reference", type=Path, help="run the model on these tensors")
    args = parser.parse_args()

    from fieldscope.edge.errors import FieldscopeError

    try:
        return run(args.bundle, args.images, args.out, args.reference)
    except FieldscopeError as exc:
        print(f"tensors: {exc}", file=sys.stderr)
        return 2


def run(bundle_dir: Path, images: Path, out: Path, reference_file: Path | None) -> int:
    """Write ``out``: the images' tensors, and the model's outputs on them (or on the
    reference's tensors)."""
    from fieldscope.edge.bundle import read_bundle
    from fieldscope.edge.classify import Classifier
    from fieldscope.edge.preprocess import (
        DENOISE_METHODS,
        load_and_preprocess,
        load_image,
        preprocess,
    )
    from fieldscope.edge.runtime import runtime_info

    bundle = read_bundle(bundle_dir)
    names = image_files(images)
    if not names:
        print(f"tensors: no images in {images}", file=sys.stderr)
        return 2
    recipe = bundle.manifest.preprocessing
    tensors = np.stack([load_and_preprocess(images / name, recipe) for name in names])
    # Every denoise filter at its defaults, on the first images, with this recipe's
    # resizing: a filter that rounds differently on ARM shows here even when this
    # bundle does not use it.
    denoised = {}
    for method in DENOISE_METHODS[1:]:
        variant = replace(recipe, denoise=method, denoise_params={})
        denoised[f"denoise_{method}"] = np.stack(
            [preprocess(load_image(images / name), variant) for name in names[:DENOISE_IMAGES]]
        )
    inputs = tensors
    if reference_file is not None:
        reference = np.load(reference_file)
        if list(reference["names"]) != names:
            print("tensors: the reference holds other images", file=sys.stderr)
            return 2
        inputs = reference["tensors"]
    classifier = Classifier(bundle, k=len(bundle.manifest.labels))
    probabilities = np.stack([classifier.classify(image).probabilities for image in inputs])
    info = runtime_info()
    np.savez(
        out,
        names=np.array(names),
        tensors=tensors,
        probabilities=probabilities,
        runtime=np.array(f"{info.name} {info.version}"),
        resample=np.array(getattr(recipe, "resample", "area")),
        **denoised,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
