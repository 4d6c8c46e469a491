"""What an attack on the server found holding, kept so by tests.

- Many consumers pipelining short ``Get``s against a few producers: no
  message lost or delivered twice.
- Ten thousand one-hour ``Get``s abandoned: every waiter and timer released.
- Thousands of idle connections: the server still serves, in bounded memory.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import defer, reactor

from mqmq.client import connect
from mqmq.errors import GetTimeout
from mqmq.server.service import MQService
from test_faults import Server, allow_open_files, frame, read_frame, spawn
from conftest import bin_path
from wire import Server as FakeServer

# Every fake-transport server here runs on each store (conftest.both_stores).
pytestmark = pytest.mark.usefixtures("both_stores")

__all__ = ["spawn"]  # a fixture the tests here use


@pytest_twisted.ensureDeferred
async def test_forty_consumers_pipelining_one_ms_gets_lose_and_repeat_nothing() -> None:
    service = MQService(reactor, ["tcp:0:interface=127.0.0.1"])
    service.startService()
    address = f"127.0.0.1:{service.ports[0].getHost().port}"  # type: ignore[attr-defined]
    producers, per_producer, consumers = 4, 5_000, 40
    received: Counter[bytes] = Counter()
    done_producing = defer.Deferred[None]()
    try:
        async def produce(number: int) -> None:
            client = await connect(reactor, address)
            for start in range(0, per_producer, 100):
                await defer.gatherResults([
                    client.put("race", b"p%d-%d" % (number, index))
                    for index in range(start, start + 100)
                ])
            await client.disconnect()

        async def consume() -> None:
            client = await connect(reactor, address)
            while not (done_producing.called and service.broker.num_messages == 0):
                gets = [client.get("race", 0.001) for _ in range(8)]
                for get in gets:
                    try:
                        received[await get] += 1
                    except GetTimeout:
                        pass
            await client.disconnect()

        consuming = [defer.ensureDeferred(consume()) for _ in range(consumers)]
        await defer.gatherResults([defer.ensureDeferred(produce(n)) for n in range(producers)])
        done_producing.callback(None)
        await defer.gatherResults(consuming).addTimeout(60, reactor)
    finally:
        await service.stopService()
    expected = {b"p%d-%d" % (n, i) for n in range(producers) for i in range(per_producer)}
    assert set(received) == expected
    assert max(received.values()) == 1


#: Abandoned Gets in the test below.  (Three thousand, not more: the test's
#: task.Clock sorts all its calls at every callLater, which makes the test
#: itself quadratic; the reactor's timers are a heap.)
ABANDONED_GETS = 3_000


def test_thousands_of_abandoned_one_hour_gets_release_every_waiter_and_timer() -> None:
    server = FakeServer()
    connections = []
    for number in range(ABANDONED_GETS):
        conn = server.connect()
        conn.send([b"Get", b"q%d" % (number % 10), b"3600000"])
        connections.append(conn)
    assert len(server.clock.getDelayedCalls()) == ABANDONED_GETS
    for conn in connections:
        conn.close()
    assert server.clock.getDelayedCalls() == []
    assert sum(len(queue.waiters) for queue in server.broker._queues.values()) == 0
    assert server.broker.num_connections == 0
    # A message put now is kept, not handed to any of them.
    producer = server.connect()
    producer.send([b"Put", b"q0", b"kept"], [b"Get", b"q0"])
    assert producer.replies() == [[b"OK"], [b"OK", b"kept"]]


def resident_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_five_thousand_idle_connections_leave_the_server_serving(
    spawn: Callable[..., Server],
) -> None:
    server = spawn(bin_path("mqmq"), "start", "-addr", "{addr}")
    allow_open_files(5_000 + 256)
    before = resident_mb(server.process.pid)
    idle = [server.connect() for _ in range(5_000)]
    worker = server.connect()
    server.wait_for_info(lambda info: info["NumConnections"] == 5_002)
    for index in range(100):
        worker.sendall(frame(b"Put", b"jobs", b"j%d" % index) + frame(b"Get", b"jobs", b"1000"))
        assert read_frame(worker) == [b"OK"]
        assert read_frame(worker) == [b"OK", b"j%d" % index]
    # Measured at about 44 MB for 5,000: a connection costs kilobytes, not more.
    grown = resident_mb(server.process.pid) - before
    assert grown < 100, f"{grown:.0f} MB for 5,000 idle connections"
    assert all(sock.fileno() >= 0 for sock in idle)
