"""Preprocessed pixels: the on-disk cache, loading a list of samples, and ``tf.data``.

Every image goes once through the edge's own ``load_and_preprocess`` (the same denoise
and resize the Pi runs) and the uint8 result is cached on disk, keyed by file (path,
size, mtime) and recipe, so later epochs, resumed runs and re-evaluations never re-run
the filters. ``fieldscope.train.data`` re-exports these names.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fieldscope.edge.errors import ImageDecodeError
from fieldscope.edge.preprocess import PreprocessRecipe, load_and_preprocess
from fieldscope.train.errors import TrainError
from fieldscope.train.rundir import CACHE_RECIPE_FILE, write_json
from fieldscope.train.samples import Sample, SkippedFile

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = ["LoadedImages", "PreprocessCache", "load_images", "make_dataset"]

log = logging.getLogger(__name__)

# Bump when the cache layout or contents change, so old entries are never reused.
_CACHE_FORMAT = 1

ProgressCallback = Callable[[int, int], None]


# --- preprocessing cache ------------------------------------------------------------


def _recipe_key(recipe: PreprocessRecipe) -> str:
    try:
        version = importlib.metadata.version("fieldscope")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
        version = "unknown"
    text = json.dumps(
        {"recipe": recipe.to_dict(), "format": _CACHE_FORMAT, "fieldscope": version},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class PreprocessCache:
    """Preprocessed uint8 arrays on disk, one ``.npy`` per (file, recipe).

    The key is the file's resolved path, size and modification time plus the recipe and
    the fieldscope version, so an edited image, a changed recipe or an upgraded
    preprocessing function is recomputed, never served stale. Entries are written
    atomically, so an interrupted run leaves no half-written array behind.
    """

    def __init__(self, cache_dir: Path, recipe: PreprocessRecipe) -> None:
        self.recipe = recipe
        self.directory = Path(cache_dir) / _recipe_key(recipe)

    def path_for(self, image: Path) -> Path:
        """Where the preprocessed array of ``image`` is (or will be) stored."""
        resolved = Path(image).resolve()
        st = resolved.stat()
        key = f"{resolved}\0{st.st_size}\0{st.st_mtime_ns}"
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        return self.directory / digest[:2] / f"{digest}.npy"

    def load(self, image: Path) -> np.ndarray:
        """The preprocessed pixels of ``image``, computed once and then read from disk.

        Raises:
            ImageDecodeError: the file cannot be read or decoded.
        """
        try:
            target = self.path_for(image)
        except OSError as exc:
            raise ImageDecodeError(f"{image}: cannot read the file ({exc.strerror})") from exc
        if target.exists():
            try:
                cached = np.load(target, allow_pickle=False)
                if cached.dtype == np.uint8 and cached.shape == (*self.recipe.size, 3):
                    return cached
            except (OSError, ValueError):
                pass
            log.warning("recomputing damaged cache entry %s", target)
        pixels = load_and_preprocess(image, self.recipe)
        self._store(target, pixels)
        return pixels

    def _store(self, target: Path, pixels: np.ndarray) -> None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if not (self.directory / CACHE_RECIPE_FILE).exists():
                write_json(self.directory / CACHE_RECIPE_FILE, self.recipe.to_dict())
            temporary = target.with_name(f".{target.stem}.{uuid.uuid4().hex}.npy")
            np.save(temporary, pixels, allow_pickle=False)
            temporary.replace(target)
        except OSError as exc:
            raise TrainError(
                f"cannot write the preprocessing cache {target}: {exc.strerror}"
            ) from exc


@dataclass(frozen=True)
class LoadedImages:
    """Preprocessed pixels of the readable files, in input order, and what was skipped."""

    images: np.ndarray  # (N, H, W, 3) uint8
    samples: tuple[Sample, ...]
    skipped: tuple[SkippedFile, ...]

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([s.label for s in self.samples], dtype="int32")


def load_images(
    samples: Sequence[Sample],
    cache: PreprocessCache,
    *,
    on_progress: ProgressCallback | None = None,
    workers: int | None = None,
) -> LoadedImages:
    """Preprocess (or read from the cache) every sample; unreadable files are skipped.

    Decoding and OpenCV filters release the GIL, so a thread per core keeps them busy.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    h, w = cache.recipe.size
    arrays: list[np.ndarray] = []
    kept: list[Sample] = []
    skipped: list[SkippedFile] = []

    def work(sample: Sample) -> np.ndarray | SkippedFile:
        try:
            return cache.load(sample.path)
        except ImageDecodeError as exc:
            return SkippedFile(sample.path, str(exc))

    total = len(samples)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, (sample, result) in enumerate(
            zip(samples, pool.map(work, samples), strict=True), 1
        ):
            if isinstance(result, SkippedFile):
                log.warning("skipping unreadable image: %s", result.reason)
                skipped.append(result)
            else:
                arrays.append(result)
                kept.append(sample)
            if on_progress is not None:
                on_progress(done, total)
    images = np.stack(arrays) if arrays else np.zeros((0, h, w, 3), dtype=np.uint8)
    return LoadedImages(images, tuple(kept), tuple(skipped))


# --- tf.data ------------------------------------------------------------------------


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    batch_size: int,
    shuffle_seed: int | None = None,
    augmenter: Callable[..., Any] | None = None,
) -> tf.data.Dataset:
    """Batches of float32 RGB 0-255 (and int labels) from in-memory uint8 arrays.

    ``shuffle_seed`` turns on a full reshuffle every epoch (training); ``augmenter`` is
    applied per batch, only when given (training). The augmentation map is sequential on
    purpose: parallel calls would consume the layers' random streams in a varying order
    and make a seeded run irreproducible, while each batch op already uses every core and
    ``prefetch`` overlaps it with the model (measured: no slower per epoch).
    """
    import tensorflow as tf

    elements: Any = images if labels is None else (images, labels)
    ds = tf.data.Dataset.from_tensor_slices(elements)
    if shuffle_seed is not None:
        ds = ds.shuffle(len(images), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if labels is None:
        ds = ds.map(_to_float, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(_to_float_labelled, num_parallel_calls=tf.data.AUTOTUNE)
    if augmenter is not None:
        augment = _augment_with(augmenter)
        ds = ds.map(augment)
    return ds.prefetch(tf.data.AUTOTUNE)


def _to_float(x: Any) -> Any:
    import tensorflow as tf

    return tf.cast(x, tf.float32)


def _to_float_labelled(x: Any, y: Any) -> Any:
    import tensorflow as tf

    return tf.cast(x, tf.float32), y


def _augment_with(augmenter: Callable[..., Any]) -> Callable[..., Any]:
    def augment(x: Any, y: Any) -> Any:
        return augmenter(x, training=True), y

    return augment
