"""The current sample: kept in data_dir/sample.json across restarts, changed by the
``sample`` command, stamped with the site on every identification."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from fieldscope.edge.commands import parse_command
from fieldscope.edge.message import Identification
from fieldscope.edge.sample_book import SAMPLE_FILE, SampleBook, sample_command, stamper
from fieldscope.edge.site import Sample, SampleConfig, SiteConfig, site_part

WIRE = Path(__file__).parent / "data" / "wire"
CONFIGURED = SampleConfig(id="from-config", volume_l=1.0)


def book(tmp_path: Path, initial: SampleConfig | None = CONFIGURED) -> SampleBook:
    return SampleBook(tmp_path / "data" / SAMPLE_FILE, initial)


def run(samples: SampleBook, payload: bytes) -> tuple[bool, dict[str, object] | None, str | None]:
    reply = sample_command(parse_command("sample", payload), samples)
    return reply.ok, None if reply.data is None else dict(reply.data), reply.error


def test_a_new_station_starts_on_the_configured_sample_or_none(tmp_path: Path) -> None:
    assert book(tmp_path).current() == Sample(id="from-config", volume_l=1.0)
    assert book(tmp_path / "other", SampleConfig()).current() is None
    assert book(tmp_path / "third", None).current() is None
    assert not (tmp_path / "data" / SAMPLE_FILE).exists()  # reading writes nothing


def test_a_started_sample_outlives_a_restart_and_an_ended_one_stays_ended(
    tmp_path: Path,
) -> None:
    samples = book(tmp_path)
    previous = samples.start(Sample(id="thau-a", operator="A. Martin"))
    assert previous == Sample(id="from-config", volume_l=1.0)
    current = samples.current()
    assert current is not None
    assert current.started_at is not None
    stored = json.loads((tmp_path / "data" / SAMPLE_FILE).read_bytes())
    assert stored["sample"]["id"] == "thau-a"
    assert book(tmp_path).current() == current  # not the configured one
    assert samples.end() == current
    assert json.loads((tmp_path / "data" / SAMPLE_FILE).read_bytes()) == {"sample": None}
    assert book(tmp_path).current() is None  # ended: [sample] does not come back


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'{"sample": {"volume_l": 2}}',
        b'{"sample": null, "x": 1}',
        b"[" * 100_000,  # deeper than the JSON parser's stack
    ],
)
def test_an_unreadable_file_is_set_aside_and_the_station_goes_on(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "data" / SAMPLE_FILE
    path.parent.mkdir()
    path.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="fieldscope.edge.sample"):
        samples = book(tmp_path)
    assert samples.current() == Sample(id="from-config", volume_l=1.0)
    assert not path.exists()
    assert path.with_name(SAMPLE_FILE + ".bad").read_bytes() == content
    assert "cannot read the current sample" in caplog.text


def test_the_command_reports_starts_refuses_a_repeat_and_ends(tmp_path: Path) -> None:
    samples = book(tmp_path, None)
    assert run(samples, b"") == (True, {"sample": None}, None)
    ok, data, _ = run(samples, b'{"action": "start", "id": "thau-a", "volume_l": 2.5}')
    assert ok
    assert data is not None
    assert data["ended"] is None
    assert data["sample"]["id"] == "thau-a"  # type: ignore[index]
    assert data["sample"]["volume_l"] == 2.5  # type: ignore[index]
    ok, _, error = run(samples, b'{"action": "start", "id": "thau-a"}')
    assert not ok
    assert "sample 'thau-a' is already running (since " in (error or "")
    ok, data, _ = run(samples, b'{"action": "start", "id": "thau-b"}')
    assert ok
    assert data is not None
    assert data["ended"]["id"] == "thau-a"  # type: ignore[index]
    ok, data, _ = run(samples, b'{"action": "end"}')
    assert ok
    assert data is not None
    assert (data["sample"], data["ended"]["id"]) == (None, "thau-b")  # type: ignore[index]
    assert run(samples, b'{"action": "end"}') == (
        False,
        None,
        "no sample is running, so there is none to end",
    )


def test_a_sample_that_cannot_be_stored_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    samples = book(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / SAMPLE_FILE).mkdir()  # a directory where the file goes
    samples.path = tmp_path / "data" / SAMPLE_FILE / "sub" / SAMPLE_FILE
    (tmp_path / "data" / SAMPLE_FILE / "sub").write_text("a file where a folder goes")
    ok, _, error = run(samples, b'{"action": "start", "id": "thau-a"}')
    assert not ok
    assert "cannot store the sample in" in (error or "")
    assert "the current sample is unchanged" in (error or "")
    assert samples.current() == Sample(id="from-config", volume_l=1.0)


def test_the_stamp_adds_the_site_and_the_sample_current_when_stored(tmp_path: Path) -> None:
    raw = (WIRE / "identification-v1.json").read_bytes()
    message = Identification.from_json(raw)

    def plain(seq: int) -> bytes:  # a message builder, as the pipeline hands the outbox
        data = message.to_dict()
        data["seq"] = seq
        return Identification.from_dict(data).to_json()

    nothing = stamper(None, book(tmp_path, None))
    assert nothing(plain) is plain  # a station without site and sample: unchanged bytes
    samples = book(tmp_path / "b", None)
    site = site_part(SiteConfig(decimal_latitude=43.4, decimal_longitude=3.6, depth_m=1.5))
    stamp = stamper(site, samples)
    samples.start(Sample(id="thau-a"))
    stamped = stamp(plain)
    samples.end()  # ended after the message was committed: it keeps its sample
    out = Identification.from_json(stamped(7))
    assert out.seq == 7
    assert out.site == site
    assert out.sample is not None
    assert out.sample.id == "thau-a"
    assert out.label == message.label
    after = Identification.from_json(stamp(plain)(8))
    assert (after.site, after.sample) == (site, None)
