"""The model a station serves, and how a new one replaces it without a gap.

A bundle is loaded in five steps, and a new bundle goes through the same five
before it may replace the one serving:

1. resolve ``model.bundle`` once (it is usually a ``current`` symlink a deployment
   re-points), so every later step reads the same directory even if the link moves
   meanwhile;
2. verify the files: checksums, and the ed25519 signature when ``model.public_key``
   is configured (:func:`~fieldscope.edge.bundle.verify_bundle`);
3. check that this device's TFLite runtime is one the manifest lists
   (:func:`~fieldscope.edge.runtime.check_min_runtime`);
4. build the interpreter, once (:class:`~fieldscope.edge.classify.Classifier`, which
   compares the model with its manifest and runs a probe inference);
5. self-test the whole path: a synthetic frame through the effective preprocessing
   recipe (the bundle's, with the configuration's overrides) and the classifier
   must give finite probabilities that sum to one.

Any failure raises :class:`~fieldscope.edge.errors.BundleError` naming the step,
and the slot keeps the old model. A success is swapped in with one reference
assignment: the pipeline takes :meth:`ModelSlot.current` once per frame and keeps
that model for the whole frame (preprocessing *and* inference), so a swap always
falls between two frames and a frame never mixes two models' recipes.

A model classifies crops like those it was trained on: when the station's ``[objects]``
settings would cut other crops than the bundle's recorded segmentation, the slot logs
one warning naming each difference, at start-up and at each swap (the model still
serves: a station in the field is better slightly off than silent).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fieldscope.edge.bundle import Bundle, verify_bundle
from fieldscope.edge.classify import Classifier
from fieldscope.edge.config import ModelConfig, PreprocessingOverrides
from fieldscope.edge.errors import BundleError, ConfigError, FieldscopeError, RecipeError
from fieldscope.edge.health import ModelInfo
from fieldscope.edge.message import ModelRef
from fieldscope.edge.objects import ObjectsSettings, segmentation_differences
from fieldscope.edge.preprocess import PreprocessRecipe, preprocess
from fieldscope.edge.runtime import RuntimeInfo, check_min_runtime, runtime_info

__all__ = [
    "BundleSource",
    "LoadedModel",
    "ModelSlot",
    "ReloadResult",
    "bundle_source",
    "load_model",
    "warn_segmentation",
]

logger = logging.getLogger(__name__)

# The self-test frame: not square and not the model's size, so resizing really runs.
_SELF_TEST_SHAPE = (120, 160, 3)


@dataclass(frozen=True)
class BundleSource:
    """Where ``model.bundle`` points now: the resolved directory and the identity of
    its manifest file. A deployment that re-points the symlink, or replaces the
    directory in place, changes it; that is how a new bundle is noticed."""

    target: Path
    manifest_id: tuple[int, int, int, int] | None  # (device, inode, size, mtime_ns)


def bundle_source(path: Path) -> BundleSource:
    """What ``path`` resolves to now (never raises: a missing bundle is a value)."""
    target = Path(os.path.realpath(path))
    try:
        st = (target / "manifest.json").stat()
    except OSError:
        return BundleSource(target, None)
    return BundleSource(target, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A verified bundle with its interpreter, ready to serve.

    ``classifier`` is not thread-safe: only the pipeline's classify thread uses it.
    ``recipe`` is the bundle's preprocessing with the configuration's overrides.
    """

    bundle: Bundle
    classifier: Classifier
    recipe: PreprocessRecipe
    runtime: RuntimeInfo
    source: BundleSource
    loaded_at: datetime

    @property
    def ref(self) -> ModelRef:
        """What every identification says about the model that made it."""
        m = self.bundle.manifest
        return ModelRef(m.model_name, m.model_version, self.bundle.sha256)

    @property
    def info(self) -> ModelInfo:
        """The retained ``model`` payload."""
        return ModelInfo.from_bundle(self.bundle, self.runtime, self.loaded_at)

    def describe(self) -> str:
        m = self.bundle.manifest
        return f"{m.model_name} {m.model_version} (sha256 {self.bundle.sha256[:12]})"


def _self_test_frame() -> npt.NDArray[np.uint8]:
    """A deterministic frame with gradients and edges, so denoising has work to do."""
    h, w, _ = _SELF_TEST_SHAPE
    y, x = np.mgrid[0:h, 0:w]
    frame = np.empty(_SELF_TEST_SHAPE, dtype=np.uint8)
    frame[..., 0] = (x * 255 // (w - 1)).astype(np.uint8)
    frame[..., 1] = (y * 255 // (h - 1)).astype(np.uint8)
    frame[..., 2] = np.where(((x // 10) + (y // 10)) % 2 == 0, 200, 40).astype(np.uint8)
    return frame


def _self_test(classifier: Classifier, recipe: PreprocessRecipe, where: Path) -> None:
    try:
        tensor = preprocess(_self_test_frame(), recipe)
        prediction = classifier.classify(tensor)
    except (RecipeError, ValueError, RuntimeError) as exc:
        raise BundleError(f"bundle {where}: the self-test inference failed: {exc}") from exc
    probs = prediction.probabilities
    if not np.all(np.isfinite(probs)) or abs(float(probs.sum()) - 1.0) > 0.05:
        raise BundleError(
            f"bundle {where}: the self-test inference gave scores that are not probabilities "
            f"(sum {float(probs.sum()):.3f})"
        )


def load_model(
    cfg: ModelConfig, overrides: PreprocessingOverrides, source: BundleSource | None = None
) -> LoadedModel:
    """Resolve, verify, check, build and self-test the configured bundle (see above).

    ``source`` is where ``cfg.bundle`` pointed when the caller looked (default: now).

    Raises:
        BundleError: the bundle is missing, damaged, unsigned or wrongly signed, not
            for this runtime, fails to load, or fails its self-test; the message
            says which and where.
        ConfigError: ``model.runtime`` names a runtime the classifier does not use.
        MissingDependencyError: no TFLite runtime is installed.
    """
    source = source or bundle_source(cfg.bundle)
    target = source.target
    if source.manifest_id is None and not target.is_dir():
        raise BundleError(f"bundle {cfg.bundle} does not exist (it resolves to {target})")
    try:
        bundle = verify_bundle(target, cfg.public_key, load_model=False)
    except OSError as exc:  # a file of the bundle cannot be read (permissions, I/O)
        raise BundleError(f"bundle {target}: cannot read it: {exc.strerror or exc}") from exc
    runtime = runtime_info()
    if cfg.runtime is not None and cfg.runtime != runtime.name:
        raise ConfigError(
            f"model.runtime = {cfg.runtime!r}, but the classifier runs the first installed "
            f"runtime, {runtime.name}; remove model.runtime or uninstall {runtime.name}"
        )
    try:
        check_min_runtime(bundle.manifest.min_runtime, runtime)
    except BundleError as exc:
        raise BundleError(f"bundle {target}: {exc}") from exc
    classifier = Classifier(bundle, cfg.threads, k=cfg.top_k)
    try:
        recipe = overrides.apply(bundle.manifest.preprocessing)
    except RecipeError as exc:
        raise BundleError(
            f"bundle {target}: the [preprocessing] overrides do not fit its recipe: {exc}"
        ) from exc
    _self_test(classifier, recipe, target)
    return LoadedModel(bundle, classifier, recipe, runtime, source, datetime.now(UTC))


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did: ``model`` serves now (the new one, or the old one kept);
    ``error`` says why the new bundle was refused (None when it was swapped in)."""

    model: LoadedModel
    previous: LoadedModel
    error: str | None = None

    @property
    def swapped(self) -> bool:
        return self.error is None


class ModelSlot:
    """The serving model, replaced atomically by :meth:`reload`.

    ``refused`` keeps the reason the last reload failed (None after a success), and
    ``refused_source`` the bundle that failed, so the symlink watcher does not try
    the same broken bundle again every few seconds.
    """

    def __init__(self, model: LoadedModel, objects: ObjectsSettings | None = None) -> None:
        self._model = model
        self._objects = objects  # the station's [objects], to compare with each bundle's
        warn_segmentation(objects, model)
        self._lock = threading.Lock()  # guards the reference swap
        self._reloading = threading.Lock()  # one reload at a time
        self.refused: str | None = None
        self.refused_source: BundleSource | None = None

    def current(self) -> LoadedModel:
        """The model to use for the next frame (take it once per frame)."""
        with self._lock:
            return self._model

    def reload(self, cfg: ModelConfig, overrides: PreprocessingOverrides) -> ReloadResult:
        """Load the configured bundle anew and swap it in; keep the old one on failure.

        Never raises for a bad bundle: the result carries the reason.
        """
        with self._reloading:
            old = self.current()
            source = bundle_source(cfg.bundle)
            try:
                new = load_model(cfg, overrides, source)
            except FieldscopeError as exc:  # BundleError, ConfigError, a missing runtime
                error = str(exc)
            except Exception as exc:
                # A bug or a bundle nobody foresaw must not stop the station: the old
                # model keeps serving, and the traceback goes to the log for a report.
                logger.exception("loading bundle %s failed unexpectedly", source.target)
                error = f"bundle {source.target}: loading failed unexpectedly: {exc!r}"
            else:
                with self._lock:
                    self._model = new
                warn_segmentation(self._objects, new)
                self.refused = None
                self.refused_source = None
                return ReloadResult(new, old)
            self.refused = error
            self.refused_source = source
            return ReloadResult(old, old, error)


def warn_segmentation(station: ObjectsSettings | None, model: LoadedModel) -> None:
    """One warning line when ``station``'s settings would cut other crops than those
    the model was trained on (None: not compared, e.g. a bare slot in a test)."""
    if station is None:
        return
    recorded = model.bundle.manifest.segmentation
    differences = segmentation_differences(
        station, None if recorded is None else recorded.settings()
    )
    if differences:
        logger.warning(
            "the [objects] settings differ from the segmentation bundle %s was trained "
            "with, so its crops will not look like the training crops: %s",
            model.describe(),
            "; ".join(differences),
        )
