"""The client against the server over real loopback TCP, on the global reactor."""

from __future__ import annotations

import socket
from typing import Any, AsyncIterator, Generator

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import defer, reactor

from mqmq.client import MQClient, connect
from mqmq.errors import GetTimeout
from mqmq.server.service import MQService


def start_service(description: str) -> MQService:
    service = MQService(reactor, [description])
    service.startService()
    return service


@pytest_twisted.async_yield_fixture
async def service() -> AsyncIterator[MQService]:
    service = start_service("tcp:0:interface=127.0.0.1")
    try:
        yield service
    finally:
        await service.stopService()


@pytest.fixture
def address(service: MQService) -> str:
    return f"127.0.0.1:{service.ports[0].getHost().port}"


def notify_on_wait(service: MQService, monkeypatch: pytest.MonkeyPatch) -> defer.Deferred[bytes]:
    """A Deferred that fires with the queue name when a Get starts waiting.

    Lets a test put a message only once a Get is known to be blocked on the
    server, without sleeping.
    """
    waiting: defer.Deferred[bytes] = defer.Deferred()
    original = service.broker.wait

    def wait(queue_name: bytes, timeout: float, present: Any = None) -> defer.Deferred[bytes]:
        result = original(queue_name, timeout, present)
        if not waiting.called:
            waiting.callback(queue_name)
        return result

    monkeypatch.setattr(service.broker, "wait", wait)
    return waiting


# -- the original README's example --------------------------------------------------


async def producer(address: str) -> None:
    client = await connect(reactor, address)
    try:
        for i in range(10):
            await client.put("queue1", f"Message {i}".encode())
    finally:
        await client.disconnect()


async def consumer(address: str) -> list[bytes]:
    client = await connect(reactor, address)
    received: list[bytes] = []
    try:
        while len(received) < 10:
            try:
                # Wait at most 1 minute for the next message.
                received.append(await client.get("queue1", 60))
            except GetTimeout:
                continue  # No message so far. Keep on waiting.
    finally:
        await client.disconnect()
    return received


@pytest_twisted.ensureDeferred
async def test_readme_producer_and_consumer(address: str, service: MQService) -> None:
    consumed = defer.ensureDeferred(consumer(address))
    await defer.ensureDeferred(producer(address))
    received = await consumed
    assert received == [f"Message {i}".encode() for i in range(10)]
    assert service.broker.num_messages == 0


@pytest_twisted.ensureDeferred
async def test_readme_producer_first_then_consumer(address: str, service: MQService) -> None:
    await defer.ensureDeferred(producer(address))
    assert service.broker.num_messages == 10
    received = await defer.ensureDeferred(consumer(address))
    assert received == [f"Message {i}".encode() for i in range(10)]


# -- blocking, timeouts, pipelining ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_blocking_get_woken_by_a_put_from_another_connection(
    address: str, service: MQService, monkeypatch: pytest.MonkeyPatch
) -> None:
    waiting = notify_on_wait(service, monkeypatch)
    consumer_client = await connect(reactor, address)
    producer_client = await connect(reactor, address)
    try:
        got = consumer_client.get("wake", 30)
        assert await waiting == b"wake"
        assert not got.called
        await producer_client.put("wake", b"good morning")
        assert await got == b"good morning"
        assert service.broker.num_messages == 0
    finally:
        await consumer_client.disconnect()
        await producer_client.disconnect()


@pytest_twisted.ensureDeferred
async def test_get_times_out_on_an_empty_queue(address: str, service: MQService) -> None:
    client = await connect(reactor, address)
    try:
        with pytest.raises(GetTimeout):
            await client.get("empty", 0.05)
        # The connection is still usable after a timeout.
        await client.put("empty", b"now")
        assert await client.get("empty", 0.05) == b"now"
    finally:
        await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_pipelining_1000_puts_then_1000_gets(address: str) -> None:
    client = await connect(reactor, address)
    try:
        messages = [b"message %d" % i for i in range(1000)]
        puts = [client.put("pipe", message) for message in messages]
        gets = [client.get("pipe", 10) for _ in messages]
        assert await defer.gatherResults(puts) == [None] * 1000
        assert await defer.gatherResults(gets) == messages
    finally:
        await client.disconnect()


# -- both styles -------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_inline_callbacks_style(address: str) -> Generator[defer.Deferred[Any], Any, None]:
    client: MQClient = yield connect(reactor, address)
    try:
        yield client.put("style", b"yielded")
        message = yield client.get("style", 1)
        assert message == b"yielded"
        info = yield client.info()
        assert info.queues == {"style": 0}
        try:
            yield client.get("style", 0.05)
        except GetTimeout:
            pass
        else:
            pytest.fail("the Get on an empty queue did not time out")
    finally:
        yield client.disconnect()


@pytest_twisted.ensureDeferred
async def test_async_await_style(address: str) -> None:
    client = await connect(reactor, address)
    try:
        await client.put("style", b"awaited")
        assert await client.get("style", 1) == b"awaited"
        info = await client.info()
        assert info.queues == {"style": 0}
    finally:
        await client.disconnect()


# -- info, big messages, disconnect ----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_info_counts_connections(address: str) -> None:
    first = await connect(reactor, address)
    second = await connect(reactor, address)
    try:
        await first.put("counted", b"1")
        await first.put("counted", b"2")
        # The second connection's reply proves the server accepted both.
        info = await second.info()
        assert info.num_connections == 2
        assert info.num_queues == 1
        assert info.num_messages == 2
        assert info.queues == {"counted": 2}
        assert (await first.info()).num_connections == 2
    finally:
        await first.disconnect()
        await second.disconnect()


@pytest_twisted.ensureDeferred
async def test_a_4_mib_message_round_trip(address: str) -> None:
    message = bytes(range(256)) * (4 * 1024 * 1024 // 256)
    assert len(message) == 4 * 1024 * 1024
    sender = await connect(reactor, address)
    receiver = await connect(reactor, address)
    try:
        await sender.put("big", message)
        got = await receiver.get("big", 10)
        assert len(got) == len(message)
        assert got == message
    finally:
        await sender.disconnect()
        await receiver.disconnect()


@pytest_twisted.ensureDeferred
async def test_disconnect_waits_for_replies_in_flight(address: str, service: MQService) -> None:
    client = await connect(reactor, address)
    puts = [client.put("late", b"%d" % i) for i in range(50)]
    await client.disconnect()
    assert await defer.gatherResults(puts) == [None] * 50
    assert service.broker.num_messages == 50


# -- IPv6 ----------------------------------------------------------------------------


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback_available(), reason="cannot bind the IPv6 loopback ::1")
@pytest_twisted.ensureDeferred
async def test_ipv6_loopback() -> None:
    service = start_service(r"tcp6:0:interface=\:\:1")
    try:
        host = service.ports[0].getHost()
        assert host.host == "::1"
        client = await connect(reactor, f"[::1]:{host.port}")
        try:
            await client.put("six", b"over IPv6")
            assert await client.get("six", 1) == b"over IPv6"
            assert (await client.info()).num_connections == 1
        finally:
            await client.disconnect()
    finally:
        await service.stopService()
