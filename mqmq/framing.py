"""Outer framing shared by the server and client protocols."""

from __future__ import annotations

from struct import Struct

from typing import cast

from twisted.internet.interfaces import IPushProducer, ITCPTransport
from twisted.protocols.basic import Int32StringReceiver

from mqmq.codec import MAX_FRAME_LENGTH

_UINT32 = Struct(">I")


class FrameReceiver(Int32StringReceiver):
    """An ``Int32StringReceiver`` that buffers without quadratic copying.

    Twisted's receiver joins its whole buffer with each new segment, so a
    32 MiB frame arriving in 64 KiB segments is copied hundreds of times.
    This one keeps the segments as they came and joins them only once enough
    has arrived to parse something.  Parsing also stops while :attr:`holding`
    is true; :meth:`_parse_buffered` takes it up again.
    """

    MAX_LENGTH = MAX_FRAME_LENGTH
    # Connected protocols always have one; TCP's is the richest we rely on
    # (pausing, producers), and UNIX and TLS transports offer the same.
    transport: ITCPTransport

    _chunks: list[bytes]
    _buffered = 0
    _needed = _UINT32.size

    @property
    def holding(self) -> bool:
        """True while frames must stay buffered, unparsed."""
        return self.paused

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet handed to ``stringReceived``."""
        return self._buffered

    def dataReceived(self, data: bytes) -> None:
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
        while end - offset >= 4:
            (length,) = unpack_from(data, offset)
            if length > self.MAX_LENGTH:
                self._chunks = []
                self._buffered = 0
                self.lengthLimitExceeded(length)
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

    def resumeProducing(self) -> None:
        self.paused = False
        cast(IPushProducer, self.transport).resumeProducing()
        self._parse_buffered()
