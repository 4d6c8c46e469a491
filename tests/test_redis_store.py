"""The Redis store's own rules, on fake clocks against a real redis-server:
servers sharing queues, reservations outliving their server, and Redis
failing (the wire rules every store keeps run on it too, through
``conftest.both_stores``)."""

from __future__ import annotations

import time
from typing import Any, Sequence

import pytest
from twisted.internet import defer

from mqmq.broker.limits import Limits
from mqmq.redis import RedisUnavailable, Script
from mqmq.stores import redis as redis_module
from mqmq.stores.redis import RedisStore
from redis_support import RedisServer, unique_prefix
from redis_sync import SyncRedis
from wire import Connection, Server, redis_store

OK = [b"OK"]
STORAGE_ERROR = [b"Error", b"SERVER_STORAGE_ERROR"]


def servers(redis_server: RedisServer, count: int, limits: Limits = Limits()) -> list[Server]:
    """``count`` servers (brokers on fake clocks) sharing one Redis and prefix."""
    prefix = unique_prefix("shared")
    return [Server(limits, store=redis_store(redis_server.address, prefix), remote=True) for _ in range(count)]


def store_of(server: Server) -> RedisStore:
    store = server.broker.store
    assert isinstance(store, RedisStore)
    return store


def client_of(server: Server) -> SyncRedis:
    client: Any = store_of(server).client
    client = getattr(client, "client", client)
    assert isinstance(client, SyncRedis)
    return client


def tick(server: Server) -> None:
    """A second passes for the server's store: its sweep and its look at
    queues with waiters (a wake-up that never came)."""
    server.store_clock.advance(1.2)
    server.settle()


def queue_keys(server: Server, name: bytes) -> list[bytes]:
    return store_of(server).queue(name).keys if name not in store_of(server)._queues else \
        store_of(server)._queues[name].keys


def test_a_put_on_one_server_reaches_a_get_waiting_on_another(redis_server: RedisServer) -> None:
    a, b = servers(redis_server, 2)
    consumer = b.connect()
    consumer.send([b"Get", b"q", b"10000"])
    assert consumer.replies() == []
    sleep_key = queue_keys(b, b"q")[7]
    # B found the queue empty: it sleeps on it, and a message made ready wakes it.
    assert client_of(b).command(b"SMEMBERS", sleep_key) == [store_of(b).server_id]
    producer = a.connect()
    producer.send([b"Put", b"q", b"hello"])
    assert producer.replies() == [OK]
    assert client_of(a).command(b"SMEMBERS", sleep_key) == []  # published, and woken
    # (The test's client hears no publish: B looks within its next second.)
    tick(b)
    assert consumer.replies() == [[b"OK", b"hello"]]


def test_a_message_goes_to_one_server_s_waiter_only(redis_server: RedisServer) -> None:
    a, b, c = servers(redis_server, 3)
    waiting = [server.connect() for server in (a, b)]
    for connection in waiting:
        connection.send([b"Get", b"q", b"5000"])
        assert connection.replies() == []
    producer = c.connect()
    producer.send([b"Put", b"q", b"once"])
    assert producer.replies() == [OK]
    tick(a)
    tick(b)
    assert [connection.replies() for connection in waiting] == [[[b"OK", b"once"]], []]
    b.clock.advance(5)
    assert waiting[1].replies() == [[b"Timeout"]]


def test_fifo_holds_across_servers(redis_server: RedisServer) -> None:
    a, b = servers(redis_server, 2)
    first, second = a.connect(), b.connect()
    first.send([b"Put", b"q", b"1"], [b"Put", b"q", b"2"])
    assert first.replies() == [OK, OK]
    second.send([b"Put", b"q", b"3"])
    assert second.replies() == [OK]
    first.send([b"Put", b"q", b"4"])
    assert first.replies() == [OK]
    # Whoever takes them, in the order Redis took them in.
    got = []
    for server in (b, a, b, a):
        connection = server.connect()
        connection.send([b"Get", b"q"])
        got += connection.replies()
    assert got == [[b"OK", b"1"], [b"OK", b"2"], [b"OK", b"3"], [b"OK", b"4"]]


def test_counts_follow_what_other_servers_did(redis_server: RedisServer) -> None:
    a, b = servers(redis_server, 2)
    producer = a.connect()
    producer.send(*[[b"Put", b"q", b"m%d" % n] for n in range(3)])
    assert producer.replies() == [OK] * 3
    consumer = b.connect()
    consumer.send([b"Get", b"q"], [b"Info"])
    replies = consumer.replies()
    assert replies[0] == [b"OK", b"m0"]
    assert b'"Queues":{"q":{"NumMessages":2}}' in replies[1][1]
    # A's view is as of its last word from Redis (plus its own changes on
    # their way): a request on the queue renews it.
    producer.send([b"Info"])
    assert b'"Queues":{"q":{"NumMessages":3}}' in producer.replies()[0][1]
    producer.send([b"Put", b"q", b"m3"])
    assert producer.replies() == [OK]
    producer.send([b"Info"])
    assert b'"Queues":{"q":{"NumMessages":3}}' in producer.replies()[0][1]
    # With no request on it, within a second or so.
    consumer.send([b"Get", b"q"], [b"Get", b"q"])
    assert consumer.replies() == [[b"OK", b"m1"], [b"OK", b"m2"]]
    tick(a)
    producer.send([b"Info"])
    assert b'"Queues":{"q":{"NumMessages":1}}' in producer.replies()[0][1]


def test_a_dead_server_s_reservations_come_back_after_their_leases(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_module, "GRACE_MS", 0)
    a, b = servers(redis_server, 2)
    producer = b.connect()
    producer.send([b"Put", b"q", b"job"])
    assert producer.replies() == [OK]
    doomed = a.connect()
    doomed.send([b"Reserve", b"q", b"100", b"200"])  # a 200 ms lease
    [[ok, message, _, deliveries]] = doomed.replies()
    assert (ok, message, deliveries) == (b"OK", b"job", b"1")
    # A dies here (kill -9): nothing of it runs again.  Its lease ends in
    # Redis's time; B's sweep finds it in the lease index and puts it back.
    time.sleep(0.3)
    tick(b)
    consumer = b.connect()
    consumer.send([b"Reserve", b"q"])
    [[ok, message, _, deliveries]] = consumer.replies()
    assert (ok, message, deliveries) == (b"OK", b"job", b"2")
    assert b.broker.num_messages == 0


def test_reservations_held_by_a_live_server_stay_its_own(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_module, "GRACE_MS", 0)
    a, b = servers(redis_server, 2)
    holder = a.connect()
    holder.send([b"Put", b"q", b"job"], [b"Reserve", b"q", b"100", b"60000"])
    [_, [ok, _, message_id, _]] = holder.replies()
    time.sleep(0.2)
    tick(b)
    other = b.connect()
    other.send([b"Get", b"q", b"1"])
    b.clock.advance(0.001)
    assert other.replies() == [[b"Timeout"]]
    holder.send([b"Ack", b"q", message_id])
    assert holder.replies() == [OK]


def test_redis_down_refuses_new_work_and_recovers(redis_server: RedisServer) -> None:
    [server] = servers(redis_server, 1)
    connection = server.connect()
    connection.send([b"Put", b"q", b"before"])
    assert connection.replies() == [OK]
    client_of(server).set_down(True)
    assert store_of(server).failure is not None
    connection.send([b"Put", b"q", b"during"], [b"Get", b"q"], [b"Reserve", b"q"])
    assert connection.replies() == [STORAGE_ERROR] * 3
    client_of(server).set_down(False)
    connection.send([b"Put", b"q", b"after"], [b"Get", b"q"], [b"Get", b"q"])
    assert connection.replies() == [OK, [b"OK", b"before"], [b"OK", b"after"]]


class _Failing:
    """Wraps a client: the next ``times`` scripts fail, run (``ran``) or not."""

    def __init__(self, client: SyncRedis, ran: bool) -> None:
        self.client = client
        self.ran = ran
        self.times = 0

    def eval(self, script: Script, keys: Sequence[bytes], args: Sequence[Any]) -> defer.Deferred[Any]:
        if self.times:
            self.times -= 1
            if self.ran:
                self.client.eval(script, keys, args)
            return defer.fail(RedisUnavailable("the connection to Redis was lost (test)"))
        return self.client.eval(script, keys, args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def failing(server: Server, ran: bool) -> _Failing:
    store = store_of(server)
    wrapper = _Failing(client_of(server), ran)
    store.client = wrapper  # type: ignore[assignment]
    return wrapper


def test_a_put_redis_did_not_take_is_refused_and_not_counted(redis_server: RedisServer) -> None:
    [server] = servers(redis_server, 1)
    connection = server.connect()
    connection.send([b"Put", b"q", b"kept"])
    assert connection.replies() == [OK]
    failing(server, ran=False).times = 1
    connection.send([b"Put", b"q", b"lost"])
    assert connection.replies() == [STORAGE_ERROR]
    assert server.broker.num_messages == 1 and server.broker.num_bytes == 4
    server.store_clock.advance(redis_module.RETRY_SECONDS)
    connection.send([b"Get", b"q"])
    assert connection.replies() == [[b"OK", b"kept"]]
    connection.send([b"Get", b"q", b"1"])
    server.clock.advance(0.001)
    assert connection.replies() == [[b"Timeout"]]


def test_an_ack_redis_did_not_take_is_tried_again_before_it_is_answered(redis_server: RedisServer) -> None:
    [server] = servers(redis_server, 1)
    connection = server.connect()
    connection.send([b"Put", b"q", b"job"], [b"Reserve", b"q"])
    [_, [_, _, message_id, _]] = connection.replies()
    failing(server, ran=False).times = 1
    connection.send([b"Ack", b"q", message_id])
    assert connection.replies() == []  # held for the retry
    server.store_clock.advance(redis_module.RETRY_SECONDS)
    assert connection.replies() == [OK]
    keys = queue_keys(server, b"q")
    assert client_of(server).command(b"HLEN", keys[1]) == 0  # gone from Redis


def test_what_a_take_whose_answer_was_lost_took_comes_back_to_the_front(redis_server: RedisServer) -> None:
    [server] = servers(redis_server, 1)
    connection = server.connect()
    connection.send([b"Put", b"q", b"first"], [b"Put", b"q", b"second"])
    assert connection.replies() == [OK, OK]
    failing(server, ran=True).times = 1
    waiting = server.connect()
    waiting.send([b"Get", b"q", b"10000"])
    assert waiting.replies() == []  # the take ran, its answer never came
    # Once Redis answers again, what it took is back at the front, and taken again.
    server.store_clock.advance(redis_module.RETRY_SECONDS)
    assert waiting.replies() == [[b"OK", b"first"]]
    connection.send([b"Get", b"q"])
    assert connection.replies() == [[b"OK", b"second"]]
    # Each take's record goes with the queue's next script, or within a second.
    tick(server)
    keys = queue_keys(server, b"q")
    assert client_of(server).command(b"HLEN", keys[8]) == 0


def test_a_redis_that_evicts_keys_is_refused(tmp_path: Any) -> None:
    # (A Redis of its own: the shared one's configuration stays as it is.)
    from redis_support import cli, require_redis

    require_redis()
    own = RedisServer(tmp_path / "redis", ["--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru"])
    own.start()
    try:
        server = Server(store=redis_store(own.address), remote=True)
        connection = server.connect()
        connection.send([b"Put", b"q", b"m"])
        assert connection.replies() == [STORAGE_ERROR]
        assert "maxmemory-policy allkeys-lru" in str(store_of(server).failure)
        cli(own.port, "CONFIG", "SET", "maxmemory-policy", "noeviction")
        server = Server(store=redis_store(own.address), remote=True)
        connection = server.connect()
        connection.send([b"Put", b"q", b"m"])
        assert connection.replies() == [OK]
    finally:
        own.stop()


def test_stopping_writes_what_is_pending_and_answers_nothing_redis_did_not_take(
    redis_server: RedisServer,
) -> None:
    [server] = servers(redis_server, 1)
    connection = server.connect()
    connection.send([b"Put", b"q", b"last"])
    assert store_of(server).stop().called
    assert connection.replies() == [OK]
    [server] = servers(redis_server, 1)
    connection = server.connect()
    connection.send([b"Put", b"q", b"job"], [b"Reserve", b"q"])
    [_, [_, _, message_id, _]] = connection.replies()
    connection.send([b"Ack", b"q", message_id], [b"Put", b"q", b"refused"])
    client_of(server).set_down(True)
    assert store_of(server).stop().called
    # The Ack is tried again, and again refused: never answered OK.
    assert connection.replies() == []


def test_redis_back_is_logged_but_a_first_connection_is_no_news(redis_server: RedisServer) -> None:
    from twisted.internet.task import Clock
    from twisted.logger import capturedLogs, formatEvent

    client = SyncRedis(redis_server.host, redis_server.port)
    store = RedisStore(f"redis://{redis_server.address}/0", Clock(), unique_prefix("log"), client=client)
    with capturedLogs() as events:
        client.failure = "connecting (test)"  # as a real client is until connected
        store.open()
        store.start()
        client.set_down(False)  # connected, after the store started
        first = [formatEvent(event) for event in events]
        client.set_down(True)
        client.set_down(False)
    lines = [formatEvent(event) for event in events]
    assert not any("takes work again" in line for line in first), first
    assert sum("takes work again" in line for line in lines) == 1, lines
    store.stop()
