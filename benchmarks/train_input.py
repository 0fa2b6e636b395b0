"""One training epoch: our input pipeline vs a seed-style ImageDataGenerator pipeline.

The research scripts fed Keras with ``ImageDataGenerator.flow_from_directory``, which
decodes, resizes, denoises and augments every image again in every epoch, in Python, one
image at a time. ``fieldscope train`` preprocesses each image once with the edge's own
function, caches the pixels, and feeds them from memory through ``tf.data`` with the
augmentation as Keras layers on whole batches, prefetched while the model trains.

Both pipelines train the same model (MobileNetV2 alpha 0.35, weights none, graph mode)
on the same folder with the same denoise filter and comparable augmentation. Reported:
the mean epoch time after the first (the first includes tracing and, for ours, the
one-off preprocessing), with the model and without it (input pipeline alone), and the
ratios. Goal: ours >= 3x faster per training epoch.

The ratio depends on how much of an epoch the model itself takes, and on the size of
the source images (which the seed pipeline decodes and resizes every epoch): camera
frames are 640x480 to 4056x3040, so the default generates 1024-pixel specimens.

    python benchmarks/train_input.py                       # 4 x 40 specimens, 1024 px
    python benchmarks/train_input.py --source-size 256     # small sources: model-bound
    python benchmarks/train_input.py --data DIR --image-size 96 --epochs 4
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from _machine import Figure, Goal, Report, benchmark_parser, positive_int

from fieldscope.edge.preprocess import PreprocessRecipe, denoise
from fieldscope.edge.specimens import write_dataset
from fieldscope.train.augment import build_augmenter
from fieldscope.train.backbones import build_classifier
from fieldscope.train.config import AugmentConfig
from fieldscope.train.data import PreprocessCache, discover, load_images, make_dataset


class EpochTimer(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: object = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: object = None) -> None:
        self.times.append(time.perf_counter() - self._start)


def make_model(n_classes: int, size: int, eager: bool = False) -> keras.Model:
    """``eager`` skips graph tracing (15 s on 2 cores): only for --quick."""
    keras.utils.set_random_seed(0)
    model = build_classifier(
        "mobilenet_v2", num_classes=n_classes, image_size=size, alpha=0.35, weights="none"
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        run_eagerly=eager,
    )
    return model


def fit_epochs(model: keras.Model, data: Any, epochs: int) -> list[float]:
    timer = EpochTimer()
    model.fit(data, epochs=epochs, callbacks=[timer], shuffle=False, verbose=0)
    return timer.times


def input_epochs(make_epoch: Any, epochs: int) -> list[float]:
    """Time iterating over the batches alone (no model), one entry per epoch."""
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for _batch in make_epoch():
            pass
        times.append(time.perf_counter() - start)
    return times


def ours(
    data: Path, size: int, batch: int, epochs: int, *, method: str, cache_dir: Path, eager: bool
) -> dict:
    """Preprocess once (timed as part of epoch 1), then tf.data from memory."""
    start = time.perf_counter()
    index = discover(data)
    recipe = PreprocessRecipe(size=(size, size), denoise=method)
    loaded = load_images(index.samples(), PreprocessCache(cache_dir, recipe))
    prepare = time.perf_counter() - start
    augmenter = build_augmenter(AugmentConfig(), seed=0)
    ds = make_dataset(
        loaded.images, loaded.labels, batch_size=batch, shuffle_seed=0, augmenter=augmenter
    )
    train = fit_epochs(make_model(len(index.labels), size, eager), ds, epochs)
    train[0] += prepare
    alone = input_epochs(lambda: ds, epochs)
    return {"train": train, "input": alone, "prepare": prepare, "images": len(loaded.samples)}


def seed_style(data: Path, size: int, batch: int, epochs: int, *, method: str, eager: bool) -> dict:
    """What the research scripts did: ImageDataGenerator + flow_from_directory."""

    def denoise_float(image: np.ndarray) -> np.ndarray:
        # The seed scripts denoised inside preprocessing_function, per image, per epoch.
        pixels = np.clip(image, 0, 255).astype(np.uint8)
        return denoise(pixels, method).astype(np.float32)

    generator = tf.keras.preprocessing.image.ImageDataGenerator(
        preprocessing_function=denoise_float,
        horizontal_flip=True,
        vertical_flip=True,
        rotation_range=180,
        zoom_range=0.1,
        brightness_range=(0.9, 1.1),
        fill_mode="reflect",
    )

    def flow() -> Any:
        return generator.flow_from_directory(
            str(data),
            target_size=(size, size),
            batch_size=batch,
            class_mode="sparse",
            shuffle=True,
            seed=0,
        )

    train_flow = flow()
    train = fit_epochs(make_model(train_flow.num_classes, size, eager), train_flow, epochs)
    input_flow = flow()

    def one_epoch() -> Iterable[Any]:
        return (input_flow[i] for i in range(len(input_flow)))

    alone = input_epochs(one_epoch, epochs)
    return {"train": train, "input": alone, "images": train_flow.samples}


def _after_first(times: list[float]) -> float:
    """Mean epoch time after the first (the first traces, and ours preprocesses once)."""
    return statistics.mean(times[1:]) if len(times) > 1 else times[0]


def _epoch_figure(
    name: str, ours: list[float], baseline: list[float], goal: Goal | None = None, note: str = ""
) -> Figure:
    """Our epoch time against the baseline's, each after the first (lower is better)."""
    return Figure(
        name,
        _after_first(ours),
        "s",
        baseline=_after_first(baseline),
        higher_is_better=False,
        goal=goal,
        note=note,
    )


def _epochs(times: list[float]) -> str:
    return "[" + ", ".join(f"{t:.2f}" for t in times) + "] s"


def main() -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--data", type=Path, help="class folders (default: generate specimens)")
    parser.add_argument(
        "--source-size", type=positive_int, default=1024, help="generated image side"
    )
    parser.add_argument(
        "--per-class", type=positive_int, default=40, help="generated images per class"
    )
    parser.add_argument("--image-size", type=positive_int, default=96)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--epochs", type=positive_int, default=3)
    parser.add_argument("--denoise", default="bilateral")
    args = parser.parse_args()
    if args.data is not None and not args.data.is_dir():
        parser.error(f"--data {args.data}: not a folder of class folders")
    if args.quick:
        args.source_size, args.per_class, args.image_size, args.epochs = 128, 4, 32, 2
        args.batch_size = 8
    report = Report(
        "train_input",
        "one training epoch: input pipeline, same model (MobileNetV2 0.35, weights none)",
        baseline="ImageDataGenerator.flow_from_directory: decode, resize, denoise, augment "
        "every image every epoch",
        ours="fieldscope train: edge preprocessing once, cached, tf.data + augmentation layers",
        quick=args.quick,
    )
    report.header()

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "specimens"
            write_dataset(data, classes=4, per_class=args.per_class, size=args.source_size, seed=0)
        source = "" if args.data else f" ({args.source_size}px specimens)"
        print(
            f"data {data}{source}; model input {args.image_size}px, batch {args.batch_size}, "
            f"denoise {args.denoise}, {args.epochs} epochs",
            flush=True,
        )
        # Both ways train on the same images, input size, batch size and epochs.
        setup = (data, args.image_size, args.batch_size, args.epochs)
        seed = seed_style(*setup, method=args.denoise, eager=args.quick)
        mine = ours(*setup, method=args.denoise, cache_dir=Path(tmp) / "cache", eager=args.quick)

    images = seed["images"]
    report.add(
        _epoch_figure(
            "training epoch, after the first",
            mine["train"],
            seed["train"],
            goal=Goal(">=", 3.0, on="gain"),
            note=f"{images} images",
        )
    )
    report.add(
        _epoch_figure("input pipeline alone, epoch after the first", mine["input"], seed["input"])
    )
    report.add(Figure("one-off preprocessing (in our first epoch)", mine["prepare"], "s"))
    report.note(
        f"training epochs: baseline {_epochs(seed['train'])}, ours {_epochs(mine['train'])}"
    )
    report.details = {
        "images": images,
        "source_size": None if args.data else args.source_size,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "denoise": args.denoise,
        "baseline_train_s": seed["train"],
        "ours_train_s": mine["train"],
        "baseline_input_s": seed["input"],
        "ours_input_s": mine["input"],
    }
    return report.finish(args.json)


if __name__ == "__main__":
    sys.exit(main())
