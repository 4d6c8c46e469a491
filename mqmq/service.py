"""The mqmq server as one Twisted service: a broker and its listeners."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from mqmq.broker import Broker
from mqmq.limits import Limits
from mqmq.server import MQServerFactory


class _Listener(service.Service):
    """Listens on one endpoint while running; remembers the port it got."""

    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, factory: MQServerFactory) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.port: Optional[IListeningPort] = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        failures: list[Failure] = []
        listening = self.endpoint.listen(self.factory)
        listening.addCallbacks(self._listening, failures.append)
        if failures:
            # Raised at once, so that a taken port stops the start with a message.
            failures[0].raiseException()

    def _listening(self, port: IListeningPort) -> None:
        self.port = port

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Optional[defer.Deferred[None]]:
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


class MQService(service.MultiService):
    """A broker serving clients on any number of Twisted server endpoints.

    Add it to an application, or start it yourself::

        server = MQService(reactor, ["tcp:47774:interface=127.0.0.1"])
        server.startService()
    """

    def __init__(self, reactor: Any, endpoints: Iterable[str] = (), limits: Limits = Limits()) -> None:
        super().__init__()
        self.reactor = reactor
        self.broker = Broker(reactor, limits)
        self.broker.setServiceParent(self)
        self.factory = MQServerFactory(self.broker)
        self._listeners: list[_Listener] = []
        for description in endpoints:
            self.listen_on(serverFromString(reactor, description))

    def listen_on(self, endpoint: IStreamServerEndpoint) -> None:
        """Serve clients on one more endpoint (from when the service runs)."""
        listener = _Listener(endpoint, self.factory)
        self._listeners.append(listener)
        listener.setServiceParent(self)

    @property
    def ports(self) -> list[IListeningPort]:
        """The ports listening now, in the order the endpoints were given."""
        return [listener.port for listener in self._listeners if listener.port is not None]

    def stopService(self) -> defer.Deferred[None]:
        """Stop accepting, close every connection, withdraw every waiting ``Get``.

        Fires once every connection has closed (at most a second after).
        """
        stopped = super().stopService()
        closed = self.factory.close_connections()
        return defer.gatherResults([stopped, closed]).addCallback(lambda _: None)
