"""Test your mqmq code without a network: a server and clients in memory.

::

    server = MemoryServer()
    client = server.client()
    done = client.put("jobs", b"one")
    server.flush()                      # move the bytes both ways
    assert server.broker.num_messages == 1

Code that connects through an endpoint, as production code does, connects
through :meth:`MemoryServer.endpoint` instead::

    connecting = connect_endpoint(server.endpoint(), clock=server.clock)

Time is a :class:`twisted.internet.task.Clock`: ``server.advance(5)`` lets five
seconds pass for ``get`` timeouts, without sleeping.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet import defer
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.test import iosim
from zope.interface import implementer

from mqmq.broker.broker import Broker
from mqmq.client import DEFAULT_REPLY_TIMEOUT, MQClient
from mqmq.broker.limits import Limits
from mqmq.server.protocol import MQServerFactory


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """A client endpoint whose connections reach a :class:`MemoryServer`."""

    def __init__(self, server: MemoryServer) -> None:
        self.server = server

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        """Connect a protocol of ``protocolFactory``'s to the server, at once.

        As over TCP, a connection the server refuses (``--max-connections``)
        is made, then closed by the server at the next flush.
        """
        protocol = protocolFactory.buildProtocol(iosim.FakeAddress())
        if protocol is None:
            return defer.fail(ConnectError("the factory built no protocol"))
        self.server._connect(protocol)
        return defer.succeed(protocol)


class MemoryServer:
    """An mqmq server whose clients connect through memory, not sockets.

    :param clock: the server's and its clients' time; a new ``Clock`` if not given.
    :param limits: the server's limits, as ``twistd mqmq``'s options set them.
    """

    def __init__(self, clock: Optional[Clock] = None, limits: Limits = Limits()) -> None:
        self.clock = clock if clock is not None else Clock()
        self.broker = Broker(self.clock, limits)
        self.factory = MQServerFactory(self.broker)
        self._pumps: list[iosim.IOPump] = []

    def client(self, reply_timeout: Optional[float] = DEFAULT_REPLY_TIMEOUT) -> MQClient:
        """A new client, connected; its reply timeout runs on :attr:`clock`."""
        client = MQClient(reply_timeout=reply_timeout, clock=self.clock)
        self._connect(client)
        return client

    def endpoint(self) -> MemoryEndpoint:
        """An ``IStreamClientEndpoint`` connecting to this server through memory."""
        return MemoryEndpoint(self)

    def _connect(self, client: IProtocol) -> None:
        server = self.factory.buildProtocol(None)
        refused = server is None
        server_side: IProtocol = Protocol() if server is None else server
        server_transport = iosim.makeFakeServer(server_side)
        pump = iosim.connect(
            server_side, server_transport,
            client, iosim.makeFakeClient(client),
            clock=self.clock,
        )
        if refused:
            # As a listening port does when its factory builds no protocol.
            server_transport.loseConnection()
        self._pumps.append(pump)

    def flush(self) -> None:
        """Deliver every byte in flight, both ways, until all is quiet."""
        moved = True
        while moved:
            moved = False
            for pump in self._pumps:
                moved = pump.flush() or moved
        self._pumps = [pump for pump in self._pumps if not pump.clientIO.disconnected]

    def advance(self, seconds: float) -> None:
        """Deliver what is in flight, let time pass (firing timeouts), deliver again.

        Flushing first lets requests made since the last flush reach the
        server before the time they should wait for starts passing.
        """
        self.flush()
        self.clock.advance(seconds)
        self.flush()
