"""Test your mqmq code without a network: a server and clients in memory.

::

    server = MemoryServer()
    client = server.client()
    done = client.put("jobs", b"one")
    server.flush()                      # move the bytes both ways
    assert server.broker.num_messages == 1

Time is a :class:`twisted.internet.task.Clock`: ``server.advance(5)`` lets five
seconds pass for ``get`` timeouts, without sleeping.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.task import Clock
from twisted.test import iosim

from mqmq.broker import Broker
from mqmq.client import MQClient
from mqmq.server import MQServerFactory


class MemoryServer:
    """An mqmq server whose clients connect through memory, not sockets."""

    def __init__(self, clock: Optional[Clock] = None) -> None:
        self.clock = clock if clock is not None else Clock()
        self.broker = Broker(self.clock)
        self.factory = MQServerFactory(self.broker)
        self._pumps: list[iosim.IOPump] = []

    def client(self) -> MQClient:
        """A new client, connected."""
        client = MQClient()
        server = self.factory.buildProtocol(None)
        pump = iosim.connect(
            server, iosim.makeFakeServer(server),
            client, iosim.makeFakeClient(client),
            clock=self.clock,
        )
        self._pumps.append(pump)
        return client

    def flush(self) -> None:
        """Deliver every byte in flight, both ways, until all is quiet."""
        moved = True
        while moved:
            moved = False
            for pump in self._pumps:
                moved = pump.flush() or moved
        self._pumps = [pump for pump in self._pumps if not pump.clientIO.disconnected]

    def advance(self, seconds: float) -> None:
        """Let time pass (firing ``get`` timeouts), then flush."""
        self.clock.advance(seconds)
        self.flush()
