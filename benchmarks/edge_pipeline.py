"""The edge daemon's pipeline against the research loop: throughput, overlap, memory, start-up.

Ours: the daemon as a separate process (``python -m fieldscope.edge.daemon``, as
systemd runs it) with a replay camera looping over 640x480 specimen frames as fast
as it can, bilateral denoising (9, 75, 75) from the bundle's recipe, and a 224x224
full int8 MobileNetV2 bundle (``--size``, ``--alpha``), against a local mosquitto
this script starts.

Baseline, the research-script way: one loop in one process, one frame after another
— ``cv2.imread``, bilateral filter, resize, Keras ``model.predict`` (full
TensorFlow) on the float model the bundle was converted from, paho publish QoS 1.

A subscriber in this process counts what each publishes. Reported:

* steady-state throughput: identifications per second at the subscriber, after a
  warm-up (both);
* throughput / (1 / slowest stage): 1.0 means the daemon runs as fast as its slowest
  stage allows, i.e. the other stages are hidden behind it. Goal: >= 0.8. The stages
  are measured alone, one frame at a time, in this process (capture = read + decode
  + hash; prepare = quality gate + preprocess; classify = inference; store = message
  + outbox commit with fsync);
* peak RSS (VmHWM) of the process (both). Goal: <= 120 MB, so a 512 MB Pi Zero 2 W
  can run the daemon;
* time from starting the process to its first identification at the subscriber
  (both). Goal: <= 1.5 s on this machine;
* SIGTERM to exit of the daemon.

The bundle (and the Keras model beside it) is built once by ``fieldscope.convert``
(TensorFlow) in a child process (this process and the daemon never import
TensorFlow), unless ``--bundle`` names one::

    python benchmarks/edge_pipeline.py                    # builds the bundle (~1 min)
    python benchmarks/edge_pipeline.py --work /tmp/bench  # keeps and reuses the bundle
    python benchmarks/edge_pipeline.py --seconds 30 --threads 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from _broker import Broker
from _machine import Figure, Goal, Report, benchmark_parser, positive_float, positive_int
from _research import research_frames, research_start

FRAME_W, FRAME_H = 640, 480
LABELS = ("globigerina", "orbulina", "textularia", "nodosaria")


def recipe_dict(size: int) -> dict[str, Any]:
    return {
        "size": [size, size],
        "denoise": "bilateral",
        "denoise_params": {"diameter": 9, "sigma_color": 75.0, "sigma_space": 75.0},
        "resize": "letterbox",
        "fill": "border",
    }


PREFIX = "bench"
RESEARCH_TOPIC = "bench/research/pi/identification"


# --- inputs: frames and the bundle -------------------------------------------------------------


def write_frames(folder: Path, n: int) -> list[Path]:
    """``n`` distinct 640x480 specimen frames (the centre of 640-pixel renderings)."""
    import cv2

    from fieldscope.edge.specimens import render_specimen, species_names

    folder.mkdir(parents=True, exist_ok=True)
    names = species_names()[: len(LABELS)]
    top = (FRAME_W - FRAME_H) // 2
    paths = []
    for i in range(n):
        rgb = render_specimen(names[i % len(names)], np.random.default_rng([7, i]), FRAME_W)
        frame = np.ascontiguousarray(rgb[top : top + FRAME_H])
        path = folder / f"frame_{i:03d}.png"
        cv2.imwrite(str(path), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


def build_bundle(out: Path, frames: Path, size: int, alpha: float) -> None:
    """MobileNetV2 (weights=None) at ``size`` with scaling in the graph, converted to full
    int8 (uint8 in and out) by ``fieldscope convert``'s own pipeline and written as a
    verified bundle. The backbone is untrained, so the conversion's fidelity check is
    recorded in the manifest but not enforced: this bundle is for timing only."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from fieldscope.convert.pipeline import convert_model, write_converted_bundle
    from fieldscope.edge.preprocess import PreprocessRecipe, load_and_preprocess

    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    backbone = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=alpha, include_top=False, weights=None, pooling="avg"
    )
    x = backbone(x, training=False)
    outputs = keras.layers.Dense(len(LABELS), activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    recipe = PreprocessRecipe.from_dict(recipe_dict(size))
    paths = sorted(frames.glob("*.png"))
    images = np.stack([load_and_preprocess(p, recipe) for p in paths])
    result = convert_model(
        model,
        labels=LABELS,
        recipe=recipe,
        calibration_images=images[:16],
        eval_images=images,
        eval_labels=[i % len(LABELS) for i in range(len(images))],
        quantize="int8",
        max_accuracy_drop=100.0,
        progress=lambda message: print(f"  {message}", flush=True),
    )
    write_converted_bundle(
        result,
        out,
        model_name="mobilenetv2-bench",
        model_version="1",
        threshold=0.5,
        overwrite=True,
    )
    model.save(keras_path(out))


def keras_path(bundle: Path) -> Path:
    """Where the Keras model the bundle was converted from is kept (for the baseline)."""
    return bundle.with_name(bundle.name + ".keras")


# --- the broker and a subscriber ---------------------------------------------------------------


class Arrivals:
    """Arrival times of identifications at a subscriber, and their payloads."""

    def __init__(self, port: int, topic: str, client_id: str) -> None:
        import paho.mqtt.client as mqtt

        self.times: list[float] = []
        self.payloads: list[bytes] = []
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            now = time.monotonic()
            with self._lock:
                self.times.append(now)
                if len(self.payloads) < 2000:
                    self.payloads.append(bytes(msg.payload))

        self.client.on_message = on_message
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        if not ready.wait(5):
            raise SystemExit("the subscriber could not subscribe")

    def count_between(self, start: float, end: float) -> int:
        with self._lock:
            return sum(1 for t in self.times if start <= t < end)

    def first_after(self, moment: float) -> float | None:
        with self._lock:
            return next((t for t in self.times if t >= moment), None)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- the daemon -------------------------------------------------------------------------------


def write_config(
    work: Path,
    bundle: Path,
    frames: Path,
    port: int,
    threads: int | None,
    *,
    device: str = "pi",
    sections: str = "",
) -> Path:
    """The station's edge.toml: a replay camera as fast as it goes, the bundle, the broker;
    ``sections`` adds tables (edge_objects.py's ``[objects]``)."""
    model_threads = f"threads = {threads}\n" if threads else ""
    config = work / "edge.toml"
    config.write_text(
        f"""[device]
station = "bench"
id = "{device}"
data_dir = "{work / "data"}"

[camera]
backend = "replay"
trigger = "continuous"
max_rate_hz = 0

[camera.replay]
path = "{frames}"
rate_hz = 0
loop = true
{sections}
[model]
bundle = "{bundle}"
{model_threads}
[mqtt]
host = "127.0.0.1"
port = {port}
prefix = "{PREFIX}"

[heartbeat]
interval_s = 60

[log]
level = "WARNING"
"""
    )
    return config


def vm_hwm_mb(pid: int) -> float:
    """Peak resident set size of a process (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_daemon(config: Path, arrivals: Arrivals) -> tuple[subprocess.Popen[bytes], float]:
    """Start the daemon; return it with the seconds until its first identification."""
    log = config.parent / "daemon.log"
    began = time.monotonic()
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fieldscope.edge.daemon", "--config", str(config)],
            stderr=fh,
        )
    while (first := arrivals.first_after(began)) is None:
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited with {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() - began > 60:
            proc.kill()
            raise SystemExit("no identification within 60 s")
        time.sleep(0.002)
    return proc, first - began


def stop_daemon(proc: subprocess.Popen[bytes]) -> tuple[float, int]:
    """SIGTERM; the seconds until it exited, and its exit code."""
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(30)
    return time.monotonic() - began, code


def steady_state(
    proc: subprocess.Popen[bytes], arrivals: Arrivals, warmup: float, seconds: float
) -> tuple[float, float]:
    """After ``warmup`` s, the identifications per second that arrive over ``seconds``
    s, and the process's peak RSS (MB): the same window for the daemon and the loop."""
    time.sleep(warmup)
    start = time.monotonic()
    time.sleep(seconds)
    end = time.monotonic()
    return arrivals.count_between(start, end) / (end - start), vm_hwm_mb(proc.pid)


def run_daemon(
    config: Path, arrivals: Arrivals, warmup: float, seconds: float, starts: int
) -> dict[str, Any]:
    """``starts - 1`` short runs for the start-up time, then one long run measured."""
    firsts = []
    for _ in range(starts - 1):
        proc, first = start_daemon(config, arrivals)
        firsts.append(first)
        stop_daemon(proc)
    proc, first = start_daemon(config, arrivals)
    firsts.append(first)
    try:
        images_per_s, rss = steady_state(proc, arrivals, warmup, seconds)
    finally:
        stop_s, code = stop_daemon(proc)
    return {
        "firsts": firsts,
        "images_per_s": images_per_s,
        "peak_rss_mb": rss,
        "stop_s": stop_s,
        "exit_code": code,
    }


# --- the baseline: the research scripts' loop -------------------------------------------------


def research_loop(keras_file: Path, frames: Path, port: int) -> None:
    """What the research scripts ran on the Pi: one loop, one frame after another —
    read, denoise, resize, Keras ``model.predict`` (full TensorFlow), publish QoS 1 with
    a plain paho client. Runs until killed."""
    import json

    import cv2

    model, size, client = research_start(keras_file, port)
    for path, frame in research_frames(frames):
        image = cv2.bilateralFilter(frame, 9, 75, 75)
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        probs = model.predict(image[None].astype(np.float32), verbose=0)[0]
        best = int(np.argmax(probs))
        message = {"image": path.name, "label": LABELS[best], "score": float(probs[best])}
        client.publish(RESEARCH_TOPIC, json.dumps(message), qos=1)


def run_research(
    keras_file: Path,
    frames: Path,
    port: int,
    arrivals: Arrivals,
    *,
    warmup: float,
    seconds: float,
) -> dict[str, Any]:
    """Start the research loop as a process; its start-up, throughput and peak memory."""
    log = keras_file.parent / "research.log"
    began = time.monotonic()
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--research-loop", str(keras_file), str(frames), str(port)],
            stderr=fh,
        )
    try:
        while (first := arrivals.first_after(began)) is None:
            if proc.poll() is not None:
                raise SystemExit(
                    f"the research loop exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
                )
            if time.monotonic() - began > 120:
                raise SystemExit("the research loop published nothing within 120 s")
            time.sleep(0.005)
        images_per_s, rss = steady_state(proc, arrivals, warmup, seconds)
    finally:
        proc.kill()
        proc.wait(30)
    return {
        "first_s": first - began,
        "images_per_s": images_per_s,
        "peak_rss_mb": rss,
    }


# --- each stage alone --------------------------------------------------------------------------


def median_ms(step: Callable[[int], object], n: int) -> float:
    for i in range(3):
        step(i)  # warm caches and lazy initialisation
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        step(i)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def stage_costs(bundle_dir: Path, frames: Path, work: Path, threads: int | None, n: int) -> dict:
    from fieldscope.edge.bundle import verify_bundle
    from fieldscope.edge.capture import ReplayCamera
    from fieldscope.edge.classify import Classifier
    from fieldscope.edge.config import QualityConfig
    from fieldscope.edge.message import ImageRef, ModelRef, Timings, build_identification
    from fieldscope.edge.outbox import Outbox
    from fieldscope.edge.preprocess import preprocess
    from fieldscope.edge.quality import assess

    bundle = verify_bundle(bundle_dir)
    recipe = bundle.manifest.preprocessing
    camera = ReplayCamera(frames, rate_hz=0, loop=True)
    camera.open()
    frames_read = []

    def capture(_i: int) -> None:
        frame = camera.read(1.0)
        assert frame is not None
        frame.digest()
        frames_read.append(frame)

    costs = {"capture": median_ms(capture, n)}
    images = [f.image for f in frames_read[:16]]
    gate = QualityConfig()
    costs["quality"] = median_ms(lambda i: assess(images[i % len(images)], gate), n)
    costs["preprocess"] = median_ms(lambda i: preprocess(images[i % len(images)], recipe), n)
    costs["prepare"] = costs["quality"] + costs["preprocess"]
    classifier = Classifier(bundle, threads)
    tensors = [preprocess(image, recipe) for image in images[:4]]
    predictions = [classifier.classify(t) for t in tensors]
    costs["classify"] = median_ms(lambda i: classifier.classify(tensors[i % len(tensors)]), n)
    ref = ModelRef(bundle.manifest.model_name, bundle.manifest.model_version, bundle.sha256)
    image = ImageRef(frames_read[0].digest(), FRAME_W, FRAME_H)
    timings = Timings(1.0, 1.0, 1.0, 1.0, 1.0)
    with Outbox(work / "stage-outbox.sqlite") as outbox:

        def store(i: int) -> None:
            outbox.add(
                "bench/t",
                lambda seq: build_identification(
                    device="pi",
                    station="bench",
                    seq=seq,
                    captured_at=datetime.now(UTC),
                    prediction=predictions[i % len(predictions)],
                    model=ref,
                    image=image,
                    timings=timings,
                ).to_json(),
            )

        costs["store"] = median_ms(store, n)
    camera.close()
    return costs


def peak_rss_figure(name: str, mb: float, baseline: float | None) -> Figure:
    """A station's peak RSS against the memory goal, <= 120 MB (see the module doc),
    the same for the one-frame and the segmenting station (edge_objects.py)."""
    return Figure(name, mb, "MB", baseline=baseline, higher_is_better=False, goal=Goal("<=", 120))


# --- main ----------------------------------------------------------------------------------------


def summarise(
    report: Report,
    costs: dict[str, float],
    daemon: dict[str, Any],
    research: dict[str, Any] | None,
    payloads: list[bytes],
) -> None:
    from fieldscope.edge.message import Identification

    stages = ("capture", "prepare", "classify", "store")
    slowest = max(stages, key=lambda s: costs[s])
    ceiling = 1000.0 / costs[slowest]
    base = research or {}
    report.add(
        Figure(
            "throughput, steady state",
            daemon["images_per_s"],
            "images/s",
            baseline=base.get("images_per_s"),
        )
    )
    report.add(
        Figure(
            f"throughput / slowest stage ({slowest}) alone",
            daemon["images_per_s"] / ceiling,
            "ratio",
            goal=Goal(">=", 0.8),
            note="1.0: the other stages are hidden behind the slowest",
        )
    )
    report.add(peak_rss_figure("peak RSS (VmHWM)", daemon["peak_rss_mb"], base.get("peak_rss_mb")))
    firsts = daemon["firsts"]
    report.add(
        Figure(
            "start to first published identification",
            statistics.median(firsts),
            "s",
            baseline=base.get("first_s"),
            higher_is_better=False,
            goal=Goal("<=", 1.5),
            note=f"median of {len(firsts)} starts",
        )
    )
    report.add(Figure("SIGTERM to exit", daemon["stop_s"], "s", higher_is_better=False))
    report.note(
        "each stage alone, median ms per frame: "
        + ", ".join(f"{s} {costs[s]:.2f}" for s in stages)
        + f" (prepare = quality gate {costs['quality']:.2f} + denoise and resize "
        f"{costs['preprocess']:.2f}; store = message + outbox commit with fsync); "
        f"slowest {slowest}: at most {ceiling:.1f} images/s, one after another "
        f"{1000.0 / sum(costs[s] for s in stages):.1f} images/s"
    )
    reported = [Identification.from_json(p).timings_ms for p in payloads[50:]]
    if reported:
        report.note(
            "in the daemon, per message (median ms): "
            + ", ".join(
                f"{s} {statistics.median(getattr(t, s) for t in reported):.1f}"
                for s in ("capture", "quality", "preprocess", "inference", "total")
            )
        )
    if daemon["exit_code"] != 0:
        report.note(f"the daemon exited with code {daemon['exit_code']} after SIGTERM")
    report.details = {"stage_ms": costs, "daemon": daemon, "research_loop": research}


def parse_args() -> argparse.Namespace:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--work", type=Path, help="working folder (kept; the bundle is reused)")
    parser.add_argument(
        "--bundle", type=Path, help="use this bundle (the baseline needs BUNDLE.keras beside it)"
    )
    parser.add_argument("--frames", type=positive_int, default=24, help="distinct replay frames")
    parser.add_argument(
        "--warmup", type=positive_float, default=3.0, help="seconds before measuring"
    )
    parser.add_argument("--seconds", type=positive_float, default=10.0, help="seconds measured")
    parser.add_argument(
        "--threads", type=positive_int, help="interpreter threads (default: runtime's)"
    )
    parser.add_argument(
        "--stage-runs", type=positive_int, default=60, help="frames per stage alone"
    )
    parser.add_argument(
        "--starts",
        type=positive_int,
        default=3,
        help="daemon starts timed (the median is reported)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the research loop")
    parser.add_argument("--size", type=positive_int, default=224, help="model input side")
    parser.add_argument("--alpha", type=positive_float, default=1.0, help="MobileNetV2 width")
    parser.add_argument("--build-bundle", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--research-loop", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bundle is not None and not (args.bundle / "manifest.json").is_file():
        parser.error(f"--bundle {args.bundle}: no bundle there (no manifest.json)")
    return args


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """The replay frames and the bundle, made once per ``--work`` folder."""
    work.mkdir(parents=True, exist_ok=True)
    frames = work / "frames"
    if len(list(frames.glob("*.png"))) != args.frames:
        shutil.rmtree(frames, ignore_errors=True)
        write_frames(frames, args.frames)
    bundle: Path = args.bundle or work / f"bundle-{args.size}-{args.alpha:g}"
    if not (bundle / "manifest.json").exists():
        print("building the int8 bundle with TensorFlow ...", flush=True)
        t0 = time.monotonic()
        build = [str(bundle), str(frames), str(args.size), str(args.alpha)]
        subprocess.run([sys.executable, __file__, "--build-bundle", *build], check=True)
        print(f"  built in {time.monotonic() - t0:.0f} s", flush=True)
    shutil.rmtree(work / "data", ignore_errors=True)
    return frames, bundle


def main() -> int:
    args = parse_args()
    if args.build_bundle:
        out, frames_dir, size, alpha = args.build_bundle
        build_bundle(Path(out), Path(frames_dir), int(size), float(alpha))
        return 0
    if args.research_loop:
        keras_file, frames_dir, port = args.research_loop
        research_loop(Path(keras_file), Path(frames_dir), int(port))
        return 0
    if args.quick:
        args.frames, args.warmup, args.seconds, args.stage_runs, args.starts = 4, 0.5, 1.0, 5, 1
        args.size, args.alpha = 96, 0.35

    report = Report(
        "edge_pipeline",
        f"the edge daemon on {FRAME_W}x{FRAME_H} frames, bilateral 9/75/75, "
        f"MobileNetV2 {args.alpha:g} {args.size}x{args.size} full int8",
        baseline="research loop: read, denoise, resize, Keras model.predict, paho publish, "
        "one frame after another",
        ours="python -m fieldscope.edge.daemon: threaded capture/prepare/classify/outbox/"
        "publish, int8 bundle on ai-edge-litert",
        quick=args.quick,
    )
    with report.started() as scratch:
        work = args.work or scratch
        frames, bundle = prepare(args, work)
        (work / "stage-outbox.sqlite").unlink(missing_ok=True)

        with Broker(work / "broker") as broker:
            arrivals = Arrivals(broker.port, f"{PREFIX}/bench/pi/identification", "bench-daemon")
            research_arrivals = Arrivals(broker.port, RESEARCH_TOPIC, "bench-research")
            try:
                print("the daemon ...", flush=True)
                config = write_config(work, bundle, frames, broker.port, args.threads)
                daemon = run_daemon(
                    config, arrivals, args.warmup, args.seconds, max(1, args.starts)
                )
                research = None
                if args.no_baseline or not keras_path(bundle).exists():
                    report.note("no baseline: --no-baseline, or no Keras model beside --bundle")
                else:
                    print("the research loop (Keras model.predict) ...", flush=True)
                    research = run_research(
                        keras_path(bundle),
                        frames,
                        broker.port,
                        research_arrivals,
                        warmup=args.warmup,
                        seconds=args.seconds,
                    )
            finally:
                arrivals.close()
                research_arrivals.close()
        print("each stage alone ...", flush=True)
        costs = stage_costs(bundle, frames, work, args.threads, args.stage_runs)

    from fieldscope.edge.runtime import runtime_info

    runtime = runtime_info()
    summarise(report, costs, daemon, research, arrivals.payloads)
    report.details.update(
        runtime=f"{runtime.name} {runtime.version}",
        threads=args.threads,
        frames=args.frames,
        seconds=args.seconds,
    )
    return report.finish(args.json)


if __name__ == "__main__":
    sys.exit(main())
