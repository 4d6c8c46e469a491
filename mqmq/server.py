"""The server side of the wire: frames in, broker calls, replies out."""

from __future__ import annotations

from struct import Struct
from typing import Optional

from twisted.internet import defer
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mqmq import errors
from mqmq.broker import Broker
from mqmq.codec import decode_payload, encode_frame
from mqmq.framing import FrameReceiver
from mqmq.commands import ERROR, OK, TIMEOUT, Get, Info, Put, Quit, parse_request

_UINT32 = Struct(">I")
_OK_FRAME = encode_frame([OK])
_TIMEOUT_FRAME = encode_frame([TIMEOUT])


class MQServerProtocol(FrameReceiver):
    """One client connection.

    Requests are handled strictly in order: while a ``Get`` waits for a
    message, the frames behind it stay buffered, unparsed, until it is
    answered.
    """

    log = Logger()

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._waiting: Optional[defer.Deferred[bytes]] = None
        self._closing = False

    def connectionMade(self) -> None:
        self.broker.num_connections += 1
        self.factory.connections.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.broker.num_connections -= 1
        self.factory.connections.discard(self)
        self._closing = True
        if self._waiting is not None:
            # Withdraws the waiter: a departed consumer never takes a message.
            self._waiting.cancel()

    @property
    def holding(self) -> bool:
        return self._closing or self.paused or self._waiting is not None

    def dataReceived(self, data: bytes) -> None:
        if not self._closing:
            super().dataReceived(data)

    def lengthLimitExceeded(self, length: int) -> None:
        self.log.info(
            "closing {peer}: frame of {length} bytes exceeds the limit of {limit}",
            peer=self.transport.getPeer(), length=length, limit=self.MAX_LENGTH,
        )
        self._close()

    def stringReceived(self, payload: bytes) -> None:
        try:
            command = parse_request(decode_payload(payload))
        except errors.MalformedFrame as error:
            self.log.info("closing {peer}: malformed frame: {error}",
                          peer=self.transport.getPeer(), error=error)
            self._close()
            return
        except errors.RequestError as error:
            self._refuse(error)
            return
        if type(command) is Put:
            self.broker.put(command.queue, command.message)
            self.transport.write(_OK_FRAME)
        elif type(command) is Get:
            self._get(command)
        elif type(command) is Info:
            self.transport.write(encode_frame([OK, self.broker.info_json()]))
        elif type(command) is Quit:
            self._close()

    def _refuse(self, error: errors.RequestError) -> None:
        self.log.debug("refusing a request from {peer}: {error}",
                       peer=self.transport.getPeer(), error=error)
        self.transport.write(encode_frame([ERROR, error.error_type.encode("ascii")]))
        if error.error_type == errors.UNKNOWN_COMMAND:
            self._close()

    def _close(self) -> None:
        self._closing = True
        self.transport.loseConnection()

    def _get(self, command: Get) -> None:
        message = self.broker.take(command.queue)
        if message is not None:
            self._send_message(message)
            return
        waiting = self.broker.wait(command.queue, command.timeout_ms / 1000)
        self._waiting = waiting
        waiting.addCallbacks(self._delivered, self._wait_ended, (command.queue,))

    def _send_message(self, message: bytes) -> None:
        # Two writes, so a large message is not copied into a new frame.
        header = _UINT32.pack(4 + 2 + 4 + len(message)) + _UINT32.pack(2) + OK
        self.transport.writeSequence([header, _UINT32.pack(len(message)), message])

    def _delivered(self, message: bytes, queue: bytes) -> None:
        self._waiting = None
        if self._closing:
            # The connection broke before the message could go out.
            self.broker.put_back(queue, message)
            return
        self._send_message(message)
        self._resume()

    def _wait_ended(self, failure: Failure) -> None:
        self._waiting = None
        if failure.check(errors.GetTimeout):
            if not self._closing:
                self.transport.write(_TIMEOUT_FRAME)
                self._resume()
        elif failure.check(defer.CancelledError):
            # The broker is stopping; connectionLost cancels with _closing set.
            if not self._closing:
                self._close()
        else:
            self.log.failure("waiting Get failed", failure)
            self._close()

    def _resume(self) -> None:
        # The answer may come from inside another connection's Put: go on with
        # our buffered requests from the reactor, not from within its call.
        if self.buffered_bytes and not self.holding:
            self.broker.clock.callLater(0, self._parse_buffered)


class MQServerFactory(Factory):
    """Builds a :class:`MQServerProtocol` for each connection, sharing one broker."""

    protocol = MQServerProtocol

    noisy = False

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.connections: set[MQServerProtocol] = set()

    def buildProtocol(self, addr: object) -> MQServerProtocol:
        protocol = MQServerProtocol(self.broker)
        protocol.factory = self
        return protocol

    def close_connections(self) -> None:
        """Close every open connection, as a server shutting down does."""
        for protocol in list(self.connections):
            protocol.transport.loseConnection()
