"""Acknowledged delivery on the SQLite store: what survives a crash (kill -9
once the replies were sent), when each OK is sent, and the moves between
the tables (docs/protocol.md, "Durability").  Real SQLite, a fake clock."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task

from mqmq.broker.broker import Broker
from mqmq.broker.limits import Limits
from mqmq.stores import sqlite
from mqmq.stores.base import Entry
from mqmq.stores.sqlite import SqliteStore
from test_sqlite_store import failing_server, rows
from wire import Server, crashed, sqlite_store

OK = [b"OK"]
LEASE = 30.0
OWNER = object()


def started(path: Path, limits: Limits = Limits()) -> tuple[task.Clock, Broker]:
    clock = task.Clock()
    broker = Broker(clock, limits, sqlite_store(path)(clock))
    broker.startService()
    return clock, broker


def reserve(broker: Broker, queue: bytes = b"q") -> Entry:
    entry = broker.reserve_now(queue, LEASE, OWNER)
    assert entry is not None
    return entry


def test_after_a_crash_reserved_messages_are_ready_with_their_counts_buried_ones_buried_acked_ones_gone(
    tmp_path: Path,
) -> None:
    path = tmp_path / "q.db"
    clock, broker = started(path)
    for message in (b"a", b"b", b"c", b"d", b"e", b"f"):
        broker.put(b"q", message)
    a = reserve(broker)
    b = reserve(broker)
    broker.release(b"q", b.message_id, OWNER)
    assert reserve(broker) == b._replace(deliveries=2)  # reserved again, still held at the crash
    c = reserve(broker)
    broker.bury(b"q", c.message_id, OWNER)
    d = reserve(broker)
    broker.ack(b"q", d.message_id, OWNER)
    e = reserve(broker)
    broker.release(b"q", e.message_id, OWNER)  # ready, at the front
    crashed(clock, broker)

    clock, again = started(path)
    # a, b and e ready at the front (each where it was last put: a where it
    # was taken from, b and e where they were released to), f behind; c
    # buried; d gone.
    assert (again.num_messages, again.num_reserved, again.num_buried) == (4, 0, 1)
    assert again.num_bytes == 5
    assert again.info_json() == (
        b'{"NumConnections":0,"NumQueues":1,"NumMessages":4,'
        b'"Queues":{"q":{"NumMessages":4,"NumReserved":0,"NumBuried":1}},"NumReserved":0,"NumBuried":1}'
    )
    assert [reserve(again)[1:] for _ in range(4)] == [(b"e", 2), (b"b", 3), (b"a", 2), (b"f", 1)]
    # The buried one comes back to the back as a new one, read from the disk.
    assert again.kick(b"q", 5) == 1
    assert again.reserve_now(b"q", LEASE, OWNER) is None  # its body is on disk alone
    clock.advance(0)
    kicked = reserve(again)
    assert (kicked.message_id, kicked.message, kicked.deliveries) == (c.message_id, b"c", 1)
    crashed(clock, again)
    assert ids_left(path) == {"messages": {a.message_id, b.message_id, c.message_id, e.message_id,
                                           a.message_id + 5}, "buried": set()}


def ids_left(path: Path) -> dict[str, set[int]]:
    return {table: {row[0] for row in rows(path, f"SELECT id FROM {table}")} for table in ("messages", "buried")}


def test_a_put_handed_to_a_waiting_reserve_is_at_the_front_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    clock, broker = started(path)
    broker.put(b"q", b"old")
    broker.bury(b"q", reserve(broker).message_id, OWNER)
    waiting = broker.wait_reserve(b"q", 10, LEASE, OWNER)
    broker.put(b"q", b"handed")  # to the waiting Reserve, at once
    handed = waiting.result
    assert (handed.message, handed.deliveries) == (b"handed", 1)
    # The kicked message is read from the disk after the window: never the
    # reserved one with it.
    assert broker.kick(b"q", 1) == 1
    clock.advance(0)
    assert reserve(broker).message == b"old"
    assert broker.reserve_now(b"q", LEASE, OWNER) is None
    broker.put(b"q", b"later")
    crashed(clock, broker)
    clock, again = started(path)
    assert [reserve(again)[1:] for _ in range(3)] == [(b"handed", 2), (b"old", 2), (b"later", 1)]
    crashed(clock, again)


def test_reserved_messages_past_the_window_keep_their_counts_when_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sqlite, "WINDOW_MESSAGES", 4)
    monkeypatch.setattr(sqlite, "WINDOW_BYTES", 64)
    monkeypatch.setattr(sqlite, "WINDOW_REFILL_BELOW", 2)
    path = tmp_path / "q.db"
    clock, broker = started(path)
    sent = [b"m%02d" % number for number in range(20)]
    for message in sent:
        broker.put(b"q", message)
        clock.advance(0)
    for _ in range(12):
        reserve(broker)
        clock.advance(0)
    crashed(clock, broker)
    clock, again = started(path)
    # Waiting Reserves, served as the reads come in, keep the counts too.
    waiting = []
    for _ in range(20):
        entry = again.reserve_now(b"q", LEASE, OWNER)
        if entry is None:
            waiting.append(again.wait_reserve(b"q", 10, LEASE, OWNER))
            clock.advance(0)
        else:
            waiting.append(defer.succeed(entry))
    got = [deferred.result for deferred in waiting]
    assert [(entry.message, entry.deliveries) for entry in got] == (
        [(message, 2) for message in sent[:12]] + [(message, 1) for message in sent[12:]]
    )
    crashed(clock, again)


def test_ack_release_bury_and_kick_are_answered_once_written(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    server = Server(store=sqlite_store(path))
    client = server.connect()
    client.send([b"Put", b"q", b"1"], [b"Put", b"q", b"2"], [b"Put", b"q", b"3"],
                [b"Reserve", b"q"], [b"Reserve", b"q"], [b"Reserve", b"q"])
    server.clock.advance(0)
    ids = [reply[2] for reply in client.replies()[3:]]
    assert rows(path, "SELECT deliveries FROM messages ORDER BY id") == [(1,), (1,), (1,)]

    def answered_once_written(frame: list[bytes], reply: list[bytes], query: str, before: Any,
                              after: Any) -> None:
        client.send(frame)
        assert client.replies() == []
        assert rows(path, query) == before
        server.clock.advance(0)
        assert client.replies() == [reply]
        assert rows(path, query) == after

    count = "SELECT count(*) FROM messages"
    answered_once_written([b"Ack", b"q", ids[0]], OK, count, [(3,)], [(2,)])
    answered_once_written([b"Bury", b"q", ids[1]], OK, "SELECT count(*) FROM buried", [(0,)], [(1,)])
    answered_once_written([b"Release", b"q", ids[2]], OK, "SELECT pos < 0 FROM messages", [(0,)], [(1,)])
    answered_once_written([b"Kick", b"q", b"3"], [b"OK", b"1"], count, [(1,)], [(2,)])
    # Touch changes nothing on disk (a lease ends with the server): at once.
    client.send([b"Reserve", b"q"])
    server.clock.advance(0)
    [[_, _, message_id, _]] = client.replies()
    client.send([b"Touch", b"q", message_id, b"1000"])
    assert client.replies() == [OK]


def test_an_ack_whose_write_failed_is_answered_once_the_retry_is_written(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    server, writes = failing_server(path)
    client = server.connect()
    client.send([b"Put", b"q", b"m"], [b"Reserve", b"q"])
    server.clock.advance(0)
    [ok, [_, _, message_id, _]] = client.replies()
    writes.failing = True
    client.send([b"Ack", b"q", message_id])
    server.clock.advance(0)
    assert client.replies() == []  # not written: not OK yet
    writes.failing = False
    server.clock.advance(sqlite.RETRY_SECONDS)
    assert client.replies() == [OK]
    assert rows(path, "SELECT count(*) FROM messages") == [(0,)]


def test_a_database_from_before_acknowledged_delivery_is_brought_up_to_date(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    with sqlite3.connect(path) as db:
        db.executescript(sqlite._SCHEMA + "PRAGMA user_version = 1;")
        db.execute("INSERT INTO queues (id, name) VALUES (1, x'71')")
        db.executemany("INSERT INTO messages (id, queue, pos, body) VALUES (?, 1, ?, ?)",
                       [(1, 1, b"one"), (2, 2, b"two")])
    clock, broker = started(path)
    assert rows(path, "PRAGMA user_version") == [(sqlite.SCHEMA_VERSION,)]
    first = reserve(broker)
    assert (first.message, first.deliveries) == (b"one", 1)
    broker.bury(b"q", first.message_id, OWNER)
    crashed(clock, broker)
    clock, again = started(path)
    assert (again.num_messages, again.num_buried) == (1, 1)
    assert again.take(b"q") == b"two"
    crashed(clock, again)


def test_a_buried_message_of_no_queue_is_damage(tmp_path: Path) -> None:
    from mqmq.errors import StoreError

    path = tmp_path / "q.db"
    clock, broker = started(path)
    crashed(clock, broker)
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO buried (id, queue, seq, body, deliveries) VALUES (1, 9, 1, x'00', 1)")
    with pytest.raises(StoreError, match="damaged: a buried message belongs to no queue"):
        started(path)


class WritesByHand:
    """The store's commits run (or fail) only when told; everything else at once."""

    def __init__(self) -> None:
        self.pending: list[tuple[Any, tuple[Any, ...], defer.Deferred[Any]]] = []

    def __call__(self, function: Any, *args: Any) -> defer.Deferred[Any]:
        if function.__name__ != "_commit":
            return defer.maybeDeferred(function, *args)
        done: defer.Deferred[Any] = defer.Deferred()
        self.pending.append((function, args, done))
        return done

    def commit(self) -> None:
        function, args, done = self.pending.pop(0)
        done.callback(function(*args))

    def fail(self) -> None:
        _, _, done = self.pending.pop(0)
        done.errback(sqlite3.OperationalError("database or disk is full"))


def by_hand(path: Path) -> tuple[task.Clock, Broker, WritesByHand]:
    writes = WritesByHand()
    clock = task.Clock()
    broker = Broker(clock, Limits(), SqliteStore(str(path), "always", clock, run_writes=writes,
                                                 run_reads=defer.maybeDeferred))
    broker.startService()
    return clock, broker, writes


def settled(clock: task.Clock, writes: WritesByHand) -> None:
    clock.advance(0)
    while writes.pending:
        writes.commit()
        clock.advance(0)


def test_a_message_taken_while_its_put_is_written_survives_two_failed_writes_buried_and_kicked(
    tmp_path: Path,
) -> None:
    path = tmp_path / "q.db"
    clock, broker, writes = by_hand(path)
    settled(clock, writes)
    broker.put(b"q", b"X")
    clock.advance(0)  # its write goes to the writer...
    taken = reserve(broker)  # ...and the message is taken meanwhile
    writes.fail()
    broker.bury(b"q", taken.message_id, OWNER)
    assert broker.kick(b"q", 1) == 1
    clock.advance(sqlite.RETRY_SECONDS)
    writes.fail()  # the retry fails too: kept for the next one
    assert broker.store.failure is not None and broker.store.pending is not None
    clock.advance(sqlite.RETRY_SECONDS)
    settled(clock, writes)
    assert broker.store.failure is None
    again = reserve(broker)
    assert (again.message_id, again.message, again.deliveries) == (taken.message_id, b"X", 1)
    settled(clock, writes)
    assert rows(path, "SELECT body, deliveries FROM messages") == [(b"X", 1)]


def test_a_release_in_a_failed_write_keeps_its_place_when_reserved_again_before_the_retry(
    tmp_path: Path,
) -> None:
    path = tmp_path / "q.db"
    clock, broker, writes = by_hand(path)
    for message in (b"a", b"b", b"c"):
        broker.put(b"q", message)
    a, b = reserve(broker), reserve(broker)
    settled(clock, writes)
    broker.release(b"q", b.message_id, OWNER)
    settled(clock, writes)
    broker.release(b"q", a.message_id, OWNER)  # a in front of b...
    clock.advance(0)
    assert reserve(broker).message == b"a"  # ...taken again before that write is done
    writes.fail()
    clock.advance(sqlite.RETRY_SECONDS)
    settled(clock, writes)
    crashed(clock, broker)
    clock, again = started(path)
    assert [reserve(again).message for _ in range(3)] == [b"a", b"b", b"c"]
    crashed(clock, again)
