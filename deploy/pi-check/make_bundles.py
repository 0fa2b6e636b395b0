"""Make the default inputs of the Raspberry Pi check: two bundles and sample images.

Run by ``deploy/pi-check/run`` when no ``--bundle`` is given, with a host Python that
has ``fieldscope[train]`` (TensorFlow). It trains a small MobileNet-like model on
synthetic specimens (``fieldscope.edge.specimens``) for long enough that it really
tells the species apart: a model that answers the same for every image would make
the arm64-vs-x86_64 comparison meaningless. It then converts it with fieldscope's
own converter (operator check, fidelity check, ``min_runtime``) twice:

* ``int8``: what ``fieldscope convert`` ships by default (median denoise);
* ``float32``: exercises the float kernels (Gaussian denoise).

The sample images are drawn with another seed than the training images. Output::

    OUT_DIR/bundles/int8/  OUT_DIR/bundles/float32/  OUT_DIR/images/<species>/*.png

Usage: python make_bundles.py OUT_DIR
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

SIZE = 48
SPECIES = 4
TRAIN_PER_CLASS = 40
SAMPLE_PER_CLASS = 3
# The bundle's quantisation and its denoise filter.
RECIPES = {"int8": "median", "float32": "gaussian"}


def _load(root: Path, labels: list[str], recipe: Any) -> tuple[np.ndarray, np.ndarray]:
    from fieldscope.edge.preprocess import load_and_preprocess

    images, targets = [], []
    for index, label in enumerate(labels):
        for path in sorted((root / label).glob("*.png")):
            images.append(load_and_preprocess(path, recipe))
            targets.append(index)
    return np.stack(images), np.asarray(targets)


def make(out_dir: Path) -> None:
    """Write the bundles and sample images into ``out_dir`` (see the module docstring)."""

    from fieldscope.convert.pipeline import convert_model, write_converted_bundle
    from fieldscope.edge.preprocess import PreprocessRecipe
    from fieldscope.edge.specimens import write_dataset
    from fieldscope.train.backbones import fit_mini_mobilenet

    write_dataset(
        out_dir / "images", classes=SPECIES, per_class=SAMPLE_PER_CLASS, size=160, seed=11
    )
    with tempfile.TemporaryDirectory(prefix="pi-check-train-") as tmp:
        train_dir = Path(tmp) / "train"
        write_dataset(train_dir, classes=SPECIES, per_class=TRAIN_PER_CLASS, size=96, seed=3)
        labels = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
        for name, denoise in RECIPES.items():
            recipe = PreprocessRecipe(size=(SIZE, SIZE), resize="letterbox", denoise=denoise)
            x, y = _load(train_dir, labels, recipe)
            test = np.arange(len(y)) % 10 < 3
            train_x = x[~test]
            model = fit_mini_mobilenet(train_x, y[~test], len(labels))
            result = convert_model(
                model,
                labels=labels,
                recipe=recipe,
                calibration_images=train_x[::2],
                eval_images=x[test],
                eval_labels=y[test],
                quantize=name,
                max_accuracy_drop=15.0,  # a test bundle: 36 test images, one is ~3 points
            )
            write_converted_bundle(
                result,
                out_dir / "bundles" / name,
                model_name=f"pi-check-{name}",
                model_version="1",
                threshold=0.5,
                source_run="deploy/pi-check/make_bundles.py",
            )
            print(f"  bundle {name}: {result.fidelity.summary()}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    try:
        from fieldscope.edge.errors import FieldscopeError
    except ImportError as exc:
        print(f"make_bundles: fieldscope is not importable here ({exc})", file=sys.stderr)
        return 2
    try:
        make(args.out_dir)
    except ImportError as exc:
        print(
            f"make_bundles: {exc}; making the default test bundles needs fieldscope[train] "
            "on the host (pip install -e '.[train]'), or give --bundle and --images",
            file=sys.stderr,
        )
        return 2
    except FieldscopeError as exc:
        print(f"make_bundles: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
