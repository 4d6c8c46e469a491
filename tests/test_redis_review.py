"""A review's reproductions for the Redis store: each test states a rule the
store should keep, on fake clocks against a real redis-server, as
``test_redis_store`` does.  Those it breaks today are marked ``xfail``
(strict: fixing the store turns them into failures to unmark)."""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from mqmq.redis import RedisUnavailable, Script
from mqmq.stores import redis as redis_module
from redis_support import RedisServer
from redis_sync import SyncRedis
from test_redis_store import servers, store_of, tick
from wire import Server

OK = [b"OK"]


def sync_client(server: Server) -> SyncRedis:
    client: Any = store_of(server).client
    while not isinstance(client, SyncRedis):
        client = client.client
    return client


def keys_of(server: Server, name: bytes) -> list[bytes]:
    store = store_of(server)
    queue = store._queues.get(name)
    return queue.keys if queue is not None else redis_module.RedisQueue(store, name).keys


def reader(server: Server) -> SyncRedis:
    """A client of the server's Redis of the test's own (the store's may be stopped)."""
    client = SyncRedis(*sync_client(server).address)
    client.start()
    return client


def in_redis(server: Server, name: bytes) -> list[bytes]:
    """The ready messages of a queue, front first, as Redis holds them."""
    client = reader(server)
    keys = keys_of(server, name)
    try:
        return [client.command(b"HGET", keys[1], i) for i in client.command(b"LRANGE", keys[0], 0, -1)]
    finally:
        client.stop()


class Scripted:
    """Wraps a store's client: each script (EVALSHA) takes the next behaviour
    queued in ``plan``: ``"ok"``, ``"ran"`` (runs, but its answer is lost)
    or ``"lost"`` (never reaches Redis); ``"ok"`` once the plan is empty.
    ``only`` limits the plan to one script (by default the queues' APPLY)."""

    def __init__(self, client: Any, only: Optional[Script] = None) -> None:
        self.client = client
        self.plan: list[str] = []
        self.only = only

    def eval(self, script: Script, keys: Sequence[bytes], args: Sequence[Any]) -> defer.Deferred[Any]:
        if not self.plan or (self.only is not None and script is not self.only):
            return self.client.eval(script, keys, args)
        how = self.plan.pop(0)
        if how == "ok":
            return self.client.eval(script, keys, args)
        if how == "ran":
            self.client.eval(script, keys, args)
        return defer.fail(RedisUnavailable(f"the connection to Redis was lost (test: {how})"))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def scripted(server: Server, only: Optional[Script] = redis_module._APPLY) -> Scripted:
    store = store_of(server)
    wrapper = Scripted(store.client, only)
    store.client = wrapper  # type: ignore[assignment]
    return wrapper


class Later:
    """Wraps a store's client: while ``holding``, each script runs in Redis at
    once but its answer (or a failure, for the scripts in ``failing``)
    arrives only at :meth:`answer`, as over a real connection."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.holding = False
        self.failing: set[Script] = set()
        self.held: list[tuple[defer.Deferred[Any], Any]] = []

    def eval(self, script: Script, keys: Sequence[bytes], args: Sequence[Any]) -> defer.Deferred[Any]:
        if not self.holding:
            return self.client.eval(script, keys, args)
        outcome: list[Any] = []
        if script in self.failing:
            outcome.append(Failure(RedisUnavailable("Redis did not answer (test)")))
        else:
            self.client.eval(script, keys, args).addBoth(outcome.append)
        waiting: defer.Deferred[Any] = defer.Deferred()
        self.held.append((waiting, outcome[0]))
        return waiting

    def answer(self) -> None:
        """Every held answer arrives, in order."""
        self.holding = False
        held, self.held = self.held, []
        for waiting, outcome in held:
            waiting.callback(outcome) if not isinstance(outcome, Failure) else waiting.errback(outcome)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def later(server: Server) -> Later:
    store = store_of(server)
    wrapper = Later(store.client)
    store.client = wrapper  # type: ignore[assignment]
    return wrapper


# Messages lost ---------------------------------------------------------------


def test_what_a_lost_take_took_comes_back_even_if_the_next_try_fails_too(redis_server: RedisServer) -> None:
    [server] = servers(redis_server, 1)
    producer = server.connect()
    producer.send([b"Put", b"q", b"first"])
    assert producer.replies() == [OK]
    client = scripted(server)
    # The take runs but its answer is lost; the try a second later fails
    # too (Redis is still restarting, say); the one after works.
    client.plan = ["ran", "lost"]
    waiting = server.connect()
    waiting.send([b"Get", b"q", b"60000"])
    assert waiting.replies() == []
    server.store_clock.advance(redis_module.RETRY_SECONDS)
    server.settle()
    server.store_clock.advance(redis_module.RETRY_SECONDS)
    server.settle()
    tick(server)
    # (Today: no reply, and nothing in Redis but the take's record, which
    # expires a minute later.)
    assert (waiting.replies(), in_redis(server, b"q")) == ([[b"OK", b"first"]], [])


def test_stopping_puts_back_what_a_lost_take_took(redis_server: RedisServer) -> None:
    [server] = servers(redis_server, 1)
    producer = server.connect()
    producer.send([b"Put", b"q", b"first"])
    assert producer.replies() == [OK]
    scripted(server).plan = ["ran"]
    waiting = server.connect()
    waiting.send([b"Get", b"q", b"60000"])
    assert waiting.replies() == []
    # The server is stopped (SIGTERM) before its retry, Redis answering again.
    waiting.close()
    stopped = store_of(server).stop()
    server.settle()
    assert stopped.called
    assert in_redis(server, b"q") == [b"first"]


# Answered OK, not stored ------------------------------------------------------


def test_a_put_on_a_queue_waiting_for_its_retry_is_not_answered_ok_before_redis_stores_it(
    redis_server: RedisServer,
) -> None:
    [server] = servers(redis_server, 1)
    connection = server.connect()
    connection.send([b"Put", b"q", b"job"], [b"Reserve", b"q"])
    [_, [_, _, message_id, _]] = connection.replies()
    client = scripted(server)
    client.plan = ["lost"]
    connection.send([b"Ack", b"q", message_id])  # q's script fails: q waits a second
    assert connection.replies() == []
    producer = server.connect()
    producer.send([b"Put", b"other", b"x"], [b"Put", b"q", b"new"])
    # Not answered before q's retry: behind it, in a script of its own
    # (and the other queue's OK, of the same batch, with it).
    assert producer.replies() == []
    assert b"new" not in in_redis(server, b"q")
    client.plan = ["lost"]  # q's retried Ack fails again; the Put goes
    server.store_clock.advance(redis_module.RETRY_SECONDS)
    server.settle()
    assert producer.replies() == [OK, OK]
    assert b"new" in in_redis(server, b"q")


def test_a_put_on_a_queue_waiting_for_its_retry_on_a_fresh_connection(redis_server: RedisServer) -> None:
    [server] = servers(redis_server, 1)
    connection = server.connect()
    connection.send([b"Put", b"q", b"job"], [b"Reserve", b"q"])
    [_, [_, _, message_id, _]] = connection.replies()
    scripted(server).plan = ["lost"]
    connection.send([b"Ack", b"q", message_id])  # q's script fails: q waits a second
    assert connection.replies() == []
    producer = server.connect()
    producer.send([b"Put", b"q", b"new"])  # (Today: AssertionError, from the protocol)
    server.store_clock.advance(redis_module.RETRY_SECONDS)
    server.settle()
    assert producer.replies() == [OK]


# Done twice ----------------------------------------------------------------


@pytest.mark.xfail(strict=True, reason="K is in _RETRIED but is not idempotent: a Kick whose answer was "
                   "lost is run again and kicks twice as many")
def test_a_kick_in_doubt_is_not_done_twice(redis_server: RedisServer) -> None:
    [server] = servers(redis_server, 1)
    connection = server.connect()
    connection.send(*[[b"Put", b"q", b"m%d" % n] for n in range(2)])
    assert connection.replies() == [OK, OK]
    connection.send([b"Reserve", b"q"], [b"Reserve", b"q"])
    ids = [reply[2] for reply in connection.replies()]
    connection.send(*[[b"Bury", b"q", i] for i in ids])
    assert connection.replies() == [OK, OK]
    scripted(server).plan = ["ran"]
    connection.send([b"Kick", b"q", b"1"])
    assert connection.replies() == []  # held for the retry
    server.store_clock.advance(redis_module.RETRY_SECONDS)
    server.settle()
    assert connection.replies() == [[b"OK", b"1"]]
    client = sync_client(server)
    assert client.command(b"LLEN", keys_of(server, b"q")[5]) == 1  # one still buried
    assert in_redis(server, b"q") == [b"m0"]


@pytest.mark.xfail(strict=True, reason="F with a new id (put_back) is in _RETRIED but is not idempotent: "
                   "in doubt, the message is stored twice")
def test_a_put_back_in_doubt_is_not_stored_twice(redis_server: RedisServer) -> None:
    [server] = servers(redis_server, 1)
    scripted(server).plan = ["ran"]
    # (The protocol puts back a Get's message whose reply its consumer never received.)
    server.broker.put_back(b"q", b"undelivered")
    server.settle()
    server.store_clock.advance(redis_module.RETRY_SECONDS)
    server.settle()
    assert in_redis(server, b"q") == [b"undelivered"]


# Reservations of a dead server -------------------------------------------------


def test_a_dead_server_s_short_reservation_comes_back_after_its_own_lease(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_module, "GRACE_MS", 0)
    a, b = servers(redis_server, 2)
    producer = b.connect()
    producer.send([b"Put", b"q", b"long"], [b"Put", b"q", b"short"])
    assert producer.replies() == [OK, OK]
    doomed = a.connect()
    doomed.send([b"Reserve", b"q", b"100", b"600000"])  # ten minutes
    assert doomed.replies()[0][1] == b"long"
    doomed.send([b"Reserve", b"q", b"100", b"200"])  # 200 ms, within 5 s of the first
    assert doomed.replies()[0][1] == b"short"
    # A dies (kill -9).  The short lease ends; B's sweeps run.
    time.sleep(0.3)
    tick(b)
    tick(b)
    consumer = b.connect()
    consumer.send([b"Reserve", b"q", b"100"])
    b.clock.advance(0.1)
    [reply] = consumer.replies()
    assert reply[:2] == [b"OK", b"short"]


def test_a_reservation_behind_a_failed_index_touch_is_swept_after_its_server_dies(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_module, "GRACE_MS", 0)
    a, b = servers(redis_server, 2)
    producer = b.connect()
    producer.send([b"Put", b"q", b"one"], [b"Put", b"q", b"two"])
    assert producer.replies() == [OK, OK]
    warm = a.connect()
    warm.send([b"Put", b"other", b"x"])  # A has a connection to Redis and numbers
    assert warm.replies() == [OK]
    client = later(a)
    # The touch (the index's node in a cluster, say) does not answer; the
    # queue's node does.
    client.failing.add(redis_module._INDEX_TOUCH)
    client.holding = True
    first, second = a.connect(), a.connect()
    first.send([b"Reserve", b"q", b"60000", b"200"])
    a.store_clock.advance(0)  # the first take waits behind the touch
    second.send([b"Reserve", b"q", b"60000", b"200"])
    a.store_clock.advance(0)  # the second waits behind the first's gate
    client.answer()  # the touch fails: the scripts behind it fail with it
    a.settle()
    assert first.replies() + second.replies() == []
    # A dies.  Nothing was reserved without the index knowing it.
    time.sleep(0.3)
    tick(b)
    assert in_redis(b, b"q") == [b"one", b"two"]


@pytest.mark.xfail(strict=True, reason="an Ack that Redis ignores (the reservation was swept back while "
                   "its server lived, or after a partition) is answered OK: the APPLY script's A is a "
                   "silent no-op")
def test_an_ack_redis_ignored_is_not_answered_ok(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_module, "GRACE_MS", 0)
    a, b = servers(redis_server, 2)
    holder = a.connect()
    holder.send([b"Put", b"q", b"job"], [b"Reserve", b"q", b"100", b"200"])
    [_, [_, _, message_id, _]] = holder.replies()
    # A's reactor stalls past the lease (its broker's timer has not run);
    # B's sweep puts the message back and B's consumer reserves it.
    time.sleep(0.3)
    tick(b)
    other = b.connect()
    other.send([b"Reserve", b"q", b"100", b"60000"])
    b.clock.advance(0.1)
    assert other.replies()[0][:2] == [b"OK", b"job"]
    holder.send([b"Ack", b"q", message_id])
    assert holder.replies() == [[b"Error", b"REQUEST_UNKNOWN_ID"]]


# Waiters ------------------------------------------------------------------------


def test_a_wake_up_heard_during_a_take_is_not_lost(redis_server: RedisServer) -> None:
    a, b = servers(redis_server, 2)
    client = later(b)
    consumer = b.connect()
    client.holding = True
    consumer.send([b"Get", b"q", b"500"])
    b.store_clock.advance(0)  # B's take has run in Redis (empty: B sleeps); its answer is on its way
    producer = a.connect()
    producer.send([b"Put", b"q", b"ready"])
    assert producer.replies() == [OK]
    # A's script published; B hears it before the take's answer.
    store = store_of(b)
    store._woken(store._queues[b"q"].channel, b"")
    b.settle()
    client.answer()
    b.settle()
    b.clock.advance(0.5)
    b.settle()
    # (Today: Timeout, the message still ready in Redis.)
    assert (consumer.replies(), in_redis(b, b"q")) == ([[b"OK", b"ready"]], [])


# Kick ---------------------------------------------------------------------------


def test_kick_through_a_server_that_never_served_the_queue(redis_server: RedisServer) -> None:
    a, b = servers(redis_server, 2)
    connection = a.connect()
    connection.send([b"Put", b"q", b"poison"], [b"Reserve", b"q"])
    [_, [_, _, message_id, _]] = connection.replies()
    connection.send([b"Bury", b"q", message_id])
    assert connection.replies() == [OK]
    other = b.connect()
    other.send([b"Kick", b"q", b"1"])
    # Redis kicks it; the count answered is as many as B knew of (README).
    [[ok, _]] = other.replies()
    assert ok == b"OK"
    assert in_redis(b, b"q") == [b"poison"]


# Stopping -----------------------------------------------------------------------


def test_stopping_while_redis_refuses_leaves_nothing_running(redis_server: RedisServer) -> None:
    [server] = servers(redis_server, 1)
    connection = server.connect()
    connection.send([b"Put", b"q1", b"a"], [b"Put", b"q2", b"b"],
                    [b"Reserve", b"q1"], [b"Reserve", b"q2"])
    replies = connection.replies()
    ids = [replies[2][2], replies[3][2]]
    connection.send([b"Ack", b"q1", ids[0]], [b"Ack", b"q2", ids[1]])
    sync_client(server).set_down(True)
    stopped = store_of(server).stop()
    assert stopped.called
    assert server.store_clock.getDelayedCalls() == []


# Redis keys -----------------------------------------------------------------------


@pytest.mark.xfail(strict=True, reason="a queue's meta hash (qn, seq, bytes) is never deleted: every queue "
                   "name ever used stays in Redis (reply-queue patterns grow Redis without bound)")
def test_a_queue_used_once_and_emptied_leaves_no_key_in_redis(redis_server: RedisServer) -> None:
    [server] = servers(redis_server, 1)
    connection = server.connect()
    for n in range(20):
        connection.send([b"Put", b"reply-%d" % n, b"x"], [b"Get", b"reply-%d" % n])
        assert connection.replies() == [OK, [b"OK", b"x"]]
    tick(server)
    prefix = store_of(server).prefix
    client = sync_client(server)
    left = [key for key in client.command(b"KEYS", prefix + b"{q:*") if b":taken:" not in key]
    assert left == []


# The test client ----------------------------------------------------------------


def test_a_server_new_to_a_queue_counts_its_buried_messages_once(redis_server: RedisServer) -> None:
    a, b = servers(redis_server, 2)
    connection = a.connect()
    connection.send([b"Put", b"q", b"poison"], [b"Reserve", b"q"])
    [_, [_, _, message_id, _]] = connection.replies()
    connection.send([b"Bury", b"q", message_id])
    assert connection.replies() == [OK]
    other = b.connect()
    other.send([b"Get", b"q", b"1"])
    b.clock.advance(0.01)
    b.settle()
    assert other.replies() == [[b"Timeout"]]
    # (Today: the total says 1, the queue 0; Info disagrees with itself.)
    assert (b.broker.num_buried, b.broker._queues[b"q"].buried) == (1, 1)
