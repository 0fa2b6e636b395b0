"""The training configuration: one typed, frozen tree, loaded once from TOML and the command line.

Every key has a default, a help text and a command-line flag generated from the same
field definition, so "every config key can be given on the command line" holds by
construction (a test walks the fields). Precedence: defaults < TOML file < flags. The
resolved tree is saved as ``config.json`` in the run, together with the preprocessing
recipe it implies, so a run can be resumed, re-evaluated and converted without guessing.

This module imports no TensorFlow, nor OpenCV (the recipe is built lazily): the CLI
builds its parser from it, and ``fieldscope --help`` must work on any install.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fieldscope.edge.errors import ConfigError, RecipeError
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


# The default backbone gets its ImageNet weights from a pip package (the
# offline-weights extra), so the default works without internet.
DEFAULT_BACKBONE = "efficientnet_lite0"
STRATEGIES: tuple[str, ...] = ("auto", "cached", "end-to-end")


def _key(help_text: str, *, flag: str | None = None, metavar: str | None = None) -> Any:
    """Field metadata: the help text and, when the generated name is clumsy, the flag."""
    return {"help": help_text, "flag": flag, "metavar": metavar}


@dataclass(frozen=True)
class PreprocessConfig:
    """The ``[preprocess]`` table: the edge's preprocessing recipe minus its size."""

    denoise: str = field(
        default="none",
        metadata=_key(
            "denoise filter: none, bilateral, median, gaussian, nlmeans", flag="--denoise"
        ),
    )
    denoise_params: Mapping[str, float | int] = field(
        default_factory=dict,
        metadata=_key(
            "denoise parameter, e.g. diameter=9 (repeatable; OpenCV's names)",
            flag="--denoise-param",
            metavar="KEY=VALUE",
        ),
    )
    resize: str = field(
        default="letterbox",
        metadata=_key("resize policy: letterbox, stretch, center-crop", flag="--resize"),
    )
    fill: str | tuple[int, int, int] = field(
        default="border",
        metadata=_key("letterbox fill: border or R,G,B", flag="--fill", metavar="FILL"),
    )
    resample: str = field(
        default="exact",
        metadata=_key(
            "how shrinking resamples: exact (integer box average, the same pixels on "
            "x86_64 and ARM) or area (OpenCV INTER_AREA, what runs before it had)",
            flag="--resample",
        ),
    )


@dataclass(frozen=True)
class AugmentConfig:
    """The ``[augment]`` table: random changes a microscope image may show, training only."""

    flip: bool = field(default=True, metadata=_key("random horizontal and vertical flips"))
    rotate90: bool = field(default=True, metadata=_key("random 90° rotations (square inputs)"))
    rotation: float = field(
        default=0.5,
        metadata=_key("free rotation, as a fraction of a full turn each way (0.5 = ±180°)"),
    )
    zoom: float = field(default=0.1, metadata=_key("random zoom in/out, fraction of the size"))
    contrast: float = field(default=0.2, metadata=_key("random contrast change, fraction"))
    brightness: float = field(default=0.1, metadata=_key("random brightness change, fraction"))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; see ``train/examples/train.toml``."""

    backbone: str = field(
        default=DEFAULT_BACKBONE, metadata=_key(f"backbone: {', '.join(BACKBONES)}")
    )
    alpha: float = field(
        default=1.0, metadata=_key("width multiplier of the Keras mobilenet_v2/v3 backbones")
    )
    weights: str = field(
        default="imagenet",
        metadata=_key("backbone weights: imagenet, none, or a .weights.h5 file", metavar="W"),
    )
    image_size: int = field(default=224, metadata=_key("model input side in pixels", metavar="PX"))
    seed: int = field(default=0, metadata=_key("seed for the split, initialisation, shuffling"))
    split: tuple[float, float, float] = field(
        default=(0.7, 0.15, 0.15),
        metadata=_key("train:val:test ratios, e.g. 70:15:15", metavar="TR:VA:TE"),
    )
    folds: int = field(default=0, metadata=_key("k-fold cross-validation (0 = one split)"))
    batch_size: int = field(default=32, metadata=_key("images per batch"))
    epochs: int = field(default=10, metadata=_key("stage 1 epochs (frozen backbone)"))
    learning_rate: float = field(default=1e-3, metadata=_key("stage 1 learning rate"))
    fine_tune_epochs: int = field(
        default=20, metadata=_key("stage 2 epochs (top layers unfrozen; 0 = skip)")
    )
    fine_tune_learning_rate: float = field(
        default=1e-4,
        metadata=_key("stage 2 initial learning rate (cosine decay)", flag="--fine-tune-lr"),
    )
    fine_tune_layers: int = field(
        default=30, metadata=_key("backbone layers unfrozen from the top in stage 2")
    )
    dropout: float = field(default=0.2, metadata=_key("dropout before the classifier"))
    strategy: str = field(
        default="auto",
        metadata=_key(
            "fitting strategy: cached (stage 1 a converged head on cached backbone features, "
            "stage 2 fine-tunes the top on cached activations), end-to-end (every epoch "
            "through the whole network), or auto (cached with pretrained weights, "
            "end-to-end from scratch)"
        ),
    )
    augment_copies: int = field(
        default=4,
        metadata=_key(
            "cached strategy: training images whose activations are cached, counting the "
            "original and its randomly augmented copies"
        ),
    )
    label_smoothing: float = field(
        default=0.1, metadata=_key("cached strategy: label smoothing of the stage 2 loss")
    )
    patience: int = field(
        default=5, metadata=_key("early stopping: epochs without improvement (0 = off)")
    )
    class_weight: str = field(
        default="balanced", metadata=_key("balanced (weights ~ 1/class size) or none")
    )
    target_precision: float = field(
        default=0.95,
        metadata=_key("decision threshold keeps the precision of accepted predictions >= this"),
    )
    threshold_confidence: float = field(
        default=0.95,
        metadata=_key(
            "the target precision holds with this confidence (lower bound of the "
            "validation precision); 0 = use the observed precision"
        ),
    )
    run_eagerly: bool = field(
        default=False, metadata=_key("run Keras eagerly (faster for tiny models, slower for real)")
    )
    cache_dir: str = field(
        default="",
        metadata=_key("preprocessed-image cache (default: RUN_DIR/cache)", metavar="DIR"),
    )
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        problems = self.validate()
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))
        # Store the recipe's canonical form (defaults merged), so a config read back from
        # config.json equals the one that wrote it.
        recipe = self.recipe()
        canonical = PreprocessConfig(
            denoise=recipe.denoise,
            denoise_params=dict(recipe.denoise_params),
            resize=recipe.resize,
            fill=recipe.fill,
            resample=recipe.resample,
        )
        object.__setattr__(self, "preprocess", canonical)

    def validate(self) -> list[str]:
        """Every problem with the values, each naming its key; empty when valid."""
        problems = list(check_backbone_options(self.backbone, self.alpha, self.weights))
        positive = {
            "image_size": self.image_size,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "fine_tune_learning_rate": self.fine_tune_learning_rate,
        }
        problems += [f"{k} must be > 0, got {v!r}" for k, v in positive.items() if v <= 0]
        not_negative = {
            "epochs": self.epochs,
            "fine_tune_epochs": self.fine_tune_epochs,
            "fine_tune_layers": self.fine_tune_layers,
            "patience": self.patience,
            "folds": self.folds,
        }
        problems += [f"{k} must be >= 0, got {v!r}" for k, v in not_negative.items() if v < 0]
        if self.image_size < 32:
            problems.append(f"image_size must be at least 32 pixels, got {self.image_size}")
        if self.epochs == 0:
            problems.append("epochs must be >= 1: stage 1 trains the new classifier head")
        if self.folds == 1:
            problems.append("folds must be 0 (one split) or at least 2")
        if len(self.split) != 3 or any(r < 0 for r in self.split):
            problems.append(f"split must be three ratios >= 0, got {self.split!r}")
        elif not math.isclose(sum(self.split), 1.0, abs_tol=1e-6):
            problems.append(f"split ratios must add up to 1, got {self.split!r}")
        elif self.split[0] == 0 or self.split[1] == 0 or (self.split[2] == 0 and not self.folds):
            problems.append(
                f"split needs train, val and test parts above 0, got {_ratio_text(self.split)}"
            )
        problems += self._strategy_problems()
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.class_weight not in ("balanced", "none"):
            problems.append(f"class_weight must be 'balanced' or 'none', got {self.class_weight!r}")
        if not 0 < self.target_precision <= 1:
            problems.append(f"target_precision must be in (0, 1], got {self.target_precision!r}")
        a = self.augment
        for name in ("rotation", "zoom", "contrast", "brightness"):
            value = getattr(a, name)
            if not 0 <= value < 1:
                problems.append(f"augment.{name} must be in [0, 1), got {value!r}")
        try:
            self.recipe()
        except RecipeError as exc:
            problems.append(f"preprocess: {exc}")
        return problems

    def _strategy_problems(self) -> list[str]:
        """Problems with the keys of the fitting strategy and the threshold rule."""
        problems: list[str] = []
        if self.strategy not in STRATEGIES:
            problems.append(
                f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}"
            )
        elif self.strategy == "cached" and self.weights == "none":
            problems.append(
                "strategy 'cached' needs pretrained weights (it freezes the backbone's lower "
                "layers); with weights 'none' use strategy 'end-to-end' or 'auto'"
            )
        if self.augment_copies < 1:
            problems.append(f"augment_copies must be >= 1, got {self.augment_copies!r}")
        if not 0 <= self.label_smoothing < 0.5:
            problems.append(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")
        if not 0 <= self.threshold_confidence < 1:
            problems.append(
                f"threshold_confidence must be in [0, 1), got {self.threshold_confidence!r}"
            )
        return problems

    def fitting_strategy(self) -> str:
        """The strategy that ``strategy = "auto"`` stands for with these weights."""
        if self.strategy != "auto":
            return self.strategy
        return "end-to-end" if self.weights == "none" else "cached"

    def recipe(self) -> PreprocessRecipe:
        """The edge preprocessing recipe this run trains with (and the bundle will carry)."""
        from fieldscope.edge.preprocess import PreprocessRecipe

        p = self.preprocess
        return PreprocessRecipe(
            size=(self.image_size, self.image_size),
            denoise=p.denoise,
            denoise_params=dict(p.denoise_params),
            resize=p.resize,
            fill=p.fill,
            resample=p.resample,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready resolved config; ``preprocess`` is the full recipe (``to_dict``)."""
        data = dataclasses.asdict(self)
        data["split"] = list(self.split)
        data["preprocess"] = self.recipe().to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a TOML/JSON tree; unknown keys and wrong types are errors naming the key."""
        return _build(cls, data, prefix="", source=source)


@dataclass(frozen=True)
class ConfigKey:
    """One leaf of the config tree, with what the CLI needs to expose it."""

    dotted: str
    dest: str
    flag: str
    kind: Any
    default: Any
    help: str
    metavar: str | None


def config_keys() -> Iterator[ConfigKey]:
    """Every leaf key of the config tree (``augment.zoom``, ``preprocess.denoise``, ...)."""
    yield from _keys(TrainConfig, prefix="")


def _keys(cls: type, prefix: str) -> Iterator[ConfigKey]:
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory):  # type: ignore[arg-type]
            yield from _keys(f.default_factory, prefix=f"{prefix}{f.name}.")  # type: ignore[arg-type]
            continue
        dotted = f"{prefix}{f.name}"
        flag = f.metadata.get("flag") or "--" + dotted.replace(".", "-").replace("_", "-")
        default = f.default
        if default is dataclasses.MISSING:
            default = f.default_factory()  # type: ignore[misc,operator]
        yield ConfigKey(
            dotted=dotted,
            dest="cfg__" + dotted.replace(".", "__"),
            flag=flag,
            kind=f.type,
            default=default,
            help=f.metadata.get("help", ""),
            metavar=f.metadata.get("metavar"),
        )


def _build(cls: type, data: Mapping[str, Any], *, prefix: str, source: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            where = f"{prefix}{name}"
            known = ", ".join(f"{prefix}{k}" for k in fields)
            raise ConfigError(f"{source}: unknown key {where!r} (known keys: {known})")
    kwargs: dict[str, Any] = {}
    for name, raw in data.items():
        f = fields[name]
        dotted = f"{prefix}{name}"
        if dataclasses.is_dataclass(f.default_factory):  # type: ignore[arg-type]
            table = raw
            if dotted == "preprocess" and isinstance(raw, Mapping) and "size" in raw:
                table = _drop_recipe_size(raw, data, source)
            kwargs[name] = _build(f.default_factory, table, prefix=f"{dotted}.", source=source)  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(dotted, str(f.type), raw, source)
    return cls(**kwargs)


def _drop_recipe_size(
    value: Mapping[str, Any], data: Mapping[str, Any], source: str
) -> dict[str, Any]:
    """A saved config carries the full recipe; its size must agree with image_size.

    A saved recipe without ``resample`` comes from a run made before the field existed,
    whose model was trained on INTER_AREA pixels: it keeps ``area``.
    """
    size = value["size"]
    side = data.get("image_size", TrainConfig.image_size)
    if list(size) != [side, side]:
        raise ConfigError(
            f"{source}: preprocess.size {list(size)} disagrees with image_size {side}; "
            "set image_size only"
        )
    return {"resample": "area", **{k: v for k, v in value.items() if k != "size"}}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _split_value(value: Any) -> tuple[float, ...] | None:
    if isinstance(value, str):
        return parse_split(value)
    if isinstance(value, list | tuple) and len(value) == 3 and all(map(_is_number, value)):
        return _normalise_split([float(v) for v in value], "split", "config")
    return None


def _fill_value(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and len(value) == 3 and all(map(_is_int, value)):
        return tuple(value)
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# type name or dotted key -> (converter returning None when the value does not fit, expected)
_CHECKS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "bool": (lambda v: v if isinstance(v, bool) else None, "true or false"),
    "int": (lambda v: v if _is_int(v) else None, "an integer"),
    "float": (lambda v: float(v) if _is_number(v) else None, "a number"),
    "str": (lambda v: v if isinstance(v, str) else None, "a string"),
    "split": (_split_value, 'three ratios, e.g. [0.7, 0.15, 0.15] or "70:15:15"'),
    "preprocess.denoise_params": (
        lambda v: dict(v) if isinstance(v, Mapping) else None,
        "a table of numbers, e.g. {diameter = 9}",
    ),
    "preprocess.fill": (_fill_value, "'border' or three integers 0..255"),
}


def _coerce(dotted: str, type_name: str, value: Any, source: str) -> Any:
    """Check one TOML/JSON value against the field's declared type (names it on error)."""
    convert, expected = _CHECKS.get(type_name) or _CHECKS[dotted]
    converted = convert(value)
    if converted is None:
        raise ConfigError(f"{source}: {dotted} must be {expected}, got {value!r}")
    return converted


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
    """Read a TOML config file into a plain tree (validated later, with the overrides)."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc


def resolve_config(
    toml_path: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> TrainConfig:
    """Defaults, then the TOML file, then dotted-key overrides (from the command line)."""
    tree: dict[str, Any] = load_config(toml_path) if toml_path is not None else {}
    source = str(toml_path) if toml_path is not None else "config"
    for dotted, value in (overrides or {}).items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: {part} must be a table")
            node = child
        merge = leaf == "denoise_params" and isinstance(node.get(leaf), Mapping)
        node[leaf] = {**node[leaf], **value} if merge else value
    return TrainConfig.from_dict(tree, source=source)


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


def _flag_params(flag: str, raw: Any) -> dict[str, float | int]:
    params: dict[str, float | int] = {}
    for item in raw:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}")
        try:
            params[name] = int(text) if text.lstrip("-").isdigit() else float(text)
        except ValueError:
            raise ConfigError(f"{flag} {name}: {text!r} is not a number") from None
    return params


def _flag_fill(flag: str, raw: Any) -> str | tuple[int, ...]:
    if raw == "border":
        return "border"
    parts = raw.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"{flag} expects 'border' or R,G,B, got {raw!r}")
    return tuple(int(p) for p in parts)


# declared type or dotted key -> converter of the flag's text
_FLAG_CONVERTERS: dict[str, Callable[[str, Any], Any]] = {
    "bool": lambda flag, raw: bool(raw),
    "int": _flag_number(int),
    "float": _flag_number(float),
    "split": lambda flag, raw: parse_split(raw),
    "preprocess.denoise_params": _flag_params,
    "preprocess.fill": _flag_fill,
}
