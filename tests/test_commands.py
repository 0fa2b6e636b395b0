"""Inbound commands: a closed set of names, validated arguments, one clear error each."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldscope.edge.commands import (
    MAX_CAPTURE_COUNT,
    MAX_COMMAND_BYTES,
    Command,
    CommandError,
    CommandName,
    parse_command,
)
from fieldscope.edge.health import CommandReply
from fieldscope.edge.site import Sample
from fieldscope.edge.topics import Topics


@pytest.mark.parametrize("payload", [b"", b"  \n", b"{}"])
@pytest.mark.parametrize("name", [c.value for c in CommandName if c is not CommandName.RESEND])
def test_every_command_accepts_an_empty_payload_or_object(name: str, payload: bytes) -> None:
    command = parse_command(name, payload)
    assert command == Command(CommandName(name))


def test_request_id_is_echoed_and_capture_takes_a_count() -> None:
    command = parse_command("capture", b'{"request_id": "r-17", "count": 3}')
    assert command == Command(CommandName.CAPTURE, "r-17", 3)
    reply = command.reply({"captured": 3})
    assert (reply.ok, reply.command, reply.request_id, reply.error) == (
        True,
        "capture",
        "r-17",
        None,
    )
    assert CommandReply.from_json(reply.to_json()) == reply
    failed = parse_command("reload", b'{"request_id": "x"}').failed("bad bundle: checksum mismatch")
    assert (failed.ok, failed.command, failed.request_id) == (False, "reload", "x")


@pytest.mark.parametrize(
    ("name", "payload", "message"),
    [
        (
            "format",
            b"",
            "unknown command 'format' "
            "(known: capture, pause, resume, reload, status, resend, sample)",
        ),
        ("capture", b"[1, 2]", "payload must be empty or a JSON object, got a JSON list"),
        ("capture", b"null", "got a JSON null"),
        ("capture", b"{bad json", "it is not valid JSON"),
        ("capture", b"\xff\xfe", "payload is not UTF-8"),
        ("capture", b'{"count": NaN}', "not valid JSON"),
        (
            "capture",
            b'{"count": 0}',
            f"count must be an integer from 1 to {MAX_CAPTURE_COUNT}, got 0",
        ),
        ("capture", b'{"count": 2.5}', "count must be an integer"),
        ("capture", b'{"count": true}', "count must be an integer"),
        ("capture", b'{"count": 1, "count": 2}', "key 'count' appears twice"),
        (
            "pause",
            b'{"count": 2}',
            "command 'pause' does not take 'count' (it accepts: request_id)",
        ),
        ("reload", b'{"bundle": "/etc/shadow"}', "command 'reload' does not take 'bundle'"),
        ("status", b'{"request_id": ""}', "request_id must be a non-empty string"),
        ("status", b'{"request_id": 7}', "request_id must be a non-empty string, got 7"),
        ("status", b'{"request_id": "a\\nb"}', "must not contain control characters"),
        ("status", b"[" * 100 + b"]" * 100, "nests deeper than 32 levels"),
        ("sample", b'{"action": "stop"}', "action must be one of start, end, got 'stop'"),
        ("sample", b'{"action": "start"}', "action 'start' needs id"),
        ("sample", b'{"action": "end", "id": "s"}', "action 'end' takes no 'id'"),
        ("sample", b'{"id": "s"}', "takes 'id' only with action 'start'"),
        ("sample", b'{"action": "start", "id": ""}', "id must be 1 to 100 printable"),
        ("sample", b'{"action": "start", "id": "s", "volume_l": 0}', "volume_l must be"),
        ("sample", b'{"action": "start", "id": "s", "volume_l": "2"}', "must be a number"),
        ("sample", b'{"action": "start", "id": "s", "operator": null}', "operator must be"),
        ("sample", b'{"action": "start", "id": "s", "started_at": "x"}', "does not take"),
    ],
)
def test_bad_commands_get_one_specific_error(name: str, payload: bytes, message: str) -> None:
    with pytest.raises(CommandError) as info:
        parse_command(name, payload)
    assert message in str(info.value)
    reply = info.value.reply()
    assert reply.ok is False
    assert reply.error == str(info.value)


def test_an_oversized_payload_is_refused_unread() -> None:
    payload = b'{"request_id": "' + b"a" * MAX_COMMAND_BYTES + b'"}'
    with pytest.raises(CommandError, match=f"at most {MAX_COMMAND_BYTES} are accepted"):
        parse_command("status", payload)


def test_the_error_reply_echoes_the_request_id_when_it_could_be_read() -> None:
    with pytest.raises(CommandError) as info:
        parse_command("selfdestruct", b'{"request_id": "r-9"}')
    reply = info.value.reply()
    assert (reply.command, reply.request_id) == ("selfdestruct", "r-9")
    with pytest.raises(CommandError) as info:
        parse_command("capture", b'{"request_id": "r-10", "count": 1000}')
    assert info.value.reply().request_id == "r-10"


def test_an_unusable_name_still_gets_a_valid_reply() -> None:
    for name in ("", "\ud800", "x" * 300):
        with pytest.raises(CommandError) as info:
            parse_command(name, b"")
        assert info.value.reply().command == "(invalid)"
    with pytest.raises(CommandError, match="command name must be a string"):
        parse_command(None, b"")  # type: ignore[arg-type]
    with pytest.raises(CommandError, match="payload must be bytes"):
        parse_command("status", "{}")  # type: ignore[arg-type]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
names = (
    st.sampled_from([c.value for c in CommandName])
    | st.text(max_size=40)
    # Any code point, lone surrogates included: a topic level decoded by paho can hold them.
    | st.text(st.characters(exclude_categories=()), max_size=10)
)
objects = st.fixed_dictionaries(
    {},
    optional={
        "request_id": json_values,
        "count": json_values | st.integers(min_value=-5, max_value=200),
    },
).map(lambda d: json.dumps(d).encode())


@settings(max_examples=300, deadline=None)
@given(
    name=names,
    payload=st.binary(max_size=300) | objects | json_values.map(lambda v: json.dumps(v).encode()),
)
def test_fuzz_anything_received_is_a_command_or_a_command_error(name: str, payload: bytes) -> None:
    try:
        command = parse_command(name, payload)
    except CommandError as exc:
        reply = exc.reply()  # always answerable
        assert CommandReply.from_json(reply.to_json()) == reply
        return
    assert command.name.value == name
    assert 1 <= command.count <= MAX_CAPTURE_COUNT
    reply = command.reply()
    assert CommandReply.from_json(reply.to_json()) == reply


def test_replies_go_one_level_below_the_command() -> None:
    topics = Topics("fieldscope", "pond-3", "scope-a")
    assert topics.command_result("capture") == "fieldscope/pond-3/scope-a/command/capture/result"
    # The device's own filter (command/+) does not match its replies.
    assert topics.command_filter == "fieldscope/pond-3/scope-a/command/+"


def test_resend_takes_a_bounded_seq_range() -> None:
    """Issue 15 item 9: a collector that found a gap asks the station to publish again."""
    command = parse_command("resend", b'{"request_id": "g-1", "first": 10, "last": 39}')
    assert command == Command(CommandName.RESEND, "g-1", 1, 10, 39)
    for payload, says in (
        (b"", "first is required"),
        (b'{"first": 5}', "last is required"),
        (b'{"first": 9, "last": 3}', "must not be above last"),
        (b'{"first": -1, "last": 3}', "first must be an integer"),
        (b'{"first": 1, "last": ' + b"9" * 400 + b"}", "last must be an integer"),
        (b'{"first": 0, "last": 10000}', "at most 10000 seqs"),
        (b'{"first": 1.5, "last": 3}', "first must be an integer"),
        (b'{"first": 1, "last": 3, "all": true}', "does not take"),
    ):
        with pytest.raises(CommandError, match=says):
            parse_command("resend", payload)


def test_sample_starts_with_its_metadata_ends_or_reports() -> None:
    payload = (
        b'{"request_id": "q", "action": "start", "id": "thau-a", "volume_l": 2.5, '
        b'"operator": "A. Martin", "notes": "net 20 \\u00b5m"}'
    )
    command = parse_command("sample", payload)
    assert (command.action, command.request_id) == ("start", "q")
    assert command.sample == Sample(
        id="thau-a", volume_l=2.5, operator="A. Martin", notes="net 20 \u00b5m"
    )
    assert parse_command("sample", b'{"action": "end"}') == Command(
        CommandName.SAMPLE, action="end"
    )
    assert parse_command("sample", b"") == Command(CommandName.SAMPLE)
