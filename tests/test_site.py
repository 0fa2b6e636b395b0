"""Site and sample metadata: the ``[site]``/``[sample]`` sections of edge.toml and the
``site``/``sample`` parts of an identification message (one set of constraints for both)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from helpers import MINIMAL_EDGE_CONFIG

from fieldscope.edge.config import ConfigFileError, SampleConfig, SiteConfig, load_config
from fieldscope.edge.errors import MessageError
from fieldscope.edge.message import Identification
from fieldscope.edge.site import DATUM, Sample, Site, site_part

WIRE = Path(__file__).parent / "data" / "wire"
SITE_TOML = """
[site]
name = "Etang de Thau, pontoon 3"
decimal_latitude = 43.4167
decimal_longitude = 3.6
coordinate_uncertainty_m = 30.0
depth_m = 1.5
country_code = "FR"
locality = "Bouzigues, north shore of the lagoon"

[sample]
id = "thau-2026-12-07-a"
volume_l = 2.5
operator = "A. Martin"
notes = "net 20 µm, surface tow"
"""


def load(tmp_path: Path, extra: str) -> Any:
    path = tmp_path / "edge.toml"
    path.write_text(MINIMAL_EDGE_CONFIG + extra, encoding="utf-8")
    return load_config(path, environ={})


def problems(tmp_path: Path, extra: str) -> list[str]:
    with pytest.raises(ConfigFileError) as info:
        load(tmp_path, extra)
    return [str(p) for p in info.value.problems]


def test_site_and_sample_default_to_nothing(tmp_path: Path) -> None:
    cfg = load(tmp_path, "")
    assert cfg.site == SiteConfig()
    assert cfg.sample == SampleConfig()
    assert site_part(cfg.site) is None


def test_a_full_site_and_sample_load_and_the_site_part_states_the_datum(tmp_path: Path) -> None:
    cfg = load(tmp_path, SITE_TOML)
    assert cfg.site.decimal_latitude == 43.4167
    assert cfg.site.country_code == "FR"
    assert cfg.sample == SampleConfig(
        id="thau-2026-12-07-a", volume_l=2.5, operator="A. Martin", notes="net 20 µm, surface tow"
    )
    part = site_part(cfg.site)
    assert part is not None
    assert part.geodetic_datum == DATUM == "WGS84"
    fixture = json.loads((WIRE / "identification-site-sample-v1.json").read_bytes())
    assert part.to_dict() == fixture["site"]


def test_a_site_without_coordinates_has_no_datum(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[site]\nlocality = "the lab sink"\nelevation_m = 40\n')
    part = site_part(cfg.site)
    assert part is not None
    assert part.to_dict() == {"locality": "the lab sink", "elevation_m": 40.0}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            "[site]\ndecimal_latitude = 43.4\n",
            "site.decimal_longitude: is needed too: latitude and longitude come together",
        ),
        (
            "[site]\ndecimal_longitude = 3.6\n",
            "site.decimal_latitude: is needed too",
        ),
        (
            '[sample]\noperator = "A. Martin"\n',
            "sample.id: is needed: the other keys describe the sample with this id",
        ),
        ('[sample]\nid = "a\\nb"\n', "sample.id: must be 1 to 100 printable characters"),
        ('[sample]\nid = "   "\n', "sample.id: must be 1 to 100 printable characters"),
        (f'[sample]\nid = "{"x" * 101}"\n', "sample.id: must be 1 to 100 printable"),
        ('[sample]\nid = "s"\nnotes = ""\n', "sample.notes: must not be empty or blank"),
    ],
)
def test_each_site_or_sample_mistake_is_one_line(tmp_path: Path, extra: str, expected: str) -> None:
    found = problems(tmp_path, extra)
    assert len(found) == 1, found
    assert expected in found[0], found[0]
    assert "\n" not in found[0]


def old_document() -> dict[str, Any]:
    """A payload written before site and sample existed."""
    document: dict[str, Any] = json.loads((WIRE / "identification-v1.json").read_bytes())
    return document


def message_with(**parts: Any) -> dict[str, Any]:
    document = old_document()
    document.update(parts)
    return document


def test_old_payloads_carry_no_site_nor_sample_and_stay_byte_identical() -> None:
    raw = (WIRE / "identification-v1.json").read_bytes()
    message = Identification.from_json(raw)
    assert (message.site, message.sample) == (None, None)
    assert json.loads(message.to_json()) == json.loads(raw)


def test_site_and_sample_round_trip_through_json() -> None:
    fixture = (WIRE / "identification-site-sample-v1.json").read_bytes()
    message = Identification.from_json(fixture)
    assert message.site is not None
    assert message.sample is not None
    assert message.sample.started_at == datetime(2026, 11, 23, 18, 0, tzinfo=UTC)
    assert message.sample.volume_l == 2.5
    assert Identification.from_json(message.to_json()) == message
    assert json.loads(message.to_json()) == json.loads(fixture)


@pytest.mark.parametrize(
    ("site", "sample", "expected"),
    [
        (
            {"decimal_latitude": 43.4, "decimal_longitude": 3.6},
            None,
            "site.geodetic_datum must be 'WGS84' with coordinates, absent without",
        ),
        ({"geodetic_datum": "WGS84"}, None, "site.geodetic_datum must be 'WGS84'"),
        (
            {"decimal_latitude": 43.4, "decimal_longitude": 3.6, "geodetic_datum": "NAD27"},
            None,
            "site.geodetic_datum",
        ),
        ({"elevation_m": 1.0, "depth_m": 2.0}, None, "site.depth_m must not come with elevation_m"),
        ({"country_code": "fr"}, None, "site.country_code"),
        ({"decimal_latitude": 95.0}, None, "site.decimal_latitude"),
        (None, {"volume_l": 2.0}, "sample.id"),
        (None, {"id": "s", "volume_l": -1.0}, "sample.volume_l"),
        (None, {"id": "s", "started_at": "2026-11-23T18:00:00+02:00"}, "sample.started_at"),
        (None, {"id": "s", "started_at": "2026-11-23"}, "sample.started_at must be a UTC"),
    ],
)
def test_a_bad_site_or_sample_part_is_refused_naming_the_field(
    site: dict[str, Any] | None, sample: dict[str, Any] | None, expected: str
) -> None:
    parts = {"site": site} if site is not None else {"sample": sample}
    with pytest.raises(MessageError) as info:
        Identification.from_dict(message_with(**parts))
    assert expected in str(info.value), str(info.value)


def test_parts_built_in_python_are_checked_too() -> None:
    with pytest.raises(MessageError, match=r"site\.decimal_longitude"):
        Site(decimal_latitude=43.4, geodetic_datum="WGS84")
    sample = Sample(id="s-1", volume_l=1.0)
    message = Identification.from_dict(message_with())
    stamped = msgspec.structs.replace(
        message, site=site_part(SiteConfig(locality="x")), sample=sample
    )
    assert Identification.from_json(stamped.to_json()) == stamped
    assert json.loads(stamped.to_json())["sample"] == {"id": "s-1", "volume_l": 1.0}
