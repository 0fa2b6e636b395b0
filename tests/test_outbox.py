"""The durable outbox: seq allocation, order, acks, caps, full disks, restarts, threads."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fieldscope.edge.outbox import FIRST_SEQ, Outbox, OutboxError, OutboxFullError, WhenFull

TOPIC = "fieldscope/pond-3/scope-a/identification"


def message(seq: int) -> bytes:
    """A payload that carries its seq, like an identification does."""
    return json.dumps({"seq": seq}).encode()


def add(outbox: Outbox, n: int, size: int = 0) -> list[int]:
    return [outbox.add(TOPIC, lambda s: message(s) + b" " * size).seq for _ in range(n)]


def test_seq_is_allocated_with_the_payload_and_pending_is_oldest_first(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as outbox:
        entries = [outbox.add(TOPIC, message) for _ in range(5)]
        assert [e.seq for e in entries] == list(range(FIRST_SEQ, FIRST_SEQ + 5))
        pending = outbox.pending(10)
        assert [e.seq for e in pending] == [e.seq for e in entries]
        # The payload was built for exactly the seq it is stored under.
        assert all(json.loads(e.payload)["seq"] == e.seq for e in pending)
        assert all(e.topic == TOPIC and e.qos == 1 for e in pending)
        assert [e.seq for e in outbox.pending(2)] == [1, 2]
        assert [e.seq for e in outbox.pending(10, after=3)] == [4, 5]
        assert outbox.depth() == 5


def test_ack_deletes_and_a_repeated_ack_is_harmless(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as outbox:
        add(outbox, 4)
        assert outbox.ack(2) is True
        assert outbox.ack(2) is False  # a duplicate PUBACK
        assert outbox.ack_many([1, 3, 99]) == 2
        assert [e.seq for e in outbox.pending(10)] == [4]
        assert outbox.depth() == 1


def test_seq_survives_restarts_and_is_never_reused_after_everything_was_acked(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as outbox:
        add(outbox, 3)
        outbox.ack_many([1, 2, 3])
        assert outbox.depth() == 0
    with Outbox(path) as outbox:
        assert outbox.next_seq == 4
        assert add(outbox, 2) == [4, 5]
        assert [e.seq for e in outbox.pending(10)] == [4, 5]


def test_a_failing_payload_factory_stores_nothing_and_uses_up_no_seq(tmp_path: Path) -> None:
    def broken(seq: int) -> bytes:
        raise ValueError(f"cannot build {seq}")

    with Outbox(tmp_path / "outbox.db") as outbox:
        add(outbox, 1)
        with pytest.raises(ValueError, match="cannot build 2"):
            outbox.add(TOPIC, broken)
        assert outbox.depth() == 1
        assert add(outbox, 1) == [2]


def test_drop_oldest_keeps_the_newest_and_counts_losses_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path, max_messages=3) as outbox:
        add(outbox, 5)
        assert [e.seq for e in outbox.pending(10)] == [3, 4, 5]
        assert outbox.depth() == 3
        assert outbox.dropped() == 2
    with Outbox(path, max_messages=3) as outbox:
        stats = outbox.stats()
        assert (stats.depth, stats.dropped, stats.next_seq) == (3, 2, 6)
        assert stats.when_full is WhenFull.DROP_OLDEST


def test_reject_new_refuses_keeps_the_backlog_and_leaves_a_seq_gap(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", max_messages=2, when_full="reject-new") as outbox:
        add(outbox, 2)
        with pytest.raises(OutboxFullError, match=r"full \(2 of 2 messages, policy reject-new\)"):
            outbox.add(TOPIC, message)
        assert [e.seq for e in outbox.pending(10)] == [1, 2]
        assert outbox.dropped() == 1
        outbox.ack(1)
        # Seq 3 was used up by the refused message: subscribers see the loss as a gap.
        assert add(outbox, 1) == [4]


def test_a_full_disk_raises_outbox_error_and_the_outbox_recovers(tmp_path: Path) -> None:
    # max_bytes sets SQLite's max_page_count: the same SQLITE_FULL as a full SD card.
    with Outbox(tmp_path / "outbox.db", when_full="reject-new", max_bytes=64 * 1024) as outbox:
        stored, error = fill_until_error(outbox, size=2000)
        assert not isinstance(error, OutboxFullError)  # the disk, not the count cap
        assert "full" in str(error)
        assert "free space" in str(error)
        assert 0 < stored < 200
        assert outbox.depth() == stored
        assert outbox.dropped() == 1  # the message that did not fit is counted
        outbox.ack_many(e.seq for e in outbox.pending(stored))
        add(outbox, 3, size=2000)  # space is reused once the backlog is acknowledged
        assert outbox.depth() == 3


def test_drop_oldest_makes_room_when_the_size_cap_is_reached(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", max_bytes=64 * 1024) as outbox:
        seqs = add(outbox, 300, size=2000)
        pending = [e.seq for e in outbox.pending(1000)]
        assert pending == sorted(pending)
        assert pending[-1] == seqs[-1]
        assert 0 < len(pending) < 300
        assert outbox.dropped() == 300 - len(pending)


def test_a_message_larger_than_the_whole_cap_is_refused_clearly(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", max_bytes=32 * 1024) as outbox:
        add(outbox, 2)
        with pytest.raises(OutboxError, match=r"size cap is full while storing a 2000\d\d-byte"):
            add(outbox, 1, size=200_000)
        # Room is made inside the failed transaction: the backlog is not sacrificed in vain.
        assert outbox.depth() == 2
        assert outbox.dropped() == 1


def test_a_second_process_cannot_share_the_outbox(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as outbox:
        add(outbox, 1)
        with pytest.raises(OutboxError, match="locked by another process"):
            Outbox(path)
    with Outbox(path) as outbox:  # the lock goes with close()
        assert outbox.depth() == 1


def test_a_damaged_file_names_the_file_and_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"this is not a database" * 500)
    with pytest.raises(OutboxError, match=r"is damaged .*move the file aside") as info:
        Outbox(path)
    assert str(path) in str(info.value)


def test_an_impossible_location_is_an_outbox_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutboxError, match="cannot create the outbox's directory"):
        Outbox(blocker / "sub" / "outbox.db")


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (tmpfs) to fill up or remount read-only; needs root."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_until_error(outbox: Outbox, size: int) -> tuple[int, OutboxError]:
    for stored in range(10_000):
        try:
            add(outbox, 1, size=size)
        except OutboxError as exc:
            return stored, exc
    raise AssertionError("the outbox never filled up")


def test_a_really_full_disk_loses_messages_without_crashing_and_recovers(tiny_disk: Path) -> None:
    ballast = tiny_disk / "archive.bin"  # the rest of the daemon's files
    with Outbox(tiny_disk / "outbox.db") as outbox:
        ballast.write_bytes(bytes(700 * 1024))
        stored, error = fill_until_error(outbox, size=3000)
        assert stored > 0
        assert "disk or the outbox's size cap is full" in str(error)
        assert outbox.dropped() == 1
        with pytest.raises(OutboxError, match="full while deleting acknowledged messages"):
            outbox.ack_many(e.seq for e in outbox.pending(5))
        assert outbox.depth() == stored  # nothing half-deleted
        ballast.unlink()  # e.g. the archive deletes its oldest images
        assert outbox.ack_many(e.seq for e in outbox.pending(5)) == 5
        entry = outbox.add(TOPIC, message)
        assert entry.seq == stored + 1  # the lost message did not use up a seq
        assert outbox.dropped() == 1


def test_a_read_only_filesystem_is_named_as_such(tiny_disk: Path) -> None:
    Outbox(tiny_disk / "outbox.db").close()
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    with pytest.raises(OutboxError, match="is on a read-only filesystem") as info:
        Outbox(tiny_disk / "outbox.db")
    assert str(tiny_disk / "outbox.db") in str(info.value)
    with pytest.raises(OutboxError, match="is on a read-only filesystem"):
        Outbox(tiny_disk / "new.db")


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(OutboxError, match="when_full must be one of"):
        Outbox(tmp_path / "a.db", when_full="drop-newest")
    with pytest.raises(OutboxError, match="max_messages must be an integer >= 1"):
        Outbox(tmp_path / "a.db", max_messages=0)
    with pytest.raises(OutboxError, match="max_bytes"):
        Outbox(tmp_path / "a.db", max_bytes=100)
    with Outbox(tmp_path / "a.db") as outbox, pytest.raises(OutboxError, match="qos"):
        outbox.add(TOPIC, message, qos=3)


def test_a_closed_outbox_says_so(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    outbox.close()
    outbox.close()  # idempotent
    with pytest.raises(OutboxError, match="is closed"):
        outbox.add(TOPIC, message)


def test_a_clock_jump_reorders_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([5000.0, 4000.0, 3000.0, 2000.0, 1000.0])
    monkeypatch.setattr("fieldscope.edge.outbox.time.time", lambda: next(clock, 1000.0))
    with Outbox(tmp_path / "outbox.db") as outbox:
        add(outbox, 4)  # each stored "earlier" than the one before
        assert [e.seq for e in outbox.pending(10)] == [1, 2, 3, 4]
        age = outbox.oldest_age_s()
        assert age is not None
        assert age >= 0.0


def test_oldest_age_and_listeners(tmp_path: Path) -> None:
    woken: list[int] = []
    with Outbox(tmp_path / "outbox.db") as outbox:
        outbox.add_listener(lambda: woken.append(outbox.depth()))
        assert outbox.oldest_age_s() is None
        add(outbox, 2)
        assert woken == [1, 2]  # called after the commit
        age = outbox.oldest_age_s()
        assert age is not None
        assert 0.0 <= age < 60.0


def test_one_writer_and_one_acker_thread_never_lose_or_duplicate(tmp_path: Path) -> None:
    total = 400
    acked: list[int] = []
    with Outbox(tmp_path / "outbox.db") as outbox:
        done = threading.Event()

        def writer() -> None:
            add(outbox, total)
            done.set()

        def acker() -> None:
            cursor = 0
            while len(acked) < total:
                batch = outbox.pending(50, after=cursor)
                if batch:
                    cursor = batch[-1].seq
                    outbox.ack_many(e.seq for e in batch)
                    acked.extend(e.seq for e in batch)
                elif done.is_set() and not outbox.pending(1, after=cursor):
                    break

        threads = [threading.Thread(target=writer), threading.Thread(target=acker)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert acked == list(range(1, total + 1))
        assert outbox.depth() == 0


def test_a_message_stored_before_kill_9_is_there_after_restart(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    script = textwrap.dedent(
        f"""
        import os, signal
        from fieldscope.edge.outbox import Outbox
        outbox = Outbox({str(path)!r})
        for _ in range(50):
            outbox.add("t/x", lambda seq: str(seq).encode())
        outbox.ack(1)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], timeout=60, check=False)
    assert result.returncode == -9
    assert (tmp_path / "outbox.db-wal").exists()  # nothing was checkpointed: WAL recovery
    with Outbox(path) as outbox:
        pending = outbox.pending(100)
        assert [e.seq for e in pending] == list(range(2, 51))
        assert [e.payload for e in pending] == [str(s).encode() for s in range(2, 51)]
        assert outbox.next_seq == 51


def test_the_file_is_plain_sqlite_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as outbox:
        add(outbox, 2)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT seq FROM messages ORDER BY seq").fetchall() == [(1,), (2,)]
    finally:
        conn.close()
