"""Contract 1 — preprocessing: the one function that turns a decoded frame into model input.

Training (``fieldscope.train``) and the edge daemon call the *same* functions, so the
model sees identical pixels on the workstation and on the Pi. Normalisation to the
backbone's range lives inside the model graph; everything here returns RGB uint8.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fieldscope.edge.errors import RecipeError

__all__ = [
    "DENOISE_DEFAULTS",
    "DENOISE_METHODS",
    "RESIZE_POLICIES",
    "PreprocessRecipe",
]

# Each denoise method with its parameters and their defaults (OpenCV's names and units).
DENOISE_DEFAULTS: Mapping[str, Mapping[str, float | int]] = {
    "none": {},
    "bilateral": {"diameter": 9, "sigma_color": 75.0, "sigma_space": 75.0},
    "median": {"ksize": 5},
    "gaussian": {"ksize": 5, "sigma": 0.0},
    "nlmeans": {"h": 10.0, "h_color": 10.0, "template_window": 7, "search_window": 21},
}
DENOISE_METHODS: tuple[str, ...] = tuple(DENOISE_DEFAULTS)
RESIZE_POLICIES: tuple[str, ...] = ("stretch", "center-crop", "letterbox")


@dataclass(frozen=True)
class PreprocessRecipe:
    """Everything needed to reproduce the model's input pixels from a decoded frame.

    It travels inside the bundle manifest (``to_dict``/``from_dict``) so the edge never
    re-derives preprocessing. ``size`` is (height, width) of the model input.
    ``fill`` is the letterbox padding: ``"border"`` (median of the image border, which
    suits white-background plankton and dark-field images alike) or an RGB triple.
    """

    size: tuple[int, int] = (224, 224)
    denoise: str = "none"
    denoise_params: Mapping[str, float | int] = field(default_factory=dict)
    resize: str = "letterbox"
    fill: str | tuple[int, int, int] = "border"

    def __post_init__(self) -> None:
        problems = self.validate()
        if problems:
            raise RecipeError("invalid preprocessing recipe: " + "; ".join(problems))
        # Freeze the defaults-merged parameters so equal recipes compare equal.
        merged = {**DENOISE_DEFAULTS[self.denoise], **dict(self.denoise_params)}
        object.__setattr__(self, "denoise_params", dict(sorted(merged.items())))
        object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))
        if not isinstance(self.fill, str):
            object.__setattr__(self, "fill", tuple(int(c) for c in self.fill))

    def validate(self) -> list[str]:
        """Every problem with this recipe, each naming the field; empty when valid."""
        problems: list[str] = []
        size = self.size
        if (
            not isinstance(size, tuple | list)
            or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)
            or not all(8 <= v <= 4096 for v in size)
        ):
            problems.append(f"size must be (height, width) integers in 8..4096, got {size!r}")
        if self.denoise not in DENOISE_DEFAULTS:
            problems.append(
                f"denoise must be one of {', '.join(DENOISE_METHODS)}, got {self.denoise!r}"
            )
        else:
            allowed = DENOISE_DEFAULTS[self.denoise]
            for key, value in dict(self.denoise_params).items():
                if key not in allowed:
                    names = ", ".join(allowed) or "no parameters"
                    problems.append(
                        f"denoise_params.{key} is not a parameter of {self.denoise!r} "
                        f"(it takes {names})"
                    )
                elif isinstance(value, bool) or not isinstance(value, int | float):
                    problems.append(f"denoise_params.{key} must be a number, got {value!r}")
                elif value < 0:
                    problems.append(f"denoise_params.{key} must be >= 0, got {value!r}")
                elif key == "ksize" and (int(value) != value or int(value) % 2 == 0):
                    problems.append(f"denoise_params.ksize must be an odd integer, got {value!r}")
        if self.resize not in RESIZE_POLICIES:
            problems.append(
                f"resize must be one of {', '.join(RESIZE_POLICIES)}, got {self.resize!r}"
            )
        fill = self.fill
        if isinstance(fill, str):
            if fill != "border":
                problems.append(f"fill must be 'border' or an RGB triple, got {fill!r}")
        elif (
            not isinstance(fill, tuple | list)
            or len(fill) != 3
            or not all(isinstance(c, int) and 0 <= c <= 255 for c in fill)
        ):
            problems.append(f"fill must be 'border' or three integers 0..255, got {fill!r}")
        return problems

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, as stored in the bundle manifest and the training config."""
        return {
            "size": [self.size[0], self.size[1]],
            "denoise": self.denoise,
            "denoise_params": dict(self.denoise_params),
            "resize": self.resize,
            "fill": self.fill if isinstance(self.fill, str) else list(self.fill),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessRecipe:
        """Parse the manifest/config form; unknown keys are errors, not silently dropped."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"preprocessing recipe must be a table/object, got {data!r}")
        known = {"size", "denoise", "denoise_params", "resize", "fill"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(
                f"unknown preprocessing key(s): {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )
        kwargs: dict[str, Any] = dict(data)
        if "size" in kwargs and isinstance(kwargs["size"], list):
            kwargs["size"] = tuple(kwargs["size"])
        if "fill" in kwargs and isinstance(kwargs["fill"], list):
            kwargs["fill"] = tuple(kwargs["fill"])
        if "denoise_params" in kwargs and not isinstance(kwargs["denoise_params"], Mapping):
            raise RecipeError(
                f"denoise_params must be a table/object, got {kwargs['denoise_params']!r}"
            )
        return cls(**kwargs)
