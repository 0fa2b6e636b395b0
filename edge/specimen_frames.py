"""Synthetic frames with many specimens, and their ground truth, for testing segmentation.

A segmenting station is only as good as its recall, precision and sizes, and those can
only be measured against a truth. This module scatters the synthetic foraminifera of
:mod:`fieldscope.edge.specimens` on one slide: most of them separated, some in touching
pairs, some cut by the frame border, plus dust specks too small to be specimens. It
returns (and :func:`write_frames` writes) the frame, a label image (one id per
specimen, 0 for the field) and the truth per specimen: class, area in pixels,
equivalent diameter, box, whether it touches the border and which cluster of touching
specimens it belongs to.

Every random choice comes from the generator handed in: a frame is a pure function of
(seed, index, settings), written byte-identically on every run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from fieldscope.edge.errors import ConfigError
from fieldscope.edge.species import species_by_name
from fieldscope.edge.specimens import render_illumination, render_surface, species_names

__all__ = ["FrameRecipe", "SyntheticFrame", "render_frame", "write_frames"]

FloatImage = npt.NDArray[np.float32]
_GAP_PX = 8  # free field around a separated specimen
_TRIES = 300


@dataclass(frozen=True)
class FrameRecipe:
    """What one frame holds. ``tile_px`` is the side of the square each specimen is
    drawn in (a specimen covers 7–20 % of it); ``light_on_dark`` draws dark-field
    frames (bright specimens on a dark tray) instead of bright-field ones."""

    size: int = 768
    separated: int = 12
    touching_pairs: int = 2
    at_border: int = 2
    debris: int = 25
    tile_px: int = 128
    light_on_dark: bool = False
    classes: tuple[str, ...] = field(default_factory=species_names)

    def check(self) -> FrameRecipe:
        """Refuse a recipe that cannot be drawn, with what to change."""
        if not 64 <= self.size <= 8192:
            raise ConfigError(f"frame size must be 64..8192 px, got {self.size}")
        if not 32 <= self.tile_px <= self.size // 2:
            raise ConfigError(f"tile_px must be 32..size/2 ({self.size // 2}), got {self.tile_px}")
        counts = (self.separated, self.touching_pairs, self.at_border, self.debris)
        if min(counts) < 0:
            raise ConfigError(f"specimen and debris counts must be 0 or more, got {counts}")
        for name in self.classes:
            species_by_name(name)  # an unknown name is a ConfigError that lists the known ones
        return self


@dataclass
class SyntheticFrame:
    """A frame (RGB uint8), its labels (int32, 0 = field) and the truth per label."""

    image: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int32]
    specimens: list[dict[str, Any]]
    debris: list[dict[str, Any]]


@dataclass
class _Stamp:
    name: str
    depth: FloatImage  # optical depth of the specimen, tight box
    mask: npt.NDArray[np.bool_]  # coverage >= 0.5


@dataclass
class _Canvas:
    size: int
    depth: FloatImage
    labels: npt.NDArray[np.int32]
    truth: list[dict[str, Any]] = field(default_factory=list)

    def window(self, x: int, y: int, stamp: _Stamp) -> tuple[slice, slice, slice, slice] | None:
        """Frame and stamp slices of the stamp's box at (x, y), clipped; None if off-frame."""
        h, w = stamp.mask.shape
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, self.size), min(y + h, self.size)
        if x1 <= x0 or y1 <= y0:
            return None
        return slice(y0, y1), slice(x0, x1), slice(y0 - y, y1 - y), slice(x0 - x, x1 - x)

    def free(self, x: int, y: int, stamp: _Stamp, gap: int, allow: int = 0) -> bool:
        """No other specimen within ``gap`` px of the stamp's mask (label ``allow`` may)."""
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * gap + 1, 2 * gap + 1))
        grown = cv2.dilate(
            cv2.copyMakeBorder(stamp.mask.astype(np.uint8), gap, gap, gap, gap, 0, value=0),
            kernel,
        ).astype(bool)
        near = _Stamp(stamp.name, stamp.depth, grown)
        win = self.window(x - gap, y - gap, near)
        if win is None:
            return True
        fy, fx, sy, sx = win
        taken = self.labels[fy, fx][grown[sy, sx]]
        return bool(np.all((taken == 0) | (taken == allow)))

    def put(self, x: int, y: int, stamp: _Stamp, cluster: int) -> int:
        """Draw the stamp; returns its label."""
        win = self.window(x, y, stamp)
        if win is None:
            raise ValueError("stamp placed off the frame")
        fy, fx, sy, sx = win
        np.maximum(self.depth[fy, fx], stamp.depth[sy, sx], out=self.depth[fy, fx])
        label = len(self.truth) + 1
        self.labels[fy, fx][stamp.mask[sy, sx]] = label
        self.truth.append({"id": label, "class": stamp.name, "cluster": cluster})
        return label


def _stamp(name: str, tile: int, rng: np.random.Generator) -> _Stamp:
    """One specimen's optical depth (bright-field absorbance), cut to its box."""
    _, spec = species_by_name(name)
    s = render_surface(spec.build(spec, rng), spec, tile, rng)
    depth = np.asarray((1.0 - s.dome) ** 2 * 0.8 + 0.9, dtype=np.float32)
    depth *= s.alpha * s.wall * np.maximum(s.mottle + np.float32(1.0), np.float32(0.4))
    depth *= np.float32(rng.uniform(1.2, 2.0))
    depth += np.float32(1.1) * s.grooves * s.alpha
    ys, xs = np.nonzero(s.alpha > 0.01)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    return _Stamp(name, depth[box].astype(np.float32), (s.alpha >= 0.5)[box])


def _inside(canvas: _Canvas, stamp: _Stamp, rng: np.random.Generator) -> tuple[int, int]:
    h, w = stamp.mask.shape
    margin = 2
    return (
        int(rng.integers(margin, max(canvas.size - w - margin, margin + 1))),
        int(rng.integers(margin, max(canvas.size - h - margin, margin + 1))),
    )


def _place_separated(canvas: _Canvas, stamp: _Stamp, rng: np.random.Generator) -> int | None:
    for _ in range(_TRIES):
        x, y = _inside(canvas, stamp, rng)
        if canvas.free(x, y, stamp, _GAP_PX):
            return canvas.put(x, y, stamp, cluster=len(canvas.truth) + 1)
    return None


def _place_touching(
    canvas: _Canvas, first: _Stamp, second: _Stamp, rng: np.random.Generator
) -> bool:
    """Two specimens whose masks overlap by a few pixels, clear of everything else."""
    for _ in range(_TRIES):
        x, y = _inside(canvas, first, rng)
        if not canvas.free(x, y, first, _GAP_PX):
            continue
        angle = rng.uniform(0, 2 * math.pi)
        h1, w1 = first.mask.shape
        h2, w2 = second.mask.shape
        for distance in range(max(h1, w1, h2, w2), 0, -1):
            x2 = round(x + w1 / 2 + distance * math.cos(angle) - w2 / 2)
            y2 = round(y + h1 / 2 + distance * math.sin(angle) - h2 / 2)
            if _overlap((x, y, first), (x2, y2, second)) >= 12:
                break
        else:
            continue
        if _within(canvas, x2, y2, second) and _clear_pair(canvas, (x, y, first), (x2, y2, second)):
            cluster = len(canvas.truth) + 1
            canvas.put(x, y, first, cluster)
            canvas.put(x2, y2, second, cluster)
            return True
    return False


def _overlap(a: tuple[int, int, _Stamp], b: tuple[int, int, _Stamp]) -> int:
    """Pixels covered by both masks at those positions."""
    (x1, y1, first), (x2, y2, second) = a, b
    dx, dy = x2 - x1, y2 - y1
    (h1, w1), (h2, w2) = first.mask.shape, second.mask.shape
    r0, r1 = max(0, dy), min(h1, dy + h2)
    c0, c1 = max(0, dx), min(w1, dx + w2)
    if r1 <= r0 or c1 <= c0:
        return 0
    both = first.mask[r0:r1, c0:c1] & second.mask[r0 - dy : r1 - dy, c0 - dx : c1 - dx]
    return int(np.count_nonzero(both))


def _within(canvas: _Canvas, x: int, y: int, stamp: _Stamp) -> bool:
    h, w = stamp.mask.shape
    return x >= 2 and y >= 2 and x + w <= canvas.size - 2 and y + h <= canvas.size - 2


def _clear_pair(canvas: _Canvas, *placed: tuple[int, int, _Stamp]) -> bool:
    return all(canvas.free(x, y, s, _GAP_PX) for x, y, s in placed)


def _place_at_border(canvas: _Canvas, stamp: _Stamp, rng: np.random.Generator) -> int | None:
    """A specimen cut by one edge of the frame (about a third of it outside)."""
    h, w = stamp.mask.shape
    for _ in range(_TRIES):
        x, y = _inside(canvas, stamp, rng)
        edge = int(rng.integers(4))
        if edge == 0:
            x = -w // 3
        elif edge == 1:
            x = canvas.size - 2 * w // 3
        elif edge == 2:
            y = -h // 3
        else:
            y = canvas.size - 2 * h // 3
        if canvas.free(x, y, stamp, _GAP_PX):
            return canvas.put(x, y, stamp, cluster=len(canvas.truth) + 1)
    return None


def _debris(canvas: _Canvas, count: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Dust specks (radius 1–2 px) on the free field; recorded, never a specimen."""
    out = []
    for _ in range(count):
        radius = int(rng.integers(1, 3))
        x, y = (int(v) for v in rng.integers(4, canvas.size - 4, 2))
        if np.any(canvas.labels[y - 6 : y + 7, x - 6 : x + 7]):
            continue
        speck = np.zeros((2 * radius + 1, 2 * radius + 1), np.float32)
        cv2.circle(speck, (radius, radius), radius, float(rng.uniform(1.0, 2.0)), -1)
        region = canvas.depth[y - radius : y + radius + 1, x - radius : x + radius + 1]
        np.maximum(region, speck, out=region)
        out.append({"x": x, "y": y, "area_px": int(np.count_nonzero(speck))})
    return out


def _optics(depth: FloatImage, light_on_dark: bool, rng: np.random.Generator) -> np.ndarray:
    """Bright field (transmission ``exp(-depth)``) or dark field (scatter grows with
    depth), uneven lamp, slight defocus, shot and read noise."""
    size = depth.shape[0]
    light = render_illumination(size, rng)
    tint = (1.0, 0.97, 0.92)
    if light_on_dark:
        signal = (1.0 - np.exp(-depth)) * np.float32(rng.uniform(170, 230)) + np.float32(15)
        channels = [signal * light * np.float32(t) for t in tint]
    else:
        lamp = light * np.float32(rng.uniform(190, 240))
        channels = [lamp * np.exp(-depth * np.float32(k)) for k in (0.9, 1.0, 1.15)]
    merged = np.asarray(cv2.merge(channels), dtype=np.float32)
    image = np.asarray(cv2.GaussianBlur(merged, (0, 0), 0.8), dtype=np.float32)
    noise = rng.standard_normal(image.shape).astype(np.float32)
    image += noise * np.sqrt(np.maximum(image, 0) * np.float32(0.1) + np.float32(4.0))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _describe(canvas: _Canvas) -> list[dict[str, Any]]:
    """Area, ESD, box and border contact of each label as drawn (after overlaps)."""
    for item in canvas.truth:
        ys, xs = np.nonzero(canvas.labels == item["id"])
        area = len(xs)
        last = canvas.size - 1
        item.update(
            area_px=area,
            esd_px=math.sqrt(4.0 * area / math.pi),
            bbox=[int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1],
            touches_border=bool(
                xs.min() == 0 or ys.min() == 0 or xs.max() == last or ys.max() == last
            ),
        )
    return canvas.truth


def render_frame(recipe: FrameRecipe, rng: np.random.Generator) -> SyntheticFrame:
    """One frame with its truth. Specimens that find no room (a crowded recipe) are
    left out, so the truth always lists what is in the image.

    Raises:
        ConfigError: a recipe that cannot be drawn.
    """
    recipe.check()
    size = recipe.size
    canvas = _Canvas(size, np.zeros((size, size), np.float32), np.zeros((size, size), np.int32))

    def stamp() -> _Stamp:
        return _stamp(recipe.classes[int(rng.integers(len(recipe.classes)))], recipe.tile_px, rng)

    for _ in range(recipe.touching_pairs):
        _place_touching(canvas, stamp(), stamp(), rng)
    for _ in range(recipe.at_border):
        _place_at_border(canvas, stamp(), rng)
    for _ in range(recipe.separated):
        _place_separated(canvas, stamp(), rng)
    debris = _debris(canvas, recipe.debris, rng)
    image = _optics(canvas.depth, recipe.light_on_dark, rng)
    return SyntheticFrame(image, canvas.labels, _describe(canvas), debris)


def write_frames(
    out_dir: Path, count: int, *, seed: int = 0, recipe: FrameRecipe | None = None
) -> list[Path]:
    """Write ``count`` frames as ``frame_NNN.png``, and beside them in ``truth/`` the
    16-bit label image ``frame_NNN.png`` and ``frame_NNN.json`` (so the frames folder
    holds only frames, ready for ``fieldscope segment``); returns the frame paths.

    Raises:
        ConfigError: a bad recipe or count, or an output folder that is a file.
    """
    recipe = (recipe or FrameRecipe()).check()
    if not 1 <= count <= 100_000:
        raise ConfigError(f"frame count must be 1..100000, got {count}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} exists and is not a folder")
    truth_dir = out_dir / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        frame = render_frame(recipe, np.random.default_rng([seed, index]))
        path = out_dir / f"frame_{index:03d}.png"
        cv2.imwrite(str(path), cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(truth_dir / path.name), frame.labels.astype(np.uint16))
        truth = {"specimens": frame.specimens, "debris": frame.debris, "size": recipe.size}
        (truth_dir / path.name).with_suffix(".json").write_text(
            json.dumps(truth, indent=1) + "\n", encoding="utf-8"
        )
        paths.append(path)
    return paths
