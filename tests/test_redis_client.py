"""The Redis client: its connection protocol on a fake transport and clock,
URLs, then the one-server client against a real ``redis-server``."""

from __future__ import annotations

import re
import signal
from typing import Any, Callable, Optional

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from mqmq.redis import RedisError, RedisUnavailable, Script, SingleRedis, check_url, from_url, single
from mqmq.redis.client import parse_url, script_command
from mqmq.redis.connection import Command, RedisProtocol, SubscriberProtocol
from redis_support import RedisServer  # its fixtures: redis_server, redis_prefix (conftest.py)
from support import failure, success

ADDRESS = "127.0.0.1:6379"


def connected(kind: type[RedisProtocol] = RedisProtocol, timeout: float = 2.0) -> tuple[RedisProtocol, StringTransport, Clock]:
    clock = Clock()
    protocol = kind(clock, timeout, ADDRESS)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, clock


def send(protocol: RedisProtocol, payload: bytes) -> defer.Deferred[Any]:
    command = Command(payload)
    protocol.send(command)
    return command.deferred


# The connection protocol.

def test_commands_are_written_at_once_and_replies_matched_in_order() -> None:
    protocol, transport, _ = connected()
    first = send(protocol, b"*1\r\n$4\r\nPING\r\n")
    second = send(protocol, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
    third = send(protocol, b"*2\r\n$3\r\nGET\r\n$1\r\nm\r\n")
    assert transport.value() == b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*2\r\n$3\r\nGET\r\n$1\r\nm\r\n"
    protocol.dataReceived(b"+PONG\r\n$5\r\nva")
    assert success(first) == b"PONG"
    assert not second.called
    protocol.dataReceived(b"lue\r\n$-1\r\n")
    assert success(second) == b"value"
    assert success(third) is None


def test_an_error_reply_fails_only_its_command() -> None:
    protocol, _, _ = connected()
    wrong = send(protocol, b"x")
    right = send(protocol, b"y")
    protocol.dataReceived(b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n:3\r\n")
    assert str(failure(wrong, RedisError)).startswith("WRONGTYPE Operation")
    assert success(right) == 3


def test_losing_the_connection_fails_every_pending_command() -> None:
    protocol, _, _ = connected()
    answered = send(protocol, b"a")
    pending = [send(protocol, b"b"), send(protocol, b"c")]
    protocol.dataReceived(b":1\r\n")
    protocol.connectionLost(Failure(ConnectionLost("gone")))
    assert success(answered) == 1
    for deferred in pending:
        assert "lost the connection to Redis at 127.0.0.1:6379" in str(failure(deferred, RedisUnavailable))
    # Later commands fail at once.
    assert "lost the connection" in str(failure(send(protocol, b"d"), RedisUnavailable))


def test_a_late_reply_fails_the_commands_and_drops_the_connection() -> None:
    protocol, transport, clock = connected(timeout=2.0)
    early = send(protocol, b"a")
    clock.advance(1.5)
    protocol.dataReceived(b":1\r\n")
    late = send(protocol, b"b")    # due at 3.5
    after = send(protocol, b"c")
    clock.advance(0.6)             # 2.1: the first command's timer, not late
    assert success(early) == 1
    assert not late.called and not transport.disconnecting
    clock.advance(1.4)             # 3.5
    assert "no reply from Redis at 127.0.0.1:6379 within 2 s" in str(failure(late, RedisUnavailable))
    assert "within 2 s" in str(failure(after, RedisUnavailable))
    assert transport.disconnecting
    # A reply arriving now belongs to no one: nothing more fires, no error.
    protocol.dataReceived(b":2\r\n")
    protocol.connectionLost(Failure(ConnectionLost("aborted")))
    assert "within 2 s" in str(failure(send(protocol, b"d"), RedisUnavailable))


def test_no_timer_is_left_once_the_connection_is_lost() -> None:
    protocol, _, clock = connected()
    send(protocol, b"a").addErrback(lambda _: None)
    protocol.connectionLost(Failure(ConnectionLost("gone")))
    assert clock.getDelayedCalls() == []


def test_a_reply_to_no_command_drops_the_connection() -> None:
    protocol, transport, _ = connected()
    protocol.dataReceived(b"+OK\r\n")
    assert transport.disconnecting


def test_bytes_that_are_not_resp_drop_the_connection_and_fail_the_pending() -> None:
    protocol, transport, _ = connected()
    pending = send(protocol, b"a")
    protocol.dataReceived(b"HTTP/1.1 400 Bad Request\r\n")
    assert "not RESP2" in str(failure(pending, RedisUnavailable))
    assert transport.disconnecting


def test_noscript_sends_eval_once_on_the_same_connection() -> None:
    script = Script("return redis.call('INCR', KEYS[1])")
    protocol, transport, _ = connected()
    command = script_command(script, [b"counter"], [b"arg", 7])
    protocol.send(command)
    assert transport.value() == (b"*6\r\n$7\r\nEVALSHA\r\n$40\r\n" + script.sha +
                                 b"\r\n$1\r\n1\r\n$7\r\ncounter\r\n$3\r\narg\r\n$1\r\n7\r\n")
    transport.clear()
    protocol.dataReceived(b"-NOSCRIPT No matching script. Please use EVAL.\r\n")
    assert not command.deferred.called
    assert transport.value() == (b"*6\r\n$4\r\nEVAL\r\n$%d\r\n%s\r\n" % (len(script.source), script.source) +
                                 b"$1\r\n1\r\n$7\r\ncounter\r\n$3\r\narg\r\n$1\r\n7\r\n")
    transport.clear()
    protocol.dataReceived(b"-NOSCRIPT again\r\n")  # not twice
    assert str(failure(command.deferred, RedisError)) == "NOSCRIPT again"
    assert transport.value() == b""


def test_script_sha_is_sha1_of_the_source() -> None:
    assert Script("return 1").sha == b"e0e1f9fabfc9d4800c877a703b823ac0578ff8db"


def test_the_subscriber_protocol_routes_pushes() -> None:
    protocol, transport, _ = connected(SubscriberProtocol)
    assert isinstance(protocol, SubscriberProtocol)
    messages: list[tuple[bytes, bytes]] = []
    dropped: list[bytes] = []
    protocol.on_message = lambda channel, payload: messages.append((channel, payload))
    protocol.on_dropped = dropped.append
    joining = send(protocol, b"*2\r\n$10\r\nSSUBSCRIBE\r\n$1\r\na\r\n")
    leaving = send(protocol, b"*2\r\n$12\r\nSUNSUBSCRIBE\r\n$1\r\nb\r\n")
    protocol.dataReceived(
        b"*3\r\n$8\r\nsmessage\r\n$1\r\nz\r\n$2\r\nhi\r\n"        # a message, before the confirmation
        b"*3\r\n$10\r\nssubscribe\r\n$1\r\na\r\n:1\r\n"
        b"*3\r\n$12\r\nsunsubscribe\r\n$1\r\nc\r\n:0\r\n"      # Redis's own: c's slot moved
        b"*3\r\n$12\r\nsunsubscribe\r\n$1\r\nb\r\n:0\r\n")     # the answer to ours
    assert messages == [(b"z", b"hi")]
    assert success(joining) == [b"ssubscribe", b"a", 1]
    assert dropped == [b"c"]
    assert success(leaving) == [b"sunsubscribe", b"b", 0]


# The node's connections, on a fake reactor.

def test_a_connection_is_usable_once_its_set_up_is_answered() -> None:
    fake = MemoryReactorClock()
    client = single(fake, "127.0.0.1", 6379, db=3, name=b"mqmq:test")
    states: list[Optional[str]] = []
    client.on_state = states.append
    client.start()
    host, port, factory, timeout, _ = fake.tcpClients[0]
    assert (host, port, timeout) == ("127.0.0.1", 6379, 2.0)
    assert "not connected" in str(failure(client.call(None, "PING"), RedisUnavailable))
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert transport.value() == (b"*3\r\n$6\r\nCLIENT\r\n$7\r\nSETNAME\r\n$9\r\nmqmq:test\r\n"
                                 b"*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n*1\r\n$4\r\nPING\r\n")
    assert "not connected" in str(failure(client.call(None, "PING"), RedisUnavailable))
    protocol.dataReceived(b"+OK\r\n+OK\r\n+PONG\r\n")
    assert client.failure is None and states == [None]
    pinged = client.call(None, "PING")
    protocol.dataReceived(b"+PONG\r\n")
    assert success(pinged) == b"PONG"


def test_a_refused_set_up_closes_the_connection_and_says_why() -> None:
    fake = MemoryReactorClock()
    client = single(fake, "127.0.0.1", 6379, db=99)
    states: list[Optional[str]] = []
    client.on_state = states.append
    client.start()
    connector = fake.connectors[0]
    factory = fake.tcpClients[0][2]
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"-ERR DB index is out of range\r\n+PONG\r\n")
    assert transport.disconnecting
    attempts: list[int] = []
    connector.connect = lambda: attempts.append(1)  # type: ignore[method-assign]
    factory.clientConnectionLost(connector, Failure(ConnectionLost("closed")))
    assert client.failure == ("Redis at 127.0.0.1:6379 refused the connection's set-up: "
                              "ERR DB index is out of range")
    assert states == [client.failure]
    # Tried again after a short backoff.
    fake.advance(0.2)
    assert attempts == [1]


# URLs.

@pytest.mark.parametrize(("url", "parsed"), [
    ("redis://127.0.0.1:6379/0", ("redis", [("127.0.0.1", 6379)], 0)),
    ("redis://localhost", ("redis", [("localhost", 6379)], 0)),
    ("redis://h:7000/5", ("redis", [("h", 7000)], 5)),
    ("redis://[::1]:6380/2", ("redis", [("::1", 6380)], 2)),
    ("redis://[::1]", ("redis", [("::1", 6379)], 0)),
    ("redis://h:1/", ("redis", [("h", 1)], 0)),
    ("redis+cluster://a:7000,b:7001,[::1]", ("redis+cluster", [("a", 7000), ("b", 7001), ("::1", 6379)], 0)),
    ("redis+cluster://a:7000/0", ("redis+cluster", [("a", 7000)], 0)),
])
def test_urls(url: str, parsed: tuple[str, list[tuple[str, int]], int]) -> None:
    assert parse_url(url) == parsed
    check_url(url)


@pytest.mark.parametrize(("url", "complaint"), [
    ("127.0.0.1:6379", "not a Redis URL"),
    ("rediss://h:6379", "unknown scheme 'rediss'"),
    ("redis://:6379", "a host is missing"),
    ("redis://", "a host is missing"),
    ("redis://h:0", "port '0'"),
    ("redis://h:65536", "port '65536'"),
    ("redis://h:port", "port 'port'"),
    ("redis://h:6379/x", "database 'x' is not a number"),
    ("redis://h:6379/-1", "database '-1'"),
    ("redis://a:1,b:2", "for a cluster's nodes use redis+cluster://"),
    ("redis+cluster://a:1/3", "only database 0"),
    ("redis+cluster://a:1,,b:2", "a host is missing"),
    ("redis://user:pw@h:6379", "a user or password is not supported"),
    ("redis://h:6379/0?timeout=1", "options"),
    ("redis://::1:6379", "in brackets"),
    ("redis://[::1:6379", "not an address"),
    ("redis://[::1]6379", "colon and a port"),
])
def test_bad_urls_say_what_is_wrong(url: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=re.escape(complaint)) as raised:
        from_url(reactor, url)
    assert "\n" not in str(raised.value) and url in str(raised.value)


def test_describe() -> None:
    assert single(reactor, "127.0.0.1", 6379, 2).describe() == "redis://127.0.0.1:6379/2"
    assert from_url(reactor, "redis://[::1]:7000").describe() == "redis://[::1]:7000/0"


# Against a real server.

async def until(condition: Callable[[], bool], deadline: float = 10.0, what: str = "condition") -> None:
    """Wait (on the reactor) until ``condition()`` holds."""
    waited = 0.0
    while not condition():
        if waited > deadline:
            pytest.fail(f"{what}: not within {deadline} s")
        await task.deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


async def started(server: RedisServer, **options: Any) -> SingleRedis:
    client = single(reactor, server.host, server.port, **options)
    client.start()
    await until(lambda: client.failure is None, what="connected")
    return client


@pytest_twisted.ensureDeferred
async def test_commands_and_their_replies(redis_server: RedisServer, redis_prefix: bytes) -> None:
    client = await started(redis_server)
    key, listed = redis_prefix + b"k", redis_prefix + b"list"
    try:
        assert await client.call(key, "SET", key, 12) == b"OK"
        assert await client.call(key, "INCRBYFLOAT", key, 0.5) == b"12.5"
        assert await client.call(key, b"GET", key) == b"12.5"
        assert await client.call(None, "GET", redis_prefix + b"missing") is None
        assert await client.call(listed, "RPUSH", listed, b"a", b"", b"c\r\n") == 3
        assert await client.call(listed, "LRANGE", listed, 0, -1) == [b"a", b"", b"c\r\n"]
        with pytest.raises(RedisError, match="^WRONGTYPE"):
            await client.call(listed, "GET", listed)
        # Many at once, pipelined, answered in order.
        counted = await defer.gatherResults([client.call(key, "INCR", redis_prefix + b"n") for _ in range(500)])
        assert counted == list(range(1, 501))
    finally:
        await client.stop()


@pytest_twisted.ensureDeferred
async def test_database_and_name_on_each_connection(redis_server: RedisServer, redis_prefix: bytes) -> None:
    name = b"mqmq-test-" + redis_prefix.replace(b":", b"-")
    client = await started(redis_server, db=4, name=name)
    key = redis_prefix + b"in-db-4"
    try:
        await client.call(key, "SET", key, b"x")
        assert redis_server.cli("-n", "4", "GET", key.decode()) == "x"
        assert redis_server.cli("-n", "0", "EXISTS", key.decode()) == "0"
        subscribed: defer.Deferred[bytes] = defer.Deferred()
        client.subscribe(redis_prefix + b"ch", lambda c, p: None, subscribed.callback)
        await subscribed
        names = [line for line in redis_server.cli("CLIENT", "LIST").splitlines() if f"name={name.decode()} " in line]
        assert len(names) == 2, names  # the command connection and the subscriber
        assert any("db=4" in line for line in names)
    finally:
        await client.stop()


@pytest_twisted.ensureDeferred
async def test_eval_loads_the_script_again_after_script_flush(redis_server: RedisServer, redis_prefix: bytes) -> None:
    script = Script("return {redis.call('INCR', KEYS[1]), ARGV[1], tonumber(ARGV[2]) * 2}")
    client = await started(redis_server)
    key = redis_prefix + b"runs"
    try:
        assert await client.eval(script, [key], [b"x", 21]) == [1, b"x", 42]
        await client.call(None, "SCRIPT", "FLUSH")
        assert await client.call(None, "SCRIPT", "EXISTS", script.sha) == [0]
        # Pipelined, each runs exactly once.
        runs = await defer.gatherResults([client.eval(script, [key], [b"y", 1]) for _ in range(3)])
        assert runs == [[2, b"y", 2], [3, b"y", 2], [4, b"y", 2]]
        assert await client.call(None, "SCRIPT", "EXISTS", script.sha) == [1]
        with pytest.raises(RedisError, match="attempt to compare|user_script"):
            await client.eval(Script("return 1 < {}"), [key], [])
    finally:
        await client.stop()


@pytest_twisted.ensureDeferred
async def test_a_new_connection_loads_the_scripts_used(redis_server: RedisServer, redis_prefix: bytes) -> None:
    script = Script(f"return '{redis_prefix.decode()}'")
    client = await started(redis_server)
    states: list[Optional[str]] = []
    client.on_state = states.append
    try:
        await client.eval(script, [], [])
        await client.call(None, "SCRIPT", "FLUSH")
        await client.call(None, "CLIENT", "KILL", "SKIPME", "no", "ID", str(await client.call(None, "CLIENT", "ID")))
        await until(lambda: len(states) == 2, what="reconnected")
        assert states[0] is not None and "lost the connection" in states[0] and states[1] is None
        assert await client.call(None, "SCRIPT", "EXISTS", script.sha) == [1]
    finally:
        await client.stop()


@pytest_twisted.ensureDeferred
async def test_subscribe_delivers_spublished_messages(redis_server: RedisServer, redis_prefix: bytes) -> None:
    client = await started(redis_server)
    channel, other = redis_prefix + b"wake", redis_prefix + b"other"
    got: list[tuple[bytes, bytes]] = []
    confirmed: list[bytes] = []
    try:
        client.subscribe(channel, lambda c, p: got.append((c, p)), confirmed.append)
        client.subscribe(other, lambda c, p: got.append((b"other", p)), confirmed.append)
        await until(lambda: len(confirmed) == 2, what="subscribed")
        assert sorted(confirmed) == sorted([channel, other])
        assert await client.call(channel, "SPUBLISH", channel, b"one") == 1
        await client.call(other, "SPUBLISH", other, b"two")
        await until(lambda: len(got) == 2, what="delivered")
        assert got == [(channel, b"one"), (b"other", b"two")]
        # Subscribing again replaces the callbacks.
        replaced: list[bytes] = []
        client.subscribe(channel, lambda c, p: replaced.append(p), confirmed.append)
        await client.call(channel, "SPUBLISH", channel, b"three")
        await until(lambda: replaced == [b"three"], what="delivered to the new callback")
        # After unsubscribing: no more messages, and Redis has no subscriber.
        client.unsubscribe(channel)
        await until(lambda: redis_server.cli("PUBSUB", "SHARDNUMSUB", channel.decode()).splitlines()[1] == "0",
                    what="unsubscribed")
        assert await client.call(channel, "SPUBLISH", channel, b"four") == 0
        client.unsubscribe(other)
        await until(lambda: redis_server.cli("PUBSUB", "SHARDNUMSUB", other.decode()).splitlines()[1] == "0",
                    what="the subscriber connection closed")
        assert got == [(channel, b"one"), (b"other", b"two")] and replaced == [b"three"]
        assert len(confirmed) == 2
    finally:
        await client.stop()


@pytest_twisted.ensureDeferred
async def test_a_restart_is_reported_and_subscriptions_confirmed_again(
    redis_server: RedisServer, redis_prefix: bytes
) -> None:
    client = await started(redis_server, timeout=1.0)
    states: list[Optional[str]] = []
    client.on_state = states.append
    channel = redis_prefix + b"ch"
    confirmed: list[bytes] = []
    got: list[bytes] = []
    try:
        client.subscribe(channel, lambda c, p: got.append(p), confirmed.append)
        await until(lambda: confirmed == [channel], what="subscribed")
        redis_server.kill()
        try:
            await until(lambda: client.failure is not None, what="down")
            assert client.failure is not None and f"Redis at {redis_server.address}" in client.failure
            # While down, calls fail at once: nothing waits for the server.
            down = client.call(None, "PING")
            assert down.called
            with pytest.raises(RedisUnavailable, match=redis_server.address):
                await down
            await until(lambda: client.failure is not None and "refused" in client.failure, what="refused")
        finally:
            redis_server.start(redis_server.port)  # the session's server, for the tests after this one
        await until(lambda: client.failure is None, what="back")
        assert await client.call(None, "PING") == b"PONG"
        await until(lambda: len(confirmed) == 2, what="subscribed again")
        await client.call(channel, "SPUBLISH", channel, b"after")
        await until(lambda: got == [b"after"], what="delivered after the restart")
        assert states[0] is not None and states[-1] is None
        assert all(state is not None for state in states[:-1])
    finally:
        await client.stop()


@pytest_twisted.ensureDeferred
async def test_losing_the_command_connection_renews_the_subscriptions(
    redis_server: RedisServer, redis_prefix: bytes
) -> None:
    name = b"renew-" + redis_prefix.replace(b":", b"-")
    client = await started(redis_server, name=name)
    channel = redis_prefix + b"ch"
    confirmed: list[bytes] = []
    try:
        client.subscribe(channel, lambda c, p: None, confirmed.append)
        await until(lambda: confirmed == [channel], what="subscribed")
        command_id = await client.call(None, "CLIENT", "ID")
        await client.call(None, "CLIENT", "KILL", "ID", str(command_id), "SKIPME", "no")
        # The subscriber connection is made anew too, and says so.
        await until(lambda: len(confirmed) == 2, what="subscribed again")
        await until(lambda: client.failure is None, what="the command connection back")
    finally:
        await client.stop()


@pytest_twisted.ensureDeferred
async def test_a_hung_server_fails_commands_within_the_timeout(redis_server: RedisServer, redis_prefix: bytes) -> None:
    client = await started(redis_server, timeout=0.3)
    assert redis_server.process is not None
    try:
        redis_server.process.send_signal(signal.SIGSTOP)
        began = reactor.seconds()
        with pytest.raises(RedisUnavailable, match=f"no reply from Redis at {redis_server.address} within 0.3 s"):
            await client.call(None, "PING")
        assert 0.25 < reactor.seconds() - began < 1.5
        assert client.failure is not None
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    try:
        await until(lambda: client.failure is None, what="back")
        assert await client.call(None, "PING") == b"PONG"
    finally:
        await client.stop()


@pytest_twisted.ensureDeferred
async def test_stop_fails_pending_commands_and_closes(redis_server: RedisServer, redis_prefix: bytes) -> None:
    client = await started(redis_server)
    states: list[Optional[str]] = []
    client.on_state = states.append
    key = redis_prefix + b"blocked"
    blocked = client.call(key, "BLPOP", key, 5)
    client.subscribe(redis_prefix + b"ch", lambda c, p: None, lambda c: None)
    await client.stop()
    with pytest.raises(RedisUnavailable, match="stopped"):
        await blocked
    assert client.failure is not None and states == []
    with pytest.raises(RedisUnavailable):
        await client.call(None, "PING")


@pytest_twisted.ensureDeferred
async def test_no_server_there(redis_server: RedisServer) -> None:
    client = single(reactor, "127.0.0.1", 1, timeout=0.5)
    states: list[Optional[str]] = []
    client.on_state = states.append
    client.start()
    try:
        await until(lambda: bool(states), what="reported")
        assert states == ["connection refused to Redis at 127.0.0.1:1"]
        with pytest.raises(RedisUnavailable, match="connection refused to Redis at 127.0.0.1:1"):
            await client.call(None, "PING")
    finally:
        await client.stop()
