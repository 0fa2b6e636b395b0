"""The quality gate: is a frame worth classifying?

A classifier given a blurred or badly exposed frame still answers, often with a
confident wrong label. The gate turns such frames away before inference and says
why, and records its measurements in every message so that thresholds can be tuned
from what a station really sees.

Measurements (all on a grey copy of the frame):

* **sharpness** — the variance of the Laplacian of a Gaussian (sigma 1 pixel) of the
  grey frame resized to ``ANALYSIS_WIDTH`` pixels wide. Resizing to a fixed width
  makes the number independent of the camera's resolution: the same field of view
  scores the same at 640 or 4056 pixels. The Gaussian is there because the plain
  Laplacian measures sensor noise as much as focus: on the synthetic specimens, a
  frame blurred with sigma 8 plus a little noise scored higher than the softest
  in-focus frame, while after a sigma-1 Gaussian the two lie far apart (in-focus
  >= 1.0, blurred <= 0.1 at 256 pixels). Units are grey levels squared.
* **brightness** — the mean grey level as a fraction of full scale (0..1).
* **clipped** — the fraction of grey pixels at exactly 0 or 255 (under- or
  over-exposed), measured at full resolution.

Pure functions of the image: no state, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from fieldscope.edge.config import QualityConfig
from fieldscope.edge.message import Quality

__all__ = ["ANALYSIS_WIDTH", "MAX_ASPECT_RATIO", "QualityResult", "assess", "measure"]

# The width sharpness is measured at; about what a model sees (224–256 pixels), so
# "sharp" means sharp at the scale the classifier works at.
ANALYSIS_WIDTH = 256
# Frames longer than this on one side relative to the other are no microscope field of
# view (a line-scan strip, a damaged header): the gate rejects them. Sharpness is still
# measured on a bounded analysis image, because resizing a 1-pixel-wide, 60000-pixel-tall
# frame to 256 wide would make a 256 x 15,360,000 image (14.6 GiB as float32).
MAX_ASPECT_RATIO = 20
_SMOOTHING_SIGMA = 1.0


@dataclass(frozen=True)
class QualityResult:
    """The gate's verdict: ``ok``, the three measurements, and why not when not ok."""

    ok: bool
    sharpness: float
    brightness: float
    clipped: float
    reason: str | None = None

    def to_message(self) -> Quality:
        """The measurements as the identification message carries them."""
        return Quality(sharpness=self.sharpness, exposure=self.brightness)


def measure(image: npt.NDArray[np.uint8]) -> tuple[float, float, float]:
    """(sharpness, brightness, clipped) of an RGB uint8 (H, W, 3) frame.

    Raises:
        ValueError: ``image`` is not a non-empty RGB uint8 array.
    """
    if (
        not isinstance(image, np.ndarray)
        or image.dtype != np.uint8
        or image.ndim != 3
        or image.shape[2] != 3
        or image.shape[0] == 0
        or image.shape[1] == 0
    ):
        shape = getattr(image, "shape", None)
        raise ValueError(f"quality: expected RGB uint8 (height, width, 3), got shape {shape}")
    grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    height, width = grey.shape
    brightness = float(grey.mean()) / 255.0
    clipped = float(np.count_nonzero((grey == 0) | (grey == 255))) / grey.size
    out_height = min(
        max(1, round(height * ANALYSIS_WIDTH / width)), ANALYSIS_WIDTH * MAX_ASPECT_RATIO
    )
    shrink = width >= ANALYSIS_WIDTH
    small = cv2.resize(
        grey,
        (ANALYSIS_WIDTH, out_height),
        interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR,
    ).astype(np.float32)
    smooth = cv2.GaussianBlur(small, (0, 0), _SMOOTHING_SIGMA)
    sharpness = float(cv2.Laplacian(smooth, cv2.CV_32F).var())
    return sharpness, brightness, clipped


def assess(image: npt.NDArray[np.uint8], cfg: QualityConfig) -> QualityResult:
    """Measure ``image`` and judge it against ``cfg``.

    Exposure is judged before sharpness, because a black or white frame is also
    flat and would otherwise be reported as merely blurry; a frame more than
    ``MAX_ASPECT_RATIO`` times longer than wide (or the reverse) is rejected first.
    With ``cfg.enabled`` false every frame passes, still measured.

    Raises:
        ValueError: ``image`` is not a non-empty RGB uint8 array.
    """
    sharpness, brightness, clipped = measure(image)
    height, width = image.shape[:2]
    reason: str | None = None
    if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
        reason = (
            f"extreme aspect ratio: {width}x{height} pixels is more than "
            f"{MAX_ASPECT_RATIO}:1 (not a microscope field of view)"
        )
    elif brightness < cfg.min_brightness:
        reason = f"too dark: brightness {brightness:.3f} < {cfg.min_brightness:g}"
    elif brightness > cfg.max_brightness:
        reason = f"too bright: brightness {brightness:.3f} > {cfg.max_brightness:g}"
    elif clipped > cfg.max_clipped:
        reason = (
            f"badly exposed: {clipped:.1%} of pixels are black or white "
            f"(more than {cfg.max_clipped:.0%})"
        )
    elif sharpness < cfg.min_sharpness:
        reason = f"too blurry: sharpness {sharpness:.3g} < {cfg.min_sharpness:g}"
    if not cfg.enabled:
        reason = None
    return QualityResult(
        ok=reason is None,
        sharpness=sharpness,
        brightness=brightness,
        clipped=clipped,
        reason=reason,
    )
