"""The client's side of acknowledged delivery: reserve() and its Delivery,
kick(), consume(), and a clear error from a server that does not serve it.
Through mqmq.testing.MemoryServer: no network, a fake clock."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer

from mqmq import errors
from mqmq.broker.limits import Limits
from mqmq.client import Delivery
from mqmq.consumer import consume
from mqmq.testing import MemoryServer
from support import failure, success


def test_reserve_gives_a_delivery_that_acks() -> None:
    server = MemoryServer()
    client = server.client()
    client.put("jobs", b"one")
    reserving = client.reserve("jobs", timeout=1, lease=10)
    server.flush()
    delivery = success(reserving)
    assert isinstance(delivery, Delivery)
    assert (delivery.queue, delivery.message, delivery.deliveries) == (b"jobs", b"one", 1)
    assert server.broker.num_reserved == 1
    acking = delivery.ack()
    server.flush()
    assert success(acking) is None
    assert server.broker.num_reserved == 0 and server.broker.num_messages == 0


def test_release_touch_bury_and_kick() -> None:
    server = MemoryServer()
    client = server.client()
    client.put("jobs", b"one")
    reserving = client.reserve("jobs", lease=1)
    server.flush()
    delivery = success(reserving)
    touching = delivery.touch(5)
    server.advance(2)  # past the first lease: the touch kept it
    assert success(touching) is None and server.broker.num_reserved == 1
    releasing = delivery.release()
    server.flush()
    assert success(releasing) is None
    again = client.reserve("jobs")
    server.flush()
    second = success(again)
    assert (second.message, second.deliveries) == (b"one", 2)
    burying = second.bury()
    server.flush()
    assert success(burying) is None and server.broker.num_buried == 1
    kicking = client.kick("jobs", 5)
    server.flush()
    assert success(kicking) == 1
    # The old id is no longer this connection's.
    stale = delivery.ack()
    server.flush()
    assert failure(stale, errors.ServerError).error_type == errors.UNKNOWN_ID


def test_a_reserve_that_finds_nothing_times_out() -> None:
    server = MemoryServer()
    client = server.client()
    reserving = client.reserve("jobs", timeout=0.5)
    server.advance(0.5)
    failure(reserving, errors.GetTimeout)


@pytest.mark.parametrize("lease", [0, -1, 43_200.001, float("nan")])
def test_a_lease_the_server_would_refuse_is_refused_here(lease: float) -> None:
    server = MemoryServer()
    client = server.client()
    failure(client.reserve("jobs", lease=lease), errors.InvalidArgument)


def test_a_server_that_does_not_serve_it_is_a_clear_error() -> None:
    # As the original server answers: an unknown command, then a close.
    server = MemoryServer()
    client = server.client()
    server.broker.store.acknowledged_delivery = False  # type: ignore[misc]
    reserving = client.reserve("jobs")
    server.flush()
    error = failure(reserving, errors.AcknowledgedDeliveryUnsupported)
    assert "does not support acknowledged delivery" in str(error)


def test_consume_acks_what_succeeds_and_releases_what_fails() -> None:
    server = MemoryServer(limits=Limits(max_deliveries=2))
    client = server.client()
    for message in (b"good", b"bad", b"later"):
        client.put("jobs", message)
    seen: list[tuple[bytes, int]] = []
    finish_later: defer.Deferred[None] = defer.Deferred()

    async def handle(delivery: Delivery) -> None:
        seen.append((delivery.message, delivery.deliveries))
        if delivery.message == b"bad":
            raise ValueError("cannot handle it")
        if delivery.message == b"later":
            await finish_later

    consumer = consume(client, "jobs", handle, lease=2, wait=1)
    server.flush()
    # good: acked; bad: released, tried again, then buried at the limit;
    # later: still being handled, its lease kept alive by touches.
    for _ in range(10):
        server.advance(0.5)
    assert seen == [(b"good", 1), (b"bad", 1), (b"bad", 2), (b"later", 1)]
    assert server.broker.num_reserved == 1 and server.broker.num_buried == 1
    finish_later.callback(None)
    server.flush()
    assert (consumer.acked, consumer.released) == (2, 2)
    stopping = consumer.stop()
    server.advance(1)  # the Reserve in flight comes back empty
    assert success(stopping) is None
    assert success(consumer.done) is None
    assert server.broker.num_reserved == 0 and server.broker.num_messages == 0


def test_a_consumer_stopped_while_its_reserve_waits_handles_what_it_brings() -> None:
    server = MemoryServer(limits=Limits(max_deliveries=1))
    client = server.client()
    handled: list[bytes] = []
    consumer = consume(client, "jobs", lambda delivery: handled.append(delivery.message), wait=10)
    server.flush()
    stopping = consumer.stop()
    producer = server.client()
    producer.put("jobs", b"arrives")
    server.flush()
    # Handled and acked, not given back (which at --max-deliveries 1 would bury it).
    assert success(stopping) is None and handled == [b"arrives"]
    assert server.broker.num_buried == 0 and server.broker.num_messages == 0


def test_ids_and_counts_must_be_what_the_server_gave() -> None:
    server = MemoryServer()
    client = server.client()
    failure(client.ack("jobs", 5), errors.InvalidArgument)  # type: ignore[arg-type]
    failure(client.kick("jobs", float("nan")), errors.InvalidArgument)  # type: ignore[arg-type]
