"""The edge daemon's pipeline: do its stages overlap, and does it fit a Pi Zero 2 W?

The daemon runs as a separate process (``python -m fieldscope.edge.daemon``, as
systemd runs it) with a replay camera looping over 640x480 specimen frames as fast as
it can, bilateral denoising (9, 75, 75) from the bundle's recipe, and a 224x224 full
int8 MobileNetV2 bundle, against a local mosquitto this script starts. A subscriber
in this process counts the identifications that arrive.

Reported:

* steady-state throughput: identifications per second at the subscriber, after a
  warm-up;
* the bare cost of each pipeline stage measured alone, one frame at a time, in this
  process (capture = read + decode + hash; prepare = quality gate + preprocess;
  classify = inference; store = message + outbox commit with fsync);
* throughput / (1 / slowest stage): 1.0 means the daemon runs as fast as its slowest
  stage allows, i.e. the other stages are hidden behind it. Goal: >= 0.8;
* the daemon's peak RSS (VmHWM). Goal: <= 120 MB, so a 512 MB Pi Zero 2 W can run it;
* the time from starting the process to the first identification at the
  subscriber. Goal: <= 1.5 s on this machine.

The bundle is built once by ``fieldscope.convert`` (TensorFlow) in a child process
(this process and the daemon never import TensorFlow), unless ``--bundle`` names one::

    python benchmarks/edge_pipeline.py                    # builds the bundle (~1 min)
    python benchmarks/edge_pipeline.py --work /tmp/bench  # keeps and reuses the bundle
    python benchmarks/edge_pipeline.py --seconds 30 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

SIZE = 224
FRAME_W, FRAME_H = 640, 480
LABELS = ("globigerina", "orbulina", "textularia", "nodosaria")
RECIPE = {
    "size": [SIZE, SIZE],
    "denoise": "bilateral",
    "denoise_params": {"diameter": 9, "sigma_color": 75.0, "sigma_space": 75.0},
    "resize": "letterbox",
    "fill": "border",
}
PREFIX = "bench"


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


def build_bundle(out: Path, frames: Path) -> None:
    """MobileNetV2 (weights=None) at 224 with scaling in the graph, converted to full
    int8 (uint8 in and out) by ``fieldscope convert``'s own pipeline and written as a
    verified bundle. The backbone is untrained, so the conversion's fidelity check is
    recorded in the manifest but not enforced: this bundle is for timing only."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from fieldscope.convert.pipeline import convert_model, write_converted_bundle
    from fieldscope.edge.preprocess import PreprocessRecipe, load_and_preprocess

    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    backbone = keras.applications.MobileNetV2(
        input_shape=(SIZE, SIZE, 3), include_top=False, weights=None, pooling="avg"
    )
    x = backbone(x, training=False)
    outputs = keras.layers.Dense(len(LABELS), activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    recipe = PreprocessRecipe.from_dict(RECIPE)
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


# --- the broker and a subscriber ---------------------------------------------------------------


def start_broker(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    conf = work / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000000\n"
        "persistence false\nlog_dest stderr\nlog_type error\n"
    )
    with (work / "mosquitto.log").open("ab") as log:
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("mosquitto did not start")


class Arrivals:
    """Arrival times of identifications at a subscriber, and their payloads."""

    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt

        self.times: list[float] = []
        self.payloads: list[bytes] = []
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-subscriber")

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


def write_config(work: Path, bundle: Path, frames: Path, port: int, threads: int | None) -> Path:
    model_threads = f"threads = {threads}\n" if threads else ""
    config = work / "edge.toml"
    config.write_text(
        f"""[device]
station = "bench"
id = "pi"
data_dir = "{work / "data"}"

[camera]
backend = "replay"
trigger = "continuous"
max_rate_hz = 0

[camera.replay]
path = "{frames}"
rate_hz = 0
loop = true

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
        time.sleep(warmup)
        start = time.monotonic()
        time.sleep(seconds)
        end = time.monotonic()
        rss = vm_hwm_mb(proc.pid)
    finally:
        stop_s, code = stop_daemon(proc)
    return {
        "firsts": firsts,
        "images_per_s": arrivals.count_between(start, end) / (end - start),
        "peak_rss_mb": rss,
        "stop_s": stop_s,
        "exit_code": code,
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


# --- main ----------------------------------------------------------------------------------------


def report(
    args: argparse.Namespace,
    costs: dict[str, float],
    daemon: dict[str, Any],
    payloads: list[bytes],
) -> None:
    from fieldscope.edge.message import Identification
    from fieldscope.edge.runtime import runtime_info

    reported = [Identification.from_json(p).timings_ms for p in payloads[50:]]
    stages = ("capture", "prepare", "classify", "store")
    slowest = max(stages, key=lambda s: costs[s])
    ceiling = 1000.0 / costs[slowest]
    ratio = daemon["images_per_s"] / ceiling
    runtime = runtime_info()
    print()
    print(
        f"edge pipeline: {args.frames} replayed {FRAME_W}x{FRAME_H} frames, bilateral 9/75/75, "
        f"MobileNetV2 {SIZE}x{SIZE} full int8, {runtime.name} {runtime.version}, "
        f"threads {args.threads or 'default'}; {platform.machine()}, {os.cpu_count()} cores"
    )
    print(
        f"  daemon throughput (steady state, {args.seconds:.0f} s): "
        f"{daemon['images_per_s']:.1f} images/s"
    )
    print("  each stage alone (median ms per frame):")
    print(f"    capture   {costs['capture']:7.2f}   read + decode PNG + sha256")
    print(
        f"    prepare   {costs['prepare']:7.2f}   quality gate {costs['quality']:.2f} + "
        f"denoise and resize {costs['preprocess']:.2f}"
    )
    print(f"    classify  {costs['classify']:7.2f}   inference")
    print(f"    store     {costs['store']:7.2f}   message + outbox commit (fsync)")
    print(f"    sum       {sum(costs[s] for s in stages):7.2f}   (one frame through all stages)")
    print(f"  slowest stage: {slowest}, at most {ceiling:.1f} images/s")
    print(f"  throughput / slowest stage: {ratio:.2f} (goal >= 0.8)")
    print(f"  daemon peak RSS: {daemon['peak_rss_mb']:.0f} MB (goal <= 120 MB)")
    firsts = daemon["firsts"]
    print(
        f"  start to first published identification: {statistics.median(firsts):.2f} s, "
        f"median of {len(firsts)} starts ({', '.join(f'{f:.2f}' for f in firsts)}) "
        "(goal <= 1.5 s)"
    )
    print(f"  SIGTERM to exit: {daemon['stop_s']:.2f} s, exit code {daemon['exit_code']}")
    if reported:
        print(
            "  in the daemon, per message (median ms): "
            + ", ".join(
                f"{s} {statistics.median(getattr(t, s) for t in reported):.1f}"
                for s in ("capture", "quality", "preprocess", "inference", "total")
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="working folder (kept; the bundle is reused)")
    parser.add_argument("--bundle", type=Path, help="use this bundle instead of building one")
    parser.add_argument("--frames", type=int, default=24, help="distinct replay frames")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds measured")
    parser.add_argument("--threads", type=int, help="interpreter threads (default: runtime's)")
    parser.add_argument("--stage-runs", type=int, default=60, help="frames per stage alone")
    parser.add_argument(
        "--starts", type=int, default=3, help="daemon starts timed (the median is reported)"
    )
    parser.add_argument(
        "--build-bundle", nargs=2, metavar=("OUT", "FRAMES"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.build_bundle:
        build_bundle(Path(args.build_bundle[0]), Path(args.build_bundle[1]))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="fieldscope-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    frames = work / "frames"
    if len(list(frames.glob("*.png"))) != args.frames:
        shutil.rmtree(frames, ignore_errors=True)
        write_frames(frames, args.frames)
    bundle = args.bundle or work / "bundle"
    if not (bundle / "manifest.json").exists():
        print("building the MobileNetV2 224 int8 bundle with TensorFlow (once) ...", flush=True)
        t0 = time.monotonic()
        subprocess.run(
            [sys.executable, __file__, "--build-bundle", str(bundle), str(frames)], check=True
        )
        print(f"  built in {time.monotonic() - t0:.0f} s: {bundle}")
    shutil.rmtree(work / "data", ignore_errors=True)
    (work / "stage-outbox.sqlite").unlink(missing_ok=True)

    broker, port = start_broker(work)
    arrivals = Arrivals(port, f"{PREFIX}/bench/pi/identification")
    try:
        config = write_config(work, bundle, frames, port, args.threads)
        daemon = run_daemon(config, arrivals, args.warmup, args.seconds, max(1, args.starts))
    finally:
        arrivals.close()
        broker.terminate()
        broker.wait(10)
    costs = stage_costs(bundle, frames, work, args.threads, args.stage_runs)

    report(args, costs, daemon, arrivals.payloads)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
