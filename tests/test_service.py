"""MQService: its listeners (Twisted's endpoint service) and its connections."""

from __future__ import annotations

import socket
from typing import Any, AsyncIterator, Optional

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import defer, reactor
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.task import Clock
from zope.interface import implementer

from mqmq.client import connect
from mqmq.server.protocol import MQServerProtocol
from mqmq.server.service import MQService
from support import success


@implementer(IListeningPort)
class FakePort:
    def __init__(self) -> None:
        self.listening = True

    def stopListening(self) -> None:
        self.listening = False

    def getHost(self) -> Any:
        return None


@implementer(IStreamServerEndpoint)
class LateEndpoint:
    """An endpoint whose ``listen`` answers only when the test says so."""

    def __init__(self) -> None:
        self.listens: list[defer.Deferred[IListeningPort]] = []
        self.cancelled = 0

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        def cancel(_: defer.Deferred[IListeningPort]) -> None:
            self.cancelled += 1

        listening: defer.Deferred[IListeningPort] = defer.Deferred(cancel)
        self.listens.append(listening)
        return listening


@implementer(IStreamServerEndpoint)
class TakenEndpoint:
    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        return defer.fail(CannotListenError("127.0.0.1", 47774, OSError("address already in use")))


def late_service() -> tuple[MQService, LateEndpoint]:
    endpoint = LateEndpoint()
    service = MQService(Clock())
    service.listen_on(endpoint)
    return service, endpoint


def test_a_listen_answering_later_is_asked_once() -> None:
    service, endpoint = late_service()
    # As twistd starts an application: privileged start, then start.
    service.privilegedStartService()
    service.startService()
    assert len(endpoint.listens) == 1
    assert service.ports == []
    port = FakePort()
    endpoint.listens[0].callback(port)
    assert service.ports == [port]


def test_stopping_cancels_a_listen_in_progress() -> None:
    service, endpoint = late_service()
    service.startService()
    stopped = service.stopService()
    assert endpoint.cancelled == 1
    success(stopped)
    assert service.ports == []


def test_stopping_stops_the_port_and_forgets_it() -> None:
    service, endpoint = late_service()
    service.startService()
    port = FakePort()
    endpoint.listens[0].callback(port)
    success(service.stopService())
    assert not port.listening
    assert service.ports == []


def test_a_service_never_started_stops_cleanly() -> None:
    service, endpoint = late_service()
    # Each part on its own: MultiService would only log a part's failure.
    for part in list(service):
        success(defer.maybeDeferred(part.stopService))
    success(service.stopService())
    assert endpoint.listens == []


def test_a_taken_port_fails_the_start_at_once() -> None:
    service = MQService(Clock())
    service.listen_on(TakenEndpoint())
    with pytest.raises(CannotListenError):
        service.privilegedStartService()


# -- over real loopback ------------------------------------------------------------



def server_side(service: MQService) -> MQServerProtocol:
    (protocol,) = service.factory.connections
    assert isinstance(protocol, MQServerProtocol)
    return protocol


@pytest_twisted.ensureDeferred
async def test_server_connections_have_tcp_nodelay(loopback_service: MQService) -> None:
    running = loopback_service
    port = running.ports[0].getHost().port  # type: ignore[attr-defined]
    client = await connect(reactor, f"127.0.0.1:{port}")
    try:
        await client.info()  # the server has accepted, and answered
        handle: Optional[socket.socket] = server_side(running).transport.getHandle()
        assert handle is not None
        assert handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        # The kernel's default, so that the test can fail:
        with socket.create_connection(("127.0.0.1", port)) as plain:
            assert plain.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
    finally:
        await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_an_embedded_service_keeps_its_messages_in_a_durable_store(tmp_path: Any) -> None:
    from mqmq.stores.sqlite import SqliteStore

    path = str(tmp_path / "queues.db")
    first = MQService(reactor, ["tcp:0:interface=127.0.0.1"], store=SqliteStore(path, "always", reactor))
    first.startService()
    port = first.ports[0].getHost().port
    client = await connect(reactor, f"127.0.0.1:{port}")
    await client.put(b"jobs", b"kept")
    await client.disconnect()
    await first.stopService()

    second = MQService(reactor, ["tcp:0:interface=127.0.0.1"], store=SqliteStore(path, "always", reactor))
    second.startService()
    try:
        client = await connect(reactor, f"127.0.0.1:{second.ports[0].getHost().port}")
        assert await client.get(b"jobs") == b"kept"
        await client.disconnect()
    finally:
        await second.stopService()
