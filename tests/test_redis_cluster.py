"""The Redis Cluster client: key slots, then against a real three-master
cluster: routing, scripts, subscriptions, a slot moved under it (ASK, then
MOVED), a master killed."""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from mqmq.redis import ClusterRedis, RedisError, RedisUnavailable, Script, cluster, from_url, key_slot, single
from mqmq.redis.cluster import REFRESH_LEAST, crc16
from mqmq.redis.connection import SubscriberProtocol
from mqmq.redis.resp import Parser
from redis_support import RedisCluster, RedisServer  # its fixtures: redis_cluster, redis_prefix (conftest.py)

#: CLUSTER KEYSLOT's answers (redis-cli, Redis 7.0.15).
KEYSLOT_VECTORS = [
    (b"foo", 12182),
    (b"bar", 5061),
    (b"{user1000}.following", 3443),
    (b"{user1000}.followers", 3443),
    (b"foo{}{bar}", 8363),       # an empty tag: the whole key
    (b"foo{{bar}}zap", 4015),    # the tag is "{bar"
    (b"foo{bar}{zap}", 5061),    # the first tag only
    (b"", 0),
    (b"123456789", 12739),
    (b"mqmq:{q:jobs}:ready", 12259),
    (b"{", 4092),
    (b"}{", 12793),
    (b"a{b", 13340),
    (b"{}", 15257),
    ("é€".encode(), 934),
]


@pytest.mark.parametrize(("key", "slot"), KEYSLOT_VECTORS, ids=repr)
def test_key_slot_as_redis_computes_it(key: bytes, slot: int) -> None:
    assert key_slot(key) == slot


def test_crc16_is_xmodem() -> None:
    assert crc16(b"123456789") == 0x31C3


def test_cluster_url() -> None:
    client = from_url(reactor, "redis+cluster://127.0.0.1:7000,[::1]:7001")
    assert isinstance(client, ClusterRedis)
    assert client.describe() == "redis+cluster://127.0.0.1:7000,[::1]:7001"


# Redirections and retries, against nodes played by the test on a fake
# reactor and clock.

SLOT_MAP = [(0, 5460, 7000), (5461, 10922, 7001), (10923, 16383, 7002)]


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class FakeCluster:
    """Three masters (ports 7000-7002) answering what :attr:`answer` says;
    PING, CLIENT, SCRIPT LOAD, ASKING and CLUSTER SLOTS answered as Redis would."""

    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        self.slot_map = list(SLOT_MAP)
        self.answer: Callable[[int, list[bytes]], Optional[bytes]] = lambda port, command: b"+OK\r\n"
        self.refusing: set[int] = set()
        self.received: list[tuple[int, list[bytes]]] = []
        self.connections: list[tuple[int, Any, StringTransport, Parser, Any, Any]] = []
        self._attempts: list[tuple[int, Any, Any]] = []
        self._seen = 0

    def client(self, timeout: float = 1.0) -> ClusterRedis:
        client = cluster(self.reactor, [("127.0.0.1", 7000)], timeout)
        client.start()
        self.pump()
        assert client.failure is None, client.failure
        return client

    def commands(self, name: bytes) -> list[tuple[int, list[bytes]]]:
        return [(port, command) for port, command in self.received if command[0] == name]

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)
        self.pump()

    def drop(self, port: int) -> None:
        """Every connection to ``port`` is lost."""
        for where, protocol, transport, _, factory, connector in list(self.connections):
            if where == port and transport.connected:
                transport.connected = False
                reason = Failure(ConnectionLost("dropped by the test"))
                protocol.connectionLost(reason)
                factory.clientConnectionLost(connector, reason)
        self.connections = [c for c in self.connections if c[2].connected]

    def pump(self) -> None:
        """Connect what asks to connect, answer what was written, until quiet."""
        busy = True
        while busy:
            busy = False
            self.reactor.advance(0)
            while self._seen < len(self.reactor.tcpClients):
                _, port, factory, _, _ = self.reactor.tcpClients[self._seen]
                connector = self.reactor.connectors[self._seen]
                self._seen += 1
                connector.connect = lambda p=port, f=factory, c=connector: self._attempts.append((p, f, c))
                self._attempts.append((port, factory, connector))
            attempts, self._attempts = self._attempts, []
            for port, factory, connector in attempts:
                busy = True
                if port in self.refusing:
                    factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError("refused")))
                    continue
                protocol = factory.buildProtocol(None)
                transport = StringTransport()
                transport.connected = True
                self.connections.append((port, protocol, transport, Parser(), factory, connector))
                protocol.makeConnection(transport)
            for port, protocol, transport, parser, _, _ in list(self.connections):
                written = transport.value()
                transport.clear()
                for command in parser.feed(written):
                    busy = True
                    self.received.append((port, command))
                    reply = self._reply(port, command)
                    if reply is not None and transport.connected:
                        protocol.dataReceived(reply)

    def _reply(self, port: int, command: list[bytes]) -> Optional[bytes]:
        name = command[0].upper()
        if name == b"PING":
            return b"+PONG\r\n"
        if name in (b"CLIENT", b"ASKING"):
            return b"+OK\r\n"
        if name == b"CLUSTER" and command[1] == b"SLOTS":
            return b"*%d\r\n" % len(self.slot_map) + b"".join(
                b"*3\r\n:%d\r\n:%d\r\n*3\r\n$9\r\n127.0.0.1\r\n:%d\r\n$2\r\nid\r\n" % entry
                for entry in self.slot_map)
        return self.answer(port, command)


def fake_key(port: int) -> bytes:
    """A key whose slot the master on ``port`` serves."""
    low, high, _ = next(entry for entry in SLOT_MAP if entry[2] == port)
    return next(b"k%d" % n for n in range(100000) if low <= key_slot(b"k%d" % n) <= high)


def outcome(deferred: defer.Deferred[Any]) -> Any:
    """What ``deferred`` fired with (a Failure if it failed), or "not fired"; left in it."""
    results: list[Any] = []

    def keep(result: Any) -> Any:
        results.append(result)
        return result

    deferred.addBoth(keep)
    if isinstance(results[:1] and results[0], Failure):
        deferred.addErrback(lambda _: None)  # looked at: not an unhandled error
    return results[0] if results else "not fired"


def test_moved_updates_the_slot_and_sends_the_command_to_its_new_master() -> None:
    fake = FakeCluster()
    client = fake.client()
    key = fake_key(7000)
    fake.answer = lambda port, command: (
        b"-MOVED %d 127.0.0.1:7001\r\n" % key_slot(key) if port == 7000 else bulk(b"from 7001"))
    asked = len(fake.commands(b"CLUSTER"))
    got = client.call(key, "GET", key)
    fake.pump()
    assert outcome(got) == b"from 7001"
    assert [port for port, _ in fake.commands(b"GET")] == [7000, 7001]
    assert client._slots[key_slot(key)] is client._nodes["127.0.0.1:7001"]
    # The whole map is read again, in the background.
    fake.advance(REFRESH_LEAST)
    assert len(fake.commands(b"CLUSTER")) == asked + 1


def test_ask_sends_asking_then_the_command_on_the_target_and_keeps_the_map() -> None:
    fake = FakeCluster()
    client = fake.client()
    key = fake_key(7000)
    fake.answer = lambda port, command: (
        b"-ASK %d 127.0.0.1:7002\r\n" % key_slot(key) if port == 7000 else bulk(b"from 7002"))
    got = client.call(key, "GET", key)
    fake.pump()
    assert outcome(got) == b"from 7002"
    on_target = [command[0] for port, command in fake.received if port == 7002]
    assert on_target[-2:] == [b"ASKING", b"GET"]
    assert client._slots[key_slot(key)] is client._nodes["127.0.0.1:7000"]
    # The next command goes to the map's master again.
    client.call(key, "GET", key)
    fake.pump()
    assert [port for port, _ in fake.commands(b"GET")] == [7000, 7002, 7000, 7002]


def test_redirections_are_followed_five_times_at_most() -> None:
    fake = FakeCluster()
    client = fake.client()
    key = fake_key(7000)
    slot = key_slot(key)
    fake.answer = lambda port, command: b"-MOVED %d 127.0.0.1:%d\r\n" % (slot, 7001 if port == 7000 else 7000)
    got = client.call(key, "GET", key)
    fake.pump()
    problem = outcome(got)
    assert problem.check(RedisUnavailable) and "more than 5 redirections" in problem.getErrorMessage()
    assert len(fake.commands(b"GET")) == 6


def test_clusterdown_is_tried_again_until_it_clears() -> None:
    fake = FakeCluster()
    client = fake.client(timeout=1.0)
    key = fake_key(7001)
    refusals = [b"-CLUSTERDOWN The cluster is down\r\n"] * 3 + [b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n"]
    fake.answer = lambda port, command: refusals.pop(0) if refusals else bulk(b"value")
    got = client.call(key, "GET", key)
    for _ in range(20):
        fake.advance(0.02)
    assert outcome(got) == b"value"
    assert len(fake.commands(b"GET")) == 5


def test_clusterdown_fails_the_command_when_its_time_is_up() -> None:
    fake = FakeCluster()
    client = fake.client(timeout=1.0)
    key = fake_key(7001)
    fake.answer = lambda port, command: b"-CLUSTERDOWN The cluster is down\r\n"
    got = client.call(key, "GET", key)
    for _ in range(95):
        fake.advance(0.01)
    assert outcome(got) == "not fired"
    fake.advance(0.05)
    fake.advance(0.01)
    problem = outcome(got)
    assert problem.check(RedisUnavailable) and "CLUSTERDOWN The cluster is down" in problem.getErrorMessage()
    assert 5 < len(fake.commands(b"GET")) < 15  # with backoff, not in a loop


def test_a_command_lost_with_its_connection_is_not_sent_again() -> None:
    fake = FakeCluster()
    client = fake.client()
    key = fake_key(7002)
    fake.answer = lambda port, command: None  # no reply
    got = client.call(key, b"INCR", key)
    fake.pump()
    fake.drop(7002)
    problem = outcome(got)
    assert problem.check(RedisUnavailable) and "lost the connection to Redis at 127.0.0.1:7002" in problem.getErrorMessage()
    assert client.failure is not None and "127.0.0.1:7002" in client.failure
    fake.answer = lambda port, command: b":1\r\n"
    fake.advance(1.0)
    assert client.failure is None
    assert len(fake.commands(b"INCR")) == 1


def test_a_command_for_a_master_not_connected_waits_for_it_within_the_timeout() -> None:
    fake = FakeCluster()
    client = fake.client(timeout=1.0)
    key = fake_key(7002)
    fake.refusing.add(7002)
    fake.drop(7002)
    got = client.call(key, "GET", key)
    fake.advance(0.3)
    assert outcome(got) == "not fired" and fake.commands(b"GET") == []
    assert client.failure == "connection refused to Redis at 127.0.0.1:7002"
    fake.refusing.clear()
    fake.answer = lambda port, command: bulk(b"late")
    for _ in range(60):
        fake.advance(0.01)
    assert outcome(got) == b"late"
    assert fake.commands(b"GET") == [(7002, [b"GET", key])]


def test_a_command_for_a_master_that_stays_down_fails_after_the_timeout() -> None:
    fake = FakeCluster()
    client = fake.client(timeout=0.5)
    key = fake_key(7002)
    fake.refusing.add(7002)
    fake.drop(7002)
    got = client.call(key, "GET", key)
    for _ in range(49):
        fake.advance(0.01)
    assert outcome(got) == "not fired"
    fake.advance(0.02)
    problem = outcome(got)
    assert problem.check(RedisUnavailable)
    assert "connection refused to Redis at 127.0.0.1:7002 (for 0.5 s)" == problem.getErrorMessage()
    # The others still answer at once.
    other = client.call(fake_key(7000), "GET", b"x")
    fake.answer = lambda port, command: bulk(b"fine")
    fake.pump()
    assert outcome(other) == b"fine"


def test_a_subscription_follows_its_slot_when_refused_or_dropped() -> None:
    fake = FakeCluster()
    client = fake.client()
    channel = fake_key(7000)
    slot = key_slot(channel)
    owner = {7000: True}

    def answer(port: int, command: list[bytes]) -> Optional[bytes]:
        if command[0] == b"SSUBSCRIBE":
            if port == 7000 and not owner[7000]:
                return b"-MOVED %d 127.0.0.1:7001\r\n" % slot
            return b"*3\r\n$10\r\nssubscribe\r\n" + bulk(command[1]) + b":1\r\n"
        return b"+OK\r\n"

    fake.answer = answer
    confirmed: list[tuple[int, bytes]] = []
    client.subscribe(channel, lambda c, p: None, lambda c: confirmed.append((len(fake.received), c)))
    fake.pump()
    assert len(confirmed) == 1 and [port for port, _ in fake.commands(b"SSUBSCRIBE")] == [7000]
    # The slot moves to 7001: 7000 tells its subscribers (sunsubscribe), and
    # the map read after says where the slot is now.
    owner[7000] = False
    fake.slot_map = [(0, slot - 1, 7000), (slot, slot, 7001), (slot + 1, 5460, 7000), *SLOT_MAP[1:]]
    subscriber = next(protocol for port, protocol, transport, parser, _, _ in fake.connections
                      if port == 7000 and isinstance(protocol, SubscriberProtocol))
    subscriber.dataReceived(b"*3\r\n$12\r\nsunsubscribe\r\n" + bulk(channel) + b":0\r\n")
    fake.advance(REFRESH_LEAST)
    fake.advance(REFRESH_LEAST)
    assert [port for port, _ in fake.commands(b"SSUBSCRIBE")] == [7000, 7001]
    assert len(confirmed) == 2
    # A map that lags (it says 7000 again): 7000 refuses with MOVED, and the
    # subscription goes where the MOVED says.
    fake.slot_map = list(SLOT_MAP)
    client._slots[slot] = client._nodes["127.0.0.1:7000"]
    client._place(client._subscriptions[channel])
    fake.pump()
    fake.slot_map = [(0, slot - 1, 7000), (slot, slot, 7001), (slot + 1, 5460, 7000), *SLOT_MAP[1:]]
    fake.advance(REFRESH_LEAST)
    fake.advance(REFRESH_LEAST)
    assert [port for port, _ in fake.commands(b"SSUBSCRIBE")][-2:] == [7000, 7001]
    assert client._subscriptions[channel].node is client._nodes["127.0.0.1:7001"]
    assert len(confirmed) == 3


# Against a real cluster.

async def until(condition: Callable[[], bool], deadline: float = 10.0, what: str = "condition") -> None:
    waited = 0.0
    while not condition():
        if waited > deadline:
            pytest.fail(f"{what}: not within {deadline} s")
        await task.deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


async def started(servers: RedisCluster, timeout: float = 1.0, **options: Any) -> ClusterRedis:
    # One seed: the others are found from it.
    client = cluster(reactor, servers.seeds[1:2], timeout, **options)
    client.start()
    await until(lambda: client.failure is None, what="connected to every master")
    return client


def count_redirections(client: ClusterRedis) -> list[str]:
    """The MOVED, ASK, TRYAGAIN and CLUSTERDOWN replies the client meets from now on."""
    seen: list[str] = []
    followed = client._redirected

    def spy(request: Any, message: str) -> None:
        seen.append(message)
        followed(request, message)

    client._redirected = spy  # type: ignore[method-assign]
    return seen


def tagged(prefix: bytes, servers: RedisCluster, owner: RedisServer, count: int = 1) -> list[bytes]:
    """Hash tags (``prefix`` + n) of slots ``owner`` serves."""
    found = []
    owners = servers.owners()
    for n in range(10000):
        tag = prefix + b"%d" % n
        if owners[key_slot(tag)] is owner:
            found.append(tag)
            if len(found) == count:
                return found
    raise AssertionError("no such tag")


@pytest_twisted.ensureDeferred
async def test_slots_agree_with_redis_for_arbitrary_keys(redis_cluster: RedisCluster, redis_prefix: bytes) -> None:
    client = await started(redis_cluster)
    keys = [redis_prefix + bytes([n, 123, (n * 7) % 256, 125, 0, 255]) for n in range(256)]
    keys += [b"{%s}" % redis_prefix, b"%s{}" % redis_prefix, b"{{%s}" % redis_prefix]
    try:
        slots = await defer.gatherResults([client.call(None, "CLUSTER", "KEYSLOT", key) for key in keys])
        assert slots == [key_slot(key) for key in keys]
    finally:
        await client.stop()


@pytest_twisted.ensureDeferred
async def test_commands_go_straight_to_the_master_of_their_slot(
    redis_cluster: RedisCluster, redis_prefix: bytes
) -> None:
    client = await started(redis_cluster, name=b"mqmq-cluster-test")
    redirections = count_redirections(client)
    keys = [redis_prefix + b"%d" % n for n in range(300)]
    try:
        assert await defer.gatherResults([client.call(key, "SET", key, key) for key in keys]) == [b"OK"] * 300
        assert await defer.gatherResults([client.call(key, "GET", key) for key in keys]) == keys
        assert redirections == []
        # Each key is on the master of its slot, asked directly; the keys span every master.
        spread: dict[int, int] = {}
        owners = redis_cluster.owners()
        for key in keys[:60]:
            owner = owners[key_slot(key)]
            assert owner.cli("GET", key.decode()) == key.decode()
            spread[owner.port] = spread.get(owner.port, 0) + 1
        assert len(spread) == 3
        # One connection per master, named.
        for node in redis_cluster.nodes:
            named = [line for line in node.cli("CLIENT", "LIST").splitlines() if "name=mqmq-cluster-test " in line]
            assert len(named) == 1, named
        # Any node answers a command without a key.
        assert await client.call(None, "PING") == b"PONG"
    finally:
        await client.stop()


@pytest_twisted.ensureDeferred
async def test_scripts_run_on_the_master_of_their_first_key(redis_cluster: RedisCluster, redis_prefix: bytes) -> None:
    script = Script("redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCR', KEYS[2])")
    client = await started(redis_cluster)
    redirections = count_redirections(client)
    tags = [tagged(redis_prefix, redis_cluster, node)[0] for node in redis_cluster.nodes]
    try:
        for tag in tags:
            keys = [b"{%s}:value" % tag, b"{%s}:count" % tag]
            assert await client.eval(script, keys, [tag]) == 1
        # A master that lost its scripts loads them again.
        redis_cluster.nodes[2].cli("SCRIPT", "FLUSH")
        for tag in tags:
            assert await client.eval(script, [b"{%s}:value" % tag, b"{%s}:count" % tag], [tag]) == 2
        for tag, node in zip(tags, redis_cluster.nodes):
            assert node.cli("GET", "{%s}:value" % tag.decode()) == tag.decode()
        assert redirections == []
        # An error in the script is the script's error, not a redirection.
        with pytest.raises(RedisError, match="WRONGTYPE|wrong kind"):
            await client.eval(Script("return redis.call('LPUSH', KEYS[1], 1)"), [b"{%s}:value" % tags[0]], [])
    finally:
        await client.stop()


@pytest_twisted.ensureDeferred
async def test_subscriptions_on_every_master(redis_cluster: RedisCluster, redis_prefix: bytes) -> None:
    client = await started(redis_cluster, name=b"mqmq-cluster-subscriber")
    channels = [tag for node in redis_cluster.nodes for tag in tagged(redis_prefix + b"ch", redis_cluster, node, 2)]
    got: list[tuple[bytes, bytes]] = []
    confirmed: list[bytes] = []
    try:
        for channel in channels:
            client.subscribe(channel, lambda c, p: got.append((c, p)), confirmed.append)
        await until(lambda: len(confirmed) == 6, what="subscribed")
        for channel in channels:
            assert await client.call(channel, "SPUBLISH", channel, b"to " + channel) == 1
        await until(lambda: len(got) == 6, what="delivered")
        assert sorted(got) == sorted((channel, b"to " + channel) for channel in channels)
        # Each master: one command and one subscriber connection, whatever the channels.
        for node in redis_cluster.nodes:
            named = [line for line in node.cli("CLIENT", "LIST").splitlines()
                     if "name=mqmq-cluster-subscriber " in line]
            assert len(named) == 2, named
        client.unsubscribe(channels[0])
        await until(lambda: redis_cluster.owner(key_slot(channels[0])).cli(
            "PUBSUB", "SHARDNUMSUB", channels[0].decode()).splitlines()[1] == "0", what="unsubscribed")
        assert await client.call(channels[1], "SPUBLISH", channels[1], b"again") == 1
        await until(lambda: len(got) == 7, what="delivered again")
    finally:
        await client.stop()


@pytest_twisted.ensureDeferred
async def test_a_slot_moved_under_the_client(redis_cluster: RedisCluster, redis_prefix: bytes) -> None:
    source, target = redis_cluster.nodes[0], redis_cluster.nodes[1]
    tag = tagged(redis_prefix, redis_cluster, source)[0]
    slot = key_slot(tag)
    there, missing, channel = b"{%s}:there" % tag, b"{%s}:new" % tag, b"{%s}:wake" % tag
    client = await started(redis_cluster, timeout=2.0)
    redirections = count_redirections(client)
    got: list[bytes] = []
    confirmed: list[bytes] = []
    try:
        await client.call(there, "SET", there, b"old")
        client.subscribe(channel, lambda c, p: got.append(p), confirmed.append)
        await until(lambda: confirmed == [channel], what="subscribed")

        # The slot starts moving: keys still on the source are served there,
        # the others are asked for on the target (ASK), and the map stays.
        source_id, target_id = redis_cluster.node_id(source), redis_cluster.node_id(target)
        target.cli("CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id)
        source.cli("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
        assert await client.call(there, "GET", there) == b"old"
        assert redirections == []
        assert await client.call(missing, "SET", missing, b"on the target") == b"OK"
        assert [message.split()[0] for message in redirections] == ["ASK"]
        assert client._slots[slot] is client._nodes[source.address]
        # A script asked for on the target is loaded there too (NOSCRIPT after ASKING).
        counted = Script("return redis.call('INCR', KEYS[1])")
        target.cli("SCRIPT", "FLUSH")
        assert await client.eval(counted, [b"{%s}:counter" % tag], []) == 1
        # A command on keys of both places must wait (TRYAGAIN) ...
        both = client.call(there, "MGET", there, missing)
        await until(lambda: any(message.startswith("TRYAGAIN") for message in redirections), what="TRYAGAIN")

        # ... until the slot has moved.
        source.cli("MIGRATE", target.host, str(target.port), "", "0", "5000", "KEYS", there.decode())
        for node in redis_cluster.nodes:
            node.cli("CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
        assert await both == [b"old", b"on the target"]
        assert await client.call(there, "GET", there) == b"old"
        assert client._slots[slot] is client._nodes[target.address]
        kinds = [message.split()[0] for message in redirections]
        assert "TRYAGAIN" in kinds and "MOVED" in kinds
        assert target.cli("GET", there.decode()) == "old"

        # The subscription followed its slot: confirmed again, on the target.
        await until(lambda: len(confirmed) == 2, what="subscribed on the new owner")
        assert target.cli("PUBSUB", "SHARDNUMSUB", channel.decode()).splitlines()[1] == "1"
        assert await client.call(channel, "SPUBLISH", channel, b"after the move") == 1
        await until(lambda: got == [b"after the move"], what="delivered")
        assert client.failure is None
    finally:
        await client.stop()


@pytest_twisted.ensureDeferred
async def test_a_killed_master_fails_its_commands_within_the_timeout(
    redis_cluster: RedisCluster, redis_prefix: bytes
) -> None:
    victim, survivor = redis_cluster.nodes[2], redis_cluster.nodes[0]
    on_victim = b"{%s}:k" % tagged(redis_prefix, redis_cluster, victim)[0]
    on_survivor = b"{%s}:k" % tagged(redis_prefix, redis_cluster, survivor)[0]
    client = await started(redis_cluster, timeout=0.5)
    states: list[Optional[str]] = []
    client.on_state = states.append
    try:
        await client.call(on_victim, "SET", on_victim, b"v")
        victim.kill()
        began = reactor.seconds()
        # Written before the kill: lost with its connection, not sent again.
        with pytest.raises(RedisUnavailable, match=f"lost the connection to Redis at {victim.address}"):
            await client.call(on_victim, "GET", on_victim)
        assert reactor.seconds() - began < 0.5  # not retried until the timeout
        assert client.failure is not None and victim.address in client.failure
        assert states and states[0] is not None
        # While it is down: tried again (a failover may come) for the
        # timeout, then failed; the other masters still serve.
        began = reactor.seconds()
        waiting = client.call(on_victim, "GET", on_victim)
        assert await client.call(on_survivor, "SET", on_survivor, b"s") == b"OK"
        with pytest.raises(RedisUnavailable, match=f"refused to Redis at {victim.address}"):
            await waiting
        assert 0.45 < reactor.seconds() - began < 0.5 + 0.5  # the timeout, and a margin for a loaded machine
    finally:
        # Back before the others count it failed (2 s): the cluster stays up.
        redis_cluster.restart(victim)
    try:
        await until(lambda: client.failure is None, what="healthy again")
        assert states[-1] is None
        assert await client.call(on_victim, "GET", on_victim) == b"v"
    finally:
        await client.stop()


@pytest_twisted.ensureDeferred
async def test_no_node_to_ask(redis_cluster: RedisCluster) -> None:
    client = cluster(reactor, [("127.0.0.1", 1)], timeout=0.3)
    client.start()
    try:
        began = reactor.seconds()
        with pytest.raises(RedisUnavailable, match="slot map is not known|connection refused"):
            await client.call(b"k", "GET", b"k")
        assert reactor.seconds() - began < 0.3 + 0.5
        assert client.failure is not None and "connection refused to Redis at 127.0.0.1:1" in client.failure
    finally:
        await client.stop()


@pytest_twisted.ensureDeferred
async def test_a_single_client_on_a_cluster_node_meets_moved_as_an_error(redis_cluster: RedisCluster) -> None:
    node = redis_cluster.nodes[0]
    key = b"{%s}" % tagged(b"moved", redis_cluster, redis_cluster.nodes[1])[0]
    client = single(reactor, node.host, node.port)
    client.start()
    await until(lambda: client.failure is None, what="connected")
    try:
        with pytest.raises(RedisError, match="^MOVED %d " % key_slot(key)):
            await client.call(key, "GET", key)
    finally:
        await client.stop()
