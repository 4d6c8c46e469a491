"""Handing a message to waiting ``Get``s: departed consumers are passed over
in a loop, never through recursion, and no message is dropped on the way.

An ``OK``-acknowledged ``Put`` was once lost when a few hundred waiting
consumers had left: each departed waiter put the message back through
``Broker.put``, which handed it to the next waiter, one stack frame each,
until Python's recursion limit dropped it.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.logger import capturedLogs

from mqmq import errors
from mqmq.server import protocol as server_module
from mqmq.broker.broker import Broker
from mqmq.broker.limits import Limits
from support import failure, success
from wire import Server

# Every test here runs on the memory store and on the SQLite store.
pytestmark = pytest.mark.usefixtures("both_stores")

#: Well past Python's recursion limit: one frame per waiter would fail on
#: CPython.  PyPy's limit counts bytes of stack, and its JIT's frames are
#: small (measured: 20,000 levels of a warmed-up recursive function under a
#: limit of 1,000), so the tests also watch the stack's depth.
MANY = 5 * sys.getrecursionlimit()


def stack_depth() -> int:
    return sum(1 for _ in traceback.walk_stack(None))


def assert_flat(depths: list[int]) -> None:
    """One frame per waiter would make the stack grow by thousands."""
    assert len(depths) == MANY
    assert max(depths) - min(depths) < 10, f"the stack grew from {min(depths)} to {max(depths)}"


def test_thousands_of_departed_waiters_are_passed_over_and_the_message_is_kept() -> None:
    broker = Broker(task.Clock())
    depths: list[int] = []

    def departed() -> bool:
        depths.append(stack_depth())
        return False

    gone = [broker.wait(b"q", 3600, present=departed) for _ in range(MANY)]
    broker.put(b"q", b"acknowledged")
    assert_flat(depths)
    for waiting in gone:
        failure(waiting, errors.ConsumerGone)
    assert broker.num_messages == 1
    assert broker.info().queues == {"q": 1}
    assert broker.take(b"q") == b"acknowledged"
    # Their timers went with them.
    assert broker.clock.getDelayedCalls() == []  # type: ignore[attr-defined]


def test_the_first_waiter_still_there_behind_departed_ones_takes_the_message() -> None:
    broker = Broker(task.Clock())
    gone = [broker.wait(b"q", 3600, present=lambda: False) for _ in range(MANY)]
    there = broker.wait(b"q", 3600, present=lambda: True)
    later = broker.wait(b"q", 3600)
    broker.put(b"q", b"m")
    assert success(there) == b"m"
    assert not later.called
    assert all(waiting.called for waiting in gone)
    assert broker.num_messages == 0


def test_callbacks_that_put_the_message_back_do_not_recurse() -> None:
    # Consumers that turn the message down from their callback, as the server
    # once did for a departed connection: thousands of them in a row.
    broker = Broker(task.Clock())

    depths: list[int] = []

    def turn_down(message: bytes) -> None:
        depths.append(stack_depth())
        broker.put_back(b"q", message)

    for _ in range(MANY):
        broker.wait(b"q", 3600).addCallback(turn_down)
    broker.put(b"q", b"acknowledged")
    assert_flat(depths)
    assert broker.num_messages == 1
    assert broker.take(b"q") == b"acknowledged"


def test_messages_put_back_from_callbacks_keep_their_order() -> None:
    broker = Broker(task.Clock())
    received: list[bytes] = []

    def turn_down_once(message: bytes) -> None:
        received.append(message)
        broker.put_back(b"q", message)

    broker.wait(b"q", 10).addCallback(turn_down_once)
    broker.put(b"q", b"first")
    broker.put(b"q", b"second")
    assert received == [b"first"]
    assert [broker.take(b"q"), broker.take(b"q")] == [b"first", b"second"]


def test_a_presence_check_that_raises_counts_as_departed_and_keeps_the_message() -> None:
    broker = Broker(task.Clock())

    def broken() -> bool:
        raise RuntimeError("boom")

    waiting = broker.wait(b"q", 10, present=broken)
    with capturedLogs() as events:
        broker.put(b"q", b"kept")
    failure(waiting, errors.ConsumerGone)
    assert broker.take(b"q") == b"kept"
    assert broker.clock.getDelayedCalls() == []  # type: ignore[attr-defined]
    # The failure was logged, not swallowed.
    logged = [event["log_failure"] for event in events if "log_failure" in event]
    assert len(logged) == 1 and logged[0].check(RuntimeError)


def test_server_passes_over_thousands_of_departed_unread_consumers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The attack as it was found, on fake transports: consumers with a Get
    # waiting and more than --max-pending-bytes behind it (so the server has
    # stopped reading them) have left; a Put must still be kept.
    server = Server(Limits(max_pending_bytes=20))
    departed = []
    for _ in range(2000):
        conn = server.connect()
        conn.send([b"Get", b"q", b"3600000"], [b"Info"], [b"Info"])
        assert not conn.reading
        departed.append(conn)
    gone = {id(conn.transport) for conn in departed}
    monkeypatch.setattr(server_module, "peer_has_gone", lambda transport: id(transport) in gone)

    producer = server.connect()
    producer.send([b"Put", b"q", b"acknowledged"])
    assert producer.replies() == [[b"OK"]]
    for conn in departed:
        assert conn.replies() == []
        assert conn.transport.disconnected  # aborted: it left
    consumer = server.connect()
    consumer.send([b"Info"], [b"Get", b"q", b"1000"])
    info, got = consumer.replies()
    assert b'"NumMessages":1' in info[1]
    assert got == [b"OK", b"acknowledged"]


def test_broker_refuses_queue_names_that_are_not_bytes() -> None:
    broker = Broker(task.Clock())
    calls: list[Any] = [
        lambda: broker.put("jobs", b"x"),  # type: ignore[arg-type]
        lambda: broker.put(b"jobs", "x"),  # type: ignore[arg-type]
        lambda: broker.take("jobs"),  # type: ignore[arg-type]
        lambda: broker.get("jobs", 1),  # type: ignore[arg-type]
        lambda: broker.wait("jobs", 1),  # type: ignore[arg-type]
        lambda: broker.put_back("jobs", b"x"),  # type: ignore[arg-type]
        lambda: broker.put(bytearray(b"jobs"), b"x"),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="bytes"):
            call()
    # Nothing was created, and Info, from any client, still works.
    assert broker.num_queues == 0
    broker.put(b"jobs", b"x")
    assert broker.info().queues == {"jobs": 1}
    server = Server()
    server.broker.put(b"b", b"1")
    with pytest.raises(TypeError):
        server.broker.put("a", b"2")  # type: ignore[arg-type]
    conn = server.connect()
    conn.send([b"Info"])
    assert conn.replies()[0][0] == b"OK"


def test_in_process_waiters_without_a_presence_check_are_served_as_before() -> None:
    broker = Broker(task.Clock())
    waiting = broker.get(b"q", 5)
    broker.put(b"q", b"m")
    assert success(waiting) == b"m"
    timing_out = broker.get(b"q", 5)
    broker.clock.advance(5)  # type: ignore[attr-defined]
    failure(timing_out, errors.GetTimeout)
    cancelled = broker.get(b"q", 5)
    cancelled.cancel()
    failure(cancelled, defer.CancelledError)
    broker.put(b"q", b"kept")
    assert broker.take(b"q") == b"kept"


def test_messages_put_back_reach_waiting_gets_oldest_first() -> None:
    broker = Broker(task.Clock())
    first, second = broker.wait(b"q", 10), broker.wait(b"q", 10)
    broker.put_back(b"q", b"m1", b"m2", b"m3")
    assert (success(first), success(second)) == (b"m1", b"m2")
    # The one left over stays at the front, before anything put later.
    broker.put(b"q", b"later")
    assert [broker.take(b"q"), broker.take(b"q")] == [b"m3", b"later"]


def test_messages_put_back_with_nobody_waiting_keep_their_order_at_the_front() -> None:
    broker = Broker(task.Clock())
    broker.put(b"q", b"newer")
    broker.put_back(b"q", b"m1", b"m2")
    assert [broker.take(b"q") for _ in range(3)] == [b"m1", b"m2", b"newer"]


def test_a_callback_that_makes_the_queue_forgotten_loses_nothing() -> None:
    # A waiter's callback makes a new queue at --max-queues, which forgets
    # the queue the next message was offered on: it must come back.
    broker = Broker(task.Clock(), Limits(max_queues=1))

    def make_a_queue(message: bytes) -> None:
        broker.put(b"other", message)

    broker.wait(b"q", 10).addCallback(make_a_queue)
    broker.put_back(b"q", b"m1", b"m2")
    assert broker.num_messages == 2
    assert broker.take(b"other") == b"m1"
    assert broker.take(b"q") == b"m2"
