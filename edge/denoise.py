"""Contract 1, the denoise step: the filters a recipe may name, as a registry.

Each filter is declared once, in :data:`FILTERS`: its name, its parameters (type,
range, default: :class:`DenoiseParam`), an optional check across parameters, and the
function that applies it. :func:`denoise`, the recipe validation
(:func:`denoise_problems`, wherever a recipe is read: manifests, ``[preprocessing]``
overrides, train flags, ``preview --denoise-param``), ``DENOISE_DEFAULTS``,
``DENOISE_LIMITS`` and the command-line help all read that table, so adding a filter
is one :class:`DenoiseFilter` (here or in a module of its own) added to it.

Ranges are bounded because a window's cost grows with its area: nlmeans with
search_window=999 held a daemon's main thread for minutes on one frame, and median
ksize=10001 took 93 s per image. The limits are several times what microscope
denoising uses (the defaults; nlmeans at its limits takes about 2.3x its default
time). A recipe names a filter of the built-in table only, so that every station
can reproduce it; :func:`denoise` takes another registry for experiments and tests.

OpenCV and numpy are imported where a filter runs, so that command-line help can
list the filters without loading them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, cast

import msgspec

from fieldscope.edge.errors import RecipeError
from fieldscope.edge.registry import Registry
from fieldscope.edge.untrusted import RejectedValueError, read_number, show_value

if TYPE_CHECKING:
    from fieldscope.edge.pixels import RGBImage

__all__ = [
    "DENOISE_DEFAULTS",
    "DENOISE_LIMITS",
    "DENOISE_METHODS",
    "FILTERS",
    "DenoiseFilter",
    "DenoiseParam",
    "denoise",
    "denoise_problems",
    "normalised_params",
    "param_problems",
]

Params = Mapping[str, float | int]


class DenoiseParam(msgspec.Struct, frozen=True):
    """One parameter of a filter, in OpenCV's names and units.

    ``window`` parameters are window sizes in pixels: integers (an integral float such
    as ``5.0`` is stored as ``5``), and ``odd`` ones must have a centre pixel.
    """

    name: str
    default: float | int
    low: float
    high: float
    window: bool = False
    odd: bool = False


class DenoiseFilter(msgspec.Struct, frozen=True, kw_only=True):
    """A denoise filter: ``apply(rgb, params)`` returns the filtered RGB uint8 image
    (``params`` complete: the defaults merged with what the recipe gives); ``check``
    (may be None) returns problems across parameters, once each one is valid."""

    name: str
    summary: str
    params: tuple[DenoiseParam, ...]
    apply: Callable[[RGBImage, Params], Any]
    check: Callable[[Params], list[str]] | None = None

    def param(self, name: str) -> DenoiseParam | None:
        """The parameter called ``name``, or None."""
        return next((p for p in self.params if p.name == name), None)

    def defaults(self) -> dict[str, float | int]:
        """Every parameter with its default value."""
        return {p.name: p.default for p in self.params}


# ── the built-in filters ──────────────────────────────────────────────────────────────


def _none(rgb: RGBImage, p: Params) -> RGBImage:
    return rgb.copy()


def _bilateral(rgb: RGBImage, p: Params) -> Any:
    import cv2

    return cv2.bilateralFilter(
        rgb, int(p["diameter"]), float(p["sigma_color"]), float(p["sigma_space"])
    )


# With diameter 0 OpenCV uses a window of 2 * round(1.5 * sigma_space) + 1 pixels.
_BILATERAL_DERIVED_MAX_SIGMA = 10


def _bilateral_check(p: Params) -> list[str]:
    sigma = float(p["sigma_space"])
    if p["diameter"] == 0 and sigma > _BILATERAL_DERIVED_MAX_SIGMA:
        return [
            f"denoise_params.diameter 0 derives the window from sigma_space ({sigma:g} "
            f"would give {2 * round(1.5 * sigma) + 1} pixels); give a diameter of 1..31, "
            f"or sigma_space <= {_BILATERAL_DERIVED_MAX_SIGMA}"
        ]
    return []


def _median(rgb: RGBImage, p: Params) -> Any:
    import cv2

    return cv2.medianBlur(rgb, int(p["ksize"]))


def _gaussian(rgb: RGBImage, p: Params) -> Any:
    import cv2

    k = int(p["ksize"])
    return cv2.GaussianBlur(rgb, (k, k), float(p["sigma"]))


def _nlmeans(rgb: RGBImage, p: Params) -> Any:
    import cv2
    import numpy as np

    # OpenCV converts to CIELAB assuming BGR, so hand it BGR and turn it back.
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    out = cv2.fastNlMeansDenoisingColored(
        bgr,
        None,
        float(p["h"]),
        float(p["h_color"]),
        int(p["template_window"]),
        int(p["search_window"]),
    )
    return out[:, :, ::-1]


_BUILTIN = (
    DenoiseFilter(name="none", summary="no filtering", params=(), apply=_none),
    DenoiseFilter(
        name="bilateral",
        summary="edge-preserving smoothing (cv2.bilateralFilter)",
        params=(
            # diameter 0 lets OpenCV derive it from sigma_space (see _bilateral_check).
            DenoiseParam("diameter", 9, 0, 31, window=True),
            DenoiseParam("sigma_color", 75.0, 0, 1000),
            DenoiseParam("sigma_space", 75.0, 0, 1000),
        ),
        apply=_bilateral,
        check=_bilateral_check,
    ),
    DenoiseFilter(
        name="median",
        summary="salt-and-pepper noise, dust (cv2.medianBlur)",
        params=(DenoiseParam("ksize", 5, 1, 31, window=True, odd=True),),
        apply=_median,
    ),
    DenoiseFilter(
        name="gaussian",
        summary="sensor noise, softens edges (cv2.GaussianBlur)",
        params=(
            DenoiseParam("ksize", 5, 1, 63, window=True, odd=True),
            DenoiseParam("sigma", 0.0, 0, 100),
        ),
        apply=_gaussian,
    ),
    DenoiseFilter(
        name="nlmeans",
        summary="strongest and slowest (cv2.fastNlMeansDenoisingColored)",
        params=(
            DenoiseParam("h", 10.0, 0, 255),
            DenoiseParam("h_color", 10.0, 0, 255),
            DenoiseParam("template_window", 7, 1, 15, window=True, odd=True),
            DenoiseParam("search_window", 21, 1, 35, window=True, odd=True),
        ),
        apply=_nlmeans,
    ),
)

FILTERS: Registry[DenoiseFilter] = Registry("denoise filter", ((f.name, f) for f in _BUILTIN))
DENOISE_METHODS: tuple[str, ...] = FILTERS.names()
# Each filter's parameters with their defaults, and the range each may take.
DENOISE_DEFAULTS: Mapping[str, Mapping[str, float | int]] = MappingProxyType(
    {name: MappingProxyType(FILTERS[name].defaults()) for name in FILTERS}
)
DENOISE_LIMITS: Mapping[str, Mapping[str, tuple[float, float]]] = MappingProxyType(
    {
        name: MappingProxyType({p.name: (p.low, p.high) for p in FILTERS[name].params})
        for name in FILTERS
    }
)


# ── validation and application ────────────────────────────────────────────────────────


def denoise_problems(
    method: object, params: object, filters: Registry[DenoiseFilter] = FILTERS
) -> list[str]:
    """Problems with a denoise method and its parameters, each naming the field."""
    if not isinstance(method, str) or method not in filters:
        return [f"denoise must be one of {', '.join(filters.names())}, got {method!r}"]
    if not isinstance(params, Mapping):
        return [f"denoise_params must be a table/object of numbers, got {params!r}"]
    chosen = filters[method]
    problems: list[str] = []
    for key, value in params.items():
        spec = chosen.param(key)
        if spec is None:
            names = ", ".join(p.name for p in chosen.params) or "no parameters"
            problems.append(
                f"denoise_params.{key} is not a parameter of {method!r} (it takes {names})"
            )
        else:
            problems.extend(param_problems(spec, value))
    if chosen.check is not None and not problems:
        problems.extend(chosen.check({**chosen.defaults(), **params}))
    return problems


def param_problems(spec: DenoiseParam, value: object) -> list[str]:
    """Problems with one denoise parameter's value: type, finiteness, range, oddness."""
    key = spec.name
    if isinstance(value, bool) or not isinstance(value, int | float):
        return [f"denoise_params.{key} must be a number, got {show_value(value)}"]
    try:  # the shared bounded reader: a 400-digit integer is a problem, not OverflowError
        number = read_number(value, spec.low, spec.high)
    except RejectedValueError as exc:
        why = " (larger windows take minutes per frame)" if spec.window else ""
        return [f"denoise_params.{key} {exc}{why}"]
    if spec.window and int(number) != number:
        return [f"denoise_params.{key} must be an integer, got {show_value(value)}"]
    if spec.odd and int(number) % 2 == 0:
        return [f"denoise_params.{key} must be an odd integer, got {show_value(value)}"]
    return []


def normalised_params(method: str, params: Params) -> dict[str, float | int]:
    """A valid method's parameters, defaults merged, windows as ints, sorted by name:
    the canonical form that makes equal recipes compare equal."""
    chosen = FILTERS[method]
    merged = {**chosen.defaults(), **dict(params)}
    windows = {p.name for p in chosen.params if p.window}
    return {k: int(v) if k in windows else v for k, v in sorted(merged.items())}


def denoise(
    image: RGBImage,
    method: str,
    params: Params | None = None,
    *,
    filters: Registry[DenoiseFilter] = FILTERS,
) -> RGBImage:
    """Apply the filter ``method`` at the image's own resolution; returns a new array.

    ``params`` override the filter's defaults (``DENOISE_DEFAULTS[method]``; OpenCV's
    units: pixels for windows, 0..255 intensity for sigmas). ``none`` returns an equal
    copy. ``nlmeans`` is the strongest and by far the slowest (about 1 s for 1280×960
    on a desktop core). ``filters`` is the registry to look ``method`` up in.

    Raises:
        RecipeError: unknown method, unknown or invalid parameter.
        ValueError: ``image`` is not RGB uint8 (H, W, 3).
    """
    import cv2
    import numpy as np

    from fieldscope.edge.pixels import check_rgb, cv_reason

    rgb = check_rgb(image, "denoise: image")
    given = {} if params is None else params
    problems = denoise_problems(method, given, filters)
    if problems:
        raise RecipeError("; ".join(problems))
    p = {**filters[method].defaults(), **given}
    try:
        out = filters[method].apply(rgb, p)
    except cv2.error as exc:
        raise RecipeError(
            f"denoise {method!r} with {dict(p)} failed in OpenCV: {cv_reason(exc)}"
        ) from exc
    return np.ascontiguousarray(cast("RGBImage", out))
