"""The server side of the wire: frames in, broker calls, replies out."""

from __future__ import annotations

from collections import deque
from struct import Struct
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from mqmq import errors
from mqmq.address import describe
from mqmq.broker.broker import Broker
from mqmq.wire.codec import MAX_FRAME_LENGTH, decode_payload, encode_frame
from mqmq.wire.commands import (
    ERROR,
    OK,
    TIMEOUT,
    Ack,
    Bury,
    Get,
    Info,
    Kick,
    Put,
    Quit,
    Release,
    Reserve,
    Touch,
    parse_request,
    parse_usual_ack,
    parse_usual_reserve,
)
from mqmq.wire.framing import FrameReceiver
from mqmq.server.liveness import peer_has_gone
from mqmq.stores.base import Batch, Entry
from mqmq.server.writer import ReplyWriter, Settlement

_UINT32 = Struct(">I")
#: A Reserve's reply up to its message: the frame's length, OK, the message's length.
_RESERVED_HEAD = Struct(">II2sI")
_OK_FRAME = encode_frame([OK])
_TIMEOUT_FRAME = encode_frame([TIMEOUT])
_STORAGE_ERROR_FRAME = encode_frame([ERROR, errors.STORAGE_ERROR.encode("ascii")])

# What a held reply is (see MQServerProtocol._hold).
_HELD_FRAME = 0
_HELD_PUT = 1
_HELD_MESSAGE = 2
#: An OK that promises a change the batch writes (Ack, Release, Bury, Kick):
#: as a Put's, it waits for the retry of a batch whose write failed.
_HELD_PROMISE = 3
_INFO_REPLY_PREFIX = _UINT32.pack(2) + OK

#: Info replies up to this size are written at once; larger ones a piece at
#: a time, as the transport takes them.
INFO_WHOLE_BYTES = 64 * 1024

#: Seconds a client may go without reading any of an unsent Info reply
#: before it is dropped, releasing what it holds of the Info budget.
INFO_STALL_SECONDS = 60.0

#: Seconds between checks that a peer we have stopped reading from is still there.
LIVENESS_INTERVAL = 1.0

#: Bytes of messages a connection may have taken while their replies wait
#: for the store; past it, its requests wait too (as they do while its
#: transport's buffer, of as many bytes, is full).  Without it one segment
#: of pipelined Gets could take a message each, however large, before any
#: reply was written.
MAX_HELD_MESSAGE_BYTES = 64 * 1024


def _parse_id(raw: bytes) -> int:
    """A message id as the server gives them (decimal digits); any other
    token cannot be held reserved."""
    if not raw.isdigit() or (raw[:1] == b"0" and len(raw) > 1) or len(raw) > 20:
        raise errors.RequestError(errors.UNKNOWN_ID, "no such id is held reserved")
    return int(raw)


class MQServerProtocol(FrameReceiver, TimeoutMixin):
    """One client connection.

    Requests are handled strictly in order: while a ``Get`` waits for a
    message, the frames behind it stay buffered, unparsed, until it is
    answered.  Reading stops (and the kernel's buffers push back on the
    client) while replies pile up unsent, or while more than
    ``max_pending_bytes`` of requests wait behind a ``Get``.
    """

    log = Logger()
    factory: MQServerFactory

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.limits = broker.limits
        self.MAX_LENGTH = max(MAX_FRAME_LENGTH, self.limits.max_frame_bytes)
        self._waiting: Optional[defer.Deferred[Any]] = None
        # An Info request being answered: waiting its turn, being built, or
        # being written a piece at a time as the transport takes them.
        self._info: Optional[defer.Deferred[list[bytes]]] = None
        self._info_waiting_turn = False
        # From an Info request until its reply is all written.
        self._info_busy = False
        self._info_pieces: Optional[deque[bytes]] = None
        self._info_pieces_bytes = 0
        # Bytes of this connection's last Info reply not yet sent, counted
        # against the factory's Info budget.
        self._info_unsent = 0
        self._info_stall: Optional[IDelayedCall] = None
        self._parsing = False
        self._closing = False
        self._reading = True
        self._liveness_check: Optional[IDelayedCall] = None
        self._store = broker.store
        # What the metrics count, at hand; and this connection's bytes read
        # (written: the writer's), added to the counters when it closes.
        self._counters = broker.counters
        self._requests = broker.counters.requests
        self._bytes_in = 0
        # Replies waiting for a durable store to write what they answer for,
        # in order: (batch, kind, value, value); None when none wait.
        self._held: Optional[deque[tuple[Batch, int, Any, Any]]] = None
        # The last Reserve of the usual shape this connection sent, parsed.
        self._usual_reserve: tuple[bytes, Optional[Reserve]] = (b"", None)
        self._held_batch: Optional[Batch] = None
        # Bytes of the messages among them, and whether that is past
        # MAX_HELD_MESSAGE_BYTES (then requests wait).
        self._held_message_bytes = 0
        self._held_full = False
        # Aborted (the peer is gone, or must be cut off) or lost: the held
        # replies are never sent, and their messages go back (connectionLost).
        self._lost = False

    @property
    def max_accepted_length(self) -> int:
        return self.limits.max_frame_bytes

    # Connection lifetime ---------------------------------------------------

    def connectionMade(self) -> None:
        self.broker.num_connections += 1
        self._counters.connections += 1
        self.factory.connections.add(self)
        self._out = ReplyWriter(self.transport)
        # The transport pauses us when its unsent replies pass its buffer size.
        self.transport.registerProducer(self, True)
        # Replies are whole frames, written at once: Nagle's algorithm would
        # only hold back a large message's tail for the peer's delayed ACK
        # (measured: 1 MiB put+get p99 42 ms with it, 1.3 ms without).
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):  # not TCP: a UNIX socket, a test transport
            pass
        self.setTimeout(self.limits.idle_timeout or None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.broker.num_connections -= 1
        self.factory.connections.discard(self)
        counters = self._counters
        counters.bytes_in += self._bytes_in
        counters.bytes_out += self._out.written
        self._closing = True
        self._lost = True
        try:
            self.setTimeout(None)
            if self._liveness_check is not None and self._liveness_check.active():
                self._liveness_check.cancel()
            if self._waiting is not None:
                # Withdraws the waiter: a departed consumer never takes a message.
                self._waiting.cancel()
            # Its reservations go back to the front of their queues.
            self.broker.release_all(self)
            if self._info_busy:
                self.factory.end_info_turn(self)
                if self._info is not None:
                    self._info.cancel()
                self._info_pieces = None
            self._set_info_unsent(0)
        finally:
            # Messages whose replies were held for the store, never sent, go
            # back first: in front of them goes anything written but unread.
            held, self._held = self._held, None
            if held:
                self._put_back([(queue, message) for _, kind, queue, message in held
                                if kind == _HELD_MESSAGE])
            # Last, once this connection can take nothing more: a message
            # whose reply the peer never received was never handed over, and
            # goes back to the front of its queue, in order.
            settling = self._out.settle(
                self.broker.clock, reason.check(ConnectionAborted) is not None, self._put_back
            )
            if settling is not None:
                self.factory.settle_later(settling)
            super().connectionLost(reason)

    def _info_stalled(self) -> None:
        self._info_stall = None
        self._abort(f"it read nothing of its Info reply for {INFO_STALL_SECONDS:g} s")

    def _put_back(self, undelivered: list[tuple[bytes, bytes]]) -> None:
        by_queue: dict[bytes, list[bytes]] = {}
        for queue, message in undelivered:
            by_queue.setdefault(queue, []).append(message)
        for queue, messages in by_queue.items():
            self.broker.put_back(queue, *messages)

    @property
    def _peer(self) -> str:
        return describe(self.transport.getPeer())

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        # TimeoutMixin's clock: the broker's, not the global reactor.
        return self.broker.clock.callLater(period, func)

    def timeoutConnection(self) -> None:
        self.log.info("closing {peer}: idle for {seconds} s",
                      peer=self._peer, seconds=self.limits.idle_timeout)
        self._close()

    def _close(self) -> None:
        self._closing = True
        if self._held is not None:
            return  # once the replies held for the store are out (_release)
        # A registered producer would hold the connection open past its close.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    # Input -----------------------------------------------------------------

    @property
    def holding(self) -> bool:
        # Asked after every request: kept to plain attributes.
        return self._closing or self.paused or self._waiting is not None or self._info_busy or self._held_full

    @property
    def _answering(self) -> bool:
        """True while a request waits for its answer, holding up those behind it."""
        return self._waiting is not None or self._info_busy or self._held_full

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._bytes_in += len(data)
        self.resetTimeout()
        super().dataReceived(data)
        if self._answering and self.buffered_bytes > self.limits.max_pending_bytes:
            self._update_reading()

    def pauseProducing(self) -> None:
        self.paused = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self.paused = False
        if self._info_stall is not None:
            # The peer reads its Info reply: it has another while to go on.
            self._info_stall.reset(INFO_STALL_SECONDS)
        if self._info_pieces is not None:
            self._write_info_pieces()
        elif self._info_unsent:
            # The transport has sent all it held.
            self._set_info_unsent(0)
        self._update_reading()
        self._parse_buffered()

    def stopProducing(self) -> None:
        self._close()

    def _update_reading(self) -> None:
        """Read from the socket unless replies pile up or requests do."""
        backlog = self._answering and self.buffered_bytes > self.limits.max_pending_bytes
        reading = not (self.paused or backlog or self._closing)
        if reading == self._reading:
            return
        self._reading = reading
        if reading:
            self.transport.resumeProducing()
        else:
            self.log.debug("stopped reading from {peer}", peer=self._peer)
            self.transport.pauseProducing()
            if self._waiting is not None:
                self._schedule_liveness_check()

    def _schedule_liveness_check(self) -> None:
        # Unread, a peer's FIN or RST goes unseen; ask the kernel instead, so
        # a departed consumer's waiter goes and never takes a message.
        if self._liveness_check is not None and self._liveness_check.active():
            return  # one check at a time, however often reading toggles
        self._liveness_check = self.broker.clock.callLater(LIVENESS_INTERVAL, self._check_liveness)

    def _departed_unread(self) -> bool:
        """True when we are not reading and the kernel says the peer has gone."""
        return not self._reading and peer_has_gone(self.transport)

    def _check_liveness(self) -> None:
        self._liveness_check = None
        if self._reading or self._closing:
            return
        if self._departed_unread():
            self._abort("the peer went away while we were not reading")
        else:
            self._schedule_liveness_check()

    def _abort(self, why: str) -> None:
        self.log.info("closing {peer}: {why}", peer=self._peer, why=why)
        self._closing = True
        self._lost = True
        self.transport.abortConnection()

    def _parse_buffered(self) -> None:
        # The replies to one read's requests go out together.
        self._parsing = True
        self._out.begin_batch()
        try:
            super()._parse_buffered()
        finally:
            self._parsing = False
            self._out.end_batch()

    def lengthLimitExceeded(self, length: int) -> None:
        self._counters.malformed += 1
        self.log.info(
            "closing {peer}: frame of {length} bytes exceeds the limit of {limit}",
            peer=self._peer, length=length, limit=self.MAX_LENGTH,
        )
        self._close()

    def frameSkipped(self, length: int) -> None:
        self._refuse(errors.RequestError(
            errors.MESSAGE_TOO_LARGE,
            f"frame of {length} bytes, the limit is {self.limits.max_frame_bytes}",
        ))

    # Requests --------------------------------------------------------------

    def stringReceived(self, payload: bytes) -> None:
        try:
            head = payload[4:7]
            if (head == b"Ack" or head == b"Res") and self._store.acknowledged_delivery:
                # A consumer that acks: Reserve and Ack as they usually come.
                if head == b"Ack":
                    acked = parse_usual_ack(payload)
                    if acked is not None:
                        self._requests[Ack] += 1
                        self.broker.ack(acked[0], acked[1], self)
                        self._promise(_OK_FRAME)
                        return
                else:
                    # A consumer sends the same Reserve again and again.
                    if payload == self._usual_reserve[0]:
                        reserve: Optional[Reserve] = self._usual_reserve[1]
                    else:
                        reserve = parse_usual_reserve(payload)
                        if reserve is not None:
                            self._usual_reserve = (payload, reserve)
                    if reserve is not None:
                        self._requests[Reserve] += 1
                        self._reserve(reserve)
                        return
            command = parse_request(decode_payload(payload))
            self._requests[type(command)] += 1
            if type(command) is Put:
                self._put(command)
            elif type(command) is Get:
                self._get(command)
            elif type(command) is Info:
                self._ask_info()
            elif type(command) is Quit:
                self._close()
            else:
                self._acknowledged_delivery(command)
        except errors.RequestError as error:
            self._refuse(error)
        except errors.MalformedFrame as error:
            self._counters.malformed += 1
            self.log.info("closing {peer}: malformed frame: {error}",
                          peer=self._peer, error=error)
            self._close()

    def _refuse(self, error: errors.RequestError) -> None:
        self._counters.error(error.error_type)
        self.log.info("refused a request from {peer}: {error}",
                      peer=self._peer, error=error)
        self._reply(encode_frame([ERROR, error.error_type.encode("ascii")]))
        if error.error_type == errors.UNKNOWN_COMMAND:
            self._close()

    def _put(self, command: Put) -> None:
        if len(command.message) > self.limits.max_message_bytes:
            raise errors.RequestError(
                errors.MESSAGE_TOO_LARGE,
                f"message of {len(command.message)} bytes, "
                f"the limit is {self.limits.max_message_bytes}",
            )
        message_id = self.broker.put(command.queue, command.message)
        if message_id is None and self._held is None:
            self._out.write(_OK_FRAME)
        else:
            # OK once the store has written it, or an error if it could not.
            self._hold(self._store.pending, _HELD_PUT, message_id, None)

    def _get(self, command: Get) -> None:
        message = self.broker.take(command.queue)
        if message is not None:
            self._send_message(command.queue, message)
            return
        waiting = self.broker.wait(command.queue, command.timeout_ms / 1000, self._consumer_present)
        self._waiting = waiting
        # Waiting for a message is not being idle.
        self.setTimeout(None)
        waiting.addCallbacks(self._delivered, self._wait_ended, (command.queue,))

    # Acknowledged delivery ----------------------------------------------------

    def _acknowledged_delivery(self, command: Any) -> None:
        broker = self.broker
        # Before anything else (a queue made, an id looked up): a store that
        # keeps no reservations knows none of these commands.
        broker.check_acknowledged_delivery()
        kind = type(command)
        if kind is Reserve:
            self._reserve(command)
            return
        if kind is Kick:
            kicked = broker.kick(command.queue, command.most)
            self._promise(encode_frame([OK, b"%d" % kicked]))
            return
        message_id = _parse_id(command.message_id)
        if kind is Ack:
            broker.ack(command.queue, message_id, self)
        elif kind is Release:
            broker.release(command.queue, message_id, self, command.delay_ms / 1000)
        elif kind is Touch:
            broker.touch(command.queue, message_id, self, command.lease_ms / 1000)
        elif kind is Bury:
            broker.bury(command.queue, message_id, self)
        self._promise(_OK_FRAME)

    def _promise(self, frame: bytes) -> None:
        """An OK for a change the store writes: sent once it is written (and,
        should that write fail, once its retry is)."""
        self._reply_for_store(frame, _HELD_PROMISE)

    def _reserve(self, command: Reserve) -> None:
        lease = command.lease_ms / 1000
        entry = self.broker.reserve_now(command.queue, lease, self)
        if entry is not None:
            self._send_reserved(entry)
            return
        waiting = self.broker.wait_reserve(command.queue, command.timeout_ms / 1000, lease, self,
                                           self._consumer_present)
        self._waiting = waiting
        self.setTimeout(None)
        waiting.addCallbacks(self._reserved, self._wait_ended)

    def _reserved(self, entry: Entry) -> None:
        self._waiting = None
        self._send_reserved(entry)
        self._end_wait()

    def _send_reserved(self, entry: Entry) -> None:
        # Should the reply never reach the peer, its connection closes, and
        # the reservation goes back with it (release_all): nothing to settle.
        # (Packed here rather than by encode_frame: one in two requests of a
        # consumer that acks is a Reserve.)
        message, message_id = entry.message, b"%d" % entry.message_id
        counters = self._counters
        counters.deliveries += 1
        if entry.deliveries == 1:
            deliveries = b"1"
        else:
            deliveries = b"%d" % entry.deliveries
            counters.redeliveries += 1
        self._reply_for_store(b"".join((
            _RESERVED_HEAD.pack(18 + len(message) + len(message_id) + len(deliveries), 2, OK, len(message)),
            message, _UINT32.pack(len(message_id)), message_id, _UINT32.pack(len(deliveries)), deliveries,
        )))

    def _reply_for_store(self, frame: bytes, kind: int = _HELD_FRAME) -> None:
        """A reply that waits for the store's pending batch, if any, and the replies before it."""
        if self._store.pending is not None:
            self._hold(self._store.pending, kind, frame, None)
        else:
            self._reply(frame)

    def _send_message(self, queue: bytes, message: bytes) -> None:
        # Counted as handed out now; should its reply never reach the peer,
        # it comes back (counted returned) as a Reserve's does (abandoned).
        self._counters.deliveries += 1
        if self._held is not None or self._store.pending is not None:
            # Not before the store has written that it was taken.
            self._hold(self._store.pending, _HELD_MESSAGE, queue, message)
            return
        self._write_message(queue, message)

    def _write_message(self, queue: bytes, message: bytes) -> None:
        # Two writes, so a large message is not copied into a new frame.
        header = _UINT32.pack(4 + 2 + 4 + len(message)) + _UINT32.pack(2) + OK
        self._out.write_message(queue, message, header, _UINT32.pack(len(message)), message)

    def _consumer_present(self) -> bool:
        # Asked by the broker just before it hands this connection's waiting
        # Get a message: one that has gone is passed over and takes nothing.
        return not (self._closing or self._departed_unread())

    def _delivered(self, message: bytes, queue: bytes) -> None:
        self._waiting = None
        self._send_message(queue, message)
        self._end_wait()

    def _wait_ended(self, failure: Failure) -> None:
        self._waiting = None
        if failure.check(errors.GetTimeout):
            if self._closing:
                return
            if self._departed_unread():
                # The requests buffered behind this Get came from a peer that
                # has left: answering them could hand its Gets messages that
                # nobody will read.
                self._abort("the peer went away while its Get waited")
                return
            self._counters.wait_timeouts += 1
            self._reply(_TIMEOUT_FRAME)
            self._end_wait()
        elif failure.check(errors.ConsumerGone):
            if not self._closing:
                self._abort("the peer went away while its Get waited")
        elif failure.check(defer.CancelledError):
            # The broker is stopping; connectionLost cancels with _closing set.
            if not self._closing:
                self._close()
        else:
            self.log.failure("waiting Get failed", failure)
            self._close()

    # Replies held for the store ---------------------------------------------
    #
    # With a durable store, a Put is answered OK, and a message sent, only
    # once the store's batch that recorded it is written (Store.pending).
    # Replies behind a held one are held too, so that replies keep the
    # order of their requests.  The memory store has no batches: nothing is
    # ever held.

    def _reply(self, frame: bytes) -> None:
        """Write a reply that waits for nothing but the replies before it."""
        if self._held is None:
            self._out.write(frame)
        else:
            self._hold(None, _HELD_FRAME, frame, None)

    def _hold(self, batch: Optional[Batch], kind: int, first: Any, second: Any) -> None:
        held = self._held
        if held is None:
            held = self._held = deque()
        if batch is None:
            # Depends on nothing new: out with the reply before it.
            assert held, "a reply held for no batch and behind none"
            batch = held[-1][0]
        held.append((batch, kind, first, second))
        if kind != _HELD_PUT:
            # (A Reserve's reply, a frame, carries its message too.)
            self._held_message_bytes += len(second) if kind == _HELD_MESSAGE else len(first)
            if self._held_message_bytes > MAX_HELD_MESSAGE_BYTES:
                self._held_full = True
        if batch is not self._held_batch:
            self._held_batch = batch
            batch.when_done(self._release)

    def _release(self, _batch: Batch) -> None:
        """Send the held replies whose batches are written, in order."""
        held = self._held
        if held is None or self._lost:
            return
        out = self._out
        checked = False
        out.begin_batch()
        try:
            while held and held[0][0].done:
                batch, kind, first, second = held[0]
                if kind == _HELD_MESSAGE and not checked:
                    checked = True
                    if self._departed_unread():
                        # As a waiting Get's consumer that has gone: it takes
                        # nothing; its messages go back (connectionLost).
                        self._abort("the peer went away while its message waited for the store")
                        return
                refused = kind == _HELD_PUT and batch.refused(first)
                if batch.retry is not None and (kind == _HELD_PROMISE or kind == _HELD_PUT and not refused):
                    # Its write failed, but its message had been taken: it
                    # is stored by the retry, and answered once that is
                    # written.  (A message taken from the store goes out
                    # even so: stored messages stay deliverable while the
                    # disk fails; their removals are written by the retry.)
                    self._wait_for_retry(batch)
                    break
                held.popleft()
                if kind == _HELD_MESSAGE:
                    self._held_message_bytes -= len(second)
                    self._write_message(first, second)
                elif refused:
                    self.log.info("refused a Put from {peer}: the store could not write it",
                                  peer=self._peer)
                    self._counters.error(errors.STORAGE_ERROR)
                    out.write(_STORAGE_ERROR_FRAME)
                elif kind == _HELD_PUT:
                    out.write(_OK_FRAME)
                else:
                    self._held_message_bytes -= len(first)
                    out.write(first)
        finally:
            out.end_batch()
        if not held:
            self._held = None
            self._held_batch = None
            if self._closing:
                self._close()
        if self._held_full and self._held_message_bytes <= MAX_HELD_MESSAGE_BYTES:
            self._held_full = False
            self._update_reading()
            if self.buffered_bytes and not self.holding and not self._parsing:
                self.broker.clock.callLater(0, self._parse_buffered)

    def _wait_for_retry(self, failed: Batch) -> None:
        """Hold the replies held for a batch whose write failed for the batch
        that retries it (a refused Put among them is answered as refused)."""
        retry = failed.retry
        assert retry is not None and self._held is not None
        while retry.retry is not None and retry.done:
            retry = retry.retry
        moved: deque[tuple[Batch, int, Any, Any]] = deque()
        for batch, kind, first, second in self._held:
            if batch is failed:
                if kind == _HELD_PUT and failed.refused(first):
                    self._counters.error(errors.STORAGE_ERROR)
                    kind, first = _HELD_FRAME, _STORAGE_ERROR_FRAME
                    self._held_message_bytes += len(first)
                batch = retry
            moved.append((batch, kind, first, second))
        self._held = moved
        self._held_batch = moved[-1][0]
        retry.when_done(self._release)

    def _end_wait(self) -> None:
        self.setTimeout(self.limits.idle_timeout or None)
        self._update_reading()
        # The answer may come from inside another connection's Put: go on with
        # our buffered requests from the reactor, not from within its call.
        if self.buffered_bytes and not self.holding:
            self.broker.clock.callLater(0, self._parse_buffered)

    # Info ------------------------------------------------------------------
    #
    # An Info reply can be tens of megabytes for a few bytes of request: it is
    # built a slice per reactor turn (Broker.build_info), one connection's at
    # a time, and while the Info replies not yet sent pass the factory's
    # budget, further ones wait their turn.  The requests behind one wait,
    # as behind a waiting Get.

    def _ask_info(self) -> None:
        # Refused at once, not after waiting its turn, when it cannot fit.
        self.broker.check_info_size(self.limits.max_info_bytes)
        # Waiting for a reply, or reading a long one, is not being idle.
        self.setTimeout(None)
        self._info_busy = True
        self._info_waiting_turn = True
        self.factory.take_info_turn(self)

    def start_info(self) -> None:
        """Build this connection's Info reply: its turn has come."""
        self._info_waiting_turn = False
        building = self.broker.build_info(self.limits.max_info_bytes)
        if not building.called:
            self._info = building
        building.addCallbacks(self._info_built, self._info_failed)

    def _info_built(self, pieces: list[bytes]) -> None:
        self._info = None
        self.factory.end_info_turn(self)
        self._write_info(pieces)

    def _write_info(self, pieces: list[bytes]) -> None:
        if self._closing:
            return
        if self._held_batch is not None:
            # After the replies held before it (released first: their
            # listener was registered first).
            self._held_batch.when_done(lambda _: self._write_info(pieces))
            return
        size = sum(map(len, pieces))
        header = _UINT32.pack(4 + 2 + 4 + size) + _INFO_REPLY_PREFIX + _UINT32.pack(size)
        if size <= INFO_WHOLE_BYTES:
            self._out.write(header, *pieces)
            self._end_info()
            return
        self._out.write(header)
        self._info_pieces = deque(pieces)
        self._info_pieces_bytes = size
        self._write_info_pieces()

    def _write_info_pieces(self) -> None:
        # A piece at a time while the transport takes them: handed over
        # whole, Twisted would copy tens of megabytes at once, stalling
        # every client, and keep the copy.
        pieces = self._info_pieces
        assert pieces is not None
        while pieces and not self.paused and not self._closing:
            piece = pieces.popleft()
            self._info_pieces_bytes -= len(piece)
            self._out.write(piece)
        if pieces or self.paused:
            # The transport will resume us once it has sent what it holds.
            self._set_info_unsent(self._info_pieces_bytes + self._out.unsent_bytes())
        else:
            # Less than its buffer size is left, and no word will come when
            # that is sent: it is no longer counted.
            self._set_info_unsent(0)
        if not pieces:
            self._info_pieces = None
            self._end_info()

    def _info_failed(self, failure: Failure) -> None:
        self._info = None
        self.factory.end_info_turn(self)
        if failure.check(defer.CancelledError):
            return
        if failure.check(errors.RequestError):
            self._refuse(failure.value)
        else:
            self.log.failure("building an Info reply failed", failure)
            self._close()
            return
        self._end_info()

    def _end_info(self) -> None:
        self._info_busy = False
        if self._closing:
            return
        self.setTimeout(self.limits.idle_timeout or None)
        self._update_reading()
        # Answered from within our own parsing, the loop goes on by itself;
        # otherwise (a later turn, another connection's doing) go on from the
        # reactor.
        if self.buffered_bytes and not self.holding and not self._parsing:
            self.broker.clock.callLater(0, self._parse_buffered)

    def _set_info_unsent(self, unsent: int) -> None:
        before = self._info_unsent
        if unsent == before:
            return
        self._info_unsent = unsent
        # A client that asks for a large Info and reads none of it would hold
        # the factory's Info budget, and with it everyone's Info, for good.
        if unsent and self._info_stall is None and not self._closing:
            self._info_stall = self.broker.clock.callLater(INFO_STALL_SECONDS, self._info_stalled)
        elif not unsent and self._info_stall is not None:
            if self._info_stall.active():
                self._info_stall.cancel()
            self._info_stall = None
        self.factory.info_unsent_bytes += unsent - before
        if unsent < before:
            self.factory.next_info_turn()


class MQServerFactory(Factory[MQServerProtocol]):
    """Builds a :class:`MQServerProtocol` for each connection, sharing one broker."""

    noisy = False
    log = Logger()

    #: Bytes of Info replies written but not yet sent, across connections,
    #: past which a new Info waits its turn: clients that ask for large
    #: Info replies and never read them cannot take all the server's memory.
    info_budget_bytes = 64 * 1024 * 1024

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.connections: set[MQServerProtocol] = set()
        #: Bytes of Info replies written to connections but not yet sent.
        self.info_unsent_bytes = 0
        # Connections waiting to build an Info reply, and the one building.
        self._info_turns: deque[MQServerProtocol] = deque()
        self._info_building: Optional[MQServerProtocol] = None
        self._starting_info_turns = False
        self._settling: set[Settlement] = set()

    def take_info_turn(self, protocol: MQServerProtocol) -> None:
        """Queue a connection's Info; it starts when none is being built and
        the budget allows (at once, usually)."""
        self._info_turns.append(protocol)
        self.next_info_turn()

    def end_info_turn(self, protocol: MQServerProtocol) -> None:
        """A connection's Info is built, or failed, or the connection closed."""
        if self._info_building is protocol:
            self._info_building = None
        elif protocol in self._info_turns:
            self._info_turns.remove(protocol)
        self.next_info_turn()

    def next_info_turn(self) -> None:
        """Start the next waiting Info, if none is being built and the budget allows."""
        if self._starting_info_turns:
            return  # called back from start_info below: the loop goes on
        self._starting_info_turns = True
        try:
            while (
                self._info_turns and self._info_building is None
                and self.info_unsent_bytes < self.info_budget_bytes
            ):
                protocol = self._info_building = self._info_turns.popleft()
                # Built at once for most servers: then the loop goes on.
                protocol.start_info()
        finally:
            self._starting_info_turns = False

    def buildProtocol(self, addr: Any) -> Optional[MQServerProtocol]:
        max_connections = self.broker.limits.max_connections
        if max_connections and len(self.connections) >= max_connections:
            self.broker.counters.connections_refused += 1
            self.log.warn("refused a connection from {peer}: {count} connections open, "
                          "the limit is {limit}",
                          peer=describe(addr), count=len(self.connections), limit=max_connections)
            return None
        protocol = MQServerProtocol(self.broker)
        protocol.factory = self
        return protocol

    def open_bytes(self) -> tuple[int, int]:
        """Bytes read from and written to the connections open now."""
        read = written = 0
        for protocol in self.connections:
            read += protocol._bytes_in
            written += protocol._out.written
        return read, written

    def settle_later(self, settling: Settlement) -> None:
        """Keep a closed connection's replies in flight until their fate is known."""
        self._settling.add(settling)
        settling.done.addCallback(lambda _: self._settling.discard(settling))

    def close_connections(self, grace: float = 1.0) -> defer.Deferred[None]:
        """Close every open connection, as a server shutting down does.

        Replies already written get ``grace`` seconds to go out; connections
        still open then are aborted.  Fires when every connection has closed.
        """
        protocols = list(self.connections)
        closed = defer.DeferredList(
            [protocol.when_closed() for protocol in protocols], consumeErrors=True
        )
        for protocol in protocols:
            protocol._close()

        def abort_stragglers() -> None:
            for protocol in list(self.connections):
                protocol.transport.abortConnection()

        timer = self.broker.clock.callLater(grace, abort_stragglers)

        def done(_: object) -> None:
            if timer.active():
                timer.cancel()
            # Replies still in flight are decided now with what the kernel
            # knows: no message stays away from its queue past the stop.
            for settling in list(self._settling):
                settling.decide_now()

        return closed.addCallback(done)
