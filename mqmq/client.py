"""A Deferred-based mqmq client, in the manner of ``twisted.protocols.memcache``.

Every request returns a Deferred.  Requests may be pipelined: each one in
flight waits in a queue, and replies, which the server sends in request
order, are matched to them in that order.

A server that stops answering does not leave requests pending forever: as
memcache's ``persistentTimeOut``, a reply timeout fails every request in
flight and closes the connection when, with requests in flight, no reply
arrives in time.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Callable, Optional, Union, cast

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import connectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.python.failure import Failure

from mqmq import errors
from mqmq.address import DEFAULT_ADDRESS, parse_address
from mqmq.wire.codec import (
    MAX_MESSAGE_LENGTH,
    MAX_QUEUE_NAME_LENGTH,
    decode_payload,
    encode_frame,
    max_frame_length,
)
from mqmq.wire.commands import (
    ACK,
    BURY,
    ERROR,
    GET,
    INFO,
    KICK,
    MAX_LEASE_MS,
    MAX_TIMEOUT_MS,
    OK,
    PUT,
    QUIT,
    RELEASE,
    RESERVE,
    TIMEOUT,
    TOUCH,
)
from mqmq.wire.framing import FrameReceiver
from mqmq.wire.info import ServerInfo

QueueName = Union[str, bytes]

#: Seconds a client waits for a reply, beyond what a waiting ``Get`` may
#: take, before it gives up on the server (as memcache's 60).
DEFAULT_REPLY_TIMEOUT = 60.0


def _reply_ok(values: list[bytes]) -> None:
    if values[0] != OK:
        raise errors.BadResponse(f"unexpected reply {values!r}")


def _reply_message(values: list[bytes]) -> bytes:
    # Only a Get may time out; ``Timeout`` to anything else is a bad reply, as in Go.
    if values[0] == TIMEOUT:
        raise errors.GetTimeout("no message arrived before the timeout")
    if values[0] != OK or len(values) < 2:
        raise errors.BadResponse(f"unexpected reply to Get: {values[:2]!r}")
    return values[1]


def _reply_info(values: list[bytes]) -> ServerInfo:
    if values[0] != OK or len(values) < 2:
        raise errors.BadResponse(f"unexpected reply to Info: {values[:2]!r}")
    return ServerInfo.from_json(values[1])


def _unsupported(failure: Failure) -> Failure:
    # The original server (or one whose store keeps no reservations) does not
    # know the command: it says so, and closes the connection.
    if failure.check(errors.ServerError) and failure.value.error_type == errors.UNKNOWN_COMMAND:
        raise errors.AcknowledgedDeliveryUnsupported(
            "the server does not support acknowledged delivery (Reserve, Ack, ...): "
            "it is the original mqmq, or its store does not keep reservations"
        )
    return failure


def _timeout_ms(timeout: float) -> int:
    """A ``Get``'s (or ``Reserve``'s) timeout in seconds as the milliseconds
    it goes out in; a negative one is sent as 0, above one hour refused."""
    # Written so that NaN is refused too.
    if not timeout <= MAX_TIMEOUT_MS / 1000:
        raise errors.InvalidArgument(f"timeout of {timeout} s is above one hour")
    # Truncate whole nanoseconds, as Go's Duration does, so that float
    # error cannot drop a millisecond (1.005 s is 1005 ms, not 1004).
    return round(max(timeout, 0) * 1_000_000_000) // 1_000_000


def _server_wait(milliseconds: int) -> float:
    """Seconds the server may rightly wait for a message: it waits 1 ms for a timeout of 0."""
    return max(milliseconds, 1) / 1000


def _milliseconds(seconds: float, what: str, least: int, most: int) -> int:
    """Seconds as the whole milliseconds a request carries, checked against
    what the server takes."""
    # Written so that NaN is refused too.
    if not least / 1000 <= seconds <= most / 1000:
        raise errors.InvalidArgument(f"{what} of {seconds} s: want {least / 1000:g} to {most / 1000:g} s")
    return max(round(seconds * 1_000_000_000) // 1_000_000, least)


class _Request:
    """A request in flight: its Deferred, how to read its reply, and how long
    the server may rightly hold it (a ``Get``'s wait) before answering."""

    __slots__ = ("deferred", "read_reply", "wait")

    def __init__(self, read_reply: Callable[[list[bytes]], Any], wait: float) -> None:
        self.deferred: defer.Deferred[Any] = defer.Deferred()
        self.read_reply = read_reply
        self.wait = wait


def _queue_name(queue: QueueName) -> bytes:
    name = queue.encode("utf-8") if isinstance(queue, str) else bytes(queue)
    if len(name) > MAX_QUEUE_NAME_LENGTH:
        raise errors.InvalidArgument(
            f"queue name of {len(name)} bytes, longest is {MAX_QUEUE_NAME_LENGTH}"
        )
    return name


class MQClient(FrameReceiver):
    """A connection to an mqmq server.

    Get one from :func:`connect`, or connect it yourself to any endpoint.
    """

    _reply_timer: Optional[IDelayedCall] = None

    def __init__(
        self,
        max_message_bytes: int = MAX_MESSAGE_LENGTH,
        *,
        reply_timeout: Optional[float] = DEFAULT_REPLY_TIMEOUT,
        clock: Optional[IReactorTime] = None,
    ) -> None:
        """:param max_message_bytes: the largest message a reply may carry; a
            longer reply fails the connection.  Raise it for a server started
            with a larger ``--max-message-bytes``.
        :param reply_timeout: seconds to wait, while requests are in flight,
            for the next reply (or the next bytes of it) beyond what a waiting
            ``get``'s own timeout allows; then every request in flight fails
            with :class:`~mqmq.errors.ReplyTimeout` and the connection is
            closed.  ``None``: wait forever.
        :param clock: the time source for the reply timeout; the global
            reactor if not given.
        """
        if reply_timeout is not None and not 0 < reply_timeout < math.inf:
            raise ValueError(f"reply_timeout must be a positive number of seconds or None, "
                             f"not {reply_timeout!r}")
        self.MAX_LENGTH = max_frame_length(max_message_bytes)
        self._reply_timeout = reply_timeout
        #: Times the reply timeout; the global reactor once needed, if not given.
        self.clock = clock
        self._pending: deque[_Request] = deque()
        self._disconnecting = False

    @property
    def reply_timeout(self) -> Optional[float]:
        """Seconds allowed for a reply beyond a ``get``'s own wait; ``None``: no limit."""
        return self._reply_timeout

    @property
    def is_open(self) -> bool:
        """Whether requests may be sent: until the connection closes or :meth:`disconnect` is called."""
        return not (self._closed or self._disconnecting)

    def _send(
        self, values: list[bytes], read_reply: Callable[[list[bytes]], Any], wait: float = 0.0
    ) -> defer.Deferred[Any]:
        if self._closed or self._disconnecting:
            return defer.fail(errors.ConnectionClosed("the connection is closed"))
        request = _Request(read_reply, wait)
        idle = not self._pending
        self._pending.append(request)
        self.transport.write(encode_frame(values))
        if idle:
            self._restart_reply_timer()
        return request.deferred

    def _restart_reply_timer(self) -> None:
        """Give the request at the head of the line its time to be answered,
        or stop the timer when none is in flight."""
        if not self._pending or self._reply_timeout is None:
            if self._reply_timer is not None:
                self._reply_timer.cancel()
                self._reply_timer = None
            return
        allowed = self._reply_timeout
        if not self.buffered_bytes:
            # Its reply has not begun: a Get at the head may still be
            # waiting, rightly, for a message.  Those behind it wait their
            # turn, and get their own time when they reach the head.
            allowed += self._pending[0].wait
        if self._reply_timer is None:
            if self.clock is None:
                from twisted.internet import reactor

                self.clock = cast(IReactorTime, reactor)
            self._reply_timer = self.clock.callLater(allowed, self._reply_timed_out)
        else:
            self._reply_timer.reset(allowed)

    def _reply_timed_out(self) -> None:
        self._reply_timer = None
        # Closing from here on, so that a request made from the errbacks
        # fails at once.
        self._disconnecting = True
        pending, self._pending = self._pending, deque()
        error = errors.ReplyTimeout(
            f"no reply from the server within {self._reply_timeout:g} s "
            f"(beyond any Get's own wait); the connection is closed"
        )
        for request in pending:
            request.deferred.errback(error)
        # Abort: a server that does not answer may not read either, and a
        # graceful close would wait for our unsent bytes forever.
        self.transport.abortConnection()

    def put(self, queue: QueueName, message: bytes) -> defer.Deferred[None]:
        """Add a message to the back of a queue."""
        try:
            name = _queue_name(queue)
        except errors.InvalidArgument:
            return defer.fail()
        return self._send([PUT, name, bytes(message)], _reply_ok)

    def get(self, queue: QueueName, timeout: float = 0.0) -> defer.Deferred[bytes]:
        """Take the oldest message of a queue, waiting up to ``timeout`` seconds.

        Fails with :class:`~mqmq.errors.GetTimeout` if none arrived in time.
        The timeout goes out in whole milliseconds; below 1 ms the server
        waits 1 ms; above one hour is refused here.
        """
        try:
            name = _queue_name(queue)
            milliseconds = _timeout_ms(timeout)
        except errors.InvalidArgument:
            return defer.fail()
        return self._send([GET, name, b"%d" % milliseconds], _reply_message, _server_wait(milliseconds))

    # Acknowledged delivery (our extension; the original server refuses it,
    # and these fail with AcknowledgedDeliveryUnsupported) --------------------

    def reserve(self, queue: QueueName, timeout: float = 0.0, lease: float = 30.0) -> defer.Deferred[Delivery]:
        """Take the oldest message of a queue as :meth:`get` does, but keep it
        reserved for ``lease`` seconds until acked (see :class:`Delivery`):
        if this connection closes or the lease runs out first, the server
        hands it out again.

        Fails with :class:`~mqmq.errors.GetTimeout` if none arrived in time.
        """
        try:
            name = _queue_name(queue)
            milliseconds = _timeout_ms(timeout)
            lease_ms = _milliseconds(lease, "lease", 1, MAX_LEASE_MS)
        except errors.InvalidArgument:
            return defer.fail()

        def read(values: list[bytes]) -> Delivery:
            if values[0] == TIMEOUT:
                raise errors.GetTimeout("no message arrived before the timeout")
            if values[0] != OK or len(values) < 4 or not values[3].isdigit():
                raise errors.BadResponse(f"unexpected reply to Reserve: {values[:1]!r}")
            return Delivery(self, name, values[1], values[2], int(values[3]))

        sent = self._send([RESERVE, name, b"%d" % milliseconds, b"%d" % lease_ms], read,
                          _server_wait(milliseconds))
        return sent.addErrback(_unsupported)

    def _about(self, command: bytes, queue: QueueName, message_id: bytes, *more: bytes) -> defer.Deferred[None]:
        try:
            name = _queue_name(queue)
            if not isinstance(message_id, (bytes, bytearray)):
                raise errors.InvalidArgument(f"message ids are bytes (Delivery.message_id), not {message_id!r}")
        except errors.InvalidArgument:
            return defer.fail()
        if not self.is_open:
            return defer.fail(errors.ReservationLost(
                "the connection that reserved the message is closed or closing: the server hands it out again"))
        return self._send([command, name, bytes(message_id), *more], _reply_ok).addErrback(_unsupported)

    def ack(self, queue: QueueName, message_id: bytes) -> defer.Deferred[None]:
        """Done with a reserved message: the server deletes it for good."""
        return self._about(ACK, queue, message_id)

    def release(self, queue: QueueName, message_id: bytes, delay: float = 0.0) -> defer.Deferred[None]:
        """Give a reserved message back, to the front of its queue, at once or after ``delay`` seconds."""
        try:
            delay_ms = _milliseconds(delay, "delay", 0, MAX_LEASE_MS)
        except errors.InvalidArgument:
            return defer.fail()
        return self._about(RELEASE, queue, message_id, b"%d" % delay_ms)

    def touch(self, queue: QueueName, message_id: bytes, lease: float = 30.0) -> defer.Deferred[None]:
        """Restart a reservation's lease: ``lease`` seconds from now."""
        try:
            lease_ms = _milliseconds(lease, "lease", 1, MAX_LEASE_MS)
        except errors.InvalidArgument:
            return defer.fail()
        return self._about(TOUCH, queue, message_id, b"%d" % lease_ms)

    def bury(self, queue: QueueName, message_id: bytes) -> defer.Deferred[None]:
        """Set a reserved message aside, never handed out until kicked."""
        return self._about(BURY, queue, message_id)

    def kick(self, queue: QueueName, count: int = 1) -> defer.Deferred[int]:
        """Bring back up to ``count`` buried messages to the back of the queue; fires with how many came back."""
        try:
            name = _queue_name(queue)
            if not isinstance(count, int) or isinstance(count, bool):
                raise errors.InvalidArgument(f"count is a whole number of messages, not {count!r}")
        except errors.InvalidArgument:
            return defer.fail()

        def read(values: list[bytes]) -> int:
            if values[0] != OK or len(values) < 2 or not values[1].isdigit():
                raise errors.BadResponse(f"unexpected reply to Kick: {values[:2]!r}")
            return int(values[1])

        return self._send([KICK, name, b"%d" % max(count, 1)], read).addErrback(_unsupported)

    def info(self) -> defer.Deferred[ServerInfo]:
        """Connections, queues and messages on the server."""
        return self._send([INFO], _reply_info)

    def disconnect(self) -> defer.Deferred[None]:
        """Send ``Quit`` and close once every request in flight is answered.

        Fires when the connection has closed.
        """
        if not (self._closed or self._disconnecting):
            self._disconnecting = True
            self.transport.write(encode_frame([QUIT]))
            if not self._pending:
                self.transport.loseConnection()
        return self.when_closed()

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        # Any bytes from the server show it is alive: the head of the line
        # (a new one, or one whose long reply is arriving) gets its full time.
        self._restart_reply_timer()

    def stringReceived(self, payload: bytes) -> None:
        if not self._pending:
            self._fail_connection(errors.BadResponse("reply with no request in flight"))
            return
        request = self._pending.popleft()
        try:
            values = decode_payload(payload)
            if not values:
                raise errors.BadResponse("empty reply")
            status = values[0]
            if status == ERROR and len(values) >= 2:
                raise errors.ServerError(values[1].decode("utf-8", "replace"))
            result = request.read_reply(values)
        except (errors.MQError, ValueError):
            request.deferred.errback(Failure())
        else:
            request.deferred.callback(result)
        if self._disconnecting and not self._pending:
            self.transport.loseConnection()

    def lengthLimitExceeded(self, length: int) -> None:
        self._fail_connection(
            errors.BadResponse(f"reply of {length} bytes exceeds the limit of {self.MAX_LENGTH}")
        )

    def _fail_connection(self, error: errors.MQError) -> None:
        # The reply stream can no longer be matched to requests: nothing more
        # goes out on it (a request made from a failed one's errback included).
        self._disconnecting = True
        pending, self._pending = self._pending, deque()
        for request in pending:
            request.deferred.errback(error)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Closed before the failures go out, so that a request made from
        # their errbacks fails at once instead of waiting forever.
        self._closed = True
        pending, self._pending = self._pending, deque()
        self._restart_reply_timer()
        for request in pending:
            request.deferred.errback(
                errors.ConnectionClosed(f"connection closed before the reply: {reason.getErrorMessage()}")
            )
        super().connectionLost(reason)


class Delivery:
    """A message handed out by :meth:`MQClient.reserve`: the server keeps it
    until one of :meth:`ack`, :meth:`release` or :meth:`bury` (each returns
    a Deferred that fires once the server answered)."""

    __slots__ = ("client", "queue", "message", "message_id", "deliveries")

    def __init__(self, client: MQClient, queue: bytes, message: bytes, message_id: bytes, deliveries: int) -> None:
        self.client = client
        #: The queue it came from, as bytes.
        self.queue = queue
        self.message = message
        #: The server's id for it (ASCII, at most 64 bytes).
        self.message_id = message_id
        #: How many times it has been handed out, this time included.
        self.deliveries = deliveries

    def ack(self) -> defer.Deferred[None]:
        """Done with: the server deletes it."""
        return self.client.ack(self.queue, self.message_id)

    def release(self, delay: float = 0.0) -> defer.Deferred[None]:
        """Not done: back to the front of its queue, at once or after ``delay`` seconds."""
        return self.client.release(self.queue, self.message_id, delay)

    def touch(self, lease: float = 30.0) -> defer.Deferred[None]:
        """Still working on it: its lease starts again, ``lease`` seconds from now."""
        return self.client.touch(self.queue, self.message_id, lease)

    def bury(self) -> defer.Deferred[None]:
        """Set aside until kicked (a message that cannot be handled)."""
        return self.client.bury(self.queue, self.message_id)

    def __repr__(self) -> str:
        return (f"<Delivery {self.message_id.decode('ascii', 'replace')} of {self.queue!r}, "
                f"{len(self.message)} bytes, delivery {self.deliveries}>")


def connect(
    reactor: Any,
    address: str = DEFAULT_ADDRESS,
    timeout: float = 30,
    max_message_bytes: int = MAX_MESSAGE_LENGTH,
    *,
    reply_timeout: Optional[float] = DEFAULT_REPLY_TIMEOUT,
    tls: Optional[IOpenSSLClientConnectionCreator] = None,
) -> defer.Deferred[MQClient]:
    """Connect to the server at ``HOST:PORT``; fires with a connected client.

    ``timeout`` bounds the connection attempt; ``reply_timeout`` (see
    :class:`MQClient`) each wait for a reply, timed by ``reactor``.  With
    ``tls`` (:func:`mqmq.tls.client_tls`, or Twisted's ``optionsForClientTLS``)
    the connection is TLS.
    """
    host, port = parse_address(address)
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, host or "127.0.0.1", port, timeout=timeout)
    if tls is not None:
        endpoint = wrapClientTLS(tls, endpoint)
    return connect_endpoint(endpoint, max_message_bytes, reply_timeout=reply_timeout, clock=reactor)


def connect_endpoint(
    endpoint: IStreamClientEndpoint,
    max_message_bytes: int = MAX_MESSAGE_LENGTH,
    *,
    reply_timeout: Optional[float] = DEFAULT_REPLY_TIMEOUT,
    clock: Optional[IReactorTime] = None,
) -> defer.Deferred[MQClient]:
    """Connect over any Twisted client endpoint (TCP, TLS, UNIX socket …).

    ``clock`` times the reply timeout (see :class:`MQClient`): pass your
    reactor, or a ``task.Clock`` in tests; the global reactor if not given.
    """
    client = MQClient(max_message_bytes, reply_timeout=reply_timeout, clock=clock)
    return connectProtocol(endpoint, client)
