"""The mqmq server as one Twisted service: a broker and its listeners."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint

from mqmq.broker.broker import Broker
from mqmq.broker.limits import Limits
from mqmq.server.protocol import MQServerFactory
from mqmq.stores.base import Store


class _Listener(StreamServerEndpointService):
    """Twisted's endpoint service, remembering the port it got.

    A listen that fails at once (a port already taken) is raised from
    ``privilegedStartService``, as ``twistd``'s own strports services do,
    so that the start fails with the reason instead of serving nowhere.
    """

    _raiseSynchronously = True
    #: The port listening now; ``None`` before it listens and once stopped.
    port: Optional[IListeningPort] = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: Optional[IListeningPort]) -> Optional[IListeningPort]:
        # None when the listen failed later or was cancelled (already logged).
        self.port = port
        return port

    def stopService(self) -> defer.Deferred[None]:
        self.port = None
        if self._waitingForPort is None:  # never started: nothing to stop
            self.running = False
            return defer.succeed(None)
        stopped: defer.Deferred[None] = super().stopService()
        return stopped


def _listening(listeners: list[_Listener]) -> list[IListeningPort]:
    return [listener.port for listener in listeners if listener.port is not None]


class MQService(service.MultiService):
    """A broker serving clients on any number of Twisted server endpoints.

    Add it to an application, or start it yourself::

        server = MQService(reactor, ["tcp:47774:interface=127.0.0.1"])
        server.startService()
    """

    def __init__(
        self,
        reactor: Any,
        endpoints: Iterable[Union[str, IStreamServerEndpoint]] = (),
        limits: Limits = Limits(),
        store: Optional[Store] = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.broker = Broker(reactor, limits, store)
        self.broker.setServiceParent(self)
        self.factory = MQServerFactory(self.broker)
        self._listeners: list[_Listener] = []
        self._other_listeners: list[_Listener] = []
        for endpoint in endpoints:
            # A description (tcp:47774, unix:/run/mqmq.sock ...), or an endpoint.
            self.listen_on(serverFromString(reactor, endpoint) if isinstance(endpoint, str) else endpoint)

    def listen_on(self, endpoint: IStreamServerEndpoint) -> None:
        """Serve clients on one more endpoint (from when the service runs)."""
        self._listen(endpoint, self.factory, self._listeners)

    def serve_also(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        """Serve something else beside the queues on an endpoint, started and
        stopped with them: the metrics' web site (:func:`mqmq.web.site.site`)."""
        self._listen(endpoint, factory, self._other_listeners)

    def _listen(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory, listeners: list[_Listener]) -> None:
        listener = _Listener(endpoint, factory)
        listeners.append(listener)
        listener.setServiceParent(self)

    @property
    def other_ports(self) -> list[IListeningPort]:
        """The ports of :meth:`serve_also`, listening now, in the order given."""
        return _listening(self._other_listeners)

    @property
    def ports(self) -> list[IListeningPort]:
        """The ports listening now, in the order the endpoints were given."""
        return _listening(self._listeners)

    def stopService(self) -> defer.Deferred[None]:
        """Stop accepting, close every connection, withdraw every waiting ``Get``,
        then write what the store has pending and close it.

        Fires once every connection has closed (at most a second after) and
        the store is closed.
        """
        stopped = super().stopService()
        closed = self.factory.close_connections()
        done = defer.gatherResults([stopped, closed])
        # Last: connections that close put their undelivered messages back.
        done.addCallback(lambda _: defer.maybeDeferred(self.broker.store.stop))
        return done.addCallback(lambda _: None)
