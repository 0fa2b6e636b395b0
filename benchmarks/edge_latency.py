"""Keras on the workstation vs the bundle on the edge: latency, memory, size, accuracy.

For one model at 224x224 it measures, each in a fresh subprocess (so peak memory is
that of a process doing only that):

* Keras ``model.predict`` on one image at a time (how the research scripts classify);
* the same Keras model called through a ``tf.function``;
* the converted bundle in each quantisation mode, run by the edge ``Classifier``
  (ai-edge-litert, no TensorFlow in the process) with 1 and 2 threads;

and prints per-image latency (median and 90th percentile), peak RSS, file sizes, the
ratios against Keras, accuracy of every bundle against the float model, and whether
the goals of issue 4 are met (int8 >= 30x faster than predict, >= 10x less peak memory
than the Keras process, >= 3.5x smaller than the Keras file, accuracy within 1 point).

Without ``--run`` the model is MobileNetV2 built by ``fieldscope.train`` with random
weights (weights=None: no download), evaluated on synthetic specimens: the speed,
memory and size figures are those of a trained model of the same architecture, the
accuracy figures are not meaningful. ``--run RUN_DIR`` benchmarks a trained run on its
own test split instead.

    python benchmarks/edge_latency.py [--run RUN_DIR] [--alpha 1.0] [--size 224]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("int8", "float16", "dynamic", "float32")
GOALS = {"speed": 30.0, "memory": 10.0, "size": 3.5, "accuracy_points": 1.0}


# --- the measuring subprocess ----------------------------------------------------------


def _peak_rss_mb() -> float:
    """This process's peak resident memory.

    ``VmHWM`` belongs to the address space, which ``exec`` replaces; ``ru_maxrss`` would
    carry over the parent's peak into a forked child (Linux keeps it across exec).
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _time_calls(call: Any, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def child(way: str, path: str, image_path: str, repeats: int, threads: int) -> None:
    """Load one model one way, classify one image ``repeats`` times, print JSON."""
    started = time.perf_counter()
    image = np.load(image_path)
    if way == "bundle":
        from fieldscope.edge.bundle import verify_bundle
        from fieldscope.edge.classify import Classifier

        classifier = Classifier(verify_bundle(Path(path)), threads)
        loaded = time.perf_counter() - started

        def call() -> Any:
            return classifier.classify(image)

        times = _time_calls(call, repeats, warmup=5)
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras
        import tensorflow as tf

        model = keras.models.load_model(path)
        batch = image[None].astype(np.float32)
        loaded = time.perf_counter() - started
        if way == "keras-predict":

            def call() -> Any:
                return model.predict(batch, verbose=0)

        else:
            function = tf.function(lambda x: model(x, training=False))
            tensor = tf.constant(batch)

            def call() -> Any:
                return function(tensor).numpy()

        times = _time_calls(call, repeats, warmup=3)
    print(
        json.dumps(
            {
                "median_ms": statistics.median(times),
                "p90_ms": float(np.percentile(times, 90)),
                "load_s": loaded,
                "peak_rss_mb": _peak_rss_mb(),
            }
        )
    )


def measure(way: str, path: Path, image: Path, repeats: int, threads: int = 0) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", way, str(path), str(image)]
    command += ["--repeats", str(repeats), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{way} {path} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --- preparing the model and its bundles -----------------------------------------------


def _untrained_model(alpha: float, size: int, work: Path) -> tuple[Any, dict[str, Any]]:
    from fieldscope.edge.preprocess import PreprocessRecipe, load_and_preprocess
    from fieldscope.edge.specimens import write_dataset
    from fieldscope.train.backbones import build_classifier

    data = work / "specimens"
    write_dataset(data, classes=4, per_class=16, size=256, seed=0)
    recipe = PreprocessRecipe(size=(size, size))
    labels = tuple(sorted(p.name for p in data.iterdir() if p.is_dir()))
    images, y = [], []
    for index, label in enumerate(labels):
        for path in sorted((data / label).glob("*.png")):
            images.append(load_and_preprocess(path, recipe))
            y.append(index)
    x, y_array = np.stack(images), np.asarray(y)
    calibration = np.arange(len(y)) % 16 < 8
    model = build_classifier(
        "mobilenet_v2", num_classes=len(labels), image_size=size, alpha=alpha, weights="none"
    )
    return model, {
        "labels": labels,
        "recipe": recipe,
        "calibration_images": x[calibration],
        "eval_images": x[~calibration],
        "eval_labels": y_array[~calibration],
        "what": f"MobileNetV2 alpha {alpha:g} at {size}x{size} with RANDOM weights "
        "(weights=None, no download): speed, memory and size are those of a trained model "
        "of this architecture; accuracy figures are not meaningful",
    }


def _run_model(run_dir: Path) -> tuple[Any, dict[str, Any]]:
    from fieldscope.convert.quantize import stratified_sample
    from fieldscope.convert.run import load_images, load_keras_model, read_run

    run = read_run(run_dir)
    picked = stratified_sample([y for _, y in run.train], 200, seed=run.seed)
    calibration, _ = load_images(tuple(run.train[i] for i in picked), run.recipe, "calibration")
    test_x, test_y = load_images(run.test, run.recipe, "test")
    return load_keras_model(run.model_path), {
        "labels": run.labels,
        "recipe": run.recipe,
        "calibration_images": calibration,
        "eval_images": test_x,
        "eval_labels": test_y,
        "what": f"the trained run {run_dir} on its {len(test_y)} test images",
    }


def _ratio(a: float, b: float) -> str:
    return f"{a / b:6.1f}x" if b else "    -"


def _convert_all(
    model: Any, data: dict[str, Any], work: Path
) -> tuple[dict[str, Path], dict[str, Any]]:
    from fieldscope.convert.pipeline import convert_model, write_converted_bundle

    bundles, fidelity = {}, {}
    for mode in MODES:
        print(f"converting {mode} ...", file=sys.stderr, flush=True)
        result = convert_model(model, quantize=mode, max_accuracy_drop=100.0, **data)
        bundle = write_converted_bundle(
            result,
            work / f"bundle-{mode}",
            model_name="bench",
            model_version="1",
            threshold=0.5,
            overwrite=True,
        )
        bundles[mode], fidelity[mode] = bundle.path, result.fidelity
    return bundles, fidelity


def _measure_all(
    keras_file: Path, bundles: dict[str, Path], image: Path, repeats: int
) -> list[tuple[str, str, dict[str, Any], int]]:
    print("measuring ...", file=sys.stderr, flush=True)
    keras_size = keras_file.stat().st_size
    rows = [
        (
            "keras model.predict",
            "-",
            measure("keras-predict", keras_file, image, repeats),
            keras_size,
        ),
        (
            "keras tf.function",
            "-",
            measure("keras-function", keras_file, image, repeats),
            keras_size,
        ),
    ]
    for mode in MODES:
        size = (bundles[mode] / "model.tflite").stat().st_size
        for threads in (1, 2):
            stats = measure("bundle", bundles[mode], image, repeats * 4, threads)
            rows.append((f"bundle {mode}", str(threads), stats, size))
    return rows


def _print_table(rows: list[tuple[str, str, dict[str, Any], int]]) -> None:
    base, keras_rss, keras_size = rows[0][2]["median_ms"], rows[0][2]["peak_rss_mb"], rows[0][3]
    print()
    print(
        f"{'way':<22}{'threads':>8}{'median ms':>11}{'p90 ms':>9}{'speed-up':>10}"
        f"{'peak RSS MB':>13}{'less mem':>10}{'file MB':>9}{'smaller':>9}"
    )
    for name, threads, s, size in rows:
        print(
            f"{name:<22}{threads:>8}{s['median_ms']:>11.2f}{s['p90_ms']:>9.2f}"
            f"{_ratio(base, s['median_ms']):>10}{s['peak_rss_mb']:>13.0f}"
            f"{_ratio(keras_rss, s['peak_rss_mb']):>10}{size / 1e6:>9.2f}"
            f"{_ratio(keras_size, size):>9}"
        )


def _print_goals(
    rows: list[tuple[str, str, dict[str, Any], int]], fidelity: dict[str, Any], trained: bool
) -> None:
    base, keras_rss, keras_size = rows[0][2]["median_ms"], rows[0][2]["peak_rss_mb"], rows[0][3]
    int8 = [(s, size) for name, _, s, size in rows if name == "bundle int8"]
    best = min(s["median_ms"] for s, _ in int8)
    memory = min(s["peak_rss_mb"] for s, _ in int8)
    drop = fidelity["int8"].accuracy_drop_points
    print()
    print("goals for the int8 bundle (issue 4):")
    for label, value, goal in (
        ("faster than model.predict (best thread count)", base / best, GOALS["speed"]),
        ("less peak memory than the Keras process", keras_rss / memory, GOALS["memory"]),
        ("smaller than the Keras file", keras_size / int8[0][1], GOALS["size"]),
    ):
        verdict = "met" if value >= goal else "NOT met"
        print(f"  {label}: {value:.1f}x (goal >= {goal:g}x) {verdict}")
    verdict = "met" if drop <= GOALS["accuracy_points"] else "NOT met"
    note = "" if trained else " (random weights: not meaningful)"
    print(
        f"  accuracy drop against float: {drop:.1f} points (goal <= "
        f"{GOALS['accuracy_points']:g}) {verdict}{note}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="benchmark a trained run (default: untrained)")
    parser.add_argument("--alpha", type=float, default=1.0, help="MobileNetV2 width (untrained)")
    parser.add_argument("--size", type=int, default=224, help="input side (untrained)")
    parser.add_argument("--repeats", type=int, default=50, help="timed Keras calls (bundles: 4x)")
    parser.add_argument("--work", type=Path, help="keep models and bundles here")
    parser.add_argument(
        "--child", nargs=3, metavar=("WAY", "MODEL", "IMAGE"), help=argparse.SUPPRESS
    )
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, repeats=args.repeats, threads=args.threads or 1)
        return 0

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    work = args.work or Path(tempfile.mkdtemp(prefix="fieldscope-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model, data = (
        _run_model(args.run) if args.run else _untrained_model(args.alpha, args.size, work)
    )
    print(f"model: {data.pop('what')}", flush=True)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    keras_file = work / "model.keras"
    model.save(keras_file)
    image = work / "image.npy"
    np.save(image, data["eval_images"][0])
    bundles, fidelity = _convert_all(model, data, work)
    rows = _measure_all(keras_file, bundles, image, args.repeats)
    _print_table(rows)
    print()
    print("fidelity against the Keras model (edge Classifier, ai-edge-litert):")
    for mode in MODES:
        print(f"  {fidelity[mode].summary()}")
    _print_goals(rows, fidelity, trained=args.run is not None)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end; models and bundles in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
