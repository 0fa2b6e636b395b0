"""Keras on the workstation vs the bundle on the edge: latency, memory, size, accuracy.

For one model at 224x224 it measures, each in a fresh subprocess (so peak memory is
that of a process doing only that):

* Keras ``model.predict`` on one image at a time (how the research scripts classify);
* the same Keras model called through a ``tf.function``;
* the converted bundle in each quantisation mode, run by the edge ``Classifier``
  (ai-edge-litert, no TensorFlow in the process): int8 with 1 and 2 threads, the
  other modes with 2;

and prints per-image latency (median and 90th percentile), peak RSS, file sizes, the
gains against ``model.predict`` (the baseline), the Keras process and the Keras file,
the accuracy of every bundle against the float model, and whether the goals of issue 4
are met (int8 >= 30x faster than predict, >= 10x less peak memory than the Keras
process, >= 3.5x smaller than the Keras file, accuracy within 1 point).

Without ``--run`` the model is MobileNetV2 built by ``fieldscope.train`` with random
weights (weights=None: no download), evaluated on synthetic specimens: the speed,
memory and size figures are those of a trained model of the same architecture, the
accuracy figures are not meaningful. ``--run RUN_DIR`` benchmarks a trained run on its
own test split instead.

    python benchmarks/edge_latency.py [--run RUN_DIR] [--alpha 1.0] [--size 224] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _machine import Figure, Goal, Report, benchmark_parser, positive_float, positive_int

from fieldscope.edge.errors import FieldscopeError

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
    model: Any, data: dict[str, Any], work: Path, modes: tuple[str, ...]
) -> tuple[dict[str, Path], dict[str, Any]]:
    from fieldscope.convert.pipeline import convert_model, write_converted_bundle

    bundles, fidelity = {}, {}
    for mode in modes:
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
    keras_file: Path,
    bundles: dict[str, Path],
    image: Path,
    repeats: int,
    *,
    threads: tuple[int, ...],
    function: bool,
) -> list[tuple[str, str, dict[str, Any], int]]:
    print("measuring ...", file=sys.stderr, flush=True)
    keras_size = keras_file.stat().st_size
    predict = measure("keras-predict", keras_file, image, repeats)
    rows = [("keras model.predict", "-", predict, keras_size)]
    if function:
        stats = measure("keras-function", keras_file, image, repeats)
        rows.append(("keras tf.function", "-", stats, keras_size))
    for mode, bundle in bundles.items():
        size = (bundle / "model.tflite").stat().st_size
        # 1 and 2 threads for int8 (the goals); the other modes with the most threads only.
        for n in threads if mode == "int8" else threads[-1:]:
            stats = measure("bundle", bundle, image, repeats * 4, n)
            rows.append((f"bundle {mode}", str(n), stats, size))
    return rows


def _print_table(rows: list[tuple[str, str, dict[str, Any], int]]) -> None:
    """Every way and thread count (the summary table below keeps the best of each way)."""
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


def _best(rows: list[tuple[str, str, dict[str, Any], int]], way: str) -> tuple[dict[str, Any], int]:
    """The fastest thread count of one way, and its file size."""
    stats, size = min(
        ((s, size) for name, _, s, size in rows if name == way), key=lambda r: r[0]["median_ms"]
    )
    return stats, size


def _figures(
    report: Report,
    rows: list[tuple[str, str, dict[str, Any], int]],
    fidelity: dict[str, Any],
    trained: bool,
) -> None:
    """The summary: each way against model.predict, and the int8 goals of issue 4."""
    keras, keras_size = rows[0][2], rows[0][3]
    # Keras under tf.function stays in the detailed table: it is neither ours nor the baseline.
    for way in (f"bundle {m}" for m in fidelity):
        stats, _ = _best(rows, way)
        report.add(
            Figure(
                f"latency, {way}",
                stats["median_ms"],
                "ms",
                baseline=keras["median_ms"],
                higher_is_better=False,
                goal=Goal(">=", GOALS["speed"], on="gain") if way == "bundle int8" else None,
                note="median, batch 1, best thread count",
            )
        )
    for mode in [m for m in ("int8", "float32") if m in fidelity]:
        stats, size = _best(rows, f"bundle {mode}")
        goal = mode == "int8"
        report.add(
            Figure(
                f"peak RSS, bundle {mode} process",
                stats["peak_rss_mb"],
                "MB",
                baseline=keras["peak_rss_mb"],
                higher_is_better=False,
                goal=Goal(">=", GOALS["memory"], on="gain") if goal else None,
            )
        )
        report.add(
            Figure(
                f"file size, bundle {mode}",
                size / 1e6,
                "MB",
                baseline=keras_size / 1e6,
                higher_is_better=False,
                goal=Goal(">=", GOALS["size"], on="gain") if goal else None,
            )
        )
    report.add(
        Figure(
            "accuracy drop vs float, int8",
            fidelity["int8"].accuracy_drop_points,
            "points",
            higher_is_better=False,
            goal=Goal("<=", GOALS["accuracy_points"]),
            note="" if trained else "random weights: not meaningful",
        )
    )
    if not trained:
        report.note("random weights: the accuracy figure is not meaningful (use --run RUN_DIR)")


def main() -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--run", type=Path, help="benchmark a trained run (default: untrained)")
    parser.add_argument(
        "--alpha", type=positive_float, default=1.0, help="MobileNetV2 width (untrained)"
    )
    parser.add_argument("--size", type=positive_int, default=224, help="input side (untrained)")
    parser.add_argument(
        "--repeats", type=positive_int, default=30, help="timed Keras calls (bundles: 4x)"
    )
    parser.add_argument("--work", type=Path, help="keep models and bundles here")
    parser.add_argument(
        "--child", nargs=3, metavar=("WAY", "MODEL", "IMAGE"), help=argparse.SUPPRESS
    )
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run is not None and not args.run.is_dir():
        parser.error(f"--run {args.run}: not a run folder (fieldscope train writes one)")
    if args.child:
        child(*args.child, repeats=args.repeats, threads=args.threads or 1)
        return 0
    threads, modes = (1, 2), MODES
    if args.quick:
        args.alpha, args.size, args.repeats, threads, modes = 0.35, 96, 5, (2,), ("int8",)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    report = Report(
        "edge_latency",
        "classifying one image: Keras on the workstation vs the bundle on the edge",
        baseline="Keras model.predict per image, full TensorFlow in the process",
        ours="bundle run by the edge Classifier (ai-edge-litert, no TensorFlow in the process)",
        quick=args.quick,
    )
    with report.started() as scratch:
        work = args.work or scratch
        work.mkdir(parents=True, exist_ok=True)
        try:
            model, data = (
                _run_model(args.run) if args.run else _untrained_model(args.alpha, args.size, work)
            )
        except FieldscopeError as exc:
            raise SystemExit(f"edge_latency: {exc}") from exc
        what = data.pop("what")
        print(f"model: {what}", flush=True)
        keras_file = work / "measured.keras"
        model.save(keras_file)
        image = work / "image.npy"
        np.save(image, data["eval_images"][0])
        bundles, fidelity = _convert_all(model, data, work, modes)
        rows = _measure_all(
            keras_file, bundles, image, args.repeats, threads=threads, function=not args.quick
        )
    _print_table(rows)
    print()
    print("fidelity against the Keras model (edge Classifier, ai-edge-litert):")
    for mode in modes:
        print(f"  {fidelity[mode].summary()}")
    _figures(report, rows, fidelity, trained=args.run is not None)
    report.details = {
        "model": what,
        "repeats": args.repeats,
        "ways": [
            {"way": name, "threads": n, "file_bytes": size, **stats}
            for name, n, stats, size in rows
        ],
        "fidelity": {mode: fidelity[mode].to_dict() for mode in modes},
    }
    return report.finish(args.json)


if __name__ == "__main__":
    sys.exit(main())
