"""Contract 1 — preprocessing: the one function that turns a decoded frame into model input.

Training (``fieldscope.train``) and the edge daemon call the *same* functions, so the
model sees identical pixels on the workstation and on the Pi. Normalisation to the
backbone's range lives inside the model graph; everything here returns RGB uint8.

The pipeline is ``load_image``/``decode_image`` (any file a microscope camera writes →
RGB uint8), then ``preprocess``: ``denoise`` at the source resolution (the filter
parameters are in source pixels, as in the research scripts) followed by ``resize_to``
the model's input size. Every function is pure and deterministic: the same bytes give
the same pixels, run after run.

The steps live in their own modules and are re-exported here, where the rest of the
code imports them: ``fieldscope.edge.decode`` (bounded decoder and its format
headers), ``fieldscope.edge.denoise`` (the filter registry), ``fieldscope.edge.resize``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fieldscope.edge.decode import MAX_DECODE_BYTES, MAX_PIXELS, decode_image, load_image
from fieldscope.edge.denoise import (
    DENOISE_DEFAULTS,
    DENOISE_LIMITS,
    DENOISE_METHODS,
    denoise,
    denoise_problems,
    normalised_params,
)
from fieldscope.edge.errors import FieldscopeError, RecipeError
from fieldscope.edge.pixels import RGBImage, check_rgb, cv_reason
from fieldscope.edge.resize import (
    RESAMPLE_METHODS,
    RESIZE_POLICIES,
    resample_problems,
    resize_problems,
    resize_to,
    size_problems,
)

__all__ = [
    "DENOISE_DEFAULTS",
    "DENOISE_LIMITS",
    "DENOISE_METHODS",
    "MAX_DECODE_BYTES",
    "MAX_PIXELS",
    "RESAMPLE_METHODS",
    "RESIZE_POLICIES",
    "PreprocessRecipe",
    "decode_image",
    "denoise",
    "load_and_preprocess",
    "load_image",
    "preprocess",
    "resize_to",
    "save_png",
]


# What a recipe read from a manifest or run config without a "resample" key means.
_LEGACY_RESAMPLE = "area"


@dataclass(frozen=True)
class PreprocessRecipe:
    """Everything needed to reproduce the model's input pixels from a decoded frame.

    It travels inside the bundle manifest (``to_dict``/``from_dict``) so the edge never
    re-derives preprocessing. ``size`` is (height, width) of the model input.
    ``fill`` is the letterbox padding: ``"border"`` (median of the image border, which
    suits white-background plankton and dark-field images alike) or an RGB triple.
    ``resample`` is how shrinking works (``RESAMPLE_METHODS``): ``"exact"`` gives the
    same pixels on every CPU; ``"area"`` is what recipes without the field meant.
    Window parameters given as integral floats (``ksize = 5.0``) are stored as ints, so
    equal recipes compare equal whatever file format they came from.
    """

    size: tuple[int, int] = (224, 224)
    denoise: str = "none"
    denoise_params: Mapping[str, float | int] = field(default_factory=dict)
    resize: str = "letterbox"
    fill: str | tuple[int, int, int] = "border"
    resample: str = "exact"

    def __post_init__(self) -> None:
        problems = self.validate()
        if problems:
            raise RecipeError("invalid preprocessing recipe: " + "; ".join(problems))
        # Freeze the defaults-merged parameters so equal recipes compare equal.
        params = normalised_params(self.denoise, self.denoise_params)
        object.__setattr__(self, "denoise_params", params)
        object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))
        if not isinstance(self.fill, str):
            object.__setattr__(self, "fill", tuple(int(c) for c in self.fill))

    def validate(self) -> list[str]:
        """Every problem with this recipe, each naming the field; empty when valid."""
        problems: list[str] = []
        problems.extend(size_problems(self.size, "size"))
        problems.extend(denoise_problems(self.denoise, self.denoise_params))
        problems.extend(resize_problems(self.resize, self.fill))
        problems.extend(resample_problems(self.resample))
        return problems

    def __hash__(self) -> int:
        # denoise_params is a dict, so the generated hash would fail; hash the canonical form.
        return hash(self.fingerprint())

    def fingerprint(self) -> str:
        """A stable sha256 of the canonical recipe: a cache key for preprocessed images."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, as stored in the bundle manifest and the training config."""
        return {
            "size": [self.size[0], self.size[1]],
            "denoise": self.denoise,
            "denoise_params": dict(self.denoise_params),
            "resize": self.resize,
            "fill": self.fill if isinstance(self.fill, str) else list(self.fill),
            "resample": self.resample,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessRecipe:
        """Parse the manifest/config form; unknown keys are errors, not silently dropped.

        A recipe without ``resample`` was written before the field existed (a bundle or
        a run folder trained on INTER_AREA pixels), so it gets ``"area"``: the pixels it
        was trained on, not the newer default.
        """
        if not isinstance(data, Mapping):
            raise RecipeError(f"preprocessing recipe must be a table/object, got {data!r}")
        known = {"size", "denoise", "denoise_params", "resize", "fill", "resample"}
        unknown = sorted(str(key) for key in set(data) - known)
        if unknown:
            raise RecipeError(
                f"unknown preprocessing key(s): {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )
        kwargs: dict[str, Any] = dict(data)
        kwargs.setdefault("resample", _LEGACY_RESAMPLE)
        if "size" in kwargs and isinstance(kwargs["size"], list):
            kwargs["size"] = tuple(kwargs["size"])
        if "fill" in kwargs and isinstance(kwargs["fill"], list):
            kwargs["fill"] = tuple(kwargs["fill"])
        return cls(**kwargs)


def preprocess(image: RGBImage, recipe: PreprocessRecipe) -> RGBImage:
    """The model input for one decoded frame: denoise at source resolution, then resize.

    Denoising first is what the filter parameters mean (a 5-pixel median of the camera's
    pixels) and what the research scripts did; resizing first would change what each
    parameter does with every input size. Returns C-contiguous uint8 (H, W, 3) with
    (H, W) == ``recipe.size``.

    Raises:
        ValueError: ``image`` is not RGB uint8 (H, W, 3) or ``recipe`` is not a recipe.
    """
    rgb = check_rgb(image, "preprocess: image")
    if not isinstance(recipe, PreprocessRecipe):
        raise ValueError(f"preprocess: recipe must be a PreprocessRecipe, got {recipe!r}")
    if recipe.denoise != "none":
        rgb = denoise(rgb, recipe.denoise, recipe.denoise_params)
    return resize_to(rgb, recipe.size, recipe.resize, recipe.fill, recipe.resample)


def load_and_preprocess(path: str | os.PathLike[str], recipe: PreprocessRecipe) -> RGBImage:
    """``preprocess(load_image(path), recipe)``: what training feeds the model per file.

    Raises:
        ImageDecodeError: the file cannot be read or decoded; the message names it.
    """
    return preprocess(load_image(path), recipe)


def save_png(path: str | os.PathLike[str], rgb: RGBImage) -> None:
    """Write RGB uint8 (H, W, 3) as a lossless PNG, atomically.

    The bytes go to a hidden temporary file beside ``path`` that is then renamed over
    it, so a reader (or a power cut on the Pi's SD card) never sees a half-written image.

    Raises:
        FieldscopeError: the file cannot be written; the message names the path.
        ValueError: ``rgb`` is not RGB uint8 (H, W, 3).
    """
    image = check_rgb(rgb, "save_png: rgb")
    target = Path(path)
    try:
        ok, encoded = cv2.imencode(".png", np.ascontiguousarray(image[:, :, ::-1]))
    except cv2.error as exc:
        raise FieldscopeError(f"cannot encode {target} as PNG: {cv_reason(exc)}") from exc
    if not ok:
        raise FieldscopeError(f"cannot encode {target} as PNG")
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with temporary.open("xb") as handle:
            handle.write(encoded.tobytes())
        temporary.replace(target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise FieldscopeError(f"cannot write {target}: {exc.strerror or exc}") from exc
