"""Image folders -> labelled samples -> a stratified split -> cached arrays -> ``tf.data``.

* **Discovery.** DATA_DIR holds one folder per class, or ``train/``, ``val/``, ``test/``
  each holding class folders. A missing ``val/`` (and ``test/``) is carved from
  ``train/``; a given ``val/`` without ``test/`` carves nothing: every ``train/`` image
  trains and the test report is on ``val/`` (``DataSplit.test_source`` says so).
  Classes are the folder names, sorted; hidden files and folders and files that are not
  images (by suffix) are ignored. Nothing is hard-coded.
* **Split.** Stratified and seeded per class: each class is shuffled by a generator seeded
  with (seed, class name), so adding a class or an image to one class leaves the other
  classes' split unchanged. K-fold cross-validation assigns each class's images to folds
  round-robin after the same shuffle.
* **Pixels.** Every image goes once through the edge's own ``load_and_preprocess`` (the
  same denoise and resize the Pi runs) and the uint8 result is cached on disk, keyed by
  file (path, size, mtime) and recipe, so later epochs, resumed runs and re-evaluations
  never re-run the filters. Unreadable files are skipped with a warning and counted.
* **Batches.** ``tf.data`` from the in-memory arrays: shuffle, batch, augment (training
  only), prefetch.

The sample types live in :mod:`fieldscope.train.samples`, the cache, loading and
``tf.data`` in :mod:`fieldscope.train.images`; this module re-exports them.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from fieldscope.train.errors import TrainError
from fieldscope.train.images import LoadedImages, PreprocessCache, load_images, make_dataset
from fieldscope.train.rundir import SPLIT_FILE, RunDir, SplitRecord, write_json
from fieldscope.train.samples import (
    IMAGE_SUFFIXES,
    SPLITS,
    DatasetIndex,
    Sample,
    SkippedFile,
    class_counts,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "SPLITS",
    "DataSplit",
    "DatasetIndex",
    "LoadedImages",
    "PreprocessCache",
    "Sample",
    "SkippedFile",
    "check_split_feasible",
    "discover",
    "kfold_splits",
    "load_images",
    "make_dataset",
    "read_split",
    "split_dataset",
]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class DataSplit:
    """Which files went where; saved in the run so convert/ can calibrate on ``train`` and
    evaluate on ``test`` without re-deriving anything."""

    labels: tuple[str, ...]
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    test: tuple[Sample, ...]
    root: Path
    seed: int = 0
    ratios: tuple[float, ...] = ()
    fold: int | None = None
    folds: int | None = None
    skipped: tuple[SkippedFile, ...] = field(default=())
    # Where the test images came from: "split" (carved by the seeded split), "test"
    # (the data folder's test/), or "val" (no test/ was given: the val/ images the user
    # set aside are the only held-out ones, so the report evaluates on them and says so).
    test_source: str = "split"
    # Every data folder when there are several (``root`` is the first); empty: just root.
    roots: tuple[Path, ...] = ()

    def part(self, name: str) -> tuple[Sample, ...]:
        if name not in SPLITS:
            raise TrainError(f"unknown split {name!r} (known: {', '.join(SPLITS)})")
        result: tuple[Sample, ...] = getattr(self, name)
        return result

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class per split, every class listed (for the distribution plot)."""
        return {name: class_counts(self.part(name), self.labels) for name in SPLITS}

    @property
    def all_roots(self) -> tuple[Path, ...]:
        """Every data folder, in the order given (``root`` is the first)."""
        return self.roots or (Path(self.root),)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: paths relative to their data folder when inside one, labels by name;
        with several data folders, ``data_dirs`` lists them and each entry names its own."""
        roots = self.all_roots
        several = len(roots) > 1

        def entry(path: Path, **rest: str) -> dict[str, Any]:
            at, rel = _locate(path, roots)
            return {"path": rel, **rest, **({"root": at} if several else {})}

        doc: dict[str, Any] = {
            "data_dir": str(roots[0]),
            "labels": list(self.labels),
            "seed": self.seed,
            "ratios": list(self.ratios),
            "fold": self.fold,
            "folds": self.folds,
            "test_source": self.test_source,
            **{
                name: [entry(s.path, label=self.labels[s.label]) for s in self.part(name)]
                for name in SPLITS
            },
            "skipped": [entry(s.path, reason=s.reason) for s in self.skipped],
        }
        if several:
            doc["data_dirs"] = [str(r) for r in roots]
        return doc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = SPLIT_FILE) -> DataSplit:
        """The split from its JSON form; a damaged one is a ``TrainError`` naming ``source``."""
        try:
            record = msgspec.convert(data, SplitRecord)
        except msgspec.ValidationError as exc:
            raise TrainError(f"{source} is damaged: missing or bad entry ({exc})") from None
        return cls.from_record(record, source=source)

    @classmethod
    def from_record(cls, record: SplitRecord, *, source: str = SPLIT_FILE) -> DataSplit:
        """The split as read from ``split.json``, paths made absolute, labels as indices."""
        problems = record.problems()
        if problems:
            raise TrainError(f"{source} is damaged: {problems[0]}")
        roots = tuple(Path(r) for r in record.roots())
        labels = tuple(record.labels)
        index = {name: i for i, name in enumerate(labels)}
        try:
            parts = {
                name: tuple(
                    Sample(record.path_of(item), index[item.label])
                    for item in getattr(record, name)
                )
                for name in SPLITS
            }
        except KeyError as exc:
            raise TrainError(f"{source} is damaged: label {exc} is not one of its labels") from None
        return cls(
            labels=labels,
            root=roots[0],
            roots=roots if len(roots) > 1 else (),
            seed=record.seed,
            ratios=tuple(record.ratios),
            fold=record.fold,
            folds=record.folds,
            skipped=tuple(SkippedFile(record.path_of(s), s.reason) for s in record.skipped),
            test_source=record.test_source,
            **parts,
        )

    def write(self, run_dir: Path) -> Path:
        path = run_dir / SPLIT_FILE
        write_json(path, self.to_dict())
        return path


def _locate(path: Path, roots: Sequence[Path]) -> tuple[int, str]:
    """Which data folder holds ``path`` (the deepest), and the path relative to it; a file
    in none is kept absolute under folder 0."""
    best: tuple[int, str] | None = None
    depth = -1
    for i, root in enumerate(roots):
        if (root == path or root in path.parents) and len(root.parts) > depth:
            best, depth = (i, path.relative_to(root).as_posix()), len(root.parts)
    return best if best is not None else (0, str(path))


def read_split(run_dir: Path) -> DataSplit:
    """The data split a run trained on (``RUN_DIR/split.json``), with absolute paths."""
    run = RunDir(Path(run_dir), TrainError)
    return DataSplit.from_record(run.read_split(), source=str(run.split_file))


# --- discovery ----------------------------------------------------------------------


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _images_under(folder: Path) -> list[Path]:
    """Image files anywhere under ``folder``, skipping hidden files and folders."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(dirpath) / name)
    return sorted(found)


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    return {
        d.name: _images_under(d)
        for d in sorted(folder.iterdir(), key=lambda p: p.name)
        if d.is_dir() and _visible(d)
    }


def discover(data_dir: Path, *, min_classes: int = 2) -> DatasetIndex:
    """Find the classes and images of DATA_DIR (class folders, or train/val/test of them).

    ``min_classes=1`` is for evaluation, where a folder of one class is a fair test.

    Raises:
        TrainError: DATA_DIR is missing, holds no images, has a single class, or mixes
            split folders with class folders.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise TrainError(f"data folder {root} does not exist or is not a folder")
    root = root.resolve()
    top = _class_folders(root)
    given = [name for name in SPLITS if name in top]
    if given:
        return _discover_presplit(root, top, given, min_classes)
    return _discover_flat(root, top, min_classes)


def _discover_presplit(
    root: Path, top: Mapping[str, list[Path]], given: list[str], min_classes: int
) -> DatasetIndex:
    """DATA_DIR holds train/ (and maybe val/, test/), each with class folders."""
    others = sorted(set(top) - set(SPLITS))
    if others:
        raise TrainError(
            f"{root} mixes split folders ({', '.join(given)}) with other folders "
            f"({', '.join(others)}); use either train/val/test or class folders"
        )
    if "train" not in given:
        raise TrainError(f"{root} has {', '.join(given)}/ but no train/ folder")
    per_part = {name: _class_folders(root / name) for name in given}
    labels = tuple(sorted(name for name, files in per_part["train"].items() if files))
    for name in given[1:]:
        extra = sorted(c for c, files in per_part[name].items() if files and c not in labels)
        if extra:
            raise TrainError(
                f"{root / name} has classes with no training images in {root / 'train'}: "
                f"{', '.join(extra)}"
            )
    _check_classes(labels, root / "train", per_part["train"], min_classes)
    index = {c: i for i, c in enumerate(labels)}
    parts = {
        name: tuple(
            Sample(p, index[c]) for c, files in per_part[name].items() if c in index for p in files
        )
        for name in given
    }
    # An empty val/ or test/ folder counts as absent: that part is carved from train.
    parts = {name: part for name, part in parts.items() if part or name == "train"}
    return DatasetIndex(root, labels, parts)


def _discover_flat(root: Path, top: Mapping[str, list[Path]], min_classes: int) -> DatasetIndex:
    """DATA_DIR holds one folder per class."""
    loose = [p for p in root.iterdir() if p.is_file() and _visible(p)]
    loose_images = [p for p in loose if p.suffix.lower() in IMAGE_SUFFIXES]
    labels = tuple(sorted(name for name, files in top.items() if files))
    if not labels and loose_images:
        raise TrainError(
            f"{root} holds {len(loose_images)} images but no class folders; put each "
            "class's images in a folder named after the class"
        )
    _check_classes(labels, root, top, min_classes)
    index = {c: i for i, c in enumerate(labels)}
    samples = tuple(Sample(p, index[c]) for c in labels for p in top[c])
    if loose_images:
        log.warning(
            "ignoring %d images directly in %s (not in a class folder)", len(loose_images), root
        )
    return DatasetIndex(root, labels, {"all": samples})


def _check_classes(
    labels: Sequence[str], where: Path, folders: Mapping[str, list[Path]], min_classes: int
) -> None:
    empty = sorted(name for name, files in folders.items() if not files)
    if not labels:
        detail = f" (class folders without images: {', '.join(empty)})" if empty else ""
        raise TrainError(
            f"no images found in {where}{detail}; expected one folder per class holding "
            f"{'/'.join(sorted(s.lstrip('.') for s in IMAGE_SUFFIXES))} files"
        )
    if len(labels) == 1 and min_classes > 1:
        n = len(folders[labels[0]])
        raise TrainError(
            f"only one class found in {where}: {labels[0]!r} ({n} images); a classifier "
            "needs at least two class folders"
        )
    for name in empty:
        log.warning("ignoring class folder %s: it holds no images", where / name)


# --- splitting ----------------------------------------------------------------------


def _round(x: float) -> int:
    return math.floor(x + 0.5)


def _ratio_text(ratios: Sequence[float]) -> str:
    return ":".join(f"{r * 100:g}" for r in ratios)


def _part_sizes(n: int, ratios: Sequence[float]) -> list[int]:
    """How many of ``n`` images go to each part after the first: at least one if its ratio
    is above 0; the first part takes the rest."""
    rest = [max(1, _round(n * r)) if r > 0 else 0 for r in ratios[1:]]
    return [n - sum(rest), *rest]


def _minimum_for(ratios: Sequence[float]) -> int:
    n = 1
    while min(_part_sizes(n, ratios)) < 1:
        n += 1
    return n


def _fold_minimum(folds: int, val_ratio: float) -> int:
    n = folds
    while True:
        # The largest fold is ceil(n / k); what remains must give one train and one val.
        rest = n - math.ceil(n / folds)
        if min(_part_sizes(rest, (1 - val_ratio, val_ratio))) >= 1:
            return n
        n += 1


def check_split_feasible(index: DatasetIndex, ratios: Sequence[float], *, folds: int = 0) -> None:
    """Fail before any work if a class has too few images for the split (names it)."""
    ratios = tuple(ratios)
    if folds:
        if index.presplit:
            raise TrainError(
                f"--folds needs class folders; {index.where} is (or holds a folder) already "
                "split into train/val/test"
            )
        val = ratios[1] / (ratios[0] + ratios[1])
        need = _fold_minimum(folds, val)
        why = f"{folds}-fold cross-validation (each fold tests on 1/{folds} of it)"
        counts = index.counts()["all"]
    elif index.presplit:
        missing = _carved_parts(index)
        carve = {name: ratios[SPLITS.index(name)] for name in missing}
        kept = ratios[0] + sum(carve.values())
        sub = [ratios[0] / kept, *(carve[m] / kept for m in missing)]
        need = _minimum_for(sub)
        why = f"carving {' and '.join(missing)} from train" if missing else "training"
        counts = index.counts()["train"]
        where = index.root / "train" if not index.roots else f"the train/ of {index.where}"
        _raise_if_too_few(counts, need, why, where)
        return
    else:
        need = _minimum_for(ratios)
        why = f"a {_ratio_text(ratios)} train:val:test split (at least one image in each)"
        counts = index.counts()["all"]
    _raise_if_too_few(counts, need, why, index.where)


def _raise_if_too_few(counts: Mapping[str, int], need: int, why: str, where: Path | str) -> None:
    short = {name: n for name, n in counts.items() if n < need}
    if short:
        listed = ", ".join(
            f"{name!r} has {n} image{'s' if n != 1 else ''}" for name, n in short.items()
        )
        raise TrainError(
            f"too few images in {where}: {listed}; {why} needs at least {need} per class"
        )


def _class_rng(seed: int, label: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(label.encode("utf-8"))])


def _by_class(samples: Iterable[Sample], n_classes: int) -> list[list[Sample]]:
    groups: list[list[Sample]] = [[] for _ in range(n_classes)]
    for s in samples:
        groups[s.label].append(s)
    return [sorted(g) for g in groups]


def _stratify(
    samples: Iterable[Sample], labels: Sequence[str], ratios: Sequence[float], seed: int
) -> list[list[Sample]]:
    """Per class: shuffle (seeded by class name), then cut into ``len(ratios)`` parts."""
    parts: list[list[Sample]] = [[] for _ in ratios]
    for c, group in enumerate(_by_class(samples, len(labels))):
        if not group:
            continue
        order = _class_rng(seed, labels[c]).permutation(len(group))
        shuffled = [group[i] for i in order]
        sizes = _part_sizes(len(group), ratios)
        # The held-out parts are cut first; the first (training) part takes the rest.
        start = 0
        for k in [*range(1, len(ratios)), 0]:
            parts[k].extend(shuffled[start : start + sizes[k]])
            start += sizes[k]
    return [sorted(p) for p in parts]


def split_dataset(
    index: DatasetIndex,
    ratios: Sequence[float] = (0.7, 0.15, 0.15),
    *,
    seed: int = 0,
    skipped: Sequence[SkippedFile] = (),
) -> DataSplit:
    """A stratified, seeded train/val/test split (given parts of a pre-split folder kept)."""
    check_split_feasible(index, ratios)
    ratios = tuple(ratios)
    source = "split"
    if not index.presplit:
        train, val, test = _stratify(index.parts["all"], index.labels, ratios, seed)
    else:
        missing = _carved_parts(index)
        carve = [ratios[SPLITS.index(m)] for m in missing]
        kept = ratios[0] + sum(carve)
        pieces = _stratify(
            index.parts["train"], index.labels, [ratios[0] / kept, *(r / kept for r in carve)], seed
        )
        got = {"train": pieces[0], **dict(zip(missing, pieces[1:], strict=True))}
        train = got["train"]
        val = list(index.parts.get("val", ())) or got["val"]
        test = list(index.parts.get("test", ())) or got.get("test") or val
        if "test" in index.parts:
            source = "test"
        elif "val" in index.parts:
            source = "val"
            log.info(
                "%s has val/ but no test/: every train/ image is trained on, and the "
                "model is evaluated on val/ (add a test/ folder for an independent test)",
                index.root,
            )
    return DataSplit(
        labels=index.labels,
        train=tuple(train),
        val=tuple(val),
        test=tuple(test),
        root=index.root,
        seed=seed,
        ratios=ratios,
        skipped=tuple(skipped),
        test_source=source,
        roots=index.roots,
    )


def _carved_parts(index: DatasetIndex) -> list[str]:
    """The parts a pre-split folder lacks that are carved from its train/.

    A given val/ is never supplemented by carving a test part from train/: the user's
    training images all train, and the test is val/ (``DataSplit.test_source``).
    """
    if "val" in index.parts:
        return []
    return [name for name in SPLITS if name not in index.parts]


def kfold_splits(
    index: DatasetIndex,
    folds: int,
    ratios: Sequence[float] = (0.7, 0.15, 0.15),
    *,
    seed: int = 0,
    skipped: Sequence[SkippedFile] = (),
) -> list[DataSplit]:
    """K stratified folds: fold k tests on the k-th fifth (say) of every class and carves
    its validation set from the rest with the train:val ratio of ``ratios``."""
    check_split_feasible(index, ratios, folds=folds)
    assigned: list[list[Sample]] = [[] for _ in range(folds)]
    for c, group in enumerate(_by_class(index.parts["all"], len(index.labels))):
        order = _class_rng(seed, index.labels[c]).permutation(len(group))
        for position, i in enumerate(order):
            assigned[position % folds].append(group[i])
    val_share = ratios[1] / (ratios[0] + ratios[1])
    splits = []
    for k in range(folds):
        rest = [s for j in range(folds) if j != k for s in assigned[j]]
        train, val = _stratify(rest, index.labels, (1 - val_share, val_share), seed + k)
        splits.append(
            DataSplit(
                labels=index.labels,
                train=tuple(train),
                val=tuple(val),
                test=tuple(sorted(assigned[k])),
                root=index.root,
                seed=seed,
                ratios=tuple(ratios),
                fold=k + 1,
                folds=folds,
                skipped=tuple(skipped),
                roots=index.roots,
            )
        )
    return splits
