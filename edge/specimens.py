"""Synthetic microscope specimens: seeded images of foraminifera-like "species".

Tests, benchmarks, the end-to-end demo and first-time users need labelled
microscope images without downloading a data set. This module draws them with
numpy and OpenCV only, so it runs on a Raspberry Pi as well as in CI.

The classes differ in what a real classifier has to learn — the arrangement of
chambers, the outline, the wall texture (pores, agglutinated grains, ridges,
porcelaneous gloss) — and *not* in global statistics: every species draws its
shell colour, opacity, size, illumination, microscope mode (bright field or dark
field), focus, noise and debris from overlapping ranges, so mean colour and
contrast alone cannot tell them apart.

Every random choice comes from the ``numpy.random.Generator`` handed in, so an
image is a pure function of (species, seed, size). ``write_dataset`` derives one
generator per image from ``[seed, class_index, image_index]``; any single image
can be regenerated without the others, and the same arguments give
byte-identical PNG files.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from fieldscope.edge.errors import ConfigError, create_folder
from fieldscope.edge.species import (
    SPECIES,
    Points,
    Species,
    _Chamber,
    _Shell,
    _Stroke,
    _uniform,
    species_by_name,
    species_names,
)

__all__ = [
    "MAX_PER_CLASS",
    "MAX_SIZE",
    "MIN_SIZE",
    "SPECIES",
    "Species",
    "render_specimen",
    "species_names",
    "write_dataset",
]

log = logging.getLogger(__name__)

MIN_SIZE = 32
MAX_SIZE = 2048
MAX_PER_CLASS = 100_000

FloatImage = npt.NDArray[np.float32]

# Geometry is described at this reference image side; line widths and texture
# scales are given in pixels at this size and scale with the requested size.
_REFERENCE_SIZE = 256.0


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class _Placement:
    """Shell coordinates → pixels: flip (coiling direction), rotate, scale, translate."""

    scale: float
    rotation: float
    flip: bool
    cx: float
    cy: float

    def points(self, pts: Points) -> Points:
        q = pts * np.array([1.0, -1.0 if self.flip else 1.0])
        c, s = math.cos(self.rotation), math.sin(self.rotation)
        x = self.cx + self.scale * (c * q[:, 0] - s * q[:, 1])
        y = self.cy + self.scale * (s * q[:, 0] + c * q[:, 1])
        return np.stack([x, y], axis=1)

    def chamber(self, ch: _Chamber) -> _Chamber:
        x, y = self.points(np.array([[ch.x, ch.y]]))[0]
        angle = self.rotation + (-ch.angle if self.flip else ch.angle)
        return _Chamber(float(x), float(y), ch.a * self.scale, ch.b * self.scale, angle, ch.wall)


def _extent(shell: _Shell) -> tuple[float, float, float]:
    """Centre (x, y) and radius of a circle around the shell, in shell coordinates."""
    xs, ys = [], []
    for ch in shell.chambers:
        r = max(ch.a, ch.b)
        xs += [ch.x - r, ch.x + r]
        ys += [ch.y - r, ch.y + r]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    radius = max(math.hypot(ch.x - cx, ch.y - cy) + max(ch.a, ch.b) for ch in shell.chambers)
    return cx, cy, radius


def _area(shell: _Shell, cx: float, cy: float, radius: float, grid: int = 48) -> float:
    """Area of the union of chambers, on a fixed grid (deterministic, no rng)."""
    t = np.linspace(-radius, radius, grid)
    gx, gy = np.meshgrid(cx + t, cy + t)
    inside = np.zeros(gx.shape, dtype=bool)
    for ch in shell.chambers:
        c, s = math.cos(ch.angle), math.sin(ch.angle)
        u = (gx - ch.x) * c + (gy - ch.y) * s
        v = -(gx - ch.x) * s + (gy - ch.y) * c
        inside |= (u / ch.a) ** 2 + (v / ch.b) ** 2 <= 1.0
    return float(inside.mean()) * (2 * radius) ** 2


def _place(shell: _Shell, size: int, rng: np.random.Generator) -> _Placement:
    """Random pose and magnification; the shell's *area* is drawn from one range for all
    species (so size is no class signal) unless the shell would not fit the frame."""
    cx, cy, radius = _extent(shell)
    area = _area(shell, cx, cy, radius)
    fraction = _uniform(rng, (0.07, 0.2))
    scale = min(size * math.sqrt(fraction / area), size * _uniform(rng, (0.4, 0.47)) / radius)
    rotation = rng.uniform(0, 2 * math.pi)
    flip = bool(rng.random() < 0.5)
    slack = max(0.5 * size - scale * radius, 0.0)
    jx, jy = rng.uniform(-0.8, 0.8, 2) * slack
    centre = (size - 1) / 2
    # Put the shell's centre (cx, cy), not the origin, at the jittered image position.
    probe = _Placement(scale, rotation, flip, 0.0, 0.0).points(np.array([[cx, cy]]))[0]
    return _Placement(scale, rotation, flip, centre + jx - probe[0], centre + jy - probe[1])


@dataclass
class _Maps:
    """Per-pixel properties of the shell, each float32 in 0..1."""

    alpha: FloatImage  # coverage
    dome: FloatImage  # height profile of the topmost chamber (1 at its centre)
    wall: FloatImage  # relative wall thickness
    outline: FloatImage  # chamber edges: outline and sutures between chambers


def _rasterise_chambers(chambers: Iterable[_Chamber], size: int, line_px: float) -> _Maps:
    """Paint chambers in order, each covering the ones below it, with anti-aliased edges."""
    maps = _Maps(*(np.zeros((size, size), np.float32) for _ in range(4)))
    for ch in chambers:
        a, b = max(ch.a, 0.6), max(ch.b, 0.6)
        reach = max(a, b) + 2.0 + 2 * line_px
        x0, x1 = max(math.floor(ch.x - reach), 0), min(math.ceil(ch.x + reach) + 1, size)
        y0, y1 = max(math.floor(ch.y - reach), 0), min(math.ceil(ch.y + reach) + 1, size)
        if x0 >= x1 or y0 >= y1:
            continue
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(ch.x)
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(ch.y)
        c, s = np.float32(math.cos(ch.angle)), np.float32(math.sin(ch.angle))
        u = (dx * c + dy * s) / np.float32(a)
        v = (dy * c - dx * s) / np.float32(b)
        f = u * u + v * v
        grad = 2.0 * np.sqrt((u / a) ** 2 + (v / b) ** 2)
        dist = (1.0 - f) / np.maximum(grad, np.float32(1e-3))  # signed pixels to the edge
        cover = np.clip(dist + 0.5, 0.0, 1.0)
        keep = 1.0 - cover
        win = np.s_[y0:y1, x0:x1]
        maps.alpha[win] = cover + keep * maps.alpha[win]
        maps.dome[win] = cover * np.sqrt(np.clip(1.0 - f, 0.0, 1.0)) + keep * maps.dome[win]
        maps.wall[win] = cover * np.float32(ch.wall) + keep * maps.wall[win]
        edge = np.exp(-((dist / np.float32(line_px)) ** 2))
        maps.outline[win] = np.maximum(cover * edge, keep * maps.outline[win])
    return maps


def _draw_strokes(
    strokes: Iterable[_Stroke], place: _Placement, size: int, px: float
) -> FloatImage:
    """Anti-aliased polylines, sub-pixel placed (OpenCV ``shift``), as a 0..1 map."""
    canvas = np.zeros((size, size), np.uint8)
    for st in strokes:
        pts = np.round(place.points(st.points) * 16).astype(np.int32)
        thickness = max(1, round(st.width * px))
        colour = round(255 * st.strength)
        cv2.polylines(canvas, [pts], st.closed, colour, thickness, cv2.LINE_AA, 4)
    return canvas.astype(np.float32) / np.float32(255)


def _pores(
    alpha: FloatImage, spacing: float, radius: float, rng: np.random.Generator
) -> FloatImage:
    """Small round pits scattered over the shell at roughly ``spacing`` pixels apart."""
    ys, xs = np.nonzero(alpha > 0.85)
    out = np.zeros(alpha.shape, np.float32)
    count = int(len(xs) / (spacing * spacing))
    if count == 0:
        return out
    pick = rng.integers(0, len(xs), count)
    out[ys[pick], xs[pick]] = rng.uniform(0.6, 1.0, count).astype(np.float32)
    out = np.asarray(cv2.GaussianBlur(out, (0, 0), radius), dtype=np.float32)
    out *= np.float32(2 * math.pi * radius * radius)  # peak depth ~ the impulse height
    return np.minimum(out, np.float32(1.0), out=out)


def _smooth_noise(size: int, cell: float, rng: np.random.Generator) -> FloatImage:
    """Unit-variance-ish noise with features about ``cell`` pixels across."""
    grid = max(2, round(size / cell))
    small = rng.standard_normal((grid, grid)).astype(np.float32)
    return np.asarray(
        cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC), dtype=np.float32
    )


def render_illumination(size: int, rng: np.random.Generator) -> FloatImage:
    """Uneven lighting: an off-centre vignette times a linear gradient.

    It is smooth, so it is computed on a coarse grid and resized (much faster).
    """
    t = np.linspace(-1.0, 1.0, 17, dtype=np.float32)
    ox, oy = rng.uniform(-0.3, 0.3, 2)
    gx, gy = rng.uniform(-0.15, 0.15, 2)
    vignette = _uniform(rng, (0.0, 0.4))
    r2 = ((t[None, :] - ox) ** 2 + (t[:, None] - oy) ** 2) / 2.0
    coarse = (1.0 - vignette * r2) * (1.0 + gx * t[None, :] + gy * t[:, None])
    coarse = np.clip(coarse, 0.2, 1.5).astype(np.float32)
    return np.asarray(
        cv2.resize(coarse, (size, size), interpolation=cv2.INTER_LINEAR), dtype=np.float32
    )


def _debris(size: int, px: float, rng: np.random.Generator) -> FloatImage:
    """Dust and fibres on the slide, anywhere in the frame."""
    canvas = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.poisson(_uniform(rng, (0.0, 4.0))))):
        colour = int(rng.integers(70, 230))
        x, y = rng.uniform(0, size, 2)
        if rng.random() < 0.7:  # a particle
            axes = (
                max(1, round(rng.uniform(0.5, 3.5) * px)),
                max(1, round(rng.uniform(0.5, 2.5) * px)),
            )
            angle = rng.uniform(0, 180)
            cv2.ellipse(canvas, (round(x), round(y)), axes, angle, 0, 360, colour, -1, cv2.LINE_AA)
        else:  # a fibre: a short random walk
            steps = rng.normal(0, 1, (int(rng.integers(4, 10)), 2)) * 6 * px
            pts = np.round((np.cumsum(steps, axis=0) + np.array([x, y])) * 16).astype(np.int32)
            cv2.polylines(canvas, [pts], False, colour, max(1, round(px)), cv2.LINE_AA, 4)
    return canvas.astype(np.float32) / np.float32(255)


@dataclass
class _Surface:
    """Everything the optics need to know about the shell, per pixel (float32, 0..1
    except ``wall`` ~0.5..1.2 and ``mottle``, a signed relative wall-density change)."""

    alpha: FloatImage
    dome: FloatImage
    wall: FloatImage
    grooves: FloatImage  # chamber edges and sutures: dark in every illumination
    ridges: FloatImage  # raised ornament: catches light in dark field
    pores: FloatImage
    mottle: FloatImage


def render_surface(shell: _Shell, spec: Species, size: int, rng: np.random.Generator) -> _Surface:
    px = size / _REFERENCE_SIZE
    place = _place(shell, size, rng)
    line_px = max(0.6, _uniform(rng, (0.8, 1.3)) * px)
    maps = _rasterise_chambers((place.chamber(c) for c in shell.chambers), size, line_px)
    alpha = maps.alpha
    sutures = _draw_strokes(shell.sutures, place, size, px) * alpha
    ridges = _draw_strokes(shell.ridges, place, size, px) * alpha
    grooves = np.maximum(maps.outline * np.float32(_uniform(rng, (0.5, 0.9))), sutures)
    if spec.pore_spacing is not None:
        pores = _pores(alpha, _uniform(rng, spec.pore_spacing) * px, 0.45 + 0.3 * px, rng)
    else:
        pores = np.zeros_like(alpha)
    mottle = _smooth_noise(size, _uniform(rng, (2.0, 4.0)) * px, rng)
    mottle *= np.float32(_uniform(rng, spec.grain))
    return _Surface(alpha, maps.dome, maps.wall, grooves, ridges, pores, mottle)


def render_specimen(species: str, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """One microscope-like image of ``species`` as a ``(size, size, 3)`` RGB uint8 array.

    All randomness comes from ``rng``, so the same generator state gives the same
    pixels. The content does not depend on the resolution: a 64-pixel render frames
    the specimen the way a 256-pixel one does.

    Raises:
        ConfigError: unknown species or a size outside MIN_SIZE..MAX_SIZE.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    _, spec = species_by_name(species)
    _check_size(size)
    px = size / _REFERENCE_SIZE

    surface = render_surface(spec.build(spec, rng), spec, size, rng)
    opacity = _uniform(rng, spec.opacity)
    tint = _uniform(rng, spec.tint)
    gloss = _uniform(rng, spec.gloss)
    light = render_illumination(size, rng)
    debris = _debris(size, px, rng)
    if rng.random() < 0.3:
        image = _dark_field(surface, light=light, debris=debris, tint=tint, gloss=gloss, rng=rng)
    else:
        image = _bright_field(
            surface, light=light, debris=debris, tint=tint, opacity=opacity, rng=rng
        )

    sigma = _uniform(rng, (0.3, 1.4)) * px  # defocus
    image = np.asarray(cv2.GaussianBlur(image, (0, 0), sigma), dtype=np.float32)
    # Sensor noise: shot noise (variance grows with the signal) plus read noise.
    gain, read = _uniform(rng, (0.03, 0.5)), _uniform(rng, (0.5, 4.0))
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    spread = np.maximum(image, np.float32(0.0))
    spread *= np.float32(gain)
    spread += np.float32(read * read)
    np.sqrt(spread, out=spread)
    spread *= noise
    image += spread
    np.clip(image, 0.0, 255.0, out=image)
    np.rint(image, out=image)
    return image.astype(np.uint8)


def _white_balance(rng: np.random.Generator) -> tuple[float, float, float]:
    warm = _uniform(rng, (-0.06, 0.1))  # halogen (warm) to LED (cool) light
    r, g, b = rng.normal(0.0, 0.03, 3)
    return 1.0 + warm + float(r), 1.0 + float(g), 1.0 - warm + float(b)


def _bright_field(
    s: _Surface,
    *,
    light: FloatImage,
    debris: FloatImage,
    tint: float,
    opacity: float,
    rng: np.random.Generator,
) -> FloatImage:
    """Transmitted light: the wall absorbs, most along the rim where light crosses it
    obliquely; amber walls absorb blue more than red."""
    # Optical depth (single channel, computed in place: full-size temporaries are slow).
    depth = 1.0 - s.dome
    depth *= depth
    depth *= np.float32(1.3)
    depth += np.float32(0.5)
    depth *= s.alpha
    depth *= s.wall
    depth *= np.maximum(s.mottle + np.float32(1.0), np.float32(0.2))
    depth *= np.float32(opacity)
    depth += np.float32(1.1) * s.grooves + np.float32(0.5) * s.ridges + np.float32(0.8) * s.pores
    lamp = light * np.float32(_uniform(rng, (160.0, 245.0)))
    lamp *= 1.0 - np.float32(0.85) * debris
    absorb = (1.0 - 0.45 * tint, 1.0, 1.0 + 0.7 * tint)
    channels = [
        np.asarray(cv2.exp(depth * np.float32(-k)), dtype=np.float32) * (lamp * np.float32(w))
        for k, w in zip(absorb, _white_balance(rng), strict=True)
    ]
    return np.asarray(cv2.merge(channels), dtype=np.float32)


def _dark_field(
    s: _Surface,
    *,
    light: FloatImage,
    debris: FloatImage,
    tint: float,
    gloss: float,
    rng: np.random.Generator,
) -> FloatImage:
    """Reflected light on a dark tray: the shell scatters, brightest where it faces the
    light; grooves and pores stay dark, ridges catch light."""
    balance = _white_balance(rng)
    background = np.float32(_uniform(rng, (6.0, 50.0))) * light
    shell_level = np.float32(_uniform(rng, (110.0, 235.0)))
    colour = (1.0, 1.0 - 0.15 * tint, 1.0 - 0.5 * tint)
    gamma = _uniform(rng, (0.5, 1.1))
    shade = np.power(s.dome, np.float32(gamma))
    shade *= np.float32(0.7)
    shade += np.float32(0.3)
    shade *= np.sqrt(2.0 - s.wall)
    shade *= np.maximum(s.mottle + np.float32(1.0), np.float32(0.2))
    shade *= 1.0 - np.float32(0.7) * s.grooves
    shade *= 1.0 - np.float32(0.6) * s.pores
    shade += np.float32(0.35) * s.ridges + np.float32(gloss) * s.dome**12
    shade *= light
    shade *= shell_level
    glow = np.float32(120.0) * debris
    channels = []
    for c, w in zip(colour, balance, strict=True):
        # Blend shell over background by coverage, then add bright debris.
        channel = shade * np.float32(c * w) - background * np.float32(w)
        channel *= s.alpha
        channel += background * np.float32(w)
        channel += glow
        channels.append(channel)
    return np.asarray(cv2.merge(channels), dtype=np.float32)


# --------------------------------------------------------------------------- dataset


def _check_int(name: str, value: object, lo: int, hi: int | None, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"{name}{what} must be an integer, got {value!r}")
    if hi is None and value < lo:
        raise ConfigError(f"{name}{what} must be {lo} or more, got {value}")
    if hi is not None and not lo <= value <= hi:
        raise ConfigError(f"{name}{what} must be between {lo} and {hi}, got {value}")
    return int(value)


def _check_size(size: object) -> int:
    return _check_int("size", size, MIN_SIZE, MAX_SIZE, " (image side in pixels)")


def _earlier_output(out_dir: Path) -> tuple[list[Path], Path | None]:
    """The PNGs an earlier ``write_dataset`` left in ``out_dir``, and the first entry that
    no run of ours would have written (``None`` when everything there is ours)."""
    names = set(species_names())
    ours: list[Path] = []
    for entry in sorted(out_dir.iterdir()):
        if not entry.is_dir() or entry.is_symlink() or entry.name not in names:
            return ours, entry
        pattern = re.compile(rf"{re.escape(entry.name)}_\d{{4,}}\.png")
        for item in sorted(entry.iterdir()):
            if not item.is_file() or item.is_symlink() or not pattern.fullmatch(item.name):
                return ours, item
            ours.append(item)
    return ours, None


def _prepare_out_dir(out_dir: Path) -> None:
    """Create ``out_dir``, or empty it if it holds an earlier run's images and nothing else.

    Anything else in it is refused, so that a mistyped path never mixes generated
    images into someone's data or deletes a file we did not write.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output folder {out_dir} is a file; give a folder path")
    if out_dir.is_dir():
        try:
            ours, foreign = _earlier_output(out_dir)
            if foreign is not None:
                raise ConfigError(
                    f"output folder {out_dir} already holds {foreign.relative_to(out_dir)}, "
                    "which is not an image of an earlier `fieldscope specimens` run; "
                    "choose a new or empty folder"
                )
            # Replace the earlier run entirely, so no stale images from a run with more
            # classes or more images per class are left behind.
            for path in ours:
                path.unlink()
            for folder in out_dir.iterdir():
                folder.rmdir()
        except OSError as exc:
            raise ConfigError(f"cannot clear output folder {out_dir}: {exc}") from exc
        if ours:
            log.info("replaced %d images of an earlier run in %s", len(ours), out_dir)
    create_folder(out_dir, "the output folder", ConfigError)


def _check_arguments(
    classes: object, per_class: object, size: object, seed: object
) -> tuple[int, int, int, int]:
    n_species = len(SPECIES)
    return (
        _check_int("classes", classes, 1, n_species, f" (number of species, at most {n_species})"),
        _check_int("per_class", per_class, 1, MAX_PER_CLASS, " (images per species)"),
        _check_size(size),
        _check_int("seed", seed, 0, None),
    )


def _write_png(path: Path, rgb: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - OpenCV always has a PNG encoder
        raise ConfigError(f"OpenCV could not encode {path} as PNG")
    try:
        path.write_bytes(encoded.tobytes())
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from exc


def write_dataset(
    out_dir: Path,
    *,
    classes: int = 4,
    per_class: int = 50,
    size: int = 256,
    seed: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Write ``out_dir/<species>/<species>_0000.png`` … for the first ``classes`` species.

    Image ``i`` of species number ``c`` is
    ``render_specimen(name, np.random.default_rng([seed, c, i]), size)``, so any one
    image can be regenerated alone, a run with more images or classes extends a
    smaller one with identical images, and the same arguments give byte-identical
    PNGs. ``out_dir`` must be missing, empty, or the output of an earlier run, which
    is then replaced (its images are deleted first); any other content is refused
    so that a mistyped path never mixes our images into someone's data.

    Returns the number of images written per species, in class order.

    Raises:
        ConfigError: an argument is out of range, or ``out_dir`` is unusable.
    """
    classes, per_class, size, seed = _check_arguments(classes, per_class, size, seed)
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)

    digits = max(4, len(str(per_class - 1)))
    total = classes * per_class
    done = 0
    counts: dict[str, int] = {}
    for c, spec in enumerate(SPECIES[:classes]):
        folder = out_dir / spec.name
        create_folder(folder, "the species folder", ConfigError, parents=False)
        for i in range(per_class):
            rgb = render_specimen(spec.name, np.random.default_rng([seed, c, i]), size)
            _write_png(folder / f"{spec.name}_{i:0{digits}d}.png", rgb)
            done += 1
            if on_progress is not None:
                on_progress(done, total)
        counts[spec.name] = per_class
    log.info("wrote %d specimen images in %d classes to %s", total, classes, out_dir)
    return counts
