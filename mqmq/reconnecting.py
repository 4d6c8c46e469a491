"""A client that rides out restarts: one connection at a time, made again
(with backoff) whenever it breaks, by Twisted's ``ClientService``.

::

    client = reconnecting_client(reactor, "127.0.0.1:47774")
    client.startService()              # or client.setServiceParent(application)
    yield client.put("jobs", b"one")   # waits for a connection if there is none

A request made while there is no connection waits for the next one (up to
``connect_timeout``, then :class:`~mqmq.errors.NotConnected`).  A request
already sent when the connection breaks fails with
:class:`~mqmq.errors.ConnectionClosed` and is not sent again: the server may
or may not have done it, and neither a ``Put`` nor a ``Get`` may be repeated
blindly.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, TypeVar, cast

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mqmq import errors
from mqmq.address import DEFAULT_ADDRESS, describe, parse_address
from mqmq.client import DEFAULT_REPLY_TIMEOUT, Delivery, MQClient, QueueName
from mqmq.wire.codec import MAX_MESSAGE_LENGTH
from mqmq.wire.info import ServerInfo

T = TypeVar("T")

#: Seconds between attempts to connect, given how many failed in a row:
#: 0.75 s after the first, 1.5 times longer after each further one, at most
#: 15 s; each plus up to 1 s at random, so that the many clients of a server
#: that restarts do not all come back at the same moment.
DEFAULT_RETRY_POLICY: Callable[[int], float] = backoffPolicy(initialDelay=0.5, maxDelay=15.0)

#: Seconds a stop waits for replies to requests in flight (a Get that waits
#: an hour would hold it up that long) before it closes the connection.
DEFAULT_STOP_GRACE = 5.0


class _Connection(MQClient):
    """One connection of a :class:`ReconnectingClient`, which it tells when it opens and closes."""

    def __init__(self, owner: ReconnectingClient) -> None:
        super().__init__(owner.max_message_bytes, reply_timeout=owner.reply_timeout, clock=owner.clock)
        self._owner = owner

    def connectionMade(self) -> None:
        super().connectionMade()
        self._owner._connection_made(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # The requests in flight fail first, with ConnectionClosed; a request
        # made from their errbacks already finds this connection closed.
        super().connectionLost(reason)
        self._owner._connection_lost(self, reason)


class _ConnectionFactory(Factory):
    noisy = False  # no "Starting factory" in the log at each reconnection

    def __init__(self, owner: ReconnectingClient) -> None:
        self.owner = owner

    def buildProtocol(self, addr: Optional[IAddress]) -> _Connection:
        return _Connection(self.owner)


@implementer(IStreamClientEndpoint)
class _Attempts:
    """An endpoint that reports its failed attempts: a request that finds no
    connection can then say why."""

    def __init__(self, endpoint: IStreamClientEndpoint, failed: Callable[[Failure], None]) -> None:
        self.endpoint = endpoint
        self.failed = failed

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        def failed(failure: Failure) -> Failure:
            self.failed(failure)
            return failure

        return self.endpoint.connect(protocolFactory).addErrback(failed)


def _refusal(attempt: defer.Deferred[T]) -> Optional[Failure]:
    """The failure of a request tried on a closed client, unless it is only
    that the client is closed (the request itself is fine)."""
    outcome: list[Failure] = []
    attempt.addErrback(outcome.append)
    if outcome and not outcome[0].check(errors.ConnectionClosed):
        return outcome[0]
    return None


def _check_connect_timeout(seconds: Optional[float]) -> Optional[float]:
    # Written so that NaN is refused too.
    if seconds is not None and not seconds >= 0:
        raise ValueError(f"connect_timeout must be a number of seconds from 0 (math.inf: no limit) "
                         f"or None, not {seconds!r}")
    return seconds


class ReconnectingClient(Service):
    """An mqmq client that keeps a connection to one server, connecting again
    whenever it breaks; a Twisted service (start it, or add it to a parent).

    It takes the requests of :class:`~mqmq.client.MQClient`, each returning a
    Deferred:

    - made while connected, a request goes out at once, on the connection;
    - made while there is none, it waits for the next one, at most
      ``connect_timeout`` seconds (the client's, or the call's), then fails
      with :class:`~mqmq.errors.NotConnected`: nothing was sent;
    - sent, and the connection breaks before the reply: it fails with
      :class:`~mqmq.errors.ConnectionClosed` and is not sent again (a
      ``Put`` may have been stored or not; a ``Get`` whose reply never came
      put the message back at the front of its queue, but one that reached
      this machine is gone; a ``Reserve``'s message is handed out again).

    A :class:`~mqmq.client.Delivery` belongs to the connection that reserved
    it: once that connection has closed, the server has put the message back
    in its queue, and its ``ack()``, ``release()``, ``touch()`` and
    ``bury()`` fail with :class:`~mqmq.errors.ReservationLost` without
    sending anything.
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        *,
        retry_policy: Optional[Callable[[int], float]] = None,
        connect_timeout: Optional[float] = None,
        reply_timeout: Optional[float] = DEFAULT_REPLY_TIMEOUT,
        max_message_bytes: int = MAX_MESSAGE_LENGTH,
        clock: Optional[IReactorTime] = None,
        stop_grace: float = DEFAULT_STOP_GRACE,
    ) -> None:
        """:param endpoint: where to connect, each time: any client endpoint
            (TCP, UNIX socket, TLS ...).
        :param retry_policy: seconds to wait before the next attempt, given
            how many failed in a row (as ``ClientService`` takes it, e.g.
            ``twisted.application.internet.backoffPolicy(...)``);
            :data:`DEFAULT_RETRY_POLICY` if not given.
        :param connect_timeout: seconds a request made while there is no
            connection waits for one; ``None`` (the default): as long as it
            takes.  Each request may give its own.
        :param reply_timeout: as :class:`~mqmq.client.MQClient`'s, for each
            connection.
        :param max_message_bytes: as :class:`~mqmq.client.MQClient`'s.
        :param clock: times retries, connect and reply timeouts; the global
            reactor if not given.
        :param stop_grace: seconds :meth:`stopService` waits for the replies
            to requests in flight before it closes the connection anyway.
        """
        if clock is None:
            from twisted.internet import reactor

            clock = cast(IReactorTime, reactor)
        self.clock = clock
        self.connect_timeout = _check_connect_timeout(connect_timeout)
        self.reply_timeout = reply_timeout
        self.max_message_bytes = max_message_bytes
        self.stop_grace = stop_grace
        # Never connected, so closed from the start: a request tried on it
        # is checked as a connection checks it (queue name, timeout ...),
        # then fails with ConnectionClosed (ReservationLost for Ack and its kin).
        self._probe = MQClient(max_message_bytes, reply_timeout=reply_timeout, clock=clock)
        self._probe.connectionLost(Failure(ConnectionDone("not connected")))
        self._connection: Optional[MQClient] = None
        #: Requests' waits for a connection, each with its connect timeout's timer.
        self._waiting: dict[defer.Deferred[MQClient], Optional[IDelayedCall]] = {}
        self._last_failure: Optional[Failure] = None
        # As ClientService's own waiters: before the first start a request
        # waits for it (an application adds consumers before it starts its
        # services); once stopped, it is refused.
        self._stopped = False
        self._connector = ClientService(
            _Attempts(endpoint, self._attempt_failed),
            _ConnectionFactory(self),
            retryPolicy=DEFAULT_RETRY_POLICY if retry_policy is None else retry_policy,
            clock=clock,
        )

    # The service -------------------------------------------------------------

    def startService(self) -> None:
        """Connect, and connect again whenever the connection breaks."""
        if self.running:
            return
        super().startService()
        self._stopped = False
        self._connector.startService()

    def stopService(self) -> defer.Deferred[None]:
        """Stop connecting: requests waiting for a connection fail with
        :class:`~mqmq.errors.NotConnected`, those in flight get up to
        ``stop_grace`` seconds to be answered (then fail with
        :class:`~mqmq.errors.ConnectionClosed`), then the connection closes.
        Fires once it has."""
        super().stopService()
        self._stopped = True
        self._fail_waiting(errors.NotConnected("the client was stopped; the request was not sent"))
        connection = self._connection
        if connection is None:
            closing: defer.Deferred[None] = defer.succeed(None)
        else:
            closing = connection.disconnect()
            if not closing.called:
                # A Get waiting an hour, or a server gone silent, must not hold the stop up.
                abort = self.clock.callLater(self.stop_grace, connection.transport.abortConnection)

                def closed(result: object) -> object:
                    if abort.active():
                        abort.cancel()
                    return result

                closing.addBoth(closed)

        def stop_connecting(_: object) -> Optional[defer.Deferred[None]]:
            if not self._stopped:
                return None  # started again meanwhile: go on connecting
            return self._connector.stopService()

        return closing.addCallback(stop_connecting)

    def disconnect(self) -> defer.Deferred[None]:
        """:meth:`stopService`, under the name :class:`~mqmq.client.MQClient` gives it."""
        return self.stopService()

    @property
    def connected(self) -> bool:
        """Whether a connection is open now (a request would go out at once)."""
        return self._connection is not None and self._connection.is_open

    def when_connected(self, connect_timeout: Optional[float] = None) -> defer.Deferred[MQClient]:
        """The open connection (an :class:`~mqmq.client.MQClient`), at once if
        there is one, or the next to open.

        Fails with :class:`~mqmq.errors.NotConnected` after ``connect_timeout``
        seconds (the client's if ``None``; ``math.inf``: no limit), or when
        the client stops (at once if it has stopped; before its first start
        it waits for the start).  Cancelling it stops the wait.
        """
        connection = self._connection
        if connection is not None and connection.is_open:
            return defer.succeed(connection)
        if self._stopped:
            return defer.fail(errors.NotConnected("the client was stopped; the request was not sent"))
        if connect_timeout is None:
            connect_timeout = self.connect_timeout
        wait = math.inf if connect_timeout is None else _check_connect_timeout(connect_timeout)
        assert wait is not None
        if wait == 0:
            return defer.fail(self._not_connected(wait))
        waiting: defer.Deferred[MQClient] = defer.Deferred(self._stop_waiting)
        timer = None if wait == math.inf else self.clock.callLater(wait, self._waited_too_long, waiting, wait)
        self._waiting[waiting] = timer
        return waiting

    def _stop_waiting(self, waiting: defer.Deferred[MQClient]) -> None:
        timer = self._waiting.pop(waiting, None)
        if timer is not None:
            timer.cancel()

    def _waited_too_long(self, waiting: defer.Deferred[MQClient], wait: float) -> None:
        del self._waiting[waiting]
        waiting.errback(self._not_connected(wait))

    def _not_connected(self, wait: float) -> errors.NotConnected:
        why = "" if self._last_failure is None else f" (last attempt: {self._last_failure.getErrorMessage()})"
        return errors.NotConnected(f"no connection to the server within {wait:g} s{why}; the request was not sent")

    def _fail_waiting(self, error: errors.MQError) -> None:
        waiting, self._waiting = self._waiting, {}
        for deferred, timer in waiting.items():
            if timer is not None:
                timer.cancel()
            deferred.errback(error)

    def _attempt_failed(self, failure: Failure) -> None:
        self._last_failure = failure

    def _connection_made(self, connection: MQClient) -> None:
        self._connection = connection
        self._last_failure = None
        self.log.info("connected to {peer}", peer=describe(connection.transport.getPeer()))
        waiting, self._waiting = self._waiting, {}
        for deferred, timer in waiting.items():
            if self._stopped:
                # Stopped by an earlier waiter's callback: no next connection comes.
                if timer is not None:
                    timer.cancel()
                deferred.errback(errors.NotConnected("the client was stopped; the request was not sent"))
                continue
            if not connection.is_open:
                # Closed by an earlier request's callback: wait on for the next.
                self._waiting[deferred] = timer
                continue
            if timer is not None:
                timer.cancel()
            deferred.callback(connection)

    def _connection_lost(self, connection: MQClient, reason: Failure) -> None:
        if self._connection is connection:
            self._connection = None
        if self.running:
            self.log.info("connection to the server lost ({reason}); connecting again",
                          reason=reason.getErrorMessage())

    # Requests ----------------------------------------------------------------

    def _request(
        self, call: Callable[[MQClient], defer.Deferred[T]], connect_timeout: Optional[float]
    ) -> defer.Deferred[T]:
        connection = self._connection
        if connection is not None and connection.is_open:
            return call(connection)
        # A request the server would refuse fails now rather than after the wait.
        refused = _refusal(call(self._probe))
        if refused is not None:
            return defer.fail(refused)
        return self.when_connected(connect_timeout).addCallback(call)

    def _about_reserved(self, call: Callable[[MQClient], defer.Deferred[None]]) -> defer.Deferred[None]:
        # No waiting: with no connection open, every reservation this client
        # held is gone (the probe says so: ReservationLost).  On an open
        # connection, an id reserved on an earlier one is refused by the
        # server (REQUEST_UNKNOWN_ID).
        connection = self._connection
        return call(connection if connection is not None and connection.is_open else self._probe)

    def put(self, queue: QueueName, message: bytes, *, connect_timeout: Optional[float] = None) -> defer.Deferred[None]:
        """As :meth:`MQClient.put <mqmq.client.MQClient.put>`; ``connect_timeout``
        as :meth:`when_connected`'s."""
        return self._request(lambda client: client.put(queue, message), connect_timeout)

    def get(
        self, queue: QueueName, timeout: float = 0.0, *, connect_timeout: Optional[float] = None
    ) -> defer.Deferred[bytes]:
        """As :meth:`MQClient.get <mqmq.client.MQClient.get>`: ``timeout`` is the
        server's wait for a message, after up to ``connect_timeout`` for a connection."""
        return self._request(lambda client: client.get(queue, timeout), connect_timeout)

    def reserve(
        self, queue: QueueName, timeout: float = 0.0, lease: float = 30.0, *,
        connect_timeout: Optional[float] = None,
    ) -> defer.Deferred[Delivery]:
        """As :meth:`MQClient.reserve <mqmq.client.MQClient.reserve>`; the
        :class:`~mqmq.client.Delivery` belongs to the connection it came on."""
        return self._request(lambda client: client.reserve(queue, timeout, lease), connect_timeout)

    def ack(self, queue: QueueName, message_id: bytes) -> defer.Deferred[None]:
        """As :meth:`MQClient.ack <mqmq.client.MQClient.ack>`, on the open
        connection; :class:`~mqmq.errors.ReservationLost` at once if none is open."""
        return self._about_reserved(lambda client: client.ack(queue, message_id))

    def release(self, queue: QueueName, message_id: bytes, delay: float = 0.0) -> defer.Deferred[None]:
        """As :meth:`MQClient.release <mqmq.client.MQClient.release>`; see :meth:`ack`."""
        return self._about_reserved(lambda client: client.release(queue, message_id, delay))

    def touch(self, queue: QueueName, message_id: bytes, lease: float = 30.0) -> defer.Deferred[None]:
        """As :meth:`MQClient.touch <mqmq.client.MQClient.touch>`; see :meth:`ack`."""
        return self._about_reserved(lambda client: client.touch(queue, message_id, lease))

    def bury(self, queue: QueueName, message_id: bytes) -> defer.Deferred[None]:
        """As :meth:`MQClient.bury <mqmq.client.MQClient.bury>`; see :meth:`ack`."""
        return self._about_reserved(lambda client: client.bury(queue, message_id))

    def kick(self, queue: QueueName, count: int = 1, *, connect_timeout: Optional[float] = None) -> defer.Deferred[int]:
        """As :meth:`MQClient.kick <mqmq.client.MQClient.kick>`."""
        return self._request(lambda client: client.kick(queue, count), connect_timeout)

    def info(self, *, connect_timeout: Optional[float] = None) -> defer.Deferred[ServerInfo]:
        """As :meth:`MQClient.info <mqmq.client.MQClient.info>`."""
        return self._request(lambda client: client.info(), connect_timeout)


def reconnecting_client(
    reactor: Any,
    address: str = DEFAULT_ADDRESS,
    timeout: float = 30,
    *,
    retry_policy: Optional[Callable[[int], float]] = None,
    connect_timeout: Optional[float] = None,
    reply_timeout: Optional[float] = DEFAULT_REPLY_TIMEOUT,
    max_message_bytes: int = MAX_MESSAGE_LENGTH,
    tls: Optional[IOpenSSLClientConnectionCreator] = None,
) -> ReconnectingClient:
    """A :class:`ReconnectingClient` of the server at ``HOST:PORT``, not yet
    started; ``timeout`` bounds each attempt to connect.  With ``tls``
    (Twisted's ``optionsForClientTLS``, for one) each connection is TLS."""
    host, port = parse_address(address)
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, host or "127.0.0.1", port, timeout=timeout)
    if tls is not None:
        endpoint = wrapClientTLS(tls, endpoint)
    return ReconnectingClient(endpoint, retry_policy=retry_policy, connect_timeout=connect_timeout,
                              reply_timeout=reply_timeout, max_message_bytes=max_message_bytes, clock=reactor)
