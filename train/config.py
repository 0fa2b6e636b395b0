"""The training configuration: one typed, frozen tree, loaded once from TOML and the command line.

Every key has a default, a help text and a command-line flag generated from the same
field declaration (a frozen ``msgspec.Struct``), so "every config key can be given on
the command line" holds by construction (a test walks the fields). Precedence:
defaults < TOML file < flags. The file is read by the edge's generic loader
(:mod:`fieldscope.edge.typed`): every problem at once, each as ``file:line: key:
message`` with a did-you-mean for unknown keys. The resolved tree is saved as
``config.json`` in the run, together with the preprocessing recipe it implies (under
``preprocess``, the run folder's format), so a run can be resumed, re-evaluated and
converted without guessing.

The ``[preprocessing]`` table is the edge's :class:`~fieldscope.edge.recipe.RecipeTable`,
the same one a station's config and ``fieldscope edge preview`` read; ``[preprocess]``,
its old name here, is still read, with a warning.

This module imports no TensorFlow, nor OpenCV (the recipe is built lazily): the CLI
builds its parser from it, and ``fieldscope --help`` must work on any install.
"""

from __future__ import annotations

import argparse
import logging
import math
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from msgspec import Meta

from fieldscope.edge.errors import ConfigError
from fieldscope.edge.recipe import DEFAULT_TABLE, RecipeTable, parse_fill, parse_params
from fieldscope.edge.typed import (
    ConfigFileError,
    ConfigProblem,
    Problems,
    ProblemsError,
    Reader,
    field_spec,
    problems_of,
    read_toml,
)
from fieldscope.train.backbones import BACKBONES, check_backbone_options

if TYPE_CHECKING:
    from fieldscope.edge.preprocess import PreprocessRecipe

__all__ = [
    "AugmentConfig",
    "ConfigKey",
    "PreprocessConfig",
    "TrainConfig",
    "add_config_arguments",
    "config_keys",
    "load_config",
    "overrides_from_args",
    "parse_split",
    "resolve_config",
]

_log = logging.getLogger(__name__)

# The default backbone gets its ImageNet weights from a pip package (the
# offline-weights extra), so the default works without internet.
DEFAULT_BACKBONE = "efficientnet_lite0"
Strategy = Literal["auto", "cached", "end-to-end"]
STRATEGIES: tuple[str, ...] = typing.get_args(Strategy)
# A training config is a few kilobytes; anything far bigger is not one.
MAX_CONFIG_BYTES = 1024 * 1024
_SPLIT_WORDS = 'three ratios, e.g. [0.7, 0.15, 0.15] or "70:15:15"'


def _key(
    help_text: str, *, flag: str | None = None, metavar: str | None = None, **bounds: Any
) -> Meta:
    """Field metadata: the help text, the flag when the generated one is clumsy, bounds."""
    unit = bounds.pop("unit", None)
    extra = {"flag": flag, "metavar": metavar, **({"unit": unit} if unit else {})}
    return Meta(description=help_text, extra=extra, **bounds)


_Fraction = Annotated[float, Meta(ge=0, lt=1)]

# The recipe table, named as in the edge's config; kept under its old name for imports.
PreprocessConfig = RecipeTable


class AugmentConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The ``[augment]`` table: random changes a microscope image may show, training only."""

    flip: Annotated[bool, _key("random horizontal and vertical flips")] = True
    rotate90: Annotated[bool, _key("random 90° rotations (square inputs)")] = True
    rotation: Annotated[
        float,
        _key("free rotation, as a fraction of a full turn each way (0.5 = ±180°)", ge=0, lt=1),
    ] = 0.5
    zoom: Annotated[float, _key("random zoom in/out, fraction of the size", ge=0, lt=1)] = 0.1
    contrast: Annotated[float, _key("random contrast change, fraction", ge=0, lt=1)] = 0.2
    brightness: Annotated[float, _key("random brightness change, fraction", ge=0, lt=1)] = 0.1
    noise: Annotated[
        float,
        _key(
            "camera noise: per image, Gaussian pixel noise of a standard deviation drawn "
            "from 0 to this many grey levels (0-255), rounded and clipped like a sensor",
            ge=0,
            le=64,
        ),
    ] = 3.0


def _split(raw: object, reader: Reader) -> object:
    """``"70:15:15"`` or three numbers in any unit, as fractions (other values unchanged)."""
    if isinstance(raw, str):
        try:
            return parse_split(raw)
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("split ")) from None
    numbers = isinstance(raw, list | tuple) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in raw
    )
    if numbers and len(raw) == 3:  # type: ignore[arg-type]
        return _normalise_split([float(v) for v in raw], "split", "config")  # type: ignore[union-attr]
    return raw


class TrainConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything that decides a training run; see ``train/examples/train.toml``."""

    backbone: Annotated[str, _key(f"backbone: {', '.join(BACKBONES)}")] = DEFAULT_BACKBONE
    alpha: Annotated[float, _key("width multiplier of the Keras mobilenet_v2/v3 backbones")] = 1.0
    weights: Annotated[
        str, _key("backbone weights: imagenet, none, or a .weights.h5 file", metavar="W")
    ] = "imagenet"
    image_size: Annotated[
        int, _key("model input side in pixels", metavar="PX", ge=32, unit="pixels")
    ] = 224
    seed: Annotated[int, _key("seed for the split, initialisation, shuffling")] = 0
    split: Annotated[
        tuple[float, float, float],
        Meta(
            description="train:val:test ratios, e.g. 70:15:15",
            extra={"metavar": "TR:VA:TE", "parse": _split, "expected": _SPLIT_WORDS},
        ),
    ] = (0.7, 0.15, 0.15)
    folds: Annotated[int, _key("k-fold cross-validation (0 = one split)", ge=0)] = 0
    batch_size: Annotated[int, _key("images per batch", gt=0)] = 32
    epochs: Annotated[
        int,
        _key("stage 1 epochs (frozen backbone)", ge=1, unit="(stage 1 trains the new head)"),
    ] = 10
    learning_rate: Annotated[float, _key("stage 1 learning rate", gt=0)] = 1e-3
    fine_tune_epochs: Annotated[
        int, _key("stage 2 epochs (top layers unfrozen; 0 = skip)", ge=0)
    ] = 20
    fine_tune_learning_rate: Annotated[
        float,
        _key("stage 2 initial learning rate (cosine decay)", flag="--fine-tune-lr", gt=0),
    ] = 1e-4
    fine_tune_layers: Annotated[
        int, _key("backbone layers unfrozen from the top in stage 2", ge=0)
    ] = 30
    dropout: Annotated[float, _key("dropout before the classifier", ge=0, lt=1)] = 0.2
    strategy: Annotated[
        Strategy,
        _key(
            "fitting strategy: cached (stage 1 a converged head on cached backbone features, "
            "stage 2 fine-tunes the top on cached activations), end-to-end (every epoch "
            "through the whole network), or auto (cached with pretrained weights, "
            "end-to-end from scratch)"
        ),
    ] = "auto"
    augment_copies: Annotated[
        int,
        _key(
            "cached strategy: training images whose activations are cached, counting the "
            "original and its randomly augmented copies",
            ge=1,
        ),
    ] = 4
    label_smoothing: Annotated[
        float, _key("cached strategy: label smoothing of the stage 2 loss", ge=0, lt=0.5)
    ] = 0.1
    patience: Annotated[int, _key("early stopping: epochs without improvement (0 = off)", ge=0)] = 5
    class_weight: Annotated[
        Literal["balanced", "none"], _key("balanced (weights ~ 1/class size) or none")
    ] = "balanced"
    target_precision: Annotated[
        float,
        _key("decision threshold keeps the precision of accepted predictions >= this", gt=0, le=1),
    ] = 0.95
    threshold_confidence: Annotated[
        float,
        _key(
            "the target precision holds with this confidence (lower bound of the "
            "validation precision); 0 = use the observed precision",
            ge=0,
            lt=1,
        ),
    ] = 0.95
    run_eagerly: Annotated[
        bool, _key("run Keras eagerly (faster for tiny models, slower for real)")
    ] = False
    cache_dir: Annotated[
        str, _key("preprocessed-image cache (default: RUN_DIR/cache)", metavar="DIR")
    ] = ""
    preprocess: RecipeTable = msgspec.field(default_factory=RecipeTable, name="preprocessing")
    augment: AugmentConfig = msgspec.field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        problems = problems_of(self)
        if problems:
            raise ProblemsError(problems, "invalid training config: ")
        # Store the recipe's canonical form (defaults merged), so a config read back from
        # config.json equals the one that wrote it.
        recipe = self.recipe()
        canonical = RecipeTable(
            denoise=recipe.denoise,
            denoise_params=dict(recipe.denoise_params),
            resize=recipe.resize,
            fill=recipe.fill,
            resample=recipe.resample,
        )
        msgspec.structs.force_setattr(self, "preprocess", canonical)

    def problems(self) -> Problems:
        """The checks across keys (each key's own range is declared with it)."""
        out: Problems = [
            ("", p) for p in check_backbone_options(self.backbone, self.alpha, self.weights)
        ]
        if self.folds == 1:
            out.append(("folds", "must be 0 (one split) or at least 2"))
        out.extend(_split_problems(self.split, self.folds))
        if self.strategy == "cached" and self.weights == "none":
            out.append(
                (
                    "strategy",
                    "'cached' needs pretrained weights (it freezes the backbone's lower "
                    "layers); with weights 'none' use strategy 'end-to-end' or 'auto'",
                )
            )
        return out

    def validate(self) -> list[str]:
        """Every problem with the values, each naming its key; empty when valid."""
        return [f"{key}: {message}" if key else message for key, message in problems_of(self)]

    def fitting_strategy(self) -> str:
        """The strategy that ``strategy = "auto"`` stands for with these weights."""
        if self.strategy != "auto":
            return self.strategy
        return "end-to-end" if self.weights == "none" else "cached"

    def recipe(self) -> PreprocessRecipe:
        """The edge preprocessing recipe this run trains with (and the bundle will carry)."""
        return self.preprocess.recipe((self.image_size, self.image_size))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready resolved config; ``preprocess`` is the full recipe (``to_dict``)."""
        data = {name: msgspec.to_builtins(getattr(self, name)) for name in self.__struct_fields__}
        data["preprocess"] = self.recipe().to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a saved ``config.json`` or a TOML tree; every problem names its key.

        Raises:
            ConfigFileError: one line per problem.
        """
        return _read(data, source=source, text=None)


def _split_problems(split: Sequence[float], folds: int) -> Problems:
    if len(split) != 3 or any(r < 0 for r in split):
        return [("split", f"must be three ratios >= 0, got {split!r}")]
    if not math.isclose(sum(split), 1.0, abs_tol=1e-6):
        return [("split", f"ratios must add up to 1, got {split!r}")]
    if split[0] == 0 or split[1] == 0 or (split[2] == 0 and not folds):
        return [("split", f"needs train, val and test parts above 0, got {_ratio_text(split)}")]
    return []


def _read(data: Mapping[str, Any], *, source: str, text: str | None) -> TrainConfig:
    """The config a (normalised) tree describes, or every problem at once."""
    if not isinstance(data, Mapping):
        raise ConfigFileError([ConfigProblem("", "must be a table of config keys", source)])
    reader = Reader(Path(source).parent, {})
    config = reader.read(TrainConfig, _normalised(data, source))
    problems = reader.located(config, text, source)
    if problems or config is None:
        raise ConfigFileError(problems)
    return typing.cast(TrainConfig, config)


def _normalised(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``preprocess`` (a saved run's key, or the old TOML table name) read as
    ``preprocessing``; a saved recipe's ``size`` checked against ``image_size``."""
    tree = dict(data)
    if "preprocess" in tree:
        if "preprocessing" in tree:
            raise ConfigFileError(
                [ConfigProblem("preprocess", "give [preprocessing] only, not both", source)]
            )
        tree["preprocessing"] = tree.pop("preprocess")
    table = tree.get("preprocessing")
    if isinstance(table, Mapping) and "size" in table:
        tree["preprocessing"] = _drop_recipe_size(table, tree, source)
    return tree


def _drop_recipe_size(
    value: Mapping[str, Any], data: Mapping[str, Any], source: str
) -> dict[str, Any]:
    """A saved config carries the full recipe; its size must agree with image_size.

    A saved recipe without ``resample`` comes from a run made before the field existed,
    whose model was trained on INTER_AREA pixels: it keeps ``area``.
    """
    size = value["size"]
    side = data.get("image_size", 224)
    if not isinstance(size, list | tuple) or list(size) != [side, side]:
        shown = list(size) if isinstance(size, list | tuple) else size
        message = f"{shown!r} disagrees with image_size {side}; set image_size only"
        raise ConfigFileError([ConfigProblem("preprocess.size", message, source)])
    return {"resample": "area", **{k: v for k, v in value.items() if k != "size"}}


class ConfigKey(msgspec.Struct, frozen=True):
    """One leaf of the config tree, with what the CLI needs to expose it.

    ``dotted`` uses attribute names (``preprocess.denoise``); ``path`` is the same key
    as the file spells it (``("preprocessing", "denoise")``).
    """

    dotted: str
    dest: str
    flag: str
    kind: str
    default: Any
    help: str
    metavar: str | None
    path: tuple[str, ...] = ()


def config_keys() -> Iterator[ConfigKey]:
    """Every leaf key of the config tree (``augment.zoom``, ``preprocess.denoise``, ...)."""
    yield from _keys(TrainConfig, None, prefix="", path=())


def _keys(cls: type, defaults: Any, prefix: str, path: tuple[str, ...]) -> Iterator[ConfigKey]:
    """The leaves below ``cls``; ``defaults`` (when given) overrides the declared ones.

    No ``TrainConfig()`` is built: checking its recipe imports OpenCV, and the parser
    is built for ``fieldscope --help`` before the native libraries are quietened.
    """
    for f in msgspec.structs.fields(cls):
        spec = field_spec(f.type)
        dotted, where = f"{prefix}{f.name}", (*path, f.encode_name)
        default = f.default if f.default_factory is msgspec.NODEFAULT else f.default_factory()
        default = default if defaults is None else getattr(defaults, f.name)
        if isinstance(default, msgspec.Struct):
            table = DEFAULT_TABLE if isinstance(default, RecipeTable) else None
            yield from _keys(type(default), table, f"{dotted}.", where)
            continue
        bare = str if typing.get_origin(spec.bare) is Literal else spec.bare
        yield ConfigKey(
            dotted=dotted,
            dest="cfg__" + dotted.replace(".", "__"),
            flag=spec.extra.get("flag") or "--" + dotted.replace(".", "-").replace("_", "-"),
            kind=getattr(bare, "__name__", str(bare)),
            default=default,
            help=spec.meta.description if spec.meta is not None else "",
            metavar=spec.extra.get("metavar"),
            path=where,
        )


def _normalise_split(parts: Sequence[float], dotted: str, source: str) -> tuple[float, ...]:
    """Accept ratios in any unit (70:15:15 or 0.7:0.15:0.15); store fractions."""
    total = sum(parts)
    if total <= 0 or any(p < 0 for p in parts):
        raise ConfigError(f"{source}: {dotted} must be three ratios >= 0, got {list(parts)!r}")
    return tuple(round(p / total, 10) for p in parts)


def parse_split(text: str) -> tuple[float, float, float]:
    """``"70:15:15"`` -> ``(0.7, 0.15, 0.15)``."""
    parts = text.replace(",", ":").split(":")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"split must look like 70:15:15, got {text!r}") from None
    if len(numbers) != 3:
        raise ConfigError(f"split must have three parts (train:val:test), got {text!r}")
    result = _normalise_split(numbers, "split", "command line")
    return (result[0], result[1], result[2])


def _ratio_text(split: Sequence[float]) -> str:
    return ":".join(f"{r * 100:g}" for r in split)


def load_config(path: Path) -> dict[str, Any]:
    """Read a TOML config file into a plain tree (validated later, with the overrides).

    Raises:
        ConfigFileError: missing, unreadable or not TOML, naming the file (and line).
    """
    return read_toml(Path(path), MAX_CONFIG_BYTES)[0]


def resolve_config(
    toml_path: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> TrainConfig:
    """Defaults, then the TOML file, then dotted-key overrides (from the command line).

    Raises:
        ConfigFileError: every problem of the file and the overrides, one per line.
    """
    tree: dict[str, Any] = {}
    text = None
    source = str(toml_path) if toml_path is not None else "config"
    if toml_path is not None:
        tree, text = read_toml(Path(toml_path), MAX_CONFIG_BYTES)
        if "preprocess" in tree:
            _log.warning(
                "%s: [preprocess] is the old name of the [preprocessing] table (the name "
                "the edge's config uses too); rename it",
                source,
            )
        tree = _normalised(tree, source)
    paths = {key.dotted: key.path for key in config_keys()}
    for dotted, value in (overrides or {}).items():
        _set(tree, paths.get(dotted) or tuple(dotted.split(".")), value, source)
    return _read(tree, source=source, text=text)


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any, source: str) -> None:
    """One override into the tree; denoise parameters merge with the file's."""
    node = tree
    *parents, leaf = path
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigFileError([ConfigProblem(part, "must be a table", source)])
        node = child
    merge = leaf == "denoise_params" and isinstance(node.get(leaf), Mapping)
    node[leaf] = {**node[leaf], **value} if merge else value


# --- command line -------------------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config key; defaults are suppressed so only given flags override."""
    group = parser.add_argument_group(
        "config overrides", "each overrides the same key of --config (defaults in brackets)"
    )
    for key in config_keys():
        default_text = _default_text(key.default)
        help_text = f"{key.help} [{default_text}]"
        common: dict[str, Any] = {"dest": key.dest, "default": argparse.SUPPRESS, "help": help_text}
        if key.kind == "bool":
            group.add_argument(key.flag, action=argparse.BooleanOptionalAction, **common)
        elif key.dotted == "preprocess.denoise_params":
            group.add_argument(key.flag, action="append", metavar=key.metavar, **common)
        else:
            metavar = key.metavar or {"int": "N", "float": "X"}.get(key.kind, "NAME")
            group.add_argument(key.flag, metavar=metavar, **common)


def _default_text(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 3 and all(isinstance(v, float) for v in value):
        return _ratio_text(value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value) if value != "" else "unset"


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The dotted-key overrides the user actually gave, converted to config types."""
    overrides: dict[str, Any] = {}
    for key in config_keys():
        if not hasattr(args, key.dest):
            continue
        raw = getattr(args, key.dest)
        overrides[key.dotted] = _from_flag(key, raw)
    return overrides


def _from_flag(key: ConfigKey, raw: Any) -> Any:
    """A flag's text as the config type; errors name the flag."""
    convert = _FLAG_CONVERTERS.get(key.kind) or _FLAG_CONVERTERS.get(key.dotted)
    return raw if convert is None else convert(key.flag, raw)


def _flag_number(kind: type) -> Callable[[str, Any], Any]:
    expected = "an integer" if kind is int else "a number"

    def convert(flag: str, raw: Any) -> Any:
        try:
            return kind(raw)
        except ValueError:
            raise ConfigError(f"{flag} expects {expected}, got {raw!r}") from None

    return convert


# declared type or dotted key -> converter of the flag's text
_FLAG_CONVERTERS: Mapping[str, Callable[[str, Any], Any]] = {
    "bool": lambda flag, raw: bool(raw),
    "int": _flag_number(int),
    "float": _flag_number(float),
    "split": lambda flag, raw: parse_split(raw),
    "preprocess.denoise_params": parse_params,
    "preprocess.fill": parse_fill,
}
