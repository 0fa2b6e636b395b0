"""The species of the synthetic specimens: shell geometry, one builder per species.

Split from :mod:`fieldscope.edge.specimens` (which renders and writes them, and
re-exports ``SPECIES``, ``Species`` and ``species_names``). Geometry is described at a
reference image side of 256 pixels; the renderer scales it to the requested size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from fieldscope.edge.errors import ConfigError

__all__ = ["SPECIES", "Species", "species_by_name", "species_names"]

Points = npt.NDArray[np.float64]


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Chamber:
    """One chamber as an ellipse in shell coordinates; later chambers cover earlier ones."""

    x: float
    y: float
    a: float  # semi-axis along ``angle``
    b: float  # semi-axis across ``angle``
    angle: float = 0.0  # radians
    wall: float = 1.0  # relative wall thickness: < 1 glassy (umbo, neck), > 1 thick


@dataclass(frozen=True)
class _Stroke:
    """A polyline in shell coordinates: a suture (dark groove) or a ridge (raised)."""

    points: Points
    width: float  # pixels at the reference size
    strength: float  # 0..1
    closed: bool = False


@dataclass
class _Shell:
    chambers: list[_Chamber] = field(default_factory=list)
    sutures: list[_Stroke] = field(default_factory=list)
    ridges: list[_Stroke] = field(default_factory=list)


def _polar(rho: float, theta: float) -> tuple[float, float]:
    return rho * math.cos(theta), rho * math.sin(theta)


def _circle(x: float, y: float, r: float, n: int = 40) -> Points:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([x + r * np.cos(t), y + r * np.sin(t)], axis=1)


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _count(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


# --------------------------------------------------------------------------- species


@dataclass(frozen=True)
class Species:
    """What makes one synthetic species recognisable, and the ranges it is drawn from.

    ``opacity`` and ``tint`` (0 colourless/white … 1 deep amber) deliberately overlap
    between species: colour is a nuisance variable here, not a class signal.
    ``pore_spacing`` is in pixels at a 256-pixel image (``None``: imperforate wall);
    ``grain`` is the amplitude of the agglutinated/mottled wall texture; ``gloss`` the
    strength of the specular highlight in dark-field images.
    """

    name: str
    description: str
    chambers: tuple[int, int]
    opacity: tuple[float, float]
    tint: tuple[float, float]
    pore_spacing: tuple[float, float] | None
    grain: tuple[float, float]
    gloss: tuple[float, float]
    build: Callable[[Species, np.random.Generator], _Shell] = field(repr=False, compare=False)


def _globigerina(spec: Species, rng: np.random.Generator) -> _Shell:
    shell = _Shell()
    n = _count(rng, spec.chambers)
    per_whorl = _uniform(rng, (3.6, 4.4))
    growth = _uniform(rng, (2.2, 3.2)) ** (1.0 / per_whorl)
    step = 2.0 * math.pi / per_whorl
    size_ratio = _uniform(rng, (0.66, 0.76))
    for i in range(n):
        rho = growth ** (i - n + 1)
        x, y = _polar(rho, i * step)
        r = size_ratio * rho
        shell.chambers.append(
            _Chamber(x, y, r, r * _uniform(rng, (0.88, 1.0)), _uniform(rng, (0, math.pi)))
        )
    # The umbilical aperture: a dark pit where the last whorl's chambers meet.
    ux, uy = _polar(0.25 * growth ** (-1), (n - 1) * step + math.pi)
    shell.sutures.append(_Stroke(_circle(ux, uy, 0.09, 16), 2.0, 0.6, closed=True))
    return shell


def _orbulina(spec: Species, rng: np.random.Generator) -> _Shell:
    shell = _Shell()
    shell.chambers.append(
        _Chamber(0.0, 0.0, 1.0, _uniform(rng, (0.95, 1.0)), _uniform(rng, (0, math.pi)), 1.15)
    )
    # The juvenile trochospire sometimes shows through the sphere as a faint ghost.
    if rng.random() < 0.7:
        turn = rng.uniform(0, 2 * math.pi)
        cx, cy = _polar(_uniform(rng, (0.0, 0.35)), rng.uniform(0, 2 * math.pi))
        for i in range(_count(rng, (3, 5))):
            rho = 0.22 * 1.3 ** (i - 3)
            x, y = _polar(rho, turn + i * 1.5)
            shell.sutures.append(
                _Stroke(_circle(cx + x, cy + y, 0.6 * rho, 24), 1.2, 0.25, closed=True)
            )
    return shell


def _textularia(spec: Species, rng: np.random.Generator) -> _Shell:
    shell = _Shell()
    n = _count(rng, spec.chambers)
    pitch = 2.0 / (n + 1)
    w0, w1 = _uniform(rng, (0.15, 0.3)), _uniform(rng, (0.75, 1.05))
    tilt = _uniform(rng, (0.2, 0.5))
    for i in range(n):
        t = i / (n - 1)
        width = w0 + (w1 - w0) * t**0.8
        side = 1.0 if i % 2 else -1.0
        # Each chamber is wider than high and tilted, so the sutures form chevrons.
        y = -1.0 + pitch * (i + 1)
        shell.chambers.append(
            _Chamber(side * width * 0.27, y, width * 0.36, pitch * 1.3, -side * tilt)
        )
    return shell


def _nodosaria(spec: Species, rng: np.random.Generator) -> _Shell:
    shell = _Shell()
    n = _count(rng, spec.chambers)
    growth = _uniform(rng, (0.02, 0.1))
    aspect = _uniform(rng, (1.0, 1.3))
    overlap = _uniform(rng, (0.72, 0.85))
    spine = _uniform(rng, (0.3, 0.9)) if rng.random() < 0.7 else 0.0
    x, prev_a = 0.0, 0.0
    first_a = aspect
    if spine:
        shell.chambers.append(_Chamber(-first_a - spine / 2 + 0.1, 0.0, spine / 2, 0.07, 0.0))
    for i in range(n):
        r = 1.0 + growth * i
        a = r * aspect
        if i:
            x += overlap * (prev_a + a)
        shell.chambers.append(_Chamber(x, 0.0, a, r))
        prev_a = a
    # A short neck carrying the terminal aperture.
    r_last = 1.0 + growth * (n - 1)
    shell.chambers.append(_Chamber(x + prev_a * 0.95, 0.0, 0.28 * r_last, 0.2 * r_last, 0.0, 0.6))
    if rng.random() < 0.6:  # longitudinal costae
        for yy in np.linspace(-0.85, 0.85, _count(rng, (4, 8))) * r_last:
            line = np.array([[-first_a - 0.2, yy], [x + prev_a, yy]])
            shell.ridges.append(_Stroke(line, 1.3, _uniform(rng, (0.35, 0.6))))
    return shell


def _quinqueloculina(spec: Species, rng: np.random.Generator) -> _Shell:
    shell = _Shell()
    n = _count(rng, spec.chambers)
    w = 1.0 / _uniform(rng, (1.7, 2.4))
    skew = _uniform(rng, (-0.08, 0.08))
    shell.chambers.append(_Chamber(0.0, 0.0, 1.0, w))
    if n >= 4:  # the middle chamber seen as a strip between the two flanking ones
        shell.chambers.append(_Chamber(0.0, -0.03 * w, 0.97, 0.3 * w, skew))
    shell.chambers.append(_Chamber(0.0, -0.55 * w, 0.93, 0.42 * w, skew))
    shell.chambers.append(_Chamber(0.02, 0.52 * w, 0.97, 0.45 * w, -skew))
    if n >= 5:  # a sliver of an older chamber along the far edge
        shell.chambers.append(_Chamber(0.0, -0.9 * w, 0.7, 0.12 * w, skew))
    # Neck and toothed aperture at one end.
    shell.chambers.append(_Chamber(0.97, 0.05 * w, 0.12, 0.1, 0.0, 0.7))
    shell.sutures.append(_Stroke(np.array([[1.0, 0.0], [1.07, 0.08 * w]]), 2.0, 0.8))
    return shell


def _radial_sutures(
    n: int,
    inner: float,
    outer: float,
    curvature: float,
    rng: np.random.Generator,
) -> list[tuple[float, Points]]:
    """Sutures of one planispiral whorl, spaced wider towards the last chamber."""
    weights = np.linspace(1.0, _uniform(rng, (1.2, 1.6)), n)
    angles = np.cumsum(weights / weights.sum() * 2.0 * math.pi)
    start = rng.uniform(0, 2 * math.pi)
    rho = np.linspace(inner, outer, 14)
    out = []
    for angle in angles:
        theta = start + angle + curvature * (rho - inner)
        out.append((float(start + angle), np.stack([rho * np.cos(theta), rho * np.sin(theta)], 1)))
    return out


def _lenticulina(spec: Species, rng: np.random.Generator) -> _Shell:
    shell = _Shell()
    n = _count(rng, spec.chambers)
    umbo = _uniform(rng, (0.18, 0.28))
    shell.chambers.append(
        _Chamber(0.0, 0.0, 1.0, _uniform(rng, (0.93, 1.0)), _uniform(rng, (0, math.pi)))
    )
    shell.chambers.append(_Chamber(0.0, 0.0, umbo, umbo, 0.0, 0.55))
    curvature = _uniform(rng, (0.6, 1.2))
    for _, line in _radial_sutures(n, umbo, 0.97, curvature, rng):
        shell.sutures.append(_Stroke(line, 2.2, _uniform(rng, (0.5, 0.8))))
    shell.ridges.append(_Stroke(_circle(0.0, 0.0, 0.95), 2.0, 0.5, closed=True))  # keel
    return shell


def _ammonia(spec: Species, rng: np.random.Generator) -> _Shell:
    shell = _Shell()
    n = _count(rng, spec.chambers)
    shell.chambers.append(_Chamber(0.0, 0.0, 0.72, 0.72))  # earlier whorls
    step = 2.0 * math.pi / n
    start = rng.uniform(0, 2 * math.pi)
    for j in range(n):
        t = j / (n - 1)
        rho = 0.5 + 0.14 * t
        x, y = _polar(rho, start + j * step)
        shell.chambers.append(_Chamber(x, y, 0.27 + 0.1 * t, rho * step * 0.8, start + j * step))
    for j in range(n):
        theta = start + (j + 0.5) * step
        line = np.array([_polar(0.18, theta), _polar(0.95, theta)])
        shell.sutures.append(_Stroke(line, 1.8, 0.55))
    shell.chambers.append(_Chamber(0.0, 0.0, 0.17, 0.17, 0.0, 0.6))  # umbilical plug
    for k in range(_count(rng, (3, 6))):
        x, y = _polar(0.2, start + k * 1.3)
        shell.ridges.append(_Stroke(_circle(x, y, 0.045, 10), 2.0, 0.6, closed=True))
    return shell


def _elphidium(spec: Species, rng: np.random.Generator) -> _Shell:
    shell = _Shell()
    n = _count(rng, spec.chambers)
    shell.chambers.append(_Chamber(0.0, 0.0, 0.85, 0.85))
    step = 2.0 * math.pi / n
    start = rng.uniform(0, 2 * math.pi)
    for j in range(n):
        x, y = _polar(0.64, start + j * step)
        shell.chambers.append(_Chamber(x, y, 0.34, 0.64 * step * 0.62, start + j * step))
    shell.chambers.append(_Chamber(0.0, 0.0, 0.14, 0.14, 0.0, 0.55))  # umbonal knob
    curvature = _uniform(rng, (0.1, 0.4))
    rungs = _count(rng, (4, 7))
    for j in range(n):
        theta0 = start + (j + 0.5) * step
        rho = np.linspace(0.16, 0.96, 10)
        theta = theta0 + curvature * (rho - 0.16)
        shell.sutures.append(
            _Stroke(np.stack([rho * np.cos(theta), rho * np.sin(theta)], 1), 2.0, 0.6)
        )
        # Retral processes: a ladder of short bridges across each suture.
        for r in np.linspace(0.3, 0.88, rungs):
            th = theta0 + curvature * (r - 0.16)
            half = 0.3 * step * r
            line = np.array([_polar(r, th - half / r), _polar(r, th + half / r)])
            shell.ridges.append(_Stroke(line, 1.4, 0.7))
    return shell


# The first species are the most distinct: `write_dataset(classes=N)` takes the first N.
SPECIES: tuple[Species, ...] = (
    Species(
        name="globigerina",
        description=(
            "trochospiral: a spiral of globular chambers growing in size, the last 4-5 dominate; "
            "coarse pores"
        ),
        chambers=(7, 11),
        opacity=(0.5, 1.1),
        tint=(0.1, 0.8),
        pore_spacing=(4.5, 6.0),
        grain=(0.05, 0.15),
        gloss=(0.2, 0.6),
        build=_globigerina,
    ),
    Species(
        name="orbulina",
        description=(
            "one large sphere with dense fine pores, sometimes a faint juvenile ghost inside"
        ),
        chambers=(1, 1),
        opacity=(0.55, 1.15),
        tint=(0.1, 0.8),
        pore_spacing=(3.0, 4.0),
        grain=(0.05, 0.15),
        gloss=(0.2, 0.6),
        build=_orbulina,
    ),
    Species(
        name="textularia",
        description=(
            "biserial: two alternating rows of chambers forming a tapering wedge; agglutinated, "
            "grainy wall"
        ),
        chambers=(8, 14),
        opacity=(0.55, 1.15),
        tint=(0.1, 0.8),
        pore_spacing=None,
        grain=(0.3, 0.5),
        gloss=(0.0, 0.2),
        build=_textularia,
    ),
    Species(
        name="nodosaria",
        description=(
            "uniserial: chambers in a straight line, often a basal spine and longitudinal ribs"
        ),
        chambers=(3, 7),
        opacity=(0.5, 1.1),
        tint=(0.1, 0.8),
        pore_spacing=None,
        grain=(0.05, 0.15),
        gloss=(0.3, 0.7),
        build=_nodosaria,
    ),
    Species(
        name="quinqueloculina",
        description=(
            "milioline: elongated porcelaneous shell, chambers seen as long lenses side by side"
        ),
        chambers=(3, 5),
        opacity=(0.6, 1.2),
        tint=(0.0, 0.6),
        pore_spacing=None,
        grain=(0.03, 0.1),
        gloss=(0.5, 0.9),
        build=_quinqueloculina,
    ),
    Species(
        name="lenticulina",
        description=(
            "planispiral lens with an umbonal boss, curved radial sutures and a keel; smooth"
        ),
        chambers=(7, 11),
        opacity=(0.5, 1.1),
        tint=(0.1, 0.8),
        pore_spacing=None,
        grain=(0.03, 0.1),
        gloss=(0.4, 0.8),
        build=_lenticulina,
    ),
    Species(
        name="ammonia",
        description=(
            "trochospiral with a lobate outline, straight radial sutures, umbilical plug and "
            "knobs; pores"
        ),
        chambers=(7, 10),
        opacity=(0.5, 1.1),
        tint=(0.1, 0.8),
        pore_spacing=(5.0, 7.0),
        grain=(0.05, 0.15),
        gloss=(0.2, 0.6),
        build=_ammonia,
    ),
    Species(
        name="elphidium",
        description=(
            "planispiral with many chambers, sutures bridged by ladders of ridges (retral "
            "processes)"
        ),
        chambers=(11, 16),
        opacity=(0.5, 1.1),
        tint=(0.1, 0.8),
        pore_spacing=(7.0, 9.0),
        grain=(0.05, 0.15),
        gloss=(0.3, 0.7),
        build=_elphidium,
    ),
)


def species_names() -> tuple[str, ...]:
    """The species in the order ``write_dataset`` uses them (its first N classes)."""
    return tuple(s.name for s in SPECIES)


def species_by_name(name: str) -> tuple[int, Species]:
    for index, spec in enumerate(SPECIES):
        if spec.name == name:
            return index, spec
    raise ConfigError(f"unknown species {name!r}; choose one of {', '.join(species_names())}")
