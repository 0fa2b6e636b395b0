"""The one place that chooses a TFLite interpreter, so the rest of edge never cares which.

Three runtimes can run our bundles, tried in this order:

1. ``ai_edge_litert`` (LiteRT, Google's successor to tflite-runtime): current, fast
   (XNNPACK), wheels for numpy 1 and 2 on x86_64 and aarch64 — the default.
2. ``tflite_runtime``: its last release (2.14) only works with numpy < 2 and cannot load
   some ops that newer converters emit, but it is what older Pi images already have.
3. ``tensorflow.lite``: a workstation with TensorFlow can run bundles without another
   install. This lazy import is the *only* place edge may touch TensorFlow.

A runtime can be forced by name (``prefer=``) to reproduce what a given Pi runs.
Errors from the runtime (an op version it does not know, a damaged flatbuffer) become
:class:`BundleError` with the runtime's own explanation and what to do about it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fieldscope.edge.errors import BundleError, ConfigError, MissingDependencyError
from fieldscope.edge.native_logs import quiet_native_stderr

__all__ = [
    "RUNTIMES",
    "Interpreter",
    "RuntimeInfo",
    "RuntimeSpec",
    "check_min_runtime",
    "make_interpreter",
    "runtime_info",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeSpec:
    """Where one runtime's ``Interpreter`` class lives and which pip package provides it.

    ``attribute`` may be dotted (looked up attribute by attribute on ``module``).
    """

    name: str
    module: str
    attribute: str
    distribution: str


# In order of preference (see the module docstring for why).
RUNTIMES: tuple[RuntimeSpec, ...] = (
    RuntimeSpec("ai_edge_litert", "ai_edge_litert.interpreter", "Interpreter", "ai-edge-litert"),
    RuntimeSpec("tflite_runtime", "tflite_runtime.interpreter", "Interpreter", "tflite-runtime"),
    # ``tensorflow.lite`` the package is not ``tf.lite`` the API: go through the API.
    RuntimeSpec("tensorflow", "tensorflow", "lite.Interpreter", "tensorflow"),
)


class Interpreter(Protocol):
    """The part of the TFLite ``Interpreter`` API that fieldscope uses (all three runtimes)."""

    def allocate_tensors(self) -> None: ...

    def get_input_details(self) -> list[dict[str, Any]]: ...

    def get_output_details(self) -> list[dict[str, Any]]: ...

    def set_tensor(self, tensor_index: int, value: Any) -> None: ...

    def get_tensor(self, tensor_index: int) -> Any: ...

    def invoke(self) -> None: ...


@dataclass(frozen=True)
class RuntimeInfo:
    """Which runtime runs the models (``name`` as in :data:`RUNTIMES`) and its version.

    The daemon reports it in its status message, so a fleet's runtimes can be audited.
    """

    name: str
    version: str


def _spec(name: str) -> RuntimeSpec:
    for spec in RUNTIMES:
        if spec.name == name:
            return spec
    known = ", ".join(s.name for s in RUNTIMES)
    raise ConfigError(f"unknown TFLite runtime {name!r} (known: {known})")


def _version(spec: RuntimeSpec, module: Any) -> str:
    try:
        return importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        # A runtime built from source or vendored by the OS has no pip metadata.
        return str(getattr(module, "__version__", "unknown"))


def _load(prefer: str | None) -> tuple[Any, RuntimeInfo]:
    """Import the first usable runtime (or exactly ``prefer``); return its class and info."""
    candidates: Sequence[RuntimeSpec] = RUNTIMES if prefer is None else (_spec(prefer),)
    failures: list[str] = []
    for spec in candidates:
        try:
            module = importlib.import_module(spec.module)
            cls: Any = module
            for part in spec.attribute.split("."):
                cls = getattr(cls, part)
        except ImportError as exc:
            # Not only "not installed": tflite_runtime 2.14 fails to import under numpy 2.
            # A broken runtime is skipped (and logged) so the next one can serve.
            failures.append(f"{spec.name}: {exc}")
            logger.debug("TFLite runtime %s unusable: %s", spec.name, exc)
            continue
        except AttributeError as exc:
            failures.append(f"{spec.name}: {exc}")
            continue
        return cls, RuntimeInfo(spec.name, _version(spec, module))
    if prefer is not None:
        spec = candidates[0]
        raise MissingDependencyError(
            f"TFLite runtime {prefer!r} is not usable ({failures[0].split(': ', 1)[1]}); "
            f"install it with `pip install {spec.distribution}` or choose another runtime"
        )
    raise MissingDependencyError(
        "no TFLite interpreter is installed (tried "
        + "; ".join(failures)
        + "); install one with `pip install ai-edge-litert` or `pip install 'fieldscope[edge]'`"
    )


def runtime_info(prefer: str | None = None) -> RuntimeInfo:
    """Name and version of the runtime :func:`make_interpreter` would use.

    Raises:
        MissingDependencyError: no runtime (or not the preferred one) can be imported.
        ConfigError: ``prefer`` is not a known runtime name.
    """
    return _load(prefer)[1]


def make_interpreter(
    model: Path | bytes, num_threads: int | None = None, *, prefer: str | None = None
) -> Interpreter:
    """An interpreter for ``model`` (a ``.tflite`` path or its bytes) with tensors allocated.

    Build it once and reuse it: construction parses the flatbuffer and plans memory,
    which costs far more than one inference on a Pi.

    Raises:
        BundleError: the file is missing, not a TFLite model, or uses an op (version)
            this runtime cannot run — the message names the runtime and its version.
        MissingDependencyError: no runtime is installed.
        ConfigError: ``num_threads`` < 1 or an unknown ``prefer``.
    """
    if num_threads is not None and (
        isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
    ):
        raise ConfigError(f"num_threads must be a positive integer or None, got {num_threads!r}")
    cls, info = _load(prefer)
    if isinstance(model, bytes | bytearray):
        where = "model bytes"
        if not model:
            raise BundleError("the model is empty (0 bytes)")
        kwargs: dict[str, Any] = {"model_content": bytes(model)}
    else:
        where = str(model)
        if not Path(model).is_file():
            raise BundleError(f"model file {where} does not exist")
        kwargs = {"model_path": str(model)}
    try:
        # LiteRT announces its XNNPACK delegate on stderr for every interpreter.
        with quiet_native_stderr():
            interpreter: Interpreter = cls(**kwargs, num_threads=num_threads)
            interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())
        if "op" in detail.lower() and "version" in detail.lower():
            hint = (
                "the model was converted by a newer TensorFlow than this runtime knows: "
                "upgrade it (`pip install -U ai-edge-litert`) or convert for an older runtime"
            )
        else:
            hint = "is it a .tflite file, complete and undamaged?"
        raise BundleError(
            f"{info.name} {info.version} cannot load {where}: {detail} ({hint})"
        ) from exc
    logger.debug("loaded %s with %s %s", where, info.name, info.version)
    return interpreter


def _version_key(text: str) -> tuple[int, ...] | None:
    """``"2.14.0"`` -> ``(2, 14, 0)``; ``None`` when it does not start with a number."""
    if not re.match(r"\d", text):
        return None
    parts = [int(m) for m in re.findall(r"\d+", text)[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def check_min_runtime(
    min_runtime: Mapping[str, str] | None, info: RuntimeInfo, reason: str | None = None
) -> None:
    """Refuse to run a bundle on a runtime its manifest does not list as able to run it.

    ``min_runtime`` (written by ``fieldscope convert``) lists each runtime that is known
    to run the model, with its oldest such version. A runtime that is missing from the
    list, or older than listed, could fail to load the model or — as tflite-runtime 2.14
    does on aarch64 with some newer int8 models — crash in ``invoke()``; a clear refusal
    beats either. A bundle without ``min_runtime`` makes no claim and is not checked,
    nor is a runtime whose version is unknown (built from source, no pip metadata).
    ``reason`` is why the converter left this runtime out, when the manifest says so.

    Raises:
        BundleError: this runtime is not listed, or is older than the listed version.
    """
    if not min_runtime:
        return
    listed = ", ".join(f"{name} >= {version}" for name, version in sorted(min_runtime.items()))
    needed = min_runtime.get(info.name)
    if needed is None and reason:
        raise BundleError(
            f"the bundle refuses {info.name} {info.version} (it lists: {listed}): {reason}; "
            "install ai-edge-litert (`pip install ai-edge-litert`), or convert with "
            "--quantize float16 for this runtime"
        )
    if needed is None:
        raise BundleError(
            f"the bundle is not known to run on {info.name} {info.version} (it lists: "
            f"{listed}); install one of those (`pip install ai-edge-litert`), or convert "
            "the model again without --allow-newer-runtime"
        )
    have, want = _version_key(info.version), _version_key(needed)
    if have is None or want is None:
        logger.warning(
            "cannot compare runtime %s version %r with the bundle's minimum %r; loading anyway",
            info.name,
            info.version,
            needed,
        )
        return
    if have < want:
        spec = _spec(info.name)
        raise BundleError(
            f"the bundle needs {info.name} >= {needed} but this device has {info.version} "
            f"(the bundle lists: {listed}); upgrade it (`pip install -U {spec.distribution}`)"
        )
