"""The reconnecting client as users meet it: consumers keep going while a
real server (``mqmq start``, SQLite store, a UNIX socket so that the address
stays the same) is stopped with SIGTERM, killed with SIGKILL, and started
again, and every message put with ``OK`` is handled."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Callable, Optional

import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import UNIXClientEndpoint

from mqmq.client import Delivery
from mqmq.consumer import consume
from mqmq.reconnecting import ReconnectingClient
from conftest import Processes, bin_path

#: Longest any step may take (a server's start, a redelivery ...).
DEADLINE = 15.0


async def until(condition: Callable[[], bool], what: str) -> None:
    """Let the reactor run until ``condition()`` holds."""
    for _ in range(int(DEADLINE / 0.02)):
        if condition():
            return
        await task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"not within {DEADLINE} s: {what}")


@pytest_twisted.ensureDeferred
async def test_consumers_ride_out_server_restarts(procs: Processes, tmp_path: Path) -> None:
    socket_path = tmp_path / "mqmq.sock"
    database = tmp_path / "queues.db"

    def start_server() -> subprocess.Popen:
        # --fsync no: still nothing answered OK is lost to a kill -9 (only to a power cut).
        return procs.spawn(bin_path("mqmq"), "start", "--listen", f"unix:{socket_path}",
                           "--store", f"sqlite:{database}", "--fsync", "no")

    def reconnecting() -> ReconnectingClient:
        client = ReconnectingClient(UNIXClientEndpoint(reactor, str(socket_path)),
                                    retry_policy=lambda attempt: 0.05, clock=reactor)
        client.startService()
        return client

    server = start_server()
    # A connection each, as producers and consumers usually have: a waiting
    # Reserve holds up the requests behind it on its connection.
    producer, clients = reconnecting(), [reconnecting(), reconnecting()]
    put_ok: set[bytes] = set()

    async def put(*messages: bytes) -> None:
        # Made at once; each goes out when there is a connection.
        putting = [producer.put("jobs", message) for message in messages]
        await defer.gatherResults(putting, consumeErrors=True)
        put_ok.update(messages)

    handled: dict[bytes, list[int]] = {}
    holding: dict[bytes, tuple[defer.Deferred[None], defer.Deferred[None]]] = {}

    def handle(delivery: Delivery) -> Optional[defer.Deferred[None]]:
        handled.setdefault(delivery.message, []).append(delivery.deliveries)
        if delivery.message in holding and len(handled[delivery.message]) == 1:
            held, hold = holding[delivery.message]
            held.callback(None)
            return hold  # in hand while the server goes away
        return task.deferLater(reactor, 0.002, lambda: None)

    consumers = [consume(client, "jobs", handle, lease=30, wait=0.2) for client in clients]

    def acked() -> int:
        return sum(consumer.acked for consumer in consumers)

    for number in (signal.SIGTERM, signal.SIGKILL):
        batch = [b"%d-%02d" % (number, i) for i in range(15)]
        target = batch[5]
        held, hold = holding[target] = (defer.Deferred(), defer.Deferred())
        await put(*batch)  # the first batch waits for the server to start listening
        # One consumer holds a message; the other has acked the rest and
        # waits in a Reserve on the empty queue.
        await held.addTimeout(DEADLINE, reactor)
        await until(lambda: acked() == len(put_ok) - 1, "all but the held message acked")
        server.send_signal(number)
        await until(lambda: server.poll() is not None, "the server exits")
        await until(lambda: not any(client.connected for client in (producer, *clients)),
                    "the clients see their connections closed")
        # Requests made while the server is down wait for the next connection.
        late = defer.ensureDeferred(put(*(b"late-%d-%d" % (number, i) for i in range(3))))
        hold.callback(None)  # the handler ends; its ack cannot be done (the reservation went with the connection)
        await task.deferLater(reactor, 0.1, lambda: None)
        assert not late.called
        assert not any(consumer.done.called for consumer in consumers)
        server = start_server()
        await late
        # The message in hand went back to the server's queue and comes again.
        await until(lambda: acked() == len(put_ok), f"every message put is acked (after signal {number})")
        assert handled[target] == [1, 2]

    info = await clients[0].info()
    assert (info.num_messages, info.num_reserved) == (0, 0)
    # Handled once each, but those in hand at a restart.
    assert handled.keys() == put_ok
    assert sorted(message for message, deliveries in handled.items() if deliveries != [1]) == sorted(holding)
    assert not any(consumer.done.called for consumer in consumers)
    for consumer in consumers:
        await consumer.stop()
    for client in (producer, *clients):
        await client.stopService()
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=5) == 0
