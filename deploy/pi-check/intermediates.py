"""Every intermediate tensor of a TFLite model on given inputs, to find the op that rounds
differently on ARM.

When a runtime gives other outputs on aarch64 than on x86_64 from identical input
tensors (``model on identical input`` in the Pi check), run this with that runtime's
Python on both architectures, then ``--compare`` the two files: it lists, in execution
order, the first ops whose outputs differ and by how many quantisation steps. Needs only
numpy and a TFLite interpreter (``tflite_runtime`` or ``ai_edge_litert``).

Usage:
    python intermediates.py MODEL.tflite INPUTS.npz OUT.npz [--images N]
    python intermediates.py --compare ARM.npz X86.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _interpreter(model: Path) -> Any:
    try:
        from tflite_runtime.interpreter import Interpreter
    except ImportError:
        from ai_edge_litert.interpreter import Interpreter
    return Interpreter(model_path=str(model), num_threads=1, experimental_preserve_all_tensors=True)


def dump(model: Path, inputs: Path, out: Path, images: int) -> None:
    """Run the model on the first ``images`` tensors of ``inputs`` (the ``tensors``
    array of a ``tensors.py`` file) and save every tensor after each run."""
    interpreter = _interpreter(model)
    interpreter.allocate_tensors()
    source = np.load(inputs)["tensors"][:images]
    entry = interpreter.get_input_details()[0]
    saved: dict[str, np.ndarray] = {}
    order = {op["index"]: op for op in interpreter._get_ops_details()}
    for n, image in enumerate(source):
        interpreter.set_tensor(entry["index"], image[None].astype(entry["dtype"]))
        interpreter.invoke()
        for op in order.values():
            for index in op["outputs"]:
                try:
                    saved[f"{n}:{op['index']}:{op['op_name']}:{index}"] = np.array(
                        interpreter.get_tensor(index)
                    )
                except ValueError:
                    continue
    np.savez(out, **saved)


def compare(arm_file: Path, x86_file: Path, shown: int = 12) -> int:
    """Print the ops whose outputs differ, first ones first; 1 if any differ."""
    arm, x86 = np.load(arm_file), np.load(x86_file)
    rows = []
    for key in x86.files:
        a, b = arm[key].astype(np.int64), x86[key].astype(np.int64)
        if a.shape != b.shape:
            rows.append((key, -1, -1))
            continue
        delta = np.abs(a - b)
        if delta.max() > 0:
            rows.append((key, int((delta > 0).sum()), int(delta.max())))

    def order(row: tuple[str, int, int]) -> tuple[int, int]:
        image, op, *_ = row[0].split(":")
        return int(image), int(op)

    rows.sort(key=order)
    print(f"{len(rows)} of {len(x86.files)} op outputs differ")
    for key, count, worst in rows[:shown]:
        print(f"  image:op:name:tensor {key}: {count} values differ, by up to {worst} steps")
    return 1 if rows else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("ARM", "X86"))
    parser.add_argument("args", nargs="*", type=Path)
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if len(args.args) != 3:
        parser.error("give MODEL.tflite INPUTS.npz OUT.npz, or --compare ARM.npz X86.npz")
    dump(*args.args, args.images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
