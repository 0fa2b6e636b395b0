"""``fieldscope train`` and ``fieldscope evaluate``.

The parser is built from the config tree (one flag per key) without importing
TensorFlow or OpenCV; handlers import the training stack only when they run, and a
missing one becomes a one-line hint to install ``fieldscope[train]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from fieldscope.edge.errors import ConfigError, MissingDependencyError
from fieldscope.train.config import (
    add_config_arguments,
    config_keys,
    overrides_from_args,
    resolve_config,
)
from fieldscope.train.rundir import RUN_FILE, RunDir, SegmentationRecord, write_json

__all__ = ["register"]

_TRAIN_MODULES = ("tensorflow", "keras", "sklearn", "matplotlib", "cv2", "numpy")


def register(subparsers: Any) -> None:
    """Add ``train`` and ``evaluate`` to the ``fieldscope`` parser."""
    p = subparsers.add_parser(
        "train",
        help="train a classifier from image folders (transfer learning, two stages)",
        description="Train a species classifier by transfer learning from DATA_DIR (one "
        "folder per class, or train/ val/ test/ each with class folders) into RUN_DIR: "
        "model, labels, resolved config, data split, metrics, decision threshold, plots. "
        "Several DATA_DIRs are merged by class folder name (e.g. the original set and "
        "the reviewed field images of fieldscope collect export --format folders); "
        "the split is stratified over all of them, and a train/ val/ test/ folder keeps "
        "its parts while class-folder ones join train/. "
        "Every key of the --config TOML file can also be given as a flag below.",
    )
    p.add_argument("data_dir", type=Path, nargs="*", metavar="DATA_DIR")
    p.add_argument("--out", type=Path, metavar="RUN_DIR", help="new folder for the run")
    p.add_argument("--config", type=Path, metavar="TOML", help="training config file")
    p.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue an interrupted or failed run (with its saved config and data split; "
        "--epochs, --fine-tune-epochs and --patience may change, --weights until the "
        "first epoch is done)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the training run already in --out RUN_DIR (only a fieldscope run "
        "is removed; any other non-empty folder is refused)",
    )
    _add_data_arguments(p)
    add_config_arguments(p)
    p.set_defaults(handler=_train)

    e = subparsers.add_parser(
        "evaluate",
        help="re-evaluate a training run on its test split or on another folder",
        description="Score RUN_DIR's model on its own test split, or on DATA_DIR (class "
        "folders), with the run's preprocessing and threshold, and rewrite its report.",
    )
    e.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    e.add_argument("data_dir", type=Path, nargs="?", metavar="DATA_DIR")
    e.add_argument(
        "--split",
        metavar="NAME",
        help="name of this evaluation in the report (default: test without DATA_DIR, "
        "eval with one; 'test' replaces the run's test figures)",
    )
    e.set_defaults(handler=_evaluate)


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    """What DATA_DIR's images are: how they were cut, which taxa their labels name."""
    p.add_argument(
        "--segmentation",
        type=Path,
        metavar="TOML",
        help="the [objects] settings that cut DATA_DIR's images from frames (fieldscope "
        "segment's segmentation.toml, or a station's edge.toml); recorded in the run and "
        "the bundle. Default: the segmentation.toml files in DATA_DIR and its folders, "
        "which must agree (given, this wins and differing files only warn)",
    )
    p.add_argument(
        "--taxa",
        type=Path,
        metavar="CSV",
        help="taxa.csv: label, scientificName, taxonRank, kingdom, is_taxon (optional aphiaID, "
        "gbifKey); checked against the class folders, recorded in the run and the bundle, "
        "used by the collector's Darwin Core and EcoTaxa exports",
    )


def _require_training_stack() -> None:
    """Import-check the training dependencies before any work, quietening TF's C++ logs."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import importlib

    from fieldscope.edge.native_logs import quiet_native_stderr

    for name in _TRAIN_MODULES:
        try:
            with quiet_native_stderr():  # abseil's lines from before TF sets up its logging
                importlib.import_module(name)
        except ModuleNotFoundError as exc:
            raise MissingDependencyError(
                f"training needs {exc.name}, which is not installed; install the training "
                "extra: pip install 'fieldscope[train]'"
            ) from exc


# What a resumed run may change. The epoch counts and patience only say how long to go
# on: the stage in progress continues to the new count, a finished stage is not re-opened.
# The backbone's starting weights matter only until the first epoch (afterwards the
# run's own checkpoint replaces them), so --weights is taken only before one: what a run
# that failed to download its ImageNet weights needs (--resume RUN --weights none).
_RESUME_ANYTIME = ("epochs", "fine_tune_epochs", "patience")
_RESUME_BEFORE_FIRST_EPOCH = ("weights",)


def _train(args: argparse.Namespace) -> int:
    overrides = overrides_from_args(args)
    summary = _resume(args, overrides) if args.resume is not None else _new_run(args, overrides)
    for line in summary.lines():
        print(line)
    return 0


def _resume(args: argparse.Namespace, overrides: Mapping[str, Any]) -> Any:
    """``--resume RUN_DIR``: continue with the run's saved config, changing only safe options."""
    flags = {key.dotted: key.flag for key in config_keys()}
    named = (
        ("DATA_DIR", args.data_dir or None),
        ("--out", args.out),
        ("--config", args.config),
        ("--segmentation", args.segmentation),
        ("--taxa", args.taxa),
        ("--overwrite", args.overwrite or None),
    )
    given = [name for name, value in named if value is not None]
    changeable = (*_RESUME_ANYTIME, *_RESUME_BEFORE_FIRST_EPOCH)
    given += [flags[dotted] for dotted in overrides if dotted not in changeable]
    if given:
        allowed = ", ".join(flags[d] for d in changeable)
        raise ConfigError(
            f"--resume continues with the run's saved config and data; drop "
            f"{', '.join(given)} (a resume may change only {allowed}), or start the run "
            f"over: fieldscope train DATA_DIR --out {args.resume} --overwrite ..."
        )
    if overrides:
        _change_resumed_config(args.resume, overrides, flags)
    _require_training_stack()
    from fieldscope.train.pipeline import resume_run

    with _resume_hint(args.resume):
        summary, worked = resume_run(
            args.resume, reporter=_TerminalReporter(), on_progress=_preprocess_progress
        )
    if not worked:
        print(f"{args.resume} is already complete; nothing to resume")
    return summary


def _new_run(args: argparse.Namespace, overrides: Mapping[str, Any]) -> Any:
    """``DATA_DIR --out RUN_DIR``: a new run (``--overwrite`` replaces an earlier one)."""
    if not args.data_dir or args.out is None:
        raise ConfigError("give DATA_DIR [DATA_DIR ...] and --out RUN_DIR (or --resume RUN_DIR)")
    config = resolve_config(args.config, overrides)
    for data_dir in args.data_dir:
        if not data_dir.is_dir():
            # Before TensorFlow loads: a typo costs no start-up time.
            raise ConfigError(f"DATA_DIR {data_dir} does not exist or is not a folder")
    segmentation = _segmentation(args.segmentation, args.data_dir)
    if args.taxa is not None:
        from fieldscope.edge.taxa import read_taxa

        read_taxa(args.taxa)  # a malformed file fails before TensorFlow loads
    if args.overwrite:
        _clear_run_dir(args.out, args.data_dir)
    _require_training_stack()
    from fieldscope.train.pipeline import train_run

    with _resume_hint(args.out):
        return train_run(
            args.data_dir,
            args.out,
            config,
            reporter=_TerminalReporter(),
            on_progress=_preprocess_progress,
            segmentation=segmentation,
            taxa=args.taxa,
        )


def _segmentation(given: Path | None, data_dir: list[Path]) -> SegmentationRecord | None:
    """The segmentation of DATA_DIR's images (:mod:`fieldscope.train.segmentation`); the
    output says where it came from, since a station compares its own settings with it."""
    from fieldscope.train.segmentation import find_segmentation

    found = find_segmentation(data_dir, given)
    for note in found.notes:
        print(f"segmentation: {note}", file=sys.stderr)
    return found.record


def _run_config_path(run_dir: Path) -> Path:
    """RUN_DIR's config.json, or a one-line error when RUN_DIR is no training run."""
    run = RunDir(run_dir, ConfigError)
    if not run.is_run() or not run.config_file.is_file():
        raise ConfigError(
            f"{run_dir} is not a fieldscope training run (no {run.run_file.name} and "
            f"{run.config_file.name}); give the --out folder of an earlier fieldscope train"
        )
    return run.config_file


def _has_trained(run_dir: Path) -> bool:
    """Whether the run finished an epoch (its checkpoint, not the backbone's starting
    weights, is then what it continues from)."""
    run = RunDir(run_dir, ConfigError)
    if run.model_file.exists():
        return True
    try:
        progress = run.read_progress()
    except ConfigError as exc:
        raise ConfigError(f"{exc}; start over with --overwrite") from exc
    if progress is None:
        return False
    return bool(progress.get("stage", 1) > 1 or progress.get("epoch", 0) > 0)


def _change_resumed_config(run_dir: Path, overrides: Mapping[str, Any], flags: Any) -> None:
    """Write the changed safe options into the run's saved config before it continues."""
    from fieldscope.train.config import TrainConfig

    path = _run_config_path(run_dir)
    run = RunDir(run_dir, ConfigError)
    try:
        tree = run.read_config_tree()
        status = run.read_record().status
    except ConfigError as exc:
        raise ConfigError(f"{exc}; start over with --overwrite") from exc
    if status == "complete":
        # Its saved config must keep saying what the finished model was trained with.
        raise ConfigError(
            f"{run_dir} is complete, so its options can no longer change; train a new run "
            f"(a new --out, or --out {run_dir} --overwrite)"
        )
    late = [d for d in overrides if d in _RESUME_BEFORE_FIRST_EPOCH and overrides[d] != tree.get(d)]
    if late and _has_trained(run_dir):
        names = ", ".join(flags[d] for d in late)
        raise ConfigError(
            f"{run_dir} has trained epochs already, so {names} can no longer change (the "
            f"run's checkpoint holds the weights now); resume without {names}, or start over "
            f"with --overwrite"
        )
    tree.update(overrides)
    config = TrainConfig.from_dict(tree, source=f"{path} with the given options")
    write_json(path, config.to_dict())
    changed = ", ".join(f"{flags[d]} {v}" for d, v in overrides.items())
    print(f"resuming {run_dir} with {changed}", file=sys.stderr)


def _clear_run_dir(run_dir: Path, data_dirs: list[Path]) -> None:
    """``--overwrite``: remove an earlier training run from RUN_DIR, and nothing else."""
    import shutil

    for data_dir in data_dirs:
        if not data_dir.is_dir():
            # Checked before anything is removed: a typo must not cost the old run.
            raise ConfigError(f"DATA_DIR {data_dir} is not a folder; nothing was overwritten")
    if not run_dir.exists():
        return
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        return
    if not run_dir.is_dir() or not RunDir(run_dir).is_run():
        raise ConfigError(
            f"--overwrite replaces only a fieldscope training run, and {run_dir} is not one "
            f"(no {RUN_FILE}); choose another --out, or remove it yourself if it is yours to lose"
        )
    shutil.rmtree(run_dir)
    print(f"removed the earlier run in {run_dir} (--overwrite)", file=sys.stderr)


@contextlib.contextmanager
def _resume_hint(run_dir: Path) -> Iterator[None]:
    """On Ctrl-C or a failure, say how to go on: every finished epoch is saved in the run,
    and a run that failed before its first (e.g. no internet for the ImageNet weights)
    resumes with other weights."""
    try:
        yield
    except KeyboardInterrupt:
        if RunDir(run_dir).is_run():
            print(f"\ncontinue with: fieldscope train --resume {run_dir}", file=sys.stderr)
        raise
    except Exception:
        if RunDir(run_dir).is_run():
            print(
                f"\nthe run in {run_dir} did not finish. Once the cause is fixed: "
                f"fieldscope train --resume {run_dir} (it may change --weights before the "
                "first epoch, and --epochs, --fine-tune-epochs, --patience), or start over: "
                f"fieldscope train DATA_DIR --out {run_dir} --overwrite ...",
                file=sys.stderr,
            )
        raise


def _evaluate(args: argparse.Namespace) -> int:
    _require_training_stack()
    from fieldscope.train.evaluate import evaluate_run

    result = evaluate_run(
        args.run_dir, args.data_dir, split=args.split, on_progress=_preprocess_progress
    )
    for line in result.lines():
        print(line)
    return 0


def _preprocess_progress(done: int, total: int) -> None:
    """On a terminal a counter redrawn with ``\\r``; in a log file one line at the end."""
    stream = sys.stderr
    if stream.isatty():
        end = "\n" if done == total else ""
        print(f"\r  preprocessing images {done}/{total}", end=end, file=stream, flush=True)
    elif done == total:
        print(f"  preprocessed {total} images", file=stream, flush=True)


class _TerminalReporter:
    """A progress bar per epoch (on a terminal), one line per epoch and per stage."""

    WIDTH = 24

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def _write(self, text: str, *, end: str = "\n") -> None:
        print(text, end=end, file=self.stream, flush=True)

    def stage_begin(self, stage: int, name: str, epochs: int, first_epoch: int) -> None:
        resumed = f", resuming after epoch {first_epoch}" if first_epoch else ""
        self._write(f"stage {stage} ({name}): up to {epochs} epochs{resumed}")

    def batch_end(
        self, stage: int, epoch: int, step: int, steps: int, logs: Mapping[str, float]
    ) -> None:
        if not self.tty:
            return
        filled = round(self.WIDTH * step / max(steps, 1))
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self._write(f"\r  epoch {epoch} [{bar}] {step}/{steps} {_metrics(logs)}", end="")

    def epoch_end(
        self, stage: int, epoch: int, epochs: int, logs: Mapping[str, float], improved: bool
    ) -> None:
        clear = "\r\033[K" if self.tty else ""
        mark = "  (best so far)" if improved else ""
        self._write(f"{clear}  epoch {epoch}/{epochs} {_metrics(logs)}{mark}")

    def stage_end(self, result: Any) -> None:
        self._write(result.line())


def _metrics(logs: Mapping[str, float]) -> str:
    names = (
        ("loss", "loss"),
        ("accuracy", "acc"),
        ("val_loss", "val_loss"),
        ("val_accuracy", "val_acc"),
    )
    return " ".join(f"{short} {logs[key]:.4f}" for key, short in names if key in logs)
