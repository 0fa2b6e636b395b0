"""What the image modules share: the RGB array type, the check that an array is one,
and OpenCV's error message made readable.

OpenCV is imported for type checking only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import cv2

__all__ = ["BLOCK_PIXELS", "RGBImage", "check_rgb", "cv_reason"]

RGBImage = npt.NDArray[np.uint8]

# Pixels converted per block in the decoder and the exact resize, so that their
# temporaries stay a few megabytes however large the image.
BLOCK_PIXELS = 1 << 18


def check_rgb(image: object, what: str) -> RGBImage:
    """The array as C-contiguous uint8 (H, W, 3), or a ValueError saying what it is."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{what} must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"{what} must be RGB uint8 of shape (height, width, 3), "
            f"got {image.dtype} of shape {image.shape}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {image.shape})")
    return np.ascontiguousarray(image)


def cv_reason(exc: cv2.error) -> str:
    """OpenCV's message without its source-file prefix, on one line."""
    text = " ".join(str(exc).split())
    return text.rsplit(" error: ", 1)[-1] or "unknown OpenCV error"
