"""Connections to one Redis node: the command and subscriber protocols, and the node keeping them open."""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Optional

from twisted.internet import error
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTCP, IReactorTime
from twisted.internet.protocol import Protocol, ReconnectingClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from mqmq.redis.resp import Parser, ProtocolError, RedisError, encode

log = Logger(namespace="mqmq.redis")


class RedisUnavailable(Exception):
    """Redis could not be reached, the connection was lost before the reply, or no reply within the timeout."""


def address_of(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Command:
    """One command in flight: the bytes written, and the Deferred its reply fires."""

    __slots__ = ("payload", "deferred", "deadline", "source", "rest", "count")

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.deferred: Deferred[Any] = Deferred()
        self.deadline = 0.0
        # For EVALSHA: the script's source, and the arguments after the SHA,
        # encoded, and how many there are: enough to send EVAL instead.
        self.source: Optional[bytes] = None
        self.rest = b""
        self.count = 0

    def refused(self, reply: RedisError, connection: RedisProtocol) -> None:
        """An error reply came: the Deferred fails, unless the script only needs loading."""
        if self.source is not None and str(reply).startswith("NOSCRIPT"):
            # The node lost its script cache (restart, failover, SCRIPT FLUSH).
            # EVAL runs the script and caches it; the command had not run, so
            # sending it again cannot apply it twice.
            self.payload = b"*%d\r\n$4\r\nEVAL\r\n$%d\r\n%b\r\n%b" % (
                self.count, len(self.source), self.source, self.rest)
            self.source = None
            connection.send(self)
            return
        self.deferred.errback(reply)

    def lost(self, reason: RedisUnavailable) -> None:
        """No reply will come: the Deferred fails with ``reason``."""
        self.deferred.errback(reason)


class RedisProtocol(Protocol):
    """A command connection: commands are written at once (pipelined) and
    matched to replies in order; a reply later than ``timeout`` drops the
    connection, since every reply after it would be out of step."""

    def __init__(self, clock: IReactorTime, timeout: float, address: str) -> None:
        self.clock = clock
        self.timeout = timeout
        self.address = address
        self.pending: deque[Command] = deque()
        self.parser = Parser()
        #: Why the connection cannot be used (we closed it, or it was lost); None while it can.
        self.why: Optional[str] = None
        self._timer: Optional[IDelayedCall] = None
        #: Called once connected (the node sends the connection's set-up).
        self.on_made: Optional[Callable[[RedisProtocol], object]] = None
        #: Called once the connection is unusable (we drop it, or it is
        #: lost), before its pending commands fail: their callbacks then see
        #: the node down.  (The factory hears of it a turn later.)
        self.on_closing: Optional[Callable[[RedisProtocol], object]] = None

    def connectionMade(self) -> None:
        # Commands are small and each waits for its reply: Nagle's algorithm
        # would hold one behind an unacknowledged other (40 ms, delayed ACK).
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        if self.on_made is not None:
            self.on_made(self)

    def send(self, command: Command) -> None:
        """Write ``command``; its Deferred fires with the reply."""
        if self.why is not None:
            command.lost(RedisUnavailable(self.why))
            return
        command.deadline = self.clock.seconds() + self.timeout
        self.pending.append(command)
        self._write(command.payload)
        if self._timer is None:
            self._timer = self.clock.callLater(self.timeout, self._check_deadline)

    def _write(self, payload: bytes) -> None:
        """Straight to the socket when Twisted holds nothing unsent: its own
        ``write`` waits a turn of the reactor for writability, a round trip
        through epoll before each command (``mqmq.server.writer`` does the
        same for replies).  Any remainder, and every other case, go through
        Twisted, which reports errors and closes as usual."""
        transport: Any = self.transport
        sock = getattr(transport, "socket", None)
        if (
            sock is None
            or transport.dataBuffer
            or transport._tempDataBuffer
            or not transport.connected
            or transport.disconnecting
        ):
            transport.write(payload)
            return
        try:
            sent = sock.send(payload)
        except OSError:
            sent = 0  # full (EAGAIN) or broken: Twisted sends it, or reports the error
        if sent < len(payload):
            transport.write(payload[sent:])

    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self.parser.feed(data)
        except ProtocolError as problem:
            self.close(f"Redis at {self.address} sent what is not RESP2: {problem}")
            return
        pending = self.pending
        for reply in replies:
            if self.why is not None:
                return  # closed by the reply before: its replies no longer count
            if not pending:
                self.close(f"Redis at {self.address} sent a reply to no command")
                return
            command = pending.popleft()
            if type(reply) is RedisError:
                command.refused(reply, self)
            else:
                command.deferred.callback(reply)

    def _check_deadline(self) -> None:
        # One timer for the oldest command, not one per command: replies come
        # in order, so only the oldest can be late first.
        self._timer = None
        if not self.pending or self.why is not None:
            return
        late = self.pending[0].deadline - self.clock.seconds()
        if late > 0:
            self._timer = self.clock.callLater(late, self._check_deadline)
            return
        self.close(f"no reply from Redis at {self.address} within {self.timeout:g} s")

    def close(self, why: str) -> None:
        """Fail every pending command with ``why`` and drop the connection."""
        if self.why is None:
            self.why = why
            if self.on_closing is not None:
                self.on_closing(self)
        self._fail_all(self.why)
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:  # type: ignore[assignment]
        if self.why is None:
            self.why = f"lost the connection to Redis at {self.address}: {reason.getErrorMessage()}"
            if self.on_closing is not None:
                self.on_closing(self)
        self._fail_all(self.why)

    def _fail_all(self, why: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self.pending = self.pending, deque()
        for command in pending:
            command.lost(RedisUnavailable(why))


class SubscriberProtocol(RedisProtocol):
    """A connection used for SSUBSCRIBE and SUNSUBSCRIBE only: ``smessage``
    pushes go to :attr:`on_message`, and a ``sunsubscribe`` we did not ask
    for (Redis sends one when the channel's slot moves away) to
    :attr:`on_dropped`; every other reply answers the oldest command."""

    on_message: Callable[[bytes, bytes], object] = staticmethod(lambda channel, payload: None)  # type: ignore[assignment]
    on_dropped: Callable[[bytes], object] = staticmethod(lambda channel: None)  # type: ignore[assignment]

    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self.parser.feed(data)
        except ProtocolError as problem:
            self.close(f"Redis at {self.address} sent what is not RESP2: {problem}")
            return
        for reply in replies:
            if self.why is not None:
                return
            if type(reply) is list and len(reply) == 3:
                kind = reply[0]
                if kind == b"smessage":
                    self.on_message(reply[1], reply[2])
                    continue
                if kind == b"sunsubscribe" and not self._asked_to_leave(reply[1]):
                    self.on_dropped(reply[1])
                    continue
            if not self.pending:
                self.close(f"Redis at {self.address} sent a reply to no command")
                return
            command = self.pending.popleft()
            if type(reply) is RedisError:
                command.refused(reply, self)
            else:
                command.deferred.callback(reply)

    def _asked_to_leave(self, channel: bytes) -> bool:
        return bool(self.pending) and self.pending[0].payload == encode((b"SUNSUBSCRIBE", channel))


class Subscription:
    """A channel's callbacks, and the node it is subscribed on."""

    __slots__ = ("channel", "on_message", "on_subscribed", "node")

    def __init__(self, channel: bytes, on_message: Callable[[bytes, bytes], object],
                 on_subscribed: Callable[[bytes], object]) -> None:
        self.channel = channel
        self.on_message = on_message
        self.on_subscribed = on_subscribed
        self.node: Optional[Node] = None


class _Keeper(ReconnectingClientFactory):
    """Keeps one connection to a node open, set up, reconnecting with backoff."""

    noisy = False
    initialDelay = 0.1
    factor = 2.0
    maxDelay = 2  # seconds: a restarted Redis is found within about that
    jitter = 0.1

    def __init__(self, node: Node, subscriber: bool) -> None:
        self.node = node
        self.subscriber = subscriber
        self.clock = node.reactor
        self.resetDelay()  # the class's delay is the base class's initialDelay
        #: The connection's protocol, once connected (set up or not).
        self.current: Optional[RedisProtocol] = None
        self.stopped: Optional[Deferred[None]] = None

    def buildProtocol(self, addr: Optional[IAddress]) -> RedisProtocol:
        kind = SubscriberProtocol if self.subscriber else RedisProtocol
        protocol = kind(self.node.reactor, self.node.timeout, self.node.address)
        protocol.factory = self
        protocol.on_made = self.set_up
        protocol.on_closing = self._closing
        self.current = protocol
        return protocol

    def connect(self) -> None:
        reactor: IReactorTCP = self.node.reactor
        connector = reactor.connectTCP(self.node.host, self.node.port, self, timeout=self.node.timeout)
        self.connector = connector  # type: ignore[assignment]

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if self.continueTrying:
            self.node.failed(self, connect_failure(self.node.address, reason, self.node.timeout))
        super().clientConnectionFailed(connector, reason)
        self._maybe_stopped()

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        protocol, self.current = self.current, None
        if self.continueTrying:
            why = protocol.why if protocol is not None and protocol.why else (
                f"lost the connection to Redis at {self.node.address}: {reason.getErrorMessage()}")
            self.node.failed(self, why)
        super().clientConnectionLost(connector, reason)
        self._maybe_stopped()

    def _closing(self, protocol: RedisProtocol) -> None:
        if protocol is self.current and self.continueTrying and protocol.why is not None:
            self.node.failed(self, protocol.why)

    def set_up(self, protocol: RedisProtocol) -> None:
        """Send the connection's set-up; it is usable once all of it is answered."""
        commands = [Command(payload) for payload in self.node.setup(self.subscriber)]
        for command in commands:
            protocol.send(command)
        results = DeferredList([c.deferred for c in commands], fireOnOneErrback=True, consumeErrors=True)
        results.addCallbacks(lambda _: self._ready(protocol), lambda f: self._refused(protocol, f))

    def _ready(self, protocol: RedisProtocol) -> None:
        if protocol.why is not None or protocol is not self.current or not self.continueTrying:
            return
        self.resetDelay()
        self.node.ready(self, protocol)

    def _refused(self, protocol: RedisProtocol, reason: Failure) -> None:
        problem = reason.value.subFailure.value  # type: ignore[union-attr]
        if isinstance(problem, RedisError):
            protocol.close(f"Redis at {self.node.address} refused the connection's set-up: {problem}")
        # A RedisUnavailable: the connection is already closing.

    def stop(self) -> Deferred[None]:
        """Stop reconnecting and close the connection; fires once it is closed."""
        self.stopTrying()
        self.stopped = Deferred()
        stopped = self.stopped
        connector: Any = self.connector
        if getattr(connector, "state", None) == "connected":
            connector.disconnect()
        else:
            self._maybe_stopped()
        return stopped

    def _maybe_stopped(self) -> None:
        if self.stopped is not None and getattr(self.connector, "state", "disconnected") == "disconnected":
            stopped, self.stopped = self.stopped, None
            stopped.callback(None)


def connect_failure(address: str, reason: Failure, timeout: float) -> str:
    """Why a connection to ``address`` could not be made, in a few words."""
    if reason.check(error.ConnectionRefusedError):
        return f"connection refused to Redis at {address}"
    if reason.check(error.TimeoutError):
        return f"no answer from Redis at {address} within {timeout:g} s"
    return f"cannot connect to Redis at {address}: {reason.getErrorMessage()}"


class Node:
    """One Redis server: a command connection kept open and set up, and a
    subscriber connection while channels are subscribed on it."""

    def __init__(
        self, reactor: Any, host: str, port: int, timeout: float, db: int, name: bytes,
        scripts: dict[bytes, bytes], on_change: Callable[[Node], object],
        on_refused: Callable[[Node, Subscription, RedisError], object],
        on_dropped: Callable[[Node, Subscription], object],
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.address = address_of(host, port)
        self.timeout = timeout
        self.db = db
        self.name = name
        self.scripts = scripts
        self.on_change = on_change
        self.on_refused = on_refused
        self.on_dropped = on_dropped
        #: The command connection, once set up; None while there is none.
        self.protocol: Optional[RedisProtocol] = None
        #: Why commands cannot be sent now; None while they can.
        self.failure: Optional[str] = f"not connected to Redis at {address_of(host, port)} yet"
        #: The channels subscribed (or being subscribed) on this node.
        self.channels: dict[bytes, Subscription] = {}
        self._commands = _Keeper(self, subscriber=False)
        self._subscriber: Optional[_Keeper] = None
        self._subscribed: Optional[SubscriberProtocol] = None
        self._logged_down = False
        self._running = False

    def start(self) -> None:
        """Connect, and keep reconnecting until :meth:`stop`."""
        self._running = True
        self._commands.connect()
        if self.channels and self._subscriber is None:
            self._start_subscriber()

    def stop(self) -> Deferred[None]:
        """Close the connections; pending commands fail with :class:`RedisUnavailable`."""
        self._running = False
        self.failure = f"the client of Redis at {self.address} is stopped"
        closing = []
        for keeper, protocol in ((self._commands, self.protocol), (self._subscriber, self._subscribed)):
            if protocol is not None:
                protocol.close(self.failure)
            if keeper is not None:
                closing.append(keeper.stop())
        self.protocol = None
        self._subscribed = None
        self._subscriber = None
        return DeferredList(closing).addCallback(lambda _: None)

    def send(self, command: Command) -> None:
        """Write ``command`` on the command connection, or fail it at once if there is none."""
        protocol = self.protocol
        if protocol is None:
            command.lost(RedisUnavailable(self.failure))
        else:
            protocol.send(command)

    def setup(self, subscriber: bool) -> list[bytes]:
        """The commands that set up a new connection: its name, its database,
        the scripts used so far (so that EVALSHA finds them), and a PING."""
        commands = []
        if self.name:
            commands.append(encode((b"CLIENT", b"SETNAME", self.name)))
        if self.db and not subscriber:
            commands.append(encode((b"SELECT", self.db)))
        commands.append(encode((b"PING",)))
        return commands

    def ready(self, keeper: _Keeper, protocol: RedisProtocol) -> None:
        if keeper is self._commands:
            for source in list(self.scripts.values()):
                # Errors are left to EVALSHA's NOSCRIPT path, which reports them.
                loading = Command(encode((b"SCRIPT", b"LOAD", source)))
                loading.deferred.addErrback(lambda _: None)
                protocol.send(loading)
            self.protocol = protocol
            self._changed(None)
        elif keeper is self._subscriber:
            assert isinstance(protocol, SubscriberProtocol)
            protocol.on_message = self._message
            protocol.on_dropped = self._dropped
            self._subscribed = protocol
            for subscription in list(self.channels.values()):
                self._send_subscribe(subscription)

    def failed(self, keeper: _Keeper, why: str) -> None:
        if keeper is self._commands:
            self.protocol = None
            if self._subscribed is not None:
                # An idle subscriber connection would not notice a node gone
                # without a word (a network cut): make it anew with the other.
                self._subscribed.close(why)
            self._changed(why)
        elif keeper is self._subscriber:
            self._subscribed = None

    def _changed(self, failure: Optional[str]) -> None:
        if failure == self.failure:
            return
        self.failure = failure
        if failure is None:
            log.info("connected to Redis at {address}", address=self.address)
            self._logged_down = False
        elif not self._logged_down:
            self._logged_down = True
            log.warn("{failure}", failure=failure, address=self.address)
        self.on_change(self)

    def subscribe(self, subscription: Subscription) -> None:
        """Subscribe ``subscription.channel`` on this node (replacing any earlier callbacks)."""
        known = self.channels.get(subscription.channel)
        self.channels[subscription.channel] = subscription
        subscription.node = self
        if known is not None:
            return
        if self._subscriber is None:
            if self._running:
                self._start_subscriber()
        elif self._subscribed is not None:
            self._send_subscribe(subscription)

    def unsubscribe(self, channel: bytes) -> None:
        """Stop delivering ``channel``; the subscriber connection closes with its last channel."""
        subscription = self.channels.pop(channel, None)
        if subscription is None:
            return
        subscription.node = None
        if not self.channels and self._subscriber is not None:
            subscriber, self._subscriber, self._subscribed = self._subscriber, None, None
            subscriber.stop()
        elif self._subscribed is not None:
            leaving = Command(encode((b"SUNSUBSCRIBE", channel)))
            leaving.deferred.addErrback(lambda _: None)
            self._subscribed.send(leaving)

    def _start_subscriber(self) -> None:
        self._subscriber = _Keeper(self, subscriber=True)
        self._subscriber.connect()

    def _send_subscribe(self, subscription: Subscription) -> None:
        assert self._subscribed is not None
        joining = Command(encode((b"SSUBSCRIBE", subscription.channel)))
        joining.deferred.addCallbacks(self._confirmed, self._refused,
                                      callbackArgs=(subscription,), errbackArgs=(subscription,))
        self._subscribed.send(joining)

    def _confirmed(self, reply: Any, subscription: Subscription) -> None:
        if self.channels.get(subscription.channel) is subscription:
            try:
                subscription.on_subscribed(subscription.channel)
            except Exception:
                log.failure("on_subscribed({channel!r}) failed", channel=subscription.channel)

    def _refused(self, reason: Failure, subscription: Subscription) -> None:
        if not reason.check(RedisError) or self.channels.get(subscription.channel) is not subscription:
            return  # the connection is lost: subscribed again on the next
        del self.channels[subscription.channel]
        subscription.node = None
        self.on_refused(self, subscription, reason.value)  # type: ignore[arg-type]

    def _message(self, channel: bytes, payload: bytes) -> None:
        subscription = self.channels.get(channel)
        if subscription is not None:
            try:
                subscription.on_message(channel, payload)
            except Exception:
                log.failure("on_message({channel!r}) failed", channel=channel)

    def _dropped(self, channel: bytes) -> None:
        subscription = self.channels.pop(channel, None)
        if subscription is not None:
            subscription.node = None
            self.on_dropped(self, subscription)

