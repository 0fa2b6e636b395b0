"""Where a station samples and which sample it is on: ``[site]``, ``[sample]`` and the
``site``/``sample`` parts of the identification message.

An identification is a scientific record only with its place and its sample: GBIF asks
for coordinates, their datum and uncertainty and a country; EcoTaxa for ``object_lat``
and ``object_lon``; a concentration (individuals per litre) needs the sampled volume.
A station is fixed, so its site is configuration (``[site]`` in edge.toml). The sample
changes while the station runs, so the ``sample`` command starts and ends one and the
daemon keeps it in ``sample.json`` in its data_dir (see :mod:`fieldscope.edge.sample_book`);
``[sample]`` is only the sample a station starts with when nothing is stored there.

Each constraint is declared once, as a type alias used by both the configuration
sections (read by :mod:`fieldscope.edge.typed`) and the message parts (checked by
:class:`~fieldscope.edge.wire.WireStruct`), so the file, the command and the message
accept the same values. Coordinates are decimal degrees on WGS84 (``geodetic_datum``
says so in every message that carries them, as Darwin Core's ``geodeticDatum``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, ClassVar, Final, Literal

import msgspec
from msgspec import Meta

from fieldscope.edge.errors import FieldscopeError, MessageError
from fieldscope.edge.typed import Problems
from fieldscope.edge.wire import TIMESTAMP_PATTERN, WireStruct

__all__ = [
    "DATUM",
    "Sample",
    "SampleConfig",
    "Site",
    "SiteConfig",
    "site_part",
]

# Coordinates are decimal degrees on this datum (Darwin Core's geodeticDatum).
DATUM: Final = "WGS84"
_BLANK = {"must": "not be empty or blank"}

Latitude = Annotated[float, Meta(ge=-90, le=90, extra={"unit": "decimal degrees"})]
Longitude = Annotated[float, Meta(ge=-180, le=180, extra={"unit": "decimal degrees"})]
Uncertainty = Annotated[float, Meta(gt=0, le=20_037_509, extra={"unit": "metres"})]
Elevation = Annotated[float, Meta(ge=-11_000, le=9_000, extra={"unit": "metres"})]
Depth = Annotated[float, Meta(ge=0, le=11_000, extra={"unit": "metres"})]
CountryCode = Annotated[
    str,
    Meta(
        pattern="^[A-Z]{2}$",
        extra={"case": "upper", "must": "be an ISO 3166-1 alpha-2 code such as 'FR'"},
    ),
]
Words = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"\S", extra=_BLANK)]
Notes = Annotated[str, Meta(min_length=1, max_length=1000, pattern=r"\S", extra=_BLANK)]
# A sample id becomes Darwin Core's eventID and EcoTaxa's sample_id: printable, one line.
SampleId = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=100,
        pattern=r"^[^\x00-\x1f\x7f-\x9f]*\S[^\x00-\x1f\x7f-\x9f]*$",
        extra={"must": "be 1 to 100 printable characters, not blank"},
    ),
]
Volume = Annotated[float, Meta(gt=0, le=1_000_000, extra={"unit": "litres"})]
UtcTime = Annotated[
    datetime, Meta(extra_json_schema={"format": "date-time", "pattern": TIMESTAMP_PATTERN})
]


def _doc(text: str) -> Meta:
    return Meta(description=text)


def _site_problems(site: SiteConfig | Site) -> Problems:
    """Latitude and longitude come together; a place is above or below the surface."""
    out: Problems = []
    lat, lon = site.decimal_latitude, site.decimal_longitude
    if (lat is None) != (lon is None):
        missing = "decimal_longitude" if lon is None else "decimal_latitude"
        out.append((missing, "is needed too: latitude and longitude come together"))
    if lat is None and lon is None and site.coordinate_uncertainty_m is not None:
        message = "needs decimal_latitude and decimal_longitude (it is their uncertainty)"
        out.append(("coordinate_uncertainty_m", message))
    if site.elevation_m is not None and site.depth_m is not None:
        message = "must not come with elevation_m: a place is below the water surface or above it"
        out.append(("depth_m", message))
    return out


# ── edge.toml ────────────────────────────────────────────────────────────────────────


class SiteConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[site]``: where the station is, every key optional.

    ``decimal_latitude``/``decimal_longitude`` are decimal degrees on WGS84, given
    together; ``coordinate_uncertainty_m`` the radius in metres they are good to;
    ``elevation_m`` (above sea level) or ``depth_m`` (below the water surface), not
    both; ``country_code`` ISO 3166-1 alpha-2 (``"FR"``); ``name`` and ``locality``
    words for people (``locality`` as Darwin Core means it).
    """

    name: Words | None = None
    decimal_latitude: Latitude | None = None
    decimal_longitude: Longitude | None = None
    coordinate_uncertainty_m: Uncertainty | None = None
    elevation_m: Elevation | None = None
    depth_m: Depth | None = None
    country_code: CountryCode | None = None
    locality: Words | None = None

    def problems(self) -> Problems:
        return _site_problems(self)


class SampleConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[sample]``: the sample a station starts on when its data_dir holds none (the
    ``sample`` command starts and ends samples after that). ``volume_l`` is the sampled
    volume in litres; ``operator`` who took it; ``notes`` free text. Without ``id`` no
    sample is current."""

    id: SampleId | None = None
    volume_l: Volume | None = None
    operator: Words | None = None
    notes: Notes | None = None

    def problems(self) -> Problems:
        if self.id is None and (self.volume_l, self.operator, self.notes) != (None,) * 3:
            return [("id", "is needed: the other keys describe the sample with this id")]
        return []


# ── the message parts ────────────────────────────────────────────────────────────────


class _Part(WireStruct, frozen=True):
    _error: ClassVar[type[FieldscopeError]] = MessageError
    _prefix: ClassVar[str] = "identification message: "


class Site(_Part, frozen=True, kw_only=True):
    """Where the station is (its ``[site]``); every member optional, omitted when unset."""

    _where: ClassVar[str] = "site"
    _omit_none: ClassVar[frozenset[str]] = frozenset(
        {
            "name",
            "decimal_latitude",
            "decimal_longitude",
            "geodetic_datum",
            "coordinate_uncertainty_m",
            "elevation_m",
            "depth_m",
            "country_code",
            "locality",
        }
    )

    name: Annotated[Words | None, _doc("The site's name.")] = None
    decimal_latitude: Annotated[Latitude | None, _doc("Decimal degrees north, WGS84.")] = None
    decimal_longitude: Annotated[Longitude | None, _doc("Decimal degrees east, WGS84.")] = None
    geodetic_datum: Annotated[
        Literal["WGS84"] | None, _doc("The coordinates' datum; present with them.")
    ] = None
    coordinate_uncertainty_m: Annotated[
        Uncertainty | None, _doc("Radius in metres the coordinates are good to.")
    ] = None
    elevation_m: Annotated[Elevation | None, _doc("Metres above sea level.")] = None
    depth_m: Annotated[Depth | None, _doc("Metres below the water surface.")] = None
    country_code: Annotated[CountryCode | None, _doc("ISO 3166-1 alpha-2, upper case.")] = None
    locality: Annotated[Words | None, _doc("The place in words (Darwin Core locality).")] = None

    def problems(self) -> list[tuple[str, str]]:
        out = _site_problems(self)
        has_coordinates = self.decimal_latitude is not None
        if has_coordinates != (self.geodetic_datum is not None):
            out.append(("geodetic_datum", f"must be {DATUM!r} with coordinates, absent without"))
        return out


class Sample(_Part, frozen=True, kw_only=True):
    """The sample the station was on: its id (Darwin Core eventID), when it started, the
    sampled volume in litres, who took it and notes; optional members omitted when unset."""

    _where: ClassVar[str] = "sample"
    _omit_none: ClassVar[frozenset[str]] = frozenset(
        {"started_at", "volume_l", "operator", "notes"}
    )

    id: Annotated[SampleId, _doc("The sample's id, unique in the campaign (eventID).")]
    started_at: Annotated[UtcTime | None, _doc("When the sample was started, UTC.")] = None
    volume_l: Annotated[Volume | None, _doc("The sampled volume, litres.")] = None
    operator: Annotated[Words | None, _doc("Who took the sample.")] = None
    notes: Annotated[Notes | None, _doc("Free notes about the sample.")] = None


def site_part(config: SiteConfig) -> Site | None:
    """The message part for ``[site]``; None when the section sets nothing."""
    values = msgspec.structs.asdict(config)
    if all(value is None for value in values.values()):
        return None
    has_coordinates = config.decimal_latitude is not None
    return Site(**values, geodetic_datum=DATUM if has_coordinates else None)
