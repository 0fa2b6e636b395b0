"""A segmenting station (``[objects] mode = "segment"``) against the research way: objects/s.

Ours: the daemon as a separate process (``python -m fieldscope.edge.daemon``) with a
replay camera looping over synthetic frames of 1, 10 and 50 specimens
(:mod:`fieldscope.edge.specimen_frames`, plus dust), ``[objects] mode = "segment"``
(Otsu, clean-up, size limits, objects cut by the frame edge dropped: the synthetic
frames' vignetted corners), each object's crop through the bundle's recipe
(bilateral 9/75/75, letterbox) and a 224x224 full int8 MobileNetV2 (the bundle of
``edge_pipeline.py``), one identification per object through the outbox (an fsync
each) to a local mosquitto.

Baseline, the research way: one loop in one process — ``cv2.imread``, Otsu threshold,
``skimage.measure.label`` + ``regionprops``, and per object: crop, bilateral filter,
resize, Keras ``model.predict`` (full TensorFlow) on the float model the bundle was
converted from, paho publish QoS 1.

Reported per objects-per-frame: objects/s at a subscriber after a warm-up (both), peak
RSS (VmHWM) of the process (both; goal <= 120 MB), and, measured in this process one
frame at a time, the share of a frame's time spent segmenting (Segmenter.segment)
against preprocessing and classifying its crops. Goal: >= 20 objects/s at 10 objects
per frame::

    python benchmarks/edge_objects.py                    # builds the bundle (~1 min)
    python benchmarks/edge_objects.py --work /tmp/bench  # keeps and reuses the bundle
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _broker import Broker
from _machine import Figure, Goal, Report, benchmark_parser, positive_float, positive_int
from _research import research_frames, research_start
from edge_pipeline import (
    Arrivals,
    keras_path,
    peak_rss_figure,
    stop_daemon,
    vm_hwm_mb,
    write_config,
)
from edge_pipeline import write_frames as write_calibration_frames

PREFIX = "bench"
RESEARCH_TOPIC = "bench/research/objects/identification"
PER_FRAME = (1, 10, 50)
MIN_AREA_PX = 200
LABELS = ("globigerina", "orbulina", "textularia", "nodosaria")


def frame_side(objects: int) -> int:
    """A square frame with room for ``objects`` separated 96-pixel specimens."""
    return 320 if objects <= 1 else (640 if objects <= 10 else 1280)


def write_object_frames(folder: Path, objects: int, n: int) -> list[Path]:
    """``n`` frames of ``objects`` separated specimens and some dust, as PNG."""
    from fieldscope.edge.specimen_frames import FrameRecipe, write_frames

    recipe = FrameRecipe(
        size=frame_side(objects),
        separated=objects,
        touching_pairs=0,
        at_border=0,
        debris=8,
        tile_px=96,
    )
    paths = write_frames(folder, n, seed=11, recipe=recipe)
    shutil.rmtree(folder / "truth")  # the replay camera reads the folder recursively
    return paths


SEGMENT_SECTION = f"""
[objects]
mode = "segment"
min_area_um2 = {MIN_AREA_PX}
drop_border = true
"""


def measure(
    command: list[str], arrivals: Arrivals, log: Path, warmup: float, seconds: float
) -> dict[str, Any]:
    """Run ``command`` until its first message, warm up, count; objects/s and peak RSS."""
    began = time.monotonic()
    with log.open("ab") as fh:
        proc = subprocess.Popen(command, stderr=fh)
    try:
        while arrivals.first_after(began) is None:
            if proc.poll() is not None:
                raise SystemExit(
                    f"{command[2]} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
                )
            if time.monotonic() - began > 180:
                raise SystemExit(f"{command[2]}: nothing published within 180 s")
            time.sleep(0.005)
        time.sleep(warmup)
        start = time.monotonic()
        time.sleep(seconds)
        end = time.monotonic()
        rss = vm_hwm_mb(proc.pid)
    finally:
        if command[2] == "fieldscope.edge.daemon":
            stop_daemon(proc)
        else:
            proc.kill()
            proc.wait(30)
    return {"objects_per_s": arrivals.count_between(start, end) / (end - start), "rss_mb": rss}


def research_loop(keras_file: Path, frames: Path, port: int) -> None:
    """The research way, until killed: threshold, regionprops, Keras predict per object."""
    import cv2
    import skimage.measure

    model, size, client = research_start(keras_file, port)
    for path, image in research_frames(frames):
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        _, mask = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY_INV | cv2.THRESH_OTSU)
        for region in skimage.measure.regionprops(skimage.measure.label(mask > 0), grey):
            y0, x0, y1, x1 = region.bbox
            border = y0 == 0 or x0 == 0 or y1 == mask.shape[0] or x1 == mask.shape[1]
            if region.area < MIN_AREA_PX or border:  # the vignetted corners, as ours
                continue
            crop = cv2.bilateralFilter(np.ascontiguousarray(image[y0:y1, x0:x1]), 9, 75, 75)
            crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
            probs = model.predict(crop[None].astype(np.float32), verbose=0)[0]
            best = int(np.argmax(probs))
            message = {
                "image": path.name,
                "label": LABELS[best],
                "score": float(probs[best]),
                "area": float(region.area),
                "esd": float(region.equivalent_diameter_area),
                "major": float(region.axis_major_length),
                "minor": float(region.axis_minor_length),
            }
            client.publish(RESEARCH_TOPIC, json.dumps(message), qos=1)


def stage_shares(bundle_dir: Path, frames: Path, runs: int) -> dict[str, float]:
    """Per frame, median ms: segmenting, preprocessing the crops, classifying them."""
    from fieldscope.edge.bundle import verify_bundle
    from fieldscope.edge.classify import Classifier
    from fieldscope.edge.objects import ObjectsSettings, Segmenter
    from fieldscope.edge.preprocess import load_image, preprocess

    bundle = verify_bundle(bundle_dir)
    recipe = bundle.manifest.preprocessing
    classifier = Classifier(bundle)
    settings = ObjectsSettings(mode="segment", min_area_um2=MIN_AREA_PX, drop_border=True)
    segmenter = Segmenter(settings)
    images = [load_image(p) for p in sorted(frames.glob("*.png"))]
    times: dict[str, list[float]] = {"segment": [], "preprocess": [], "classify": [], "n": []}
    for i in range(runs + 1):
        t0 = time.perf_counter()
        found = segmenter.segment(images[i % len(images)])
        t1 = time.perf_counter()
        tensors = [preprocess(o.crop, recipe) for o in found.objects]
        t2 = time.perf_counter()
        for tensor in tensors:
            classifier.classify(tensor)
        t3 = time.perf_counter()
        if i:  # the first warms caches
            for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2), strict=False):
                times[key].append(value * 1000)
            times["n"].append(len(found.objects))
    return {key: statistics.median(values) for key, values in times.items()}


def run_one(
    args: argparse.Namespace, work: Path, bundle: Path, objects: int, broker: Broker
) -> dict[str, Any]:
    frames = work / f"frames-{objects}"
    if not frames.is_dir():
        write_object_frames(frames, objects, args.frames)
    shutil.rmtree(work / "data", ignore_errors=True)
    config = write_config(
        work, bundle, frames, broker.port, None, device="objects", sections=SEGMENT_SECTION
    )
    out: dict[str, Any] = {"objects": objects}
    arrivals = Arrivals(broker.port, f"{PREFIX}/bench/objects/identification", f"o{objects}")
    try:
        command = [sys.executable, "-m", "fieldscope.edge.daemon", "--config", str(config)]
        out["ours"] = measure(command, arrivals, work / "daemon.log", args.warmup, args.seconds)
    finally:
        arrivals.close()
    if not args.no_baseline and keras_path(bundle).exists():
        research = Arrivals(broker.port, RESEARCH_TOPIC, f"r{objects}")
        try:
            command = [sys.executable, __file__, "--research-loop", str(keras_path(bundle)),
                       str(frames), str(broker.port)]  # fmt: skip
            out["research"] = measure(
                command, research, work / "research.log", args.warmup, args.seconds
            )
        finally:
            research.close()
    out["stages_ms"] = stage_shares(bundle, frames, args.stage_runs)
    return out


def summarise(report: Report, results: list[dict[str, Any]]) -> None:
    for r in results:
        n, ours, base = r["objects"], r["ours"], r.get("research") or {}
        goal = Goal(">=", 20) if n == 10 else None
        report.add(
            Figure(
                f"objects/s, {n} per frame",
                ours["objects_per_s"],
                "objects/s",
                baseline=base.get("objects_per_s"),
                goal=goal,
            )
        )
        report.add(peak_rss_figure(f"peak RSS, {n} per frame", ours["rss_mb"], base.get("rss_mb")))
        s = r["stages_ms"]
        total = s["segment"] + s["preprocess"] + s["classify"]
        report.add(
            Figure(
                f"share of a frame's time segmenting, {n} per frame",
                100.0 * s["segment"] / total,
                "%",
                higher_is_better=False,
                note=f"classify {100.0 * s['classify'] / total:.0f} %",
            )
        )
        report.note(
            f"{n} per frame (found {s['n']:.0f}): per frame median ms: segment "
            f"{s['segment']:.1f}, preprocess crops {s['preprocess']:.1f}, classify crops "
            f"{s['classify']:.1f}"
        )
    report.details = {"runs": results}


def parse_args() -> argparse.Namespace:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--work", type=Path, help="working folder (kept; the bundle is reused)")
    parser.add_argument("--bundle", type=Path, help="use this bundle (baseline: BUNDLE.keras)")
    parser.add_argument("--frames", type=positive_int, default=4, help="distinct frames per N")
    parser.add_argument("--warmup", type=positive_float, default=3.0, help="seconds before")
    parser.add_argument("--seconds", type=positive_float, default=10.0, help="seconds measured")
    parser.add_argument("--stage-runs", type=positive_int, default=8, help="frames per share")
    parser.add_argument("--per-frame", type=positive_int, nargs="+", default=list(PER_FRAME))
    parser.add_argument("--no-baseline", action="store_true", help="skip the research loop")
    parser.add_argument("--size", type=positive_int, default=224, help="model input side")
    parser.add_argument("--alpha", type=positive_float, default=1.0, help="MobileNetV2 width")
    parser.add_argument("--research-loop", nargs=3, help=argparse.SUPPRESS)
    return parser.parse_args()


def prepare_bundle(args: argparse.Namespace, work: Path) -> Path:
    """The int8 bundle (and its Keras model), built once per ``--work`` by edge_pipeline."""
    bundle: Path = args.bundle or work / f"bundle-{args.size}-{args.alpha:g}"
    if not (bundle / "manifest.json").exists():
        calibration = work / "calibration"
        write_calibration_frames(calibration, 16)
        print("building the int8 bundle with TensorFlow ...", flush=True)
        script = Path(__file__).with_name("edge_pipeline.py")
        build = [str(bundle), str(calibration), str(args.size), str(args.alpha)]
        subprocess.run([sys.executable, str(script), "--build-bundle", *build], check=True)
    return bundle


def main() -> int:
    args = parse_args()
    if args.research_loop:
        keras_file, frames_dir, port = args.research_loop
        research_loop(Path(keras_file), Path(frames_dir), int(port))
        return 0
    if args.quick:
        args.frames, args.warmup, args.seconds, args.stage_runs = 2, 0.5, 1.0, 2
        args.size, args.alpha, args.per_frame = 96, 0.35, [1, 10]
    report = Report(
        "edge_objects",
        f"a segmenting station: 1, 10, 50 specimens per frame, MobileNetV2 {args.alpha:g} "
        f"{args.size}x{args.size} full int8",
        baseline="research loop: Otsu, skimage regionprops, Keras model.predict per object, "
        "paho publish",
        ours='python -m fieldscope.edge.daemon, [objects] mode = "segment": one identification '
        "per object through the outbox",
        quick=args.quick,
    )
    report.header()
    with tempfile.TemporaryDirectory(prefix="fieldscope-bench-objects-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        bundle = prepare_bundle(args, work)
        with Broker(work / "broker") as broker:
            results = []
            for n in args.per_frame:
                print(f"{n} object(s) per frame ...", flush=True)
                results.append(run_one(args, work, bundle, n, broker))
    summarise(report, results)
    return report.finish(args.json)


if __name__ == "__main__":
    sys.exit(main())
