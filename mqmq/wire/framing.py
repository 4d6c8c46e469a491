"""Outer framing shared by the server and client protocols."""

from __future__ import annotations

from struct import Struct

from twisted.internet import defer
from twisted.internet.interfaces import IConsumer, IPushProducer, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from mqmq.wire.codec import MAX_FRAME_LENGTH

_UINT32 = Struct(">I")


class IStreamTransport(ITCPTransport, IConsumer, IPushProducer):
    """What the protocols need of a transport: TCP's, UNIX's and TLS's all give it."""


@implementer(IPushProducer)
class FrameReceiver(Int32StringReceiver):
    """An ``Int32StringReceiver`` that buffers without quadratic copying.

    Twisted's receiver joins its whole buffer with each new segment, so a
    32 MiB frame arriving in 64 KiB segments is copied hundreds of times.
    This one keeps the segments as they came and joins them only once enough
    has arrived to parse something.

    Parsing stops while :attr:`holding` is true; :meth:`_parse_buffered`
    takes it up again.  A frame longer than :attr:`MAX_LENGTH` calls
    ``lengthLimitExceeded`` (by default: close).  A frame longer than
    :attr:`max_accepted_length` but within ``MAX_LENGTH`` is read past without
    being kept, then reported to :meth:`frameSkipped`.
    """

    MAX_LENGTH = MAX_FRAME_LENGTH
    transport: IStreamTransport

    _chunks: list[bytes]
    _buffered = 0
    _needed = _UINT32.size
    _skipping = 0
    _skipped_length = 0
    _closed = False
    _close_watchers: list[defer.Deferred[None]] | None = None

    def when_closed(self) -> defer.Deferred[None]:
        """A Deferred that fires once the connection has closed."""
        if self._closed:
            return defer.succeed(None)
        if self._close_watchers is None:
            self._close_watchers = []
        watcher: defer.Deferred[None] = defer.Deferred()
        self._close_watchers.append(watcher)
        return watcher

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        watchers, self._close_watchers = self._close_watchers or [], None
        for watcher in watchers:
            watcher.callback(None)

    @property
    def max_accepted_length(self) -> int:
        """Longest frame kept and parsed; longer ones are skipped."""
        return self.MAX_LENGTH

    @property
    def holding(self) -> bool:
        """True while frames must stay buffered, unparsed."""
        return self.paused

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet handed to ``stringReceived``."""
        return self._buffered

    def frameSkipped(self, length: int) -> None:
        """A frame of ``length`` bytes, over :attr:`max_accepted_length`, was dropped."""

    def dataReceived(self, data: bytes) -> None:
        if self._skipping:
            if len(data) < self._skipping:
                self._skipping -= len(data)
                return
            data = data[self._skipping :]
            self._skipping = 0
            self.frameSkipped(self._skipped_length)
            if not data:
                return
        if self._buffered:
            self._chunks.append(data)
        else:
            self._chunks = [data]
        self._buffered += len(data)
        self._parse_buffered()

    def _parse_buffered(self) -> None:
        if self._buffered < self._needed or self.holding:
            return
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        end = len(data)
        offset = 0
        needed = _UINT32.size
        unpack_from = _UINT32.unpack_from
        accepted = self.max_accepted_length
        while end - offset >= 4:
            (length,) = unpack_from(data, offset)
            if length > accepted:
                self._chunks = []
                self._buffered = 0
                self._needed = _UINT32.size
                if length > self.MAX_LENGTH:
                    self.lengthLimitExceeded(length)
                else:
                    self._skip(length, data[offset + 4 :])
                return
            frame_end = offset + 4 + length
            if frame_end > end:
                needed = 4 + length
                break
            self.stringReceived(data[offset + 4 : frame_end])
            offset = frame_end
            if self.holding:
                break
        rest = data[offset:] if offset else data
        self._chunks = [rest]
        self._buffered = len(rest)
        self._needed = needed

    def _skip(self, length: int, received: bytes) -> None:
        self._skipped_length = length
        self._skipping = length
        if received:
            self.dataReceived(received)

    def resumeProducing(self) -> None:
        self.paused = False
        self.transport.resumeProducing()
        self._parse_buffered()
