"""Typed configuration files: TOML text -> a tree of ``msgspec.Struct``, every problem at once.

A configuration mistake must be found when the file is loaded, and reported in full: one
line per problem that names the file, the line and the dotted key, so that a user fixes
everything in one round instead of one error per run::

    edge.toml:12: mqtt.prot: unknown key (did you mean 'port'?)

A section is declared once, as a frozen ``msgspec.Struct``: field names, types, defaults,
and constraints in ``Annotated[..., msgspec.Meta(...)]``. The :class:`Reader` walks the
TOML tree against those declarations: unknown keys get a did-you-mean (difflib), each
field is converted on its own with ``msgspec.convert`` (so one bad value does not hide
the others), paths are taken relative to the file's folder, and ``"${VAR}"`` secrets
come from the environment. Cross-field checks stay in each Struct's
``problems() -> list[(key, message)]`` and are collected by :func:`problems_of`.

``Meta.extra`` keys this module understands (all optional):

* ``unit`` / ``what``: words for range messages (``must be a fraction in [0, 1]``);
* ``expected``: the type in words where the generated one would not say it well;
* ``item``: the same for each value of a table (``Mapping``) field;
* ``parse``: ``f(raw, reader)`` run before conversion; a ``ValueError`` is the message;
* ``case``: ``"upper"`` or ``"lower"``, applied to a string before it is checked;
* ``env``: a string ``"${VAR}"`` is replaced by the environment variable's value.

TensorFlow-free and import-light: the edge daemon and ``fieldscope.train`` both use it.
"""

from __future__ import annotations

import difflib
import enum
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from fieldscope.edge.tomlfile import (
    ConfigFileError,
    ConfigProblem,
    ProblemsError,
    key_lines,
    line_of,
    read_toml,
)
from fieldscope.edge.topics import show
from fieldscope.edge.untrusted import RejectedValueError, read_number

__all__ = [
    "ConfigFileError",
    "ConfigProblem",
    "FieldSpec",
    "Problems",
    "ProblemsError",
    "Reader",
    "constraint_problems",
    "field_spec",
    "key_lines",
    "kind",
    "line_of",
    "one_of",
    "problems_of",
    "read_toml",
    "seconds",
]

Problems = list[tuple[str, str]]  # (dotted key relative to the section, message)

_MISSING: Any = msgspec.NODEFAULT
_ENV_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


# ── types and constraints in words ────────────────────────────────────────────────────

_TOML_KINDS: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"),  # before int: a bool is an int to Python
    (int, "an integer"),
    (float, "a float"),
    (str, "a string"),
    (list, "an array"),
    (dict, "a table"),
)


def kind(value: object) -> str:
    """A value's TOML type in words, for "must be X, got Y" messages."""
    return next(
        (word for cls, word in _TOML_KINDS if isinstance(value, cls)),
        f"a {type(value).__name__}",
    )


def _shown(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else show(value)


def one_of(key: str, value: str, choices: Sequence[str]) -> Problems:
    """``[(key, "must be one of ...")]`` with a did-you-mean, or ``[]`` when it is one."""
    if value in choices:
        return []
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return [(key, f"must be one of {', '.join(choices)}, got {show(value)}{hint}")]


def seconds(low: float, high: float, unit: str = "seconds") -> msgspec.Meta:
    """The bounds of a duration or a rate, with the words its range message uses."""
    return msgspec.Meta(ge=low, le=high, extra={"unit": unit})


class FieldSpec(msgspec.Struct, frozen=True):
    """A field's declared type taken apart: the bare type, its Meta, whether None is allowed."""

    bare: Any
    meta: msgspec.Meta | None
    optional: bool

    @property
    def extra(self) -> Mapping[str, Any]:
        return (self.meta.extra or {}) if self.meta is not None else {}


def _unwrap(annotation: Any) -> tuple[Any, msgspec.Meta | None]:
    if typing.get_origin(annotation) is not Annotated:
        return annotation, None
    annotation, *extras = typing.get_args(annotation)
    return annotation, next((m for m in extras if isinstance(m, msgspec.Meta)), None)


def field_spec(annotation: Any) -> FieldSpec:
    """``Annotated[X | None, Meta]`` and ``Annotated[X, Meta] | None`` alike."""
    annotation, meta = _unwrap(annotation)
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        if len(rest) == 1:
            bare, inner = _unwrap(rest[0])
            return FieldSpec(bare, meta or inner, True)
        return FieldSpec(typing.Union[rest], meta, True)  # noqa: UP007
    return FieldSpec(annotation, meta, False)


def _choices(bare: Any) -> tuple[str, ...] | None:
    """The allowed strings of a ``Literal`` or a string ``Enum``; None for other types."""
    if typing.get_origin(bare) is Literal:
        return typing.get_args(bare)
    if isinstance(bare, type) and issubclass(bare, enum.Enum):
        return tuple(str(m.value) for m in bare)
    return None


def _struct_type(bare: Any) -> type[msgspec.Struct] | None:
    return bare if isinstance(bare, type) and issubclass(bare, msgspec.Struct) else None


def _is_mapping(bare: Any) -> bool:
    return typing.get_origin(bare) in (dict, Mapping) or bare in (dict, Mapping)


_WORDS: Mapping[Any, str] = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    Path: "a non-empty path string",
}


def _expected(bare: Any) -> str:
    """A declared type in words: ``int`` -> "an integer", ``tuple[str, ...]`` -> ..."""
    origin, args = typing.get_origin(bare), typing.get_args(bare)
    if bare in _WORDS or _choices(bare) is not None:
        return _WORDS.get(bare, "a string")
    if origin in (typing.Union, types.UnionType):
        numbers = set(args) <= {int, float}
        return "a number" if numbers else " or ".join(_expected(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"an array of {_expected(args[0]).removeprefix('a ').removeprefix('an ')}s"
        return f"an array of {len(args)} values"
    return "a table" if _is_mapping(bare) else f"a {getattr(bare, '__name__', bare)}"


def _convertible(bare: Any) -> Any:
    """The type msgspec converts to: a Literal or an Enum is checked as a constraint."""
    if _choices(bare) is not None:
        return str
    return bare


def _range_text(meta: msgspec.Meta, is_int: bool) -> str:
    low = meta.ge if meta.ge is not None else meta.gt
    high = meta.le if meta.le is not None else meta.lt
    if low is not None and high is not None:
        if is_int and meta.gt is None and meta.lt is None:
            return f"in {low}..{high}"
        opening, closing = "[" if meta.gt is None else "(", "]" if meta.lt is None else ")"
        return f"in {opening}{low:g}, {high:g}{closing}"
    if low is not None:
        return f"{'>=' if meta.gt is None else '>'} {low:g}"
    return f"{'<=' if meta.lt is None else '<'} {high:g}"


def _text_problem(value: str, meta: msgspec.Meta, extra: Mapping[str, Any]) -> str | None:
    """Why a string breaks its declared length or pattern (``extra["must"]`` words the
    rule where a regular expression would not), or None."""
    too_short = meta.min_length is not None and len(value) < meta.min_length
    too_long = meta.max_length is not None and len(value) > meta.max_length
    mismatch = meta.pattern is not None and re.search(meta.pattern, value) is None
    if not (too_short or too_long or mismatch):
        return None
    if "must" in extra:
        return f"must {extra['must']}, got {show(value)}"
    if too_short:
        return f"must be at least {meta.min_length} characters, got {show(value)}"
    if too_long:
        return f"must be at most {meta.max_length} characters, got {len(value)}"
    return f"must match {meta.pattern}, got {show(value)}"


def _constraint_problem(value: Any, spec: FieldSpec) -> str | None:
    """Why ``value`` breaks the declared Literal or Meta bounds, or None."""
    choices = _choices(spec.bare)
    if choices is not None:
        found = one_of("", value.value if isinstance(value, enum.Enum) else value, choices)
        return found[0][1] if found else None
    meta = spec.meta
    if meta is not None and isinstance(value, str):
        return _text_problem(value, meta, spec.extra)
    if meta is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    ok = (
        (meta.ge is None or value >= meta.ge)
        and (meta.gt is None or value > meta.gt)
        and (meta.le is None or value <= meta.le)
        and (meta.lt is None or value < meta.lt)
    )
    if ok:
        return None
    extra = spec.extra
    what = f"{extra['what']} " if "what" in extra else ""
    unit = f" {extra['unit']}" if "unit" in extra else ""
    text = _range_text(meta, spec.bare is int)
    return f"must be {what}{text}{unit}, got {value}"


def constraint_problems(struct: msgspec.Struct) -> Problems:
    """Every declared constraint (Meta bounds, Literal choices) that a field breaks.

    msgspec checks these only when it decodes; a Struct built in code (tests, the
    demo) is checked here with the same declarations and the same messages.
    """
    out: Problems = []
    for f in msgspec.structs.fields(struct):
        value = getattr(struct, f.name)
        if value is None:
            continue
        problem = _constraint_problem(value, field_spec(f.type))
        if problem is not None:
            out.append((f.encode_name, problem))
    return out


def problems_of(struct: msgspec.Struct) -> Problems:
    """Every problem of a Struct tree: constraints, then each ``problems()``, keys dotted."""
    out = constraint_problems(struct)
    own = getattr(struct, "problems", None)
    if callable(own):
        out.extend(own())
    for f in msgspec.structs.fields(struct):
        value = getattr(struct, f.name)
        if isinstance(value, msgspec.Struct):
            out.extend(
                (f"{f.encode_name}.{k}" if k else f.encode_name, m) for k, m in problems_of(value)
            )
    return out


# ── reading a TOML tree ───────────────────────────────────────────────────────────────


class _Table(msgspec.Struct):
    dotted: str
    data: Mapping[str, Any]
    known: list[str]


class Reader:
    """Reads one document into Structs, collecting every problem instead of stopping.

    ``derived`` gives defaults that depend on other values (``outbox.path`` inside
    ``device.data_dir``): dotted key -> ``f(reader)``, evaluated after the section's
    other keys. ``forbidden`` names keys people may expect but cannot set, with why.
    ``values`` holds each value read, by dotted key, for the derived defaults.
    """

    def __init__(
        self,
        base_dir: Path,
        environ: Mapping[str, str],
        *,
        derived: Mapping[str, Callable[[Reader], Any]] | None = None,
        forbidden: Mapping[str, str] | None = None,
    ) -> None:
        self.base_dir = base_dir
        self.environ = environ
        self.derived = derived or {}
        self.forbidden = forbidden or {}
        self.problems: Problems = []
        self.values: dict[str, Any] = {}
        self.env_names: dict[str, str] = {}
        self._tables: list[_Table] = []

    def problem(self, key: str, message: str) -> None:
        """Record one problem at a dotted key."""
        self.problems.append((key, message))

    def resolve(self, value: str) -> Path:
        """``~`` expanded; a relative path is taken from the config file's folder.

        Never resolved through symlinks: ``model.bundle`` is usually a ``current``
        link that a deployment re-points, and the daemon must keep following it.
        """
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def env(self, key: str, variable: str) -> str | None:
        """The environment variable's value; a missing or empty one is a problem at ``key``."""
        found = self.environ.get(variable)
        if found is None:
            self.problem(
                key,
                f"environment variable {variable} is not set "
                "(set it in the service's EnvironmentFile=, or export it)",
            )
        elif not found:
            self.problem(key, f"environment variable {variable} is empty")
        else:
            self.env_names[key] = variable
            return found
        return None

    def read(
        self, cls: type[Any], data: Mapping[str, Any], dotted: str = "", *, present: bool = True
    ) -> Any:
        """``data`` as a ``cls``; a bad value is recorded and its default used instead."""
        table = _Table(dotted, data, [])
        self._tables.append(table)
        kwargs: dict[str, Any] = {}
        fields = msgspec.structs.fields(cls)
        for f in sorted(fields, key=lambda f: _join(dotted, f.encode_name) in self.derived):
            if field_spec(f.type).extra.get("internal"):  # not a key of the file
                kwargs[f.name] = f.default
                continue
            table.known.append(f.encode_name)
            key = _join(dotted, f.encode_name)
            kwargs[f.name] = self._field(f, data.get(f.encode_name, _MISSING), key, present)
            self.values[key] = kwargs[f.name]
        for key, message in self.forbidden.items():
            parent, _, name = key.rpartition(".")
            if parent == dotted:
                table.known.append(name)
                if name in data:
                    self.problem(key, message)
        return self._build(cls, kwargs, dotted)

    def _build(self, cls: type[Any], kwargs: dict[str, Any], dotted: str) -> Any:
        try:
            return cls(**kwargs)
        except ProblemsError as exc:
            self.problems.extend((_join(dotted, k), m) for k, m in exc.problems)
            return None

    def _field(self, f: msgspec.structs.FieldInfo, raw: Any, key: str, present: bool) -> Any:
        spec = field_spec(f.type)
        struct = _struct_type(spec.bare)
        if raw is _MISSING:
            return self._absent(f, spec, key, present)
        if struct is not None:
            if isinstance(raw, dict):
                return self.read(struct, raw, key)
            self.problem(key, f"must be a table ([{key}]), got {kind(raw)} {_shown(raw)}")
            return self._fallback(f, spec, key)
        value = self.convert(key, spec, raw)
        return self._fallback(f, spec, key) if value is _MISSING else value

    def _absent(
        self, f: msgspec.structs.FieldInfo, spec: FieldSpec, key: str, present: bool
    ) -> Any:
        struct = _struct_type(spec.bare)
        what = spec.meta.description if spec.meta is not None else None
        if key in self.derived:
            return self.derived[key](self)
        if struct is not None and not spec.optional:
            if f.required and present and what:
                self.problem(key, f"section [{key}] is missing ({what})")
            # Read as empty, so its keys count as known for the did-you-mean hints.
            return self.read(struct, {}, key, present=False)
        if f.required and present:
            self.problem(key, f"required ({what})")
        return self._fallback(f, spec, key)

    def _fallback(self, f: msgspec.structs.FieldInfo, spec: FieldSpec, key: str) -> Any:
        """The default in place of a bad or missing value, so that reading goes on."""
        if f.default is not _MISSING:
            return f.default
        if f.default_factory is not _MISSING:
            return f.default_factory()
        if key in self.derived:
            return self.derived[key](self)
        placeholders = {str: "", Path: self.base_dir, int: 0, float: 0.0}
        return None if spec.optional else placeholders.get(spec.bare)

    def convert(self, key: str, spec: FieldSpec, raw: Any) -> Any:
        """One value checked against its declared type and constraints; ``_MISSING`` if bad."""
        extra = spec.extra
        if "parse" in extra:
            try:
                raw = extra["parse"](raw, self)
            except ValueError as exc:
                self.problem(key, str(exc))
                return _MISSING
        if _is_mapping(spec.bare) and typing.get_args(spec.bare):
            return self._mapping(key, spec, raw)
        value = self._typed(key, spec, raw, extra.get("expected"))
        if value is _MISSING:
            return value
        if isinstance(value, str) and "case" in extra:
            value = value.upper() if extra["case"] == "upper" else value.lower()
        if isinstance(value, str) and extra.get("env"):
            match = _ENV_REFERENCE.match(value)
            value = value if match is None else self.env(key, match.group(1))
            if value is None:
                return _MISSING
        problem = _constraint_problem(value, spec)
        if problem is not None:
            self.problem(key, problem)
            return _MISSING
        is_enum = isinstance(spec.bare, type) and issubclass(spec.bare, enum.Enum)
        return spec.bare(value) if is_enum else value

    def _typed(self, key: str, spec: FieldSpec, raw: Any, expected: str | None) -> Any:
        bare = _convertible(spec.bare)
        if bare is float and not isinstance(raw, bool) and isinstance(raw, int | float):
            try:  # the shared bounded reader: a 400-digit integer is a problem, not OverflowError
                return read_number(raw)
            except RejectedValueError:
                self.problem(key, f"must be a finite number, got {kind(raw)} {_shown(raw)}")
                return _MISSING
        if not _finite_numbers(raw):
            self.problem(
                key, f"must be {expected or _expected(spec.bare)}, got {kind(raw)} {_shown(raw)}"
            )
            return _MISSING
        try:
            return msgspec.convert(raw, bare, dec_hook=self._hook)
        except (msgspec.ValidationError, ValueError, TypeError):
            self.problem(
                key, f"must be {expected or _expected(spec.bare)}, got {kind(raw)} {_shown(raw)}"
            )
            return _MISSING

    def _mapping(self, key: str, spec: FieldSpec, raw: Any) -> Any:
        if not isinstance(raw, dict):
            self.problem(key, f"must be a table, got {kind(raw)} {_shown(raw)}")
            return _MISSING
        item = FieldSpec(typing.get_args(spec.bare)[1], None, False)
        out = {}
        for name, value in raw.items():
            converted = self._typed(f"{key}.{name}", item, value, spec.extra.get("item"))
            if converted is not _MISSING:
                out[name] = converted
        return out

    def _hook(self, cls: type, value: Any) -> Any:
        if cls is Path:
            if not isinstance(value, str) or not value:
                raise ValueError("not a path")
            return self.resolve(value)
        raise NotImplementedError(cls)

    def unknown_keys(self) -> Problems:
        """Keys no declaration names, each with a suggestion where one is likely."""
        elsewhere: dict[str, list[str]] = {}
        for table in self._tables:
            for name in table.known:
                elsewhere.setdefault(name, []).append(_join(table.dotted, name))
        out: Problems = []
        for table in self._tables:
            for name, value in table.data.items():
                if name not in table.known:
                    what = "unknown section" if isinstance(value, dict) else "unknown key"
                    out.append((_join(table.dotted, name), what + _hint(name, table, elsewhere)))
        return out

    def located(
        self,
        root: Any,
        text: str | None,
        source: str | None,
        checks: Callable[[Any], Problems] | None = None,
    ) -> list[ConfigProblem]:
        """Every problem, positioned and in file order: type problems and unknown keys
        first-hand, then the Struct checks (``checks``, default :func:`problems_of`) for
        keys not already reported (a bad value was replaced by its default)."""
        problems = self.problems + self.unknown_keys()
        reported = {key for key, _ in problems}
        if root is not None:
            problems += [
                (key, message)
                for key, message in (checks or problems_of)(root)
                if not any(key == r or key.startswith(r + ".") for r in reported)
            ]
        lines = key_lines(text) if text is not None else {}
        found = [ConfigProblem(k, m, source, line_of(k, lines)) for k, m in problems]
        return sorted(found, key=lambda p: math.inf if p.line is None else p.line)


def _join(dotted: str, name: str) -> str:
    return f"{dotted}.{name}" if dotted else name


def _finite_numbers(value: Any) -> bool:
    """False for a nan, an inf or an integer too big for a float, anywhere in ``value``."""
    if isinstance(value, list):
        return all(_finite_numbers(v) for v in value)
    if isinstance(value, float | int) and not isinstance(value, bool):
        try:
            read_number(value)
        except RejectedValueError:
            return False
    return True


def _hint(name: str, table: _Table, elsewhere: Mapping[str, list[str]]) -> str:
    close = difflib.get_close_matches(name, table.known, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    # Where else the name is a key: anywhere for a top-level stray, else within the
    # same section (a key put one table too high or too low).
    section = table.dotted.split(".", 1)[0]
    near = [k for k in elsewhere.get(name, []) if not table.dotted or k.split(".", 1)[0] == section]
    if near:
        return f" (did you mean {' or '.join(near[:3])}?)"
    if table.known:
        return f" (known here: {', '.join(sorted(set(table.known)))})"
    return ""
