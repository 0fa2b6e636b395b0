"""Make the real-data input of the Raspberry Pi check: a 24-class plankton bundle.

Synthetic bundles have few classes and wide margins, so they hide what a Pi does to a
real model: one grey level of preprocessing, or an int8 kernel that rounds differently,
moves a close call between two of many species. This trains a quick model with
``fieldscope train`` on the 2,880 NDSB plankton images in 24 classes (read in place
from ``$FIELDSCOPE_NDSB24``, default ``../shared/data/ndsb24`` next to the checkout; never
copied into the repository), converts it with ``fieldscope convert`` (int8, logits
output, exact resampling), and copies a few images per class of the run's *test* split
(never trained on) as the check's images. Output::

    OUT_DIR/bundles/ndsb24-int8/  OUT_DIR/images/<class>/*.jpg  OUT_DIR/run/

Run by ``deploy/pi-check/run --real`` with a host Python that has fieldscope[train];
about 3-4 minutes on two cores. Exit status 2 with a one-line reason when the data
are missing.

Usage: python make_real_bundle.py OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ndsb24"
# The quick recipe: small input, one fine-tuning pass less than the default.
TRAIN_ARGS = ("--image-size", "96", "--fine-tune-epochs", "3", "--augment-copies", "1")
TEST_IMAGES_PER_CLASS = 2


def data_dir() -> Path:
    """Where the NDSB images are: ``$FIELDSCOPE_NDSB24`` or the shared default."""
    return Path(os.environ.get("FIELDSCOPE_NDSB24") or DEFAULT_DATA)


def _fieldscope(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "fieldscope.cli", *args], check=True)


def make(out_dir: Path, data: Path) -> None:
    """Train, convert and pick the test images into ``out_dir`` (see the docstring)."""
    run = out_dir / "run"
    bundle = out_dir / "bundles" / "ndsb24-int8"
    _fieldscope("train", str(data), "--out", str(run), *TRAIN_ARGS)
    # The check compares the Pi with x86_64 on this bundle, whatever its accuracy: the
    # quick recipe's int8 model loses accuracy against Keras (see the fidelity it
    # prints), which the convert gate would refuse by default.
    _fieldscope(
        "convert", str(run), "--out", str(bundle), "--name", "ndsb24", "--max-accuracy-drop", "100"
    )
    from fieldscope.train.rundir import RunDir

    split = RunDir(run).read_split()
    chosen: dict[str, list[str]] = defaultdict(list)
    for sample in split.test:
        if len(chosen[sample.label]) < TEST_IMAGES_PER_CLASS:
            chosen[sample.label].append(sample.path)
    for label, paths in chosen.items():
        (out_dir / "images" / label).mkdir(parents=True, exist_ok=True)
        for rel in paths:
            source = Path(rel) if Path(rel).is_absolute() else Path(split.data_dir) / rel
            shutil.copyfile(source, out_dir / "images" / label / source.name)
    manifest = json.loads((bundle / "manifest.json").read_text())
    fidelity = manifest["provenance"].get("fidelity") or {}
    print(
        f"  bundle {bundle} ({len(manifest['labels'])} classes, output "
        f"{manifest.get('output')}, resample {manifest['preprocessing'].get('resample')}, "
        f"fidelity {json.dumps(fidelity, sort_keys=True)})"
    )
    print(f"  images: {sum(len(p) for p in chosen.values())} from the test split")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    data = data_dir()
    if not data.is_dir() or not any(p.is_dir() for p in data.iterdir()):
        print(
            f"make_real_bundle: no NDSB plankton folders at {data}; set FIELDSCOPE_NDSB24 "
            "to the folder with one sub-folder per class (24 classes)",
            file=sys.stderr,
        )
        return 2
    try:
        make(args.out_dir, data)
    except subprocess.CalledProcessError as exc:
        print(f"make_real_bundle: {' '.join(exc.cmd[2:4])} failed (exit {exc.returncode})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
