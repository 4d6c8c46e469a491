"""Departed consumers over real loopback TCP: the attacks as they were found.

The server runs in this process on the global reactor; clients are plain
sockets (see ``test_faults``), so a test can leave data unsent behind a
``Get`` and close, as a crashed or hostile consumer does.
"""

from __future__ import annotations

from typing import AsyncIterator

import pytest
import pytest_twisted  # type: ignore[import-untyped]

from mqmq.broker.limits import Limits
from test_faults import PENDING, Harness, RawClient, frame, linux_only, logged_errors, pause, until

__all__ = ["logged_errors"]  # a fixture the tests here use


@pytest_twisted.async_yield_fixture
async def tight(logged_errors: list) -> AsyncIterator[Harness]:  # noqa: F811
    running = Harness(Limits(max_pending_bytes=PENDING))
    try:
        yield running
    finally:
        await running.stop()


@linux_only
@pytest_twisted.ensureDeferred
async def test_put_answered_ok_is_kept_when_hundreds_of_unread_waiters_have_left(
    tight: Harness,
) -> None:
    # 300 consumers each send a Get, then more than --max-pending-bytes (so
    # the server stops reading them), then close.  Once this lost the next
    # acknowledged Put: each departed waiter put it back through a recursive
    # call until Python's recursion limit dropped it.
    behind = frame(b"Put", b"behind", b"x" * 4000) * ((PENDING * 3 // 2) // 4000)
    consumers: list[RawClient] = []
    for _ in range(300):
        consumer = RawClient(tight.port)
        tight.clients.append(consumer)
        consumers.append(consumer)
        await consumer.send(frame(b"Get", b"q", b"3600000") + behind)
        await pause()  # the server accepts it before the listen backlog fills
    await until(lambda: tight.waiters(b"q") == 300, "300 Gets wait", within=30)
    for consumer in consumers:
        await until(lambda: consumer.unsent() == 0, "the server's kernel took it all")
        consumer.close()

    # At once, before the server's next look at the silent connections.
    producer = RawClient(tight.port)
    tight.clients.append(producer)
    assert await producer.request(b"Put", b"q", b"acknowledged") == [b"OK"]
    assert await producer.request(b"Get", b"q", b"1000") == [b"OK", b"acknowledged"]
    await tight.gone(1, b"q", within=10)


@linux_only
@pytest_twisted.ensureDeferred
async def test_consumer_gone_with_unsent_data_behind_its_get_never_takes_a_message(
    tight: Harness,
) -> None:
    # The consumer's FIN waits behind 8 MB that the server will not read, so
    # the server's socket stays ESTABLISHED and nothing says it has gone.
    # The message handed to it is reset by its kernel, never acknowledged:
    # it must come back.
    consumer = await tight.waiting_get(b"q", 3_600_000)
    await consumer.send_some(b"\0" * (8 * 1024 * 1024), within=1.0)
    assert consumer.unsent() > 0, "some data stays unsent behind the Get"
    consumer.close()

    producer = await tight.connect()
    assert await producer.request(b"Put", b"q", b"acknowledged") == [b"OK"]
    await tight.gone(1, b"q", within=10)
    assert await producer.request(b"Get", b"q", b"1000") == [b"OK", b"acknowledged"]


@linux_only
@pytest_twisted.ensureDeferred
async def test_a_message_the_consumer_received_is_not_put_back(tight: Harness) -> None:
    # The other side of the same rule: a reply the peer acknowledged was
    # delivered, and a consumer that then resets does not get it again.
    consumer = await tight.waiting_get(b"q", 60_000)
    producer = await tight.connect()
    assert await producer.request(b"Put", b"q", b"once") == [b"OK"]
    assert await consumer.read_frame() == [b"OK", b"once"]
    protocol = consumer.protocol
    assert protocol is not None
    await until(lambda: protocol._out._delivered() == protocol._out._written, "the peer acked it")
    consumer.reset()
    await tight.gone(1)
    assert await producer.request(b"Get", b"q", b"1") == [b"Timeout"]
