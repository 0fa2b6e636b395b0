"""What every wire format shares: msgspec Structs that check themselves, JSON decoding
whose errors name the field, and the one way times are written.

The formats (identification, heartbeat, model info, command reply, bundle manifest) are
declared once, as ``msgspec.Struct`` classes with their constraints in
``Annotated[..., msgspec.Meta(...)]``. That one declaration decodes a received payload,
checks a value the daemon builds in Python (msgspec checks types only while decoding, so
:class:`WireStruct` does it on construction too), and generates the JSON Schemas third
parties use (``python -m fieldscope.edge.wire_schemas``). What a type cannot say (a UTC time,
an MQTT topic level, that ``label`` is ``top_k[0].label``) is each Struct's
``problems()``: ``(key, message)`` pairs, the protocol the config loader uses as well.

Errors read ``<what>: <field path> must be <rule>, got <value>`` so a station's log or a
collector's quarantine names the field and the value, never a library's wording.
"""

from __future__ import annotations

import functools
import json
import math
import re
import types
import typing
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import Enum
from typing import Annotated, Any, ClassVar, Self, TypeVar

import msgspec
from msgspec import inspect as mi

from fieldscope.edge.errors import FieldscopeError
from fieldscope.edge.topics import show
from fieldscope.edge.untrusted import MAX_PAYLOAD_BYTES, RejectedValueError, load_json

__all__ = [
    "TIMESTAMP_PATTERN",
    "Sha256",
    "WireStruct",
    "compact_json",
    "decode_json",
    "from_builtins",
    "utc_text",
    "version_problem",
]

_TIMESTAMP = re.compile(
    r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])T([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,6})?Z"
)
# The same rule for JSON Schema: anchored so it means the same in ECMA-262 and Python.
TIMESTAMP_PATTERN = "^" + _TIMESTAMP.pattern + r"(?![\s\S])"
_MISSING = object()
_AT = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
S = TypeVar("S", bound="WireStruct")
# A checksum, as the manifest lists files and the messages name models and images.
Sha256 = Annotated[
    str,
    msgspec.Meta(
        min_length=64,
        max_length=64,
        pattern="^[0-9a-f]{64}$",
        extra={"must": "be 64 lowercase hex digits (a SHA-256)"},
    ),
]


def utc_text(value: datetime) -> str:
    """A UTC time as every payload writes it: ``2026-11-23T18:39:00.123456Z``.

    Always six fraction digits (equal times give equal bytes) and four-digit years
    (``isoformat`` pads them, ``strftime("%Y")`` does not)."""
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


class WireStruct(msgspec.Struct, frozen=True):
    """Base of the wire Structs: a value is valid whether it was decoded or made in Python.

    Subclasses say how their errors read: ``_error`` (the exception type), ``_prefix``
    (which payload), ``_where`` (the part's path when made on its own, e.g.
    ``"candidate"``), ``_omit_none`` (optional fields: left out when None, refused as
    null, because "unknown" is an absent key on the wire) and ``_required`` (keys a
    received payload must have although Python gives them a default); ``problems()`` are
    reported after ``_problems_prefix`` when it is set.
    """

    _error: ClassVar[type[FieldscopeError]] = FieldscopeError
    _prefix: ClassVar[str] = ""
    _where: ClassVar[str] = ""
    _omit_none: ClassVar[frozenset[str]] = frozenset()
    _required: ClassVar[tuple[str, ...]] = ()
    _problems_prefix: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        _check_fields(self)
        problems = self.problems()
        if problems:
            text = "; ".join(f"{_join(self._where, key)} {message}" for key, message in problems)
            prefix = self._prefix if self._problems_prefix is None else self._problems_prefix
            raise self._error(prefix + text)

    def problems(self) -> list[tuple[str, str]]:
        """Rules across fields, as ``(key, message)``; empty when the value is consistent."""
        return []

    @classmethod
    def _precheck(cls, data: dict[str, Any]) -> None:
        """Checks a received payload needs before its fields are read (its version)."""

    @classmethod
    def _fail(cls, problem: str) -> FieldscopeError:
        return cls._error(cls._prefix + problem)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form: optional fields that are unknown are left out."""
        out: dict[str, Any] = _builtins(self)
        return out

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON with sorted keys: equal values give equal bytes."""
        return compact_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: object, path: str | None = None) -> Self:
        """Parse the decoded JSON form; errors name fields under ``path`` (default: where
        this part sits in its payload, e.g. ``timings_ms``)."""
        return from_builtins(cls, data, cls._where if path is None else path)

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        """Parse a received payload; any defect raises ``_error`` naming the field."""
        return decode_json(cls, data)


def compact_json(data: Any) -> bytes:
    """How payloads are written: compact UTF-8 JSON, sorted keys, no NaN."""
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _builtins(value: object) -> Any:
    if isinstance(value, WireStruct):
        return {
            name: _builtins(item)
            for name, _ in _fields(type(value))
            if not ((item := getattr(value, name)) is None and name in value._omit_none)
        }
    if isinstance(value, datetime):
        return utc_text(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [_builtins(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _builtins(item) for key, item in value.items()}
    return value


@functools.cache
def _fields(cls: type[msgspec.Struct]) -> tuple[tuple[str, Any], ...]:
    return tuple((f.name, f.type) for f in msgspec.structs.fields(cls))


def _join(base: str, key: str) -> str:
    if not base:
        return key.lstrip(".")
    return base + key if key.startswith(("[", ".")) or not key else f"{base}.{key}"


def _got(value: object) -> str:
    return "null" if value is None else f"{type(value).__name__} {show(value)}"


def _check_fields(obj: WireStruct) -> None:
    """Check a Struct made in Python against its declared types and constraints.

    Values become their canonical form (an int given for a float field a float, a list
    for a tuple field a tuple, an aware time UTC), so equal values compare and hash equal.
    """
    for name, annotation in _fields(type(obj)):
        value = getattr(obj, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise obj._fail(f"{_join(obj._where, name)} must be a finite number, got {show(value)}")
        try:
            converted = msgspec.convert(value, annotation)
        except msgspec.ValidationError as exc:
            raise obj._fail(_explain(exc, value, annotation, _join(obj._where, name))) from None
        if isinstance(converted, datetime):
            converted = _utc(obj, converted, _join(obj._where, name))
        for text in converted if isinstance(converted, tuple) else (converted,):
            if isinstance(text, str) and not text.isascii() and _has_surrogate(text):
                path = _join(obj._where, name)
                raise obj._fail(f"{path} must be valid Unicode (it has a lone surrogate)")
        if converted is not value:
            msgspec.structs.force_setattr(obj, name, converted)


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _utc(obj: WireStruct, value: datetime, path: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise obj._fail(
            f"{path} must be timezone-aware (naive times are ambiguous on a Pi), got "
            f"{value.isoformat()}; use datetime.now(timezone.utc)"
        )
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise obj._fail(f"{path} is out of range in UTC, got {value.isoformat()}") from None


def version_problem(value: object, supported: tuple[int, ...]) -> str | None:
    """Why a payload's ``version`` cannot be read, or None: a reader refuses versions it
    does not know (checked first, so a newer payload says so instead of failing on a
    field) and names the ones it reads."""
    names = ", ".join(str(v) for v in supported)
    if isinstance(value, bool) or not isinstance(value, int):
        return f"version must be an integer (supported: {names}), got {show(value)}"
    if value not in supported:
        return (
            f"version {value} is not supported by this reader (supported: {names}); "
            "upgrade fieldscope to read it"
        )
    return None


# --- decoding ------------------------------------------------------------------------------


def decode_json(cls: type[S], data: object, max_bytes: int = MAX_PAYLOAD_BYTES) -> S:
    """Decode a received payload into ``cls``; any defect raises ``cls._error``, never a
    library error (the JSON is read with the bounded reader of ``untrusted``)."""
    if not isinstance(data, bytes | bytearray | str):
        raise cls._fail(f"payload must be bytes or str, got {type(data).__name__}")
    try:
        decoded = load_json(data, max_bytes=max_bytes)
    except RejectedValueError as exc:
        raise cls._fail(f"payload {exc}") from None
    return from_builtins(cls, decoded)


def from_builtins(cls: type[S], data: object, where: str = "") -> S:
    """Convert decoded JSON into ``cls``; errors name the field path under ``where``."""
    if not isinstance(data, Mapping):
        raise cls._fail(f"{where or 'the payload'} must be an object, got {_got(data)}")
    data = dict(data)
    cls._precheck(data)
    _refuse_nulls(cls, data, where)
    _read_times(cls, cls, data, where)
    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError as exc:
        raise cls._fail(_explain(exc, data, cls, where)) from None
    except FieldscopeError as exc:
        if isinstance(exc, cls._error):
            raise
        # A shared part (a ModelRef in a heartbeat) speaks of its own payload: say which.
        raise cls._fail(str(exc).partition(": ")[2]) from None


def _read_times(
    cls: type[WireStruct], part: type[WireStruct], data: dict[str, Any], where: str
) -> None:
    """Read the times of ``part`` and of the parts below it (a sample's ``started_at``)
    with the one strict rule, in place: msgspec alone would take any UTC offset."""
    for name in _time_fields(part):
        if name in data:
            data[name] = _timestamp(cls, data[name], _join(where, name))
    for name, _, inner, many in _parts(part):
        value = data.get(name)
        if inner is None or many or not isinstance(value, Mapping):
            continue
        data[name] = dict(value)
        _read_times(cls, inner, data[name], _join(where, name))


def _timestamp(cls: type[WireStruct], value: object, path: str) -> datetime:
    if not isinstance(value, str) or not _TIMESTAMP.fullmatch(value):
        raise cls._fail(
            f"{path} must be a UTC time like 2026-11-23T18:39:00.123456Z "
            f"(at most 6 fraction digits, ending in Z), got {show(value)}"
        )
    try:
        return datetime.fromisoformat(value).astimezone(UTC)
    except ValueError as exc:
        raise cls._fail(f"{path} is not a valid date and time ({exc}), got {show(value)}") from None


def _refuse_nulls(cls: type[WireStruct], data: Mapping[str, Any], where: str) -> None:
    """Refuse ``null`` for optional fields, which the wire leaves out instead (msgspec
    would read null as None), and a missing ``_required`` key, here and in the parts below."""
    for key in cls._required:
        if key not in data:
            raise cls._fail(f"{_join(where, key)} is required")
    for name, annotation, part, many in _parts(cls):
        value = data.get(name, _MISSING)
        if value is None and name in cls._omit_none:
            noun = _noun(_bare(mi.type_info(annotation)))
            raise cls._fail(f"{_join(where, name)} must be {noun}, got null")
        if part is None:
            continue
        if isinstance(value, Mapping):
            _refuse_nulls(part, value, _join(where, name))
        elif many and isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, Mapping):
                    _refuse_nulls(part, item, f"{_join(where, name)}[{i}]")


@functools.cache
def _parts(cls: type[WireStruct]) -> tuple[tuple[str, Any, type[WireStruct] | None, bool], ...]:
    """Per field: its annotation, the WireStruct it holds (if any), whether a tuple of them."""
    return tuple(
        (
            name,
            annotation,
            _part_type(annotation),
            typing.get_origin(_unannotated(annotation)) is tuple,
        )
        for name, annotation in _fields(cls)
    )


@functools.cache
def _time_fields(cls: type[WireStruct]) -> tuple[str, ...]:
    return tuple(n for n, a in _fields(cls) if _is_time(a))


def _is_time(annotation: Any) -> bool:
    """``datetime``, however wrapped: ``Annotated[...]``, ``| None`` or both (not a
    tuple of times, which no wire format has)."""
    annotation = _unannotated(annotation)
    if annotation is datetime:
        return True
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return False
    return any(_is_time(arg) for arg in typing.get_args(annotation))


def _unannotated(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _part_type(annotation: Any) -> type[WireStruct] | None:
    """The WireStruct inside ``X``, ``X | None`` or ``tuple[X, ...]``, if any."""
    annotation = _unannotated(annotation)
    args = typing.get_args(annotation) if typing.get_origin(annotation) else ()
    for candidate in (annotation, *args):
        if isinstance(candidate, type) and issubclass(candidate, WireStruct):
            return candidate
    return None


# --- error texts ----------------------------------------------------------------------------


def _explain(exc: msgspec.ValidationError, data: object, root: Any, base: str) -> str:
    """msgspec's error as ``<path> must be <rule>, got <value>``, rules read from the type."""
    message, _, at = str(exc).partition(" - at `$")
    sub = at.rstrip("`")
    path = _join(base, sub) if sub else base
    value, info = _walk(data, mi.type_info(root), sub)
    if found := re.fullmatch(r"Object missing required field `(.+)`", message):
        return f"{_join(path, found[1])} is required"
    if found := re.fullmatch(r"Object contains unknown field `(.+)`", message):
        return f"{_join(path, found[1])} is not a known field"
    if message.startswith("Invalid enum") or isinstance(_bare(info), mi.EnumType):
        return f"{path} must be {_noun(info)}, got {show(value)}"
    if re.fullmatch(r"Expected `.+`, got `.+`", message):
        return f"{path} must be {_noun(info)}, got {_got(value)}"
    if message.startswith("Expected `"):
        return f"{path} {_rule(info, value)}"
    return f"{path}: {message}" if path else message


def _walk(data: object, info: mi.Type, sub: str) -> tuple[object, mi.Type]:
    """The value and the type at a msgspec path such as ``.top_k[2].score``; an optional
    field that the wire leaves out when unknown (``_omit_none``) loses its ``| None``."""
    for name, index in _AT.findall(sub):
        bare = _bare(info)
        if name:
            fields = {f.encode_name: f.type for f in getattr(bare, "fields", ())}
            info = fields.get(name, bare)
            owner = getattr(bare, "cls", None)
            if name in getattr(owner, "_omit_none", ()):
                info = _non_null(info)
            data = data.get(name, _MISSING) if isinstance(data, Mapping) else _MISSING
        else:
            if isinstance(bare, mi.TupleType) and int(index) < len(bare.item_types):
                info = bare.item_types[int(index)]  # a fixed tuple: each place its own type
            else:
                info = getattr(bare, "item_type", getattr(bare, "value_type", bare))
            ok = isinstance(data, list | tuple) and int(index) < len(data)
            data = data[int(index)] if ok else _MISSING  # type: ignore[index]
    return data, info


def _bare(info: mi.Type) -> mi.Type:
    """The type without its metadata and without ``| None``."""
    while isinstance(info, mi.Metadata):
        info = info.type
    if isinstance(info, mi.UnionType):
        rest = [t for t in info.types if not isinstance(t, mi.NoneType)]
        if len(rest) == 1:
            return _bare(rest[0])
    return info


def _non_null(info: mi.Type) -> mi.Type:
    """``X`` of ``X | None`` (metadata kept), else the type itself."""
    while isinstance(info, mi.Metadata) and isinstance(info.type, mi.UnionType):
        info = info.type
    if isinstance(info, mi.UnionType):
        rest = [t for t in info.types if not isinstance(t, mi.NoneType)]
        return rest[0] if len(rest) == 1 else info
    return info


def _extra(info: mi.Type) -> dict[str, Any]:
    """The ``Meta(extra=...)`` of a type, looking through ``| None``."""
    info = _non_null(info)
    return dict(info.extra or {}) if isinstance(info, mi.Metadata) else {}


_NOUNS: tuple[tuple[type, str], ...] = (
    (mi.BoolType, "true or false"),
    (mi.IntType, "an integer"),
    (mi.FloatType, "a number"),
    (mi.StrType, "a string"),
    (mi.NoneType, "null"),
    (mi.DateTimeType, "a UTC time"),
)
_PLURALS = {mi.IntType: "integers", mi.FloatType: "numbers", mi.StrType: "strings"}


def _noun(info: mi.Type) -> str:
    while isinstance(info, mi.Metadata):
        info = info.type
    if isinstance(info, mi.UnionType):
        return " or ".join(_noun(t) for t in info.types)
    if isinstance(info, mi.EnumType | mi.LiteralType):
        values = [m.value for m in info.cls] if isinstance(info, mi.EnumType) else info.values
        return "one of " + ", ".join(str(v) for v in values)
    for kind, noun in _NOUNS:
        if isinstance(info, kind):
            return noun
    if isinstance(info, mi.ListType | mi.VarTupleType | mi.TupleType):
        item = _bare(getattr(info, "item_type", mi.AnyType()))
        plural = _PLURALS.get(type(item))
        return f"a list of {plural}" if plural else "a list"
    return "an object"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _rule(info: mi.Type, value: object) -> str:
    extra = _extra(info)
    info = _bare(info)
    if isinstance(info, mi.IntType | mi.FloatType):
        return f"must be {_bounds(info)}, got {show(value)}"
    longest = getattr(info, "max_length", None)
    size = len(value) if isinstance(value, str | list | tuple | Mapping) else 0
    if isinstance(info, mi.StrType):
        if longest is not None and size > longest:
            return f"must be at most {longest} characters, got {size}"
        return f"must {extra.get('must', f'match {info.pattern!r}')}, got {show(value)}"
    fewest = getattr(info, "min_length", None) or 0
    if size < fewest:
        return f"must have at least {fewest} entries, got {size}"
    return f"must have at most {longest} entries, got {size}"


def _bounds(info: mi.IntType | mi.FloatType) -> str:
    low = info.ge if info.ge is not None else info.gt
    if low is not None and info.le is not None:
        return f"between {_number(low)} and {_number(info.le)}"
    if info.le is not None:
        return f"<= {_number(info.le)}"
    return f"{'>=' if info.ge is not None else '>'} {_number(low or 0)}"
