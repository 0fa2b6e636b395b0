"""The ``[preprocessing]`` table: a preprocessing recipe as a user writes it, parsed once.

Three places let a user choose how images are prepared for the model: the training
config (``fieldscope train``), a station's overrides of its bundle's recipe (the edge
daemon's config) and ``fieldscope edge preview``. They all read the same table, with the
same names, types and messages, through :class:`RecipeTable`; an unset key keeps the
value of the recipe it is applied to (:meth:`RecipeTable.apply`). The input ``size`` is
not in the table: training sets it with ``image_size``, and a bundle's is fixed by its
model.

This module imports neither OpenCV nor NumPy (``PreprocessRecipe`` is imported when a
recipe is built), so the training CLI can build its parser from it on any install.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from msgspec import Meta

from fieldscope.edge.errors import RecipeError

if TYPE_CHECKING:
    from fieldscope.edge.preprocess import PreprocessRecipe

__all__ = [
    "DEFAULT_TABLE",
    "RECIPE_KEYS",
    "RecipeTable",
    "parse_fill",
    "parse_params",
    "recipe_from_saved",
]

Problems = list[tuple[str, str]]


def _help(text: str, *, flag: str, metavar: str | None = None) -> Meta:
    """Field metadata: the help text and the command-line flag that sets the key."""
    return Meta(description=text, extra={"flag": flag, "metavar": metavar})


class RecipeTable(msgspec.Struct, frozen=True, kw_only=True):
    """``[preprocessing]``: departures from a base recipe; None keeps the base's value.

    For training the base is the default recipe at ``image_size``; for a station it is
    the bundle's recipe (what the model was trained with, so the normal setting is no
    override at all; a camera noisier than the training images may need a stronger
    filter, though).
    """

    denoise: Annotated[
        str | None,
        _help("denoise filter: none, bilateral, median, gaussian, nlmeans", flag="--denoise"),
    ] = None
    denoise_params: Annotated[
        Mapping[str, float | int] | None,
        _help(
            "denoise parameter, e.g. diameter=9 (repeatable; OpenCV's names)",
            flag="--denoise-param",
            metavar="KEY=VALUE",
        ),
    ] = None
    resize: Annotated[
        str | None, _help("resize policy: letterbox, stretch, center-crop", flag="--resize")
    ] = None
    fill: Annotated[
        str | tuple[int, int, int] | None,
        Meta(
            description="letterbox fill: border or R,G,B",
            extra={"flag": "--fill", "metavar": "FILL", "expected": '"border" or [R, G, B]'},
        ),
    ] = None
    resample: Annotated[
        str | None,
        _help(
            "how shrinking resamples: exact (integer box average, the same pixels on "
            "x86_64 and ARM) or area (OpenCV INTER_AREA, what runs before it had)",
            flag="--resample",
        ),
    ] = None

    @property
    def empty(self) -> bool:
        """True when the base recipe is used unchanged."""
        return all(getattr(self, name) is None for name in RECIPE_KEYS)

    def apply(self, recipe: PreprocessRecipe) -> PreprocessRecipe:
        """``recipe`` with these departures; its size always stays.

        A new denoise method starts from its own default parameters (the base's
        parameters belong to the base's method); the same method keeps the base's
        parameters, updated by ``denoise_params``.

        Raises:
            RecipeError: the combination is invalid.
        """
        if self.empty:
            return recipe
        from fieldscope.edge.preprocess import PreprocessRecipe

        method = self.denoise if self.denoise is not None else recipe.denoise
        params: dict[str, float | int] = (
            dict(recipe.denoise_params) if method == recipe.denoise else {}
        )
        params.update(self.denoise_params or {})
        return PreprocessRecipe(
            size=recipe.size,
            denoise=method,
            denoise_params=params,
            resize=self.resize if self.resize is not None else recipe.resize,
            fill=self.fill if self.fill is not None else recipe.fill,
            resample=self.resample if self.resample is not None else recipe.resample,
        )

    def recipe(self, size: tuple[int, int]) -> PreprocessRecipe:
        """The recipe these keys give at ``size``, unset keys at their defaults.

        Raises:
            RecipeError: the combination is invalid.
        """
        from fieldscope.edge.preprocess import PreprocessRecipe

        return self.apply(PreprocessRecipe(size=size))

    def problems(self) -> Problems:
        """Every problem, keyed relative to the table (``denoise_params.ksize``)."""
        out: Problems = []
        if self.denoise_params is not None and self.denoise is None:
            out.append(
                (
                    "denoise_params",
                    "needs preprocessing.denoise as well (parameters belong to one method)",
                )
            )
        table = (
            self if self.denoise is not None else msgspec.structs.replace(self, denoise_params=None)
        )
        if table.empty:
            return out
        try:
            table.recipe((224, 224))
        except RecipeError as exc:
            text = str(exc).removeprefix("invalid preprocessing recipe: ")
            for part in text.split("; "):
                key, _, rest = part.partition(" ")
                known = key.split(".", 1)[0] in RECIPE_KEYS
                out.append((key, rest) if known else ("", part))
        return out


RECIPE_KEYS: tuple[str, ...] = tuple(f.name for f in msgspec.structs.fields(RecipeTable))
# ``PreprocessRecipe``'s defaults as a table, for help texts that must not import OpenCV
# (a test keeps the two equal).
DEFAULT_TABLE = RecipeTable(
    denoise="none", denoise_params={}, resize="letterbox", fill="border", resample="exact"
)


def parse_params(flag: str, items: Sequence[str]) -> dict[str, float | int]:
    """``["diameter=9", "sigma_color=30"]`` from repeated ``flag`` options, as numbers.

    Raises:
        RecipeError: an item is not KEY=VALUE with a number; the message names ``flag``.
    """
    params: dict[str, float | int] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise RecipeError(f"{flag} expects KEY=VALUE, got {item!r}")
        try:
            params[name] = int(text) if text.lstrip("-").isdigit() else float(text)
        except ValueError:
            raise RecipeError(f"{flag} {name}: {text!r} is not a number") from None
    return params


def parse_fill(flag: str, text: str) -> str | tuple[int, int, int]:
    """``"border"`` or ``"R,G,B"`` as given to ``flag``.

    Raises:
        RecipeError: neither form; the message names ``flag``.
    """
    if text == "border":
        return text
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise RecipeError(f"{flag} expects 'border' or R,G,B, got {text!r}")
    return (int(parts[0]), int(parts[1]), int(parts[2]))


def recipe_from_saved(config: Any) -> PreprocessRecipe:
    """The recipe a training run saved in its ``config.json`` (its ``preprocess`` object,
    the run folder's format, kept so that every run ever made still converts).

    Raises:
        RecipeError: no recipe, or an invalid one.
    """
    from fieldscope.edge.preprocess import PreprocessRecipe

    saved = config.get("preprocess") if isinstance(config, Mapping) else None
    if saved is None:
        raise RecipeError("it has no preprocessing recipe (no 'preprocess' object)")
    return PreprocessRecipe.from_dict(saved)
