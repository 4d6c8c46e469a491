"""The broker on its own: queues, waiters and timeouts, driven by ``task.Clock``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure

from mqmq.broker.broker import Broker
from mqmq.errors import GetTimeout
from wire import sqlite_store

# Exactly representable, so clock arithmetic lands on the deadline exactly.
EPSILON = 2.0**-10


# Every test runs against each store: the memory store, and the SQLite store
# (real SQLite in a temporary directory, its writes run at once on the clock).
_database: list[Path] = []


@pytest.fixture(autouse=True, params=["memory", "sqlite"])
def store_kind(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        _database.append(tmp_path / "queues.db")
    yield request.param
    _database.clear()


def make_broker() -> tuple[Broker, task.Clock]:
    clock = task.Clock()
    if not _database:
        return Broker(clock), clock
    broker = Broker(clock, store=sqlite_store(_database[0])(clock))
    broker.startService()
    return broker, clock


def timers(clock: task.Clock) -> list[Any]:
    """The clock's pending calls but a store's write of its changes."""
    return [call for call in clock.getDelayedCalls() if "_write_pending" not in repr(call.func)]


class Outcome:
    """What a Deferred fired with, recorded without consuming anything else."""

    def __init__(self, d: defer.Deferred[bytes]) -> None:
        self.fired = False
        self.result: Any = None
        d.addBoth(self._record)

    def _record(self, result: Any) -> None:
        self.fired = True
        self.result = result

    @property
    def message(self) -> bytes:
        assert self.fired, "the Deferred has not fired"
        assert isinstance(self.result, bytes), f"failed instead: {self.result!r}"
        return self.result

    def failure(self) -> Failure:
        assert self.fired, "the Deferred has not fired"
        assert isinstance(self.result, Failure), f"succeeded instead: {self.result!r}"
        return self.result


def info(broker: Broker) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(broker.info_json())
    return document


# FIFO, put and take


def test_take_returns_messages_in_put_order() -> None:
    broker, _ = make_broker()
    for message in (b"one", b"two", b"three"):
        broker.put(b"q", message)
    assert [broker.take(b"q") for _ in range(4)] == [b"one", b"two", b"three", None]


def test_queues_are_independent() -> None:
    broker, _ = make_broker()
    broker.put(b"a", b"a1")
    broker.put(b"b", b"b1")
    broker.put(b"a", b"a2")
    assert broker.take(b"b") == b"b1"
    assert broker.take(b"b") is None
    assert broker.take(b"a") == b"a1"
    assert broker.take(b"a") == b"a2"


def test_empty_name_and_binary_messages() -> None:
    broker, _ = make_broker()
    broker.put(b"", b"\x00\xff")
    broker.put(b"", b"")
    assert broker.take(b"") == b"\x00\xff"
    assert broker.take(b"") == b""
    assert broker.take(b"") is None


def test_get_on_non_empty_queue_fires_at_once() -> None:
    broker, clock = make_broker()
    broker.put(b"q", b"first")
    broker.put(b"q", b"second")
    outcome = Outcome(broker.get(b"q", 5))
    assert outcome.message == b"first"
    assert timers(clock) == []
    assert broker.take(b"q") == b"second"


# Waiting


@pytest.mark.parametrize("method", ["get", "wait"])
def test_waiter_fires_with_first_message_put_later(method: str) -> None:
    broker, clock = make_broker()
    outcome = Outcome(getattr(broker, method)(b"q", 5))
    assert not outcome.fired
    broker.put(b"q", b"first")
    assert outcome.message == b"first"
    broker.put(b"q", b"second")
    assert broker.take(b"q") == b"second"
    assert broker.num_messages == 0


def test_message_on_another_queue_does_not_wake_waiter() -> None:
    broker, _ = make_broker()
    outcome = Outcome(broker.get(b"q", 5))
    broker.put(b"other", b"m")
    assert not outcome.fired
    assert broker.take(b"other") == b"m"


def test_waiters_served_in_order_they_started_waiting() -> None:
    broker, _ = make_broker()
    outcomes = [Outcome(broker.get(b"q", 5)) for _ in range(4)]
    for message in (b"m0", b"m1", b"m2", b"m3"):
        broker.put(b"q", message)
    assert [o.message for o in outcomes] == [b"m0", b"m1", b"m2", b"m3"]
    assert broker.num_messages == 0


def test_timeout_fires_after_exactly_the_timeout() -> None:
    broker, clock = make_broker()
    outcome = Outcome(broker.get(b"q", 2.5))
    clock.advance(2.5 - EPSILON)
    assert not outcome.fired
    clock.advance(EPSILON)
    outcome.failure().trap(GetTimeout)
    assert timers(clock) == []
    # The timed-out waiter is gone: the next message is stored.
    broker.put(b"q", b"m")
    assert broker.num_messages == 1
    assert broker.take(b"q") == b"m"


def test_timed_out_waiter_is_skipped_by_later_messages() -> None:
    broker, clock = make_broker()
    short = Outcome(broker.get(b"q", 1))
    long = Outcome(broker.get(b"q", 10))
    clock.advance(1)
    short.failure().trap(GetTimeout)
    assert not long.fired
    broker.put(b"q", b"m")
    assert long.message == b"m"
    assert timers(clock) == []


def test_timer_cancelled_when_message_arrives() -> None:
    broker, clock = make_broker()
    outcome = Outcome(broker.get(b"q", 5))
    assert len(timers(clock)) == 1
    broker.put(b"q", b"m")
    assert outcome.message == b"m"
    assert timers(clock) == []
    clock.advance(10)
    assert outcome.result == b"m"


def test_cancelled_waiter_is_removed_at_once() -> None:
    broker, clock = make_broker()
    d = broker.get(b"q", 5)
    outcome = Outcome(d)
    d.cancel()
    outcome.failure().trap(defer.CancelledError)
    assert timers(clock) == []
    # A departed consumer never takes a message: it is stored, not lost.
    broker.put(b"q", b"m")
    assert broker.num_messages == 1
    assert broker.num_bytes == 1
    assert info(broker)["Queues"] == {"q": {"NumMessages": 1}}
    assert broker.take(b"q") == b"m"


def test_cancelling_one_waiter_passes_message_to_the_next() -> None:
    broker, clock = make_broker()
    first = broker.get(b"q", 5)
    second = Outcome(broker.get(b"q", 5))
    third = Outcome(broker.get(b"q", 5))
    first.addErrback(lambda f: f.trap(defer.CancelledError))
    first.cancel()
    assert len(timers(clock)) == 2
    broker.put(b"q", b"m1")
    broker.put(b"q", b"m2")
    assert second.message == b"m1"
    assert third.message == b"m2"
    assert timers(clock) == []


def test_cancel_after_delivery_changes_nothing() -> None:
    broker, clock = make_broker()
    d = broker.get(b"q", 5)
    outcome = Outcome(d)
    broker.put(b"q", b"m")
    d.cancel()
    assert outcome.message == b"m"
    assert broker.num_messages == 0
    assert timers(clock) == []


# put_back


def test_put_back_goes_to_front_of_queue() -> None:
    broker, _ = make_broker()
    broker.put(b"q", b"a")
    broker.put(b"q", b"bb")
    taken = broker.take(b"q")
    assert taken == b"a"
    assert (broker.num_messages, broker.num_bytes) == (1, 2)
    broker.put_back(b"q", taken)
    assert (broker.num_messages, broker.num_bytes) == (2, 3)
    assert info(broker)["Queues"] == {"q": {"NumMessages": 2}}
    assert [broker.take(b"q") for _ in range(3)] == [b"a", b"bb", None]


def test_put_back_on_new_queue_creates_it() -> None:
    broker, _ = make_broker()
    broker.put_back(b"fresh", b"m")
    assert broker.num_queues == 1
    assert broker.take(b"fresh") == b"m"


def test_put_back_hands_message_to_waiter() -> None:
    broker, clock = make_broker()
    first = Outcome(broker.get(b"q", 5))
    second = Outcome(broker.get(b"q", 5))
    broker.put_back(b"q", b"returned")
    assert first.message == b"returned"
    assert not second.fired
    assert broker.num_messages == 0
    assert broker.num_bytes == 0
    assert len(timers(clock)) == 1


# Counts and Info


def test_message_and_byte_counts() -> None:
    broker, _ = make_broker()
    assert (broker.num_messages, broker.num_bytes, broker.num_queues) == (0, 0, 0)
    broker.put(b"a", b"12345")
    broker.put(b"a", b"")
    broker.put(b"b", b"xyz")
    assert (broker.num_messages, broker.num_bytes, broker.num_queues) == (3, 8, 2)
    broker.take(b"a")
    assert (broker.num_messages, broker.num_bytes) == (2, 3)
    broker.take(b"a")
    broker.take(b"b")
    assert (broker.num_messages, broker.num_bytes, broker.num_queues) == (0, 0, 2)


def test_message_handed_to_waiter_is_never_counted() -> None:
    broker, _ = make_broker()
    Outcome(broker.get(b"q", 5))
    broker.put(b"q", b"m")
    assert (broker.num_messages, broker.num_bytes) == (0, 0)
    assert info(broker)["NumMessages"] == 0


def test_get_and_take_create_queues_that_stay_listed_when_empty() -> None:
    broker, clock = make_broker()
    broker.get(b"waited", 1).addErrback(lambda f: f.trap(GetTimeout))
    assert broker.take(b"taken") is None
    broker.put(b"drained", b"m")
    broker.take(b"drained")
    clock.advance(1)
    assert broker.num_queues == 3
    assert info(broker) == {
        "NumConnections": 0,
        "NumQueues": 3,
        "NumMessages": 0,
        "Queues": {
            "drained": {"NumMessages": 0},
            "taken": {"NumMessages": 0},
            "waited": {"NumMessages": 0},
        },
    }


def test_info_json_exact_bytes_and_key_order() -> None:
    broker, _ = make_broker()
    broker.num_connections = 2
    for _ in range(3):
        broker.put(b"b", b"m")
    broker.put(b"a", b"m")
    raw = broker.info_json()
    assert raw == (
        b'{"NumConnections":2,"NumQueues":2,"NumMessages":4,'
        b'"Queues":{"a":{"NumMessages":1},"b":{"NumMessages":3}}}'
    )
    pairs = json.loads(raw, object_pairs_hook=lambda kv: [k for k, _ in kv])
    assert pairs == ["NumConnections", "NumQueues", "NumMessages", "Queues"]


def test_info_snapshot() -> None:
    broker, _ = make_broker()
    broker.put(b"q", b"m")
    broker.put(b"q", b"m")
    snapshot = broker.info()
    assert snapshot.num_queues == 1
    assert snapshot.num_messages == 2
    assert dict(snapshot.queues) == {"q": 2}


def test_info_never_fails_on_invalid_utf8_names() -> None:
    broker, _ = make_broker()
    broker.put(b"q\xff\xfe", b"m")
    assert info(broker)["Queues"] == {"q\ufffd\ufffd": {"NumMessages": 1}}


# Stopping


def test_stop_service_cancels_waiters_and_timers_and_keeps_messages() -> None:
    broker, clock = make_broker()
    broker.startService()
    broker.put(b"kept", b"m1")
    broker.put(b"kept", b"m2")
    waiting = [Outcome(broker.get(name, 5)) for name in (b"x", b"x", b"y")]
    assert len(timers(clock)) == 3
    broker.stopService()
    assert not broker.running
    for outcome in waiting:
        outcome.failure().trap(defer.CancelledError)
    assert timers(clock) == []
    # Nobody waits any more: later messages are stored.
    broker.put(b"x", b"late")
    assert broker.num_messages == 3
    assert broker.take(b"kept") == b"m1"
    assert broker.take(b"kept") == b"m2"
    assert broker.take(b"x") == b"late"


def test_info_sees_queues_created_and_counts_changed_after_an_earlier_info() -> None:
    broker, _ = make_broker()
    broker.put(b"b", b"1")
    first = json.loads(broker.info_json())
    assert first["Queues"] == {"b": {"NumMessages": 1}}
    broker.put(b"a", b"1")
    broker.put(b"b", b"2")
    broker.take(b"c")
    second = broker.info_json()
    assert second == (
        b'{"NumConnections":0,"NumQueues":3,"NumMessages":3,"Queues":'
        b'{"a":{"NumMessages":1},"b":{"NumMessages":2},"c":{"NumMessages":0}}}'
    )
