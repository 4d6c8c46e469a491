"""The SQLite store, for real, driven deterministically: a ``task.Clock`` and
writes run at once (``run_writes``) instead of in the writer thread."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task

from mqmq.broker import broker as broker_module
from mqmq.broker.broker import Broker
from mqmq.errors import STORAGE_FULL, GetTimeout, RequestError, StoreError
from mqmq.stores import sqlite
from mqmq.broker.limits import Limits
from mqmq.stores.sqlite import SCHEMA_VERSION, SqliteQueue, SqliteStore
from wire import Server, sqlite_store

OK = [b"OK"]


def started(path: Path, fsync: str = "always", limits: Limits = Limits()) -> tuple[task.Clock, Broker]:
    clock = task.Clock()
    broker = Broker(clock, limits, sqlite_store(path, fsync)(clock))
    broker.startService()
    return clock, broker


def stop(clock: task.Clock, broker: Broker) -> None:
    clock.advance(0)
    stopping = broker.store.stop()
    assert isinstance(stopping, defer.Deferred) and stopping.called


def contents(broker: Broker) -> dict[bytes, list[bytes]]:
    found: dict[bytes, list[bytes]] = {}
    for name, _ in list(broker.queue_sizes()):
        messages = []
        while (message := broker.take(name)) is not None:
            messages.append(message)
        found[name] = messages
    return found


def rows(path: Path, query: str) -> list[Any]:
    with sqlite3.connect(path) as db:
        return db.execute(query).fetchall()


def test_messages_come_back_after_a_restart_in_order(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    clock, broker = started(path)
    for message in (b"a", b"b", b"c"):
        broker.put(b"jobs", message)
    broker.put(b"other", b"d")
    assert broker.take(b"jobs") == b"a"
    broker.put_back(b"jobs", b"a")  # its consumer left: at the front again
    assert broker.take(b"other") == b"d"
    broker.take(b"empty")  # a queue made by a Get, holding nothing
    stop(clock, broker)

    clock, again = started(path)
    assert again.num_messages == 3 and again.num_bytes == 3
    assert again.info_json() == (
        b'{"NumConnections":0,"NumQueues":3,"NumMessages":3,'
        b'"Queues":{"empty":{"NumMessages":0},"jobs":{"NumMessages":3},"other":{"NumMessages":0}}}'
    )
    assert contents(again) == {b"empty": [], b"jobs": [b"a", b"b", b"c"], b"other": []}
    stop(clock, again)


def test_puts_back_go_in_front_of_each_other_in_order_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    clock, broker = started(path)
    for message in (b"1", b"2", b"3", b"4"):
        broker.put(b"q", message)
    taken = [broker.take(b"q") for _ in range(3)]
    broker.put_back(b"q", *taken[1:])  # 2 and 3 come back
    broker.put_back(b"q", taken[0])  # then 1, before them
    stop(clock, broker)
    clock, again = started(path)
    assert contents(again) == {b"q": [b"1", b"2", b"3", b"4"]}
    stop(clock, again)


def test_a_put_is_answered_once_it_is_written(tmp_path: Path) -> None:
    server = Server(store=sqlite_store(tmp_path / "q.db"))
    connection = server.connect()
    connection.send([b"Put", b"q", b"hello"])
    assert connection.replies() == []
    assert rows(tmp_path / "q.db", "SELECT body FROM messages") == []
    server.clock.advance(0)
    assert connection.replies() == [OK]
    assert rows(tmp_path / "q.db", "SELECT body FROM messages") == [(b"hello",)]


def test_a_message_is_sent_once_its_removal_is_written(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    server = Server(store=sqlite_store(path))
    connection = server.connect()
    connection.send([b"Put", b"q", b"hello"])
    server.clock.advance(0)
    assert connection.replies() == [OK]
    connection.send([b"Get", b"q", b"0"])
    assert connection.replies() == []
    assert rows(path, "SELECT count(*) FROM messages") == [(1,)]
    server.clock.advance(0)
    assert connection.replies() == [[b"OK", b"hello"]]
    assert rows(path, "SELECT count(*) FROM messages") == [(0,)]


def test_replies_keep_their_order_behind_held_ones(tmp_path: Path) -> None:
    server = Server(store=sqlite_store(tmp_path / "q.db"))
    connection = server.connect()
    # A Put (held for the write), a refused request and a Get that times
    # out (neither needs the disk) must still come in the order asked.
    connection.send([b"Put", b"q", b"m"], [b"Get", b"x" * 2000], [b"Get", b"empty", b"5"])
    assert connection.replies() == []
    server.clock.advance(0)
    assert connection.replies() == [OK, [b"Error", b"REQUEST_BAD_QUEUE_NAME"]]
    server.clock.advance(0.005)
    assert connection.replies() == [[b"Timeout"]]


def test_quit_sends_the_held_replies_first(tmp_path: Path) -> None:
    server = Server(store=sqlite_store(tmp_path / "q.db"))
    connection = server.connect()
    connection.send([b"Put", b"q", b"m"], [b"Quit"])
    assert not connection.closed
    server.clock.advance(0)
    assert connection.replies() == [OK]
    assert connection.closed


def test_one_transaction_for_what_one_turn_did(tmp_path: Path) -> None:
    server = Server(store=sqlite_store(tmp_path / "q.db"))
    store = server.broker.store
    assert isinstance(store, SqliteStore)
    first, second = server.connect(), server.connect()
    first.send(*[[b"Put", b"q", b"%d" % n] for n in range(500)])
    second.send(*[[b"Put", b"r", b"%d" % n] for n in range(300)])
    server.clock.advance(0)
    assert store.commits == 1
    assert store.rows_written == 2 + 800
    assert first.replies() == [OK] * 500 and second.replies() == [OK] * 300


def test_a_message_taken_in_the_turn_that_put_it_never_reaches_the_disk(tmp_path: Path) -> None:
    server = Server(store=sqlite_store(tmp_path / "q.db"))
    store = server.broker.store
    assert isinstance(store, SqliteStore)
    connection = server.connect()
    connection.send([b"Put", b"q", b"m"], [b"Get", b"q"])
    server.clock.advance(0)
    assert connection.replies() == [OK, [b"OK", b"m"]]
    assert store.rows_written == 1  # the queue alone


def test_a_held_message_goes_back_to_the_front_when_its_consumer_leaves(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    server = Server(store=sqlite_store(path))
    producer, consumer = server.connect(), server.connect()
    producer.send([b"Put", b"q", b"first"], [b"Put", b"q", b"second"])
    server.clock.advance(0)
    consumer.send([b"Get", b"q"])
    consumer.close()  # before the removal was written: its reply never left
    server.clock.advance(0)
    assert consumer.replies() == []
    assert rows(path, "SELECT body FROM messages ORDER BY pos") == [(b"first",), (b"second",)]
    assert server.queue_contents() == {b"q": [b"first", b"second"]}


def test_a_held_message_goes_back_when_its_unread_consumer_has_gone_by_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mqmq.server import protocol as server_module

    server = Server(store=sqlite_store(tmp_path / "q.db"))
    producer, consumer = server.connect(), server.connect()
    producer.send([b"Put", b"q", b"m"])
    server.clock.advance(0)
    consumer.send([b"Get", b"q"])  # its reply waits for the removal's write
    consumer.protocol.pauseProducing()  # its socket's buffer is full: not read from
    assert not consumer.reading
    # Meanwhile its peer leaves, which only the kernel knows.
    monkeypatch.setattr(server_module, "peer_has_gone", lambda transport: transport is consumer.transport)
    server.clock.advance(0)
    assert consumer.transport.value() == b"" and consumer.closed
    consumer.lose()
    assert server.queue_contents() == {b"q": [b"m"]}


def test_forgotten_empty_queues_leave_the_database(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    clock, broker = started(path, limits=Limits(max_queues=1))
    broker.put(b"old", b"m")
    broker.take(b"old")
    broker.put(b"new", b"n")  # forgets "old", which holds nothing
    stop(clock, broker)
    assert rows(path, "SELECT name FROM queues") == [(b"new",)]


@pytest.mark.parametrize("fsync, synchronous", [("always", 2), ("everysec", 1), ("no", 1)])
def test_fsync_settings(tmp_path: Path, fsync: str, synchronous: int) -> None:
    clock, broker = started(tmp_path / "q.db", fsync)
    store = broker.store
    assert isinstance(store, SqliteStore)
    assert store._db is not None
    assert store._db.execute("PRAGMA synchronous").fetchall()[0][0] == synchronous
    assert store._db.execute("PRAGMA journal_mode").fetchall()[0][0] == "wal"
    broker.put(b"q", b"m")
    clock.advance(0)
    assert store._unsynced
    clock.advance(1)
    # everysec syncs within a second; the others leave it.
    assert store._unsynced == (fsync != "everysec")
    stop(clock, broker)


def test_a_database_from_a_newer_mqmq_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    stop(*started(path))
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer mqmq"):
        started(path)


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    path.write_bytes(b"this is not a database, but a file of text that is long enough " * 100)
    with pytest.raises(StoreError, match="not a database"):
        started(path)


def test_another_programs_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE accounts (id INTEGER)")
    with pytest.raises(StoreError, match="not an mqmq one"):
        started(path)


def test_a_damaged_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    clock, broker = started(path)
    for number in range(3000):
        broker.put(b"q%d" % (number % 7), b"message %d " % number * 20)
    stop(clock, broker)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    assert len(data) > 40 * 4096
    for page in range(5, len(data) // 4096, 3):
        data[page * 4096 : page * 4096 + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="damaged|malformed|cannot read|not a database"):
        started(path)


def test_a_database_that_cannot_be_opened_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open the database .*missing"):
        started(tmp_path / "missing" / "q.db")


@pytest.fixture
def small_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """A window of 8 messages or 64 bytes, refilled at 4: spilling shows at once."""
    from mqmq.stores import sqlite

    monkeypatch.setattr(sqlite, "WINDOW_MESSAGES", 8)
    monkeypatch.setattr(sqlite, "WINDOW_BYTES", 64)
    monkeypatch.setattr(sqlite, "WINDOW_REFILL_BELOW", 4)


def in_memory(broker: Broker, queue: bytes) -> int:
    stored = broker._queues[queue].messages
    assert isinstance(stored, SqliteQueue)
    return len(stored._messages) + len(stored._spilled)


@pytest.mark.usefixtures("small_window")
def test_a_long_queue_keeps_a_window_in_memory_and_the_rest_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    clock, broker = started(path)
    sent = [b"m%03d" % n for n in range(200)]
    for message in sent:
        broker.put(b"q", message)
    clock.advance(0)
    assert len(broker._queues[b"q"].messages) == 200 and broker.num_messages == 200
    assert in_memory(broker, b"q") == 8
    taken = [broker.take(b"q") for _ in range(120)]
    clock.advance(0)
    assert in_memory(broker, b"q") <= 8
    stop(clock, broker)

    clock, again = started(path)
    assert again.num_messages == 80 and again.num_bytes == 80 * 4
    assert in_memory(again, b"q") == 8
    assert taken + contents(again)[b"q"] == sent
    stop(clock, again)


@pytest.mark.usefixtures("small_window")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.one_of(
    st.tuples(st.just("put"), st.integers(0, 2), st.binary(max_size=40)),
    st.tuples(st.just("take"), st.integers(0, 2), st.just(b"")),
    st.tuples(st.just("put_back"), st.integers(0, 2), st.binary(max_size=40)),
    st.tuples(st.just("write"), st.just(0), st.just(b"")),
    st.tuples(st.just("restart"), st.just(0), st.just(b"")),
), max_size=120))
def test_the_store_is_a_fifo_whatever_is_done_and_written_when(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, int, bytes]]
) -> None:
    path = tmp_path_factory.mktemp("fifo") / "q.db"
    model: dict[bytes, list[bytes]] = {b"a": [], b"b": [], b"c": []}
    names = list(model)
    clock, broker = started(path)
    for action, index, message in steps:
        queue = names[index]
        if action == "put":
            broker.put(queue, message)
            model[queue].append(message)
        elif action == "take":
            assert broker.take(queue) == (model[queue].pop(0) if model[queue] else None)
        elif action == "put_back":
            broker.put_back(queue, message)
            model[queue].insert(0, message)
        elif action == "write":
            clock.advance(0)
        else:
            stop(clock, broker)
            clock, broker = started(path)
        assert broker.num_messages == sum(map(len, model.values()))
        assert broker.num_bytes == sum(len(m) for q in model.values() for m in q)
    stop(clock, broker)
    clock, broker = started(path)
    found = contents(broker)
    assert {name: found.get(name, []) for name in model} == model
    stop(clock, broker)


def test_message_ids_are_never_reused_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    clock, broker = started(path)
    first = [broker.put(b"q", b"m") for _ in range(3)]
    for _ in first:
        broker.take(b"q")  # gone from the database: max(id) tells nothing
    stop(clock, broker)
    clock, again = started(path)
    later = again.put(b"q", b"n")
    assert later is not None and all(i is not None and later > i for i in first)
    stop(clock, again)


class HeldCalls:
    """A store's writes or reads that run only when told (``finish``), as a
    slow disk's would: ``run_writes=`` or ``run_reads=``.  While ``failing``,
    and for the next ``failures`` of them, they fail with ``error`` instead."""

    def __init__(self, error: Exception) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], defer.Deferred[Any]]] = []
        self.error = error
        self.failing = False
        self.failures = 0

    def __call__(self, function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        done: defer.Deferred[Any] = defer.Deferred()
        self.calls.append((function, args, done))
        return done

    def finish(self) -> int:
        """Run (or fail) every call asked for so far; how many."""
        calls, self.calls = self.calls, []
        for function, args, done in calls:
            if self.failing or self.failures:
                self.failures = max(0, self.failures - 1)
                done.errback(self.error)
            else:
                done.callback(function(*args))
        return len(calls)


def held_writes() -> HeldCalls:
    return HeldCalls(sqlite3.OperationalError("database or disk is full"))


def held_reads() -> HeldCalls:
    return HeldCalls(sqlite3.OperationalError("disk I/O error"))


class FailingWrites:
    """Runs the store's writes at once, failing them (as a full disk does) while ``failing``."""

    def __init__(self) -> None:
        self.failing = False

    def __call__(self, function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        if self.failing and function.__name__ == "_commit":
            return defer.fail(sqlite3.OperationalError("database or disk is full"))
        return defer.maybeDeferred(function, *args)


def failing_server(path: Path) -> tuple[Server, FailingWrites]:
    writes = FailingWrites()
    return Server(store=lambda clock: SqliteStore(str(path), "always", clock, run_writes=writes)), writes


def test_a_stored_message_is_delivered_while_the_disk_fails_and_removed_once_it_works(
    tmp_path: Path,
) -> None:
    path = tmp_path / "q.db"
    server, writes = failing_server(path)
    producer, consumer = server.connect(), server.connect()
    producer.send([b"Put", b"q", b"X"])
    server.clock.advance(0)
    assert producer.replies() == [OK]
    writes.failing = True
    consumer.send([b"Get", b"q"], [b"Get", b"empty", b"5"])
    server.clock.advance(0)
    # Stored messages stay deliverable (the protocol's promise) ...
    assert consumer.replies() == [[b"OK", b"X"]]
    producer.send([b"Put", b"q", b"Y"])
    server.clock.advance(0)
    assert producer.replies() == [[b"Error", b"SERVER_STORAGE_ERROR"]]
    server.clock.advance(2)
    assert consumer.replies() == [[b"Timeout"]]
    # ... and the removal, not yet written, is written once the disk works.
    assert rows(path, "SELECT body FROM messages") == [(b"X",)]
    writes.failing = False
    server.clock.advance(1)
    assert rows(path, "SELECT body FROM messages") == []
    assert server.broker.store.failure is None


def test_a_put_whose_message_was_taken_before_its_write_failed_is_not_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    writes = held_writes()
    server = Server(store=lambda clock: SqliteStore(str(path), "always", clock, run_writes=writes))
    producer, consumer = server.connect(), server.connect()
    producer.send([b"Put", b"q", b"X"])
    server.clock.advance(0)  # X's write goes to the writer
    consumer.send([b"Get", b"q"])  # X is taken while its write is under way
    writes.failures = 1
    writes.finish()  # and fails
    assert producer.replies() == [] and consumer.replies() == []
    server.clock.advance(1)
    writes.finish()
    # Stored with the retry, then taken: both told, neither an error.
    assert producer.replies() == [OK]
    assert consumer.replies() == [[b"OK", b"X"]]


def test_a_queue_forgotten_and_made_again_in_one_write(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    clock, broker = started(path, limits=Limits(max_queues=1))
    broker.put(b"a", b"1")
    broker.take(b"a")
    clock.advance(0)
    broker.put(b"b", b"2")  # forgets a
    broker.take(b"b")
    broker.put(b"a", b"3")  # forgets b, makes a again: one write
    clock.advance(0)
    assert broker.store.failure is None
    stop(clock, broker)
    clock, again = started(path)
    assert contents(again) == {b"a": [b"3"]}
    stop(clock, again)


@pytest.mark.usefixtures("small_window")
def test_the_window_never_takes_spilled_messages_before_older_ones_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    clock, broker = started(path)
    for number in range(8):
        broker.put(b"q", b"w%d" % number)  # the window, by count
    broker.put(b"q", b"A")
    broker.put(b"q", b"B" * 200)  # over the window's 64 bytes on its own
    clock.advance(0)  # A and B on disk alone
    broker.put(b"q", b"C")  # spilled, not yet written
    taken = [broker.take(b"q") for _ in range(12)]
    assert taken == [b"w%d" % n for n in range(8)] + [b"A", b"B" * 200, b"C", None]
    stop(clock, broker)


def test_a_put_handed_to_a_waiter_is_answered_with_the_delivery(tmp_path: Path) -> None:
    server = Server(store=sqlite_store(tmp_path / "q.db"))
    store = server.broker.store
    assert isinstance(store, SqliteStore)
    producer, consumer = server.connect(), server.connect()
    consumer.send([b"Get", b"q", b"1000"])
    server.clock.advance(0)  # the queue's row
    commits = store.commits
    producer.send([b"Put", b"q", b"m"])
    # Neither reply goes out alone: a crash now loses nothing answered OK.
    assert producer.replies() == [] and consumer.replies() == []
    server.clock.advance(0)
    assert producer.replies() == [OK]
    assert consumer.replies() == [[b"OK", b"m"]]
    # The message never reached the disk, and nothing else changed: no
    # (empty) transaction was written for it.
    assert store.commits == commits


def test_a_hand_over_keeps_its_consumers_replies_in_order(tmp_path: Path) -> None:
    writes = held_writes()
    server = Server(store=lambda clock: SqliteStore(str(tmp_path / "q.db"), "always", clock, run_writes=writes))
    producer, consumer = server.connect(), server.connect()
    consumer.send([b"Get", b"q", b"1"])  # makes the queue
    server.clock.advance(0.001)
    writes.finish()
    assert consumer.replies() == [[b"Timeout"]]
    # The consumer's own Put is in a write in flight; then its Get waits.
    consumer.send([b"Put", b"a", b"mine"], [b"Get", b"q", b"1000"])
    server.clock.advance(0)
    assert len(writes.calls) == 1
    producer.send([b"Put", b"q", b"handed"])
    server.clock.advance(0)
    # The hand-over wrote nothing: its Put is answered; the delivery waits
    # behind the consumer's own OK, still held for the write in flight.
    assert producer.replies() == [OK]
    assert consumer.replies() == []
    writes.finish()
    assert consumer.replies() == [OK, [b"OK", b"handed"]]


def test_a_failed_write_is_tried_again_after_the_retry_delay_only(tmp_path: Path) -> None:
    writes = held_writes()
    server = Server(store=lambda clock: SqliteStore(str(tmp_path / "q.db"), "always", clock, run_writes=writes))
    store = server.broker.store
    first, second = server.connect(), server.connect()
    first.send([b"Put", b"a", b"1"])
    server.clock.advance(0)
    assert len(writes.calls) == 1
    second.send([b"Put", b"b", b"2"])  # the next batch: due at the end of the turn
    writes.failures = 1
    writes.finish()  # the write fails before that
    server.clock.advance(0)
    assert writes.calls == []  # not at once: after the retry delay
    assert first.replies() == [[b"Error", b"SERVER_STORAGE_ERROR"]]
    writes.failures = 1
    server.clock.advance(sqlite.RETRY_SECONDS)
    assert writes.finish() == 1  # tried again, and failed again
    pending = [call for call in server.clock.getDelayedCalls() if call.func == store._write_pending]
    assert len(pending) == 1  # one retry timer, not two
    server.clock.advance(sqlite.RETRY_SECONDS)
    assert writes.finish() == 1
    assert store.failure is None
    stopping = store.stop()
    assert stopping.called and server.clock.getDelayedCalls() == []


def test_a_hand_over_does_not_wait_for_a_write_it_has_nothing_in(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    writes = held_writes()
    server = Server(store=lambda clock: SqliteStore(str(path), "always", clock, run_writes=writes))
    slow, producer, consumer = server.connect(), server.connect(), server.connect()
    consumer.send([b"Get", b"q", b"1000"])
    slow.send([b"Put", b"a", b"first"])
    server.clock.advance(0)
    writes.finish()
    assert slow.replies() == [OK]
    slow.send([b"Put", b"a", b"stored"])
    server.clock.advance(0)
    assert len(writes.calls) == 1  # its write is in flight
    producer.send([b"Put", b"q", b"handed"])
    server.clock.advance(0)
    # The hand-over wrote nothing: its replies go without waiting for the
    # write in flight; the Put in that write still waits for it.
    assert producer.replies() == [OK]
    assert consumer.replies() == [[b"OK", b"handed"]]
    assert slow.replies() == []
    writes.finish()
    assert slow.replies() == [OK]
    assert writes.calls == []


def test_a_new_database_is_for_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    clock, broker = started(path)
    broker.put(b"q", b"secret")
    clock.advance(0)
    for made in (path, Path(f"{path}-wal")):
        assert made.stat().st_mode & 0o777 == 0o600, made
    stop(clock, broker)


def with_held_reads(path: Path, limits: Limits = Limits()) -> tuple[task.Clock, Broker, HeldCalls]:
    reads = held_reads()
    clock = task.Clock()
    store = SqliteStore(str(path), "always", clock, run_writes=defer.maybeDeferred, run_reads=reads)
    broker = Broker(clock, limits, store)
    broker.startService()
    return clock, broker, reads


def filled(path: Path, count: int) -> list[bytes]:
    """A database whose queue ``q`` holds ``count`` messages, most on disk alone."""
    clock, broker = started(path)
    sent = [b"m%03d" % n for n in range(count)]
    for message in sent:
        broker.put(b"q", message)
    stop(clock, broker)
    return sent


def rest_of(clock: task.Clock, broker: Broker, reads: HeldCalls) -> list[bytes]:
    """Every message left on queue ``q``, taken, reads answered as they are asked for."""
    taken = []
    while (message := broker.take(b"q")) is not None or reads.finish():
        clock.advance(0)
        if message is not None:
            taken.append(message)
    return taken


def window_emptied(path: Path) -> tuple[list[bytes], task.Clock, Broker, HeldCalls, list[Optional[bytes]]]:
    """Queue ``q`` of 20 messages read back at start-up, its window (8) taken,
    and the read of the rest asked for but not answered."""
    sent = filled(path / "q.db", 20)
    clock, broker, reads = with_held_reads(path / "q.db")
    taken = [broker.take(b"q") for _ in range(8)]
    return sent, clock, broker, reads, taken


@pytest.mark.usefixtures("small_window")
def test_the_window_is_refilled_by_a_read_that_never_stops_the_gets(tmp_path: Path) -> None:
    sent = filled(tmp_path / "q.db", 30)
    clock, broker, reads = with_held_reads(tmp_path / "q.db")
    taken = [broker.take(b"q") for _ in range(4)]  # the window: 8, down to 4
    assert reads.calls == []
    taken.append(broker.take(b"q"))  # at 4: a read starts, and the Get is answered meanwhile
    assert len(reads.calls) == 1
    taken += [broker.take(b"q") for _ in range(3)]
    assert len(reads.calls) == 1  # one read at a time
    assert reads.finish() == 1
    taken += rest_of(clock, broker, reads)
    assert taken == sent
    stop(clock, broker)


@pytest.mark.usefixtures("small_window")
def test_gets_that_find_the_window_empty_wait_for_the_read_in_their_order(tmp_path: Path) -> None:
    sent = filled(tmp_path / "q.db", 30)
    clock, broker, reads = with_held_reads(tmp_path / "q.db")
    taken = [broker.take(b"q") for _ in range(8)]
    assert broker.take(b"q") is None  # the read is not back: none at hand
    assert len(broker._queues[b"q"].messages) == 22  # though the queue holds them
    first, second = broker.get(b"q", 10), broker.get(b"q", 10)
    broker.put(b"q", b"new")  # behind the 22, not to the waiting Gets
    assert broker.take(b"q") is None  # nor to a later Get
    assert not first.called and not second.called
    reads.finish()
    assert broker.take(b"q") is None  # in, but the waiting Gets come first
    clock.advance(0)  # the store says they arrived: the waiters are served, oldest first
    assert first.result == sent[8] and second.result == sent[9]
    taken += rest_of(clock, broker, reads)
    assert taken[8:] == sent[10:] + [b"new"]
    assert broker.num_messages == 0
    stop(clock, broker)


@pytest.mark.usefixtures("small_window")
def test_a_failed_read_is_tried_again_and_loses_nothing(tmp_path: Path) -> None:
    sent, clock, broker, reads, taken = window_emptied(tmp_path)
    waiting = broker.get(b"q", 60)
    reads.failing = True
    assert reads.finish() == 1
    assert not waiting.called
    clock.advance(sqlite.RETRY_SECONDS)  # read again
    reads.failing = False
    assert reads.finish() == 1
    clock.advance(0)
    assert waiting.result == sent[8]
    taken += rest_of(clock, broker, reads)
    assert taken == sent[:8] + sent[9:]
    stop(clock, broker)


@pytest.mark.usefixtures("small_window")
def test_a_get_whose_timeout_ends_while_its_queue_is_read_waits_for_the_read(tmp_path: Path) -> None:
    sent, clock, broker, reads, taken = window_emptied(tmp_path)
    waiting = broker.get(b"q", 0.001)  # the original client's default timeout
    clock.advance(0.001)
    assert not waiting.called  # the queue is not empty: no Timeout for it
    reads.finish()
    clock.advance(0)
    assert waiting.result == sent[8]
    stop(clock, broker)


@pytest.mark.usefixtures("small_window")
def test_a_get_that_times_out_while_reads_fail_takes_nothing(tmp_path: Path) -> None:
    sent, clock, broker, reads, taken = window_emptied(tmp_path)
    waiting = broker.get(b"q", 1)
    failures: list[Any] = []
    waiting.addErrback(failures.append)
    reads.failing = True
    for _ in range(int(1 + broker_module.FETCH_GRACE_SECONDS)):
        reads.finish()
        clock.advance(1)
    assert failures and failures[0].check(GetTimeout)
    reads.failing = False
    reads.finish()
    clock.advance(sqlite.RETRY_SECONDS)
    taken += rest_of(clock, broker, reads)
    assert taken == sent
    stop(clock, broker)


@pytest.mark.usefixtures("small_window")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.one_of(
    st.tuples(st.just("put"), st.integers(0, 1)),
    st.tuples(st.just("get"), st.integers(0, 1)),
    st.tuples(st.just("take"), st.integers(0, 1)),
    st.tuples(st.just("write"), st.just(0)),
    st.tuples(st.just("read"), st.just(0)),
    st.tuples(st.just("turn"), st.just(0)),
), max_size=150))
@example(steps=[("put", 0)] * 4 + [("write", 0)] + [("take", 0)] * 3 + [("get", 0), ("put", 0), ("read", 0)])
@example(steps=[("put", 0)] * 6 + [("write", 0)] + [("take", 0)] * 3 + [("get", 0), ("get", 0), ("read", 0),
                                                                        ("take", 0)])
def test_with_reads_that_answer_late_every_get_is_served_in_order_and_nothing_is_lost(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[str, int]]
) -> None:
    path = tmp_path_factory.mktemp("late") / "q.db"
    sent: dict[bytes, list[bytes]] = {b"a": [], b"b": []}
    names = list(sent)
    # What each queue's Gets (waiting ones included) and takes received, in order.
    received: dict[bytes, list[defer.Deferred[bytes]]] = {b"a": [], b"b": []}
    clock, broker, reads = with_held_reads(path)
    for number, (action, index) in enumerate(steps):
        queue = names[index]
        if action == "put":
            message = b"%s%d" % (queue, number) + b"." * 20  # 3 fill the window
            broker.put(queue, message)
            sent[queue].append(message)
        elif action == "get":
            received[queue].append(broker.get(queue, 1000))
        elif action == "take":
            message = broker.take(queue)
            if message is not None:
                received[queue].append(defer.succeed(message))
        elif action == "write":
            clock.advance(0)
        elif action == "read":
            reads.finish()
        else:
            clock.advance(0)
    # Every read answered and every waiter served: Gets in their order, FIFO.
    clock.advance(0)
    while reads.finish():
        clock.advance(0)
    for queue in names:
        results = []
        for deferred in received[queue]:
            if not deferred.called:
                break
            results.append(deferred.result)
        assert all(not deferred.called for deferred in received[queue][len(results):])
        left = []
        while (message := broker.take(queue)) is not None or reads.finish():
            clock.advance(0)
            if message is not None:
                left.append(message)
        assert results + left == sent[queue][:len(results) + len(left)]
        # Every Get still waiting found the queue truly empty.
        assert len(results) + len(left) == len(sent[queue])
    for deferreds in received.values():
        for deferred in deferreds:
            if not deferred.called:
                deferred.addErrback(lambda failure: failure.trap(defer.CancelledError))
                deferred.cancel()
    stop(clock, broker)


@pytest.mark.usefixtures("small_window")
def test_limits_hold_for_puts_made_while_gets_wait_for_a_read(tmp_path: Path) -> None:
    filled(tmp_path / "q.db", 20)
    clock, broker, reads = with_held_reads(tmp_path / "q.db", Limits(max_queued_messages=15))
    for _ in range(8):
        broker.take(b"q")
    waiting = broker.get(b"q", 10)
    assert not waiting.called and broker.num_messages == 12
    for _ in range(3):
        broker.put(b"q", b"more")
    with pytest.raises(RequestError) as refused:
        broker.put(b"q", b"one too many")
    assert refused.value.error_type == STORAGE_FULL
    assert broker.num_messages == 15
    reads.finish()
    clock.advance(0)
    assert waiting.called
    stop(clock, broker)


@pytest.mark.usefixtures("small_window")
def test_a_read_tried_again_after_a_failure_is_called_off_by_a_stop(tmp_path: Path) -> None:
    filled(tmp_path / "q.db", 20)
    clock, broker, reads = with_held_reads(tmp_path / "q.db")
    for _ in range(8):
        broker.take(b"q")
    reads.failing = True
    assert reads.finish() == 1  # failed: tried again in a second
    assert clock.getDelayedCalls()
    stop(clock, broker)
    assert clock.getDelayedCalls() == []
    clock.advance(sqlite.RETRY_SECONDS)
    assert reads.calls == []
