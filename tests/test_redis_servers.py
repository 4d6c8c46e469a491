"""Several mqmq servers in front of one Redis behave as one (issue 13's
"Proof"): real servers, started as users start them (``python -m mqmq
start``, ``twistd -n mqmq``) on ports of their choosing, on the session's
Redis (or three-master Redis Cluster), each test with a ``--redis-prefix``
of its own.

- a ``Get`` waiting on one server is woken by a ``Put`` on another at once,
  and a message is handed to exactly one of two waiting on two others;
- under load (``benchmarks/soak.py --servers 2|3``) every ``Put`` answered
  ``OK`` is delivered exactly once, each producer's in order;
- a server killed with SIGKILL mid-load loses nothing acknowledged, and a
  reservation it held is handed out again by a survivor after its lease;
- 10,000 waiting ``Get``s on 100 queues hold two Redis connections;
- Redis down: ``Put``s are refused (``SERVER_STORAGE_ERROR``), never
  answered ``OK``; Redis back: the server takes work again by itself, and
  what was answered ``OK`` before is all there.

``MQMQ_TEST_NO_CLUSTER=why`` skips the Redis Cluster variants.
"""

from __future__ import annotations

import json
import os
import re
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, cast

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import defer, reactor, task

from mqmq import GetTimeout, MQClient, ServerError, connect
from mqmq.client import Delivery
from mqmq.errors import STORAGE_ERROR
from mqmq.wire.codec import encode_frame
from conftest import REPO_ROOT, Processes, bin_path, load_benchmark, logged_port
from redis_support import RedisServer, cli, require_redis
from support import read_exactly

#: A cluster variant's mark: MQMQ_TEST_NO_CLUSTER=why skips them.
NO_CLUSTER = os.environ.get("MQMQ_TEST_NO_CLUSTER", "")
CLUSTER = pytest.mark.skipif(bool(NO_CLUSTER), reason=f"Redis Cluster variants skipped: {NO_CLUSTER}")
STORES = [pytest.param("redis", id="redis"), pytest.param("cluster", id="cluster", marks=CLUSTER)]

#: What a server with --http logs, naming its port.
SERVING_HTTP = re.compile(r"serving metrics and the dashboard over HTTP: 127\.0\.0\.1:(\d+)")
#: Longest any one step may take (a server's start, a recovery ...).
DEADLINE = 15.0


@pytest.fixture
def store_url(request: pytest.FixtureRequest) -> str:
    """``--store`` for the session's Redis, or its cluster (the test's ``store`` parameter)."""
    if getattr(request, "param", "redis") == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        return "redis+cluster://" + ",".join(node.address for node in cluster.nodes)
    return f"redis://{request.getfixturevalue('redis_server').address}/0"


@pytest.fixture
def prefix(redis_prefix: bytes) -> str:
    return redis_prefix.decode()


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    read_log: Callable[[], str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_servers(procs: Processes, count: int, *options: str, twistd: int = 0) -> list[Server]:
    """``count`` servers started side by side on 127.0.0.1:0, the first
    ``twistd`` of them with ``twistd -n mqmq`` (logging to stdout), the
    others with ``python -m mqmq start`` (to stderr)."""
    spawned: list[tuple[subprocess.Popen, Callable[[], str]]] = []
    for index in range(count):
        if index < twistd:
            process = procs.spawn(bin_path("twistd"), "-n", "--pidfile=", "mqmq",
                                  "--addr", "127.0.0.1:0", *options)

            def read(process: subprocess.Popen = process) -> str:
                return procs.output(process)[0].decode("utf-8", "replace")
        else:
            process = procs.spawn(sys.executable, "-m", "mqmq", "start", "-addr", "127.0.0.1:0", *options)

            def read(process: subprocess.Popen = process) -> str:
                return procs.output(process)[1]
        spawned.append((process, read))
    return [Server(process, logged_port(read, process, DEADLINE), read) for process, read in spawned]


def redis_options(store_url: str, prefix: str, *more: str) -> tuple[str, ...]:
    return ("--store", store_url, "--redis-prefix", prefix, *more)


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def until(condition: Callable[[], bool]) -> None:
    """Let the reactor run until ``condition()`` holds (at most DEADLINE)."""
    give_up = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < give_up, "not in time"
        await sleep(0.01)


def outcome(deferred: defer.Deferred[Any]) -> list[Any]:
    """What ``deferred`` fires with, once it does (a Failure if it fails)."""
    result: list[Any] = []
    deferred.addBoth(result.append)
    return result


# A Get waiting on one server, a Put on another ----------------------------------


@pytest.mark.parametrize("store_url", STORES, indirect=True)
@pytest_twisted.ensureDeferred
async def test_a_put_on_one_server_wakes_a_get_waiting_on_another(
        procs: Processes, store_url: str, prefix: str) -> None:
    a, b, c = start_servers(procs, 3, *redis_options(store_url, prefix), twistd=1)
    on_a, on_b, on_c = [await connect(reactor, server.address) for server in (a, b, c)]
    try:
        woken_after = []
        for round_ in range(3):
            waiting = on_b.get("wake", 10)
            await sleep(0.3)  # B's take found the queue empty: B sleeps on it
            assert not waiting.called
            put_at = time.monotonic()
            await on_a.put("wake", b"m%d" % round_)
            assert await waiting == b"m%d" % round_
            woken_after.append(time.monotonic() - put_at)
        # Woken through Redis, not found by the look every second.
        assert max(woken_after) < 0.5, woken_after

        for round_ in range(3):
            first, second = b"first-%d" % round_, b"second-%d" % round_
            gets = {"B": outcome(on_b.get("once", 10)), "C": outcome(on_c.get("once", 10))}
            await sleep(0.3)
            await on_a.put("once", first)
            await until(lambda: any(gets.values()))
            await sleep(0.3)  # time enough for the other to have it too, had both taken it
            answered = {name: got for name, got in gets.items() if got}
            assert list(answered.values()) == [[first]], gets
            # The other still waits, and gets the next one.
            await on_a.put("once", second)
            (other,) = gets.keys() - answered.keys()
            await until(lambda: bool(gets[other]))
            assert gets[other] == [second]
        for client in (on_a, on_b, on_c):
            with pytest.raises(GetTimeout):
                await client.get("once", 0.1)
    finally:
        for client in (on_a, on_b, on_c):
            await client.disconnect()
    for server in (a, b, c):
        assert server.process.poll() is None, server.read_log()


# Under load: soak.py --servers N ------------------------------------------------


def soak(subprocess_env: dict[str, str], store_url: str, prefix: str, *options: str) -> dict[str, Any]:
    """A run of ``benchmarks/soak.py`` (as users run it), its audit."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "soak.py"), "--json", "--seed", "13",
         "--store", store_url, "--redis-prefix", prefix, *options],
        env=subprocess_env, capture_output=True, timeout=180,
    )
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, output
    audit: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    assert "Traceback" not in output, output
    return audit


@pytest.mark.parametrize("servers, store_url", [
    (2, "redis"), (3, "redis"), pytest.param(3, "cluster", marks=CLUSTER),
], indirect=["store_url"])
def test_every_message_is_handed_over_exactly_once_by_servers_under_load(
        subprocess_env: dict[str, str], store_url: str, prefix: str, servers: int) -> None:
    audit = soak(subprocess_env, store_url, prefix, "--servers", str(servers), "--duration", "2",
                 "--producers", str(servers), "--consumers", str(2 * servers), "--window", "4",
                 "--max-size", "256", "--drop-rate", "0")
    assert audit["passed"] is True
    # Each server had producers and consumers (round-robin).
    assert audit["servers"] == servers and len(audit["server_connections"]) == servers
    assert all(count >= 3 for count in audit["server_connections"]), audit
    # Exactly once: every Put answered OK, and each of them delivered once.
    assert audit["puts_acked"] > 1000 and audit["puts_unacked"] == audit["puts_refused"] == 0
    assert audit["gets_delivered"] == audit["puts_acked"]
    assert audit["missing"] == audit["duplicates"] == audit["duplicates_after_drop"] == 0
    assert audit["vanished_bound"] == 0 and audit["corrupt"] == audit["unknown"] == 0
    # Handed over while the load ran, not only by the drain at the end.
    assert audit["gets_delivered"] - audit["drained"] > 500
    # Each consumer saw each producer's messages on a queue in their order.
    assert audit["order_checked"] is True and audit["out_of_order"] == 0


def test_the_order_audit_can_fail() -> None:
    soak_tool = load_benchmark("soak")
    audit = soak_tool.Audit(mode="reserve")
    audit.acked_ids.update({b"p0-1", b"p0-2", b"p0-3", b"p1-1"})
    seen = audit.seen[(1, b"q", b"p0")] = soak_tool.array("q")
    # Seen 1, 3, then 2 (first delivery: out of order), then 2 again (a redelivery: allowed).
    seen.extend([1 * 8 + 1, 3 * 8 + 1, 2 * 8 + 1, 2 * 8 + 2])
    runner = soak_tool.Soak.__new__(soak_tool.Soak)
    runner.audit = audit
    assert runner._out_of_order() == 1


# A server killed with SIGKILL -----------------------------------------------------


def test_a_server_killed_mid_load_loses_nothing_acknowledged(
        subprocess_env: dict[str, str], redis_server: RedisServer, prefix: str) -> None:
    lease = 2
    audit = soak(subprocess_env, f"redis://{redis_server.address}/0", prefix,
                 "--servers", "3", "--kill-every", "1", "--reserve", "--lease", str(lease),
                 "--duration", "2.5", "--producers", "3", "--consumers", "4", "--window", "4",
                 "--max-size", "256", "--drop-rate", "0.05")
    assert audit["passed"] is True
    assert audit["server_kills"] >= 1
    # Every Put answered OK acked exactly once (or its Ack cut off by a kill),
    # every redelivery after an unacked delivery, with a higher count.
    assert audit["missing"] == audit["acked_twice"] == audit["unaccounted"] == 0
    assert audit["corrupt"] == audit["unknown"] == audit["out_of_order"] == 0
    assert audit["consumer_drops"] and audit["redelivered"]
    # Whether a kill catches reservations in a consumer's hands (or its Acks
    # in flight) is chance: a reservation a killed server held comes back
    # through a survivor only once its lease (and 2 s of grace) ran out,
    # with a higher deliveries count (the audit's rule); the next test
    # makes sure of it.
    if audit["reclaimed"]:
        assert audit["reclaim_wait_s"][0] >= lease + 1.5, audit
        assert min(int(count) for count in audit["reclaimed_deliveries"]) >= 2


@pytest_twisted.ensureDeferred
async def test_a_killed_servers_reservation_comes_back_through_a_survivor_after_its_lease(
        procs: Processes, redis_server: RedisServer, prefix: str) -> None:
    lease = 2.0
    survivor, doomed = start_servers(procs, 2, *redis_options(f"redis://{redis_server.address}/0", prefix))
    producer = await connect(reactor, survivor.address)
    holder = await connect(reactor, doomed.address)
    await producer.put("jobs", b"the job")
    await producer.put("jobs", b"the next")
    delivery: Delivery = await holder.reserve("jobs", 1, lease)
    reserved_at = time.monotonic()
    assert (delivery.message, delivery.deliveries) == (b"the job", 1)
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait()
    await holder.when_closed()
    # The next message is ready at once; the reserved one is nobody's until its lease ends.
    consumer = await connect(reactor, survivor.address)
    assert (await consumer.get("jobs", 0)) == b"the next"
    again: Delivery = await consumer.reserve("jobs", 15, 30)
    waited = time.monotonic() - reserved_at
    assert (again.message, again.message_id, again.deliveries) == (b"the job", delivery.message_id, 2)
    # The lease, 2 s of grace for its own server to act, a sweep within about a second.
    assert lease + 1.5 <= waited <= lease + 2 + 4, waited
    await again.ack()
    with pytest.raises(GetTimeout):
        await consumer.get("jobs", 0.5)
    for client in (producer, consumer):
        await client.disconnect()
    assert survivor.process.poll() is None


# Many waiters, two Redis connections ----------------------------------------------


def server_redis_connections(nodes: list[int], process: subprocess.Popen) -> list[int]:
    """How many connections the server (its Redis client names them
    ``mqmq:HOST-PID-…``) holds to each Redis node, as CLIENT LIST says."""
    name = f"name=mqmq:{os.uname().nodename[:20]}-{process.pid}-"
    return [sum(name in line for line in cli(port, "CLIENT", "LIST").splitlines()) for port in nodes]


def http_port(server: Server) -> int:
    give_up = time.monotonic() + DEADLINE
    while time.monotonic() < give_up:
        match = SERVING_HTTP.search(server.read_log())
        if match:
            return int(match.group(1))
        time.sleep(0.02)
    pytest.fail(f"no HTTP port logged:\n{server.read_log()}")


def stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as response:
        stats: dict[str, Any] = json.loads(response.read())
    return stats


def frame(*values: bytes) -> bytes:
    return bytes(encode_frame(list(values)))


def read_frame(sock: socket.socket) -> list[bytes]:
    """One reply, read whole (the socket is blocking for this)."""
    sock.setblocking(True)
    sock.settimeout(5)
    (length,) = struct.unpack(">I", read_exactly(sock, 4))
    payload = read_exactly(sock, length)
    values = []
    while payload:
        (size,) = struct.unpack(">I", payload[:4])
        values.append(payload[4:4 + size])
        payload = payload[4 + size:]
    return values


@pytest.fixture
def many_sockets() -> Iterator[list[socket.socket]]:
    """A list to put sockets in; closed after the test.  Skips unless this
    process may open 10,500 files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 10_500 and (hard == resource.RLIM_INFINITY or hard >= 10_500):
        resource.setrlimit(resource.RLIMIT_NOFILE, (10_500, hard))
    elif soft < 10_500:
        pytest.skip(f"10,000 connections need 10,500 open files; the limit is {hard}")
    sockets: list[socket.socket] = []
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()
        if soft < 10_500:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("store_url", STORES, indirect=True)
def test_ten_thousand_waiting_gets_hold_two_redis_connections(
        procs: Processes, store_url: str, prefix: str, request: pytest.FixtureRequest,
        many_sockets: list[socket.socket], tmp_path: Path) -> None:
    if store_url.startswith("redis+cluster://"):
        nodes = [node.port for node in request.getfixturevalue("redis_cluster").nodes]
    else:
        nodes = [request.getfixturevalue("redis_server").port]
    # Clients on a UNIX socket: a TCP connection takes the server two file
    # descriptors (see mqmq.server.writer), a UNIX one one, and 20,000 is a
    # usual hard limit.
    path = tmp_path / "mqmq.sock"
    (server,) = start_servers(procs, 1, *redis_options(
        store_url, prefix, "--max-connections", "10100", "--http", "tcp:0:interface=127.0.0.1",
        "--listen", f"unix:{path}"))
    web = http_port(server)
    # A connection answers its requests in order (a waiting Get holds up
    # those behind it): one waiting Get per connection, 100 on each queue.
    queues = [b"wait-%02d" % (i % 100) for i in range(10_000)]
    selector = selectors.DefaultSelector()
    try:
        for queue in queues:
            sock = socket.socket(socket.AF_UNIX)
            many_sockets.append(sock)
            sock.settimeout(DEADLINE)
            give_up = time.monotonic() + DEADLINE
            while True:
                try:
                    sock.connect(str(path))
                    break
                except BlockingIOError:
                    # The listen backlog is full: the server accepts soon.
                    assert time.monotonic() < give_up, "connections not accepted"
                    time.sleep(0.001)
            sock.sendall(frame(b"Get", queue, b"60000"))
        give_up = time.monotonic() + DEADLINE
        while (seen := stats(web))["waiting"] != 10_000 and time.monotonic() < give_up:
            time.sleep(0.1)
        assert seen["waiting"] == 10_000 and seen["queues"]["count"] == 100, seen
        per_node = server_redis_connections(nodes, server.process)
        # One for commands, one for subscriptions, on each node.
        assert all(1 <= count <= 2 for count in per_node), per_node
        assert sum(per_node) <= 2 * len(nodes)

        # One message on each of ten queues: one Get answered for each.
        for sock, queue in zip(many_sockets, queues):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, queue)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as putter:
            for q in range(0, 100, 10):
                putter.sendall(frame(b"Put", b"wait-%02d" % q, b"message for %d" % q))
                assert read_frame(putter) == [b"OK"]
        answered: dict[bytes, list[bytes]] = {}
        give_up = time.monotonic() + 3
        while time.monotonic() < give_up:
            for key, _ in selector.select(0.1):
                selector.unregister(key.fileobj)
                queue = key.data
                answered.setdefault(queue, []).append(b"|".join(read_frame(cast(socket.socket, key.fileobj))))
            if len(answered) == 10:
                give_up = min(give_up, time.monotonic() + 1)  # and no more after a while
        assert answered == {b"wait-%02d" % q: [b"OK|message for %d" % q] for q in range(0, 100, 10)}
        give_up = time.monotonic() + DEADLINE
        while (seen := stats(web))["waiting"] != 10_000 - 10 and time.monotonic() < give_up:
            time.sleep(0.1)
        assert seen["waiting"] == 10_000 - 10, seen
        assert server_redis_connections(nodes, server.process) == per_node
    finally:
        selector.close()
    assert server.process.poll() is None


# Redis down, Redis back -------------------------------------------------------------


async def put_until(client: MQClient, queue: str, make: Callable[[int], bytes], ok: bool,
                    deadline: float) -> tuple[list[bytes], list[bytes], list[float]]:
    """Put one message after another until a Put is answered OK (``ok``) or
    not, or ``deadline`` seconds pass: those answered OK, those refused,
    and how long each refusal took."""
    accepted: list[bytes] = []
    refused: list[bytes] = []
    took: list[float] = []
    give_up = time.monotonic() + deadline
    number = 0
    while time.monotonic() < give_up:
        message = make(number)
        number += 1
        asked = time.monotonic()
        try:
            await client.put(queue, message)
        except ServerError as error:
            assert error.error_type == STORAGE_ERROR
            refused.append(message)
            took.append(time.monotonic() - asked)
            if not ok:
                break
        else:
            accepted.append(message)
            if ok:
                break
        await sleep(0.05)
    return accepted, refused, took


async def drain(client: MQClient, queue: str) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(await client.get(queue, 0))
        except GetTimeout:
            return got


@pytest_twisted.ensureDeferred
async def test_redis_down_refuses_puts_and_the_server_takes_work_again_once_it_is_back(
        procs: Processes, tmp_path: Path, prefix: str) -> None:
    require_redis()
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    timeout = 1.0
    try:
        (server,) = start_servers(procs, 1, *redis_options(
            f"redis://{redis.address}/0", prefix, "--redis-timeout", str(timeout)))
        client = await connect(reactor, server.address)
        await client.put("before", b"warm-up")
        assert await client.get("before", 1) == b"warm-up"
        recoveries = []
        for number, stop in ((signal.SIGKILL, redis.kill), (signal.SIGTERM, redis.stop)):
            before = [b"%d-before-%d" % (number, i) for i in range(20)]
            for message in before:
                await client.put("before", message)
            stop()
            # Refused, within the timeout and a little, and never OK while Redis is down.
            accepted, refused, took = await put_until(
                client, "down", lambda i: b"%d-down-%d" % (number, i), ok=True, deadline=1.2)
            assert not accepted and len(refused) >= 5, (accepted, refused)
            assert max(took) <= timeout + 0.5, took
            # Back on the same port: the server finds it by itself.
            redis.start(redis.port)
            back_at = time.monotonic()
            accepted, refused, _ = await put_until(
                client, "back", lambda i: b"%d-back-%d" % (number, i), ok=True, deadline=DEADLINE)
            assert accepted, f"no Put answered OK within {DEADLINE} s of Redis's return"
            recoveries.append(round(time.monotonic() - back_at, 2))
            for i in range(5):
                await client.put("back", b"%d-after-%d" % (number, i))
            if number == signal.SIGTERM:
                # Stopped with SIGTERM, Redis wrote its append-only file:
                # everything answered OK before is there, once, in order.
                assert await drain(client, "before") == before
            else:
                await drain(client, "before")
            got = await drain(client, "back")
            assert got == accepted + [b"%d-after-%d" % (number, i) for i in range(5)]
            # A refused Put may have been stored only if Redis took it just
            # before the refusal (in doubt): here Redis was down all along.
            assert await drain(client, "down") == []
        assert all(recovery < 2 + 1 + 2 for recovery in recoveries), recoveries
        await client.disconnect()
        assert server.process.poll() is None
    finally:
        redis.stop()

