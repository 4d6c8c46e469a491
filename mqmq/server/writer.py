"""Replies out: coalesced per batch of requests, sent without a reactor round trip.

Twisted's TCP transport never sends from ``write``: it buffers, asks the
reactor to watch for writability, and sends on the next turn of the loop.
For a request answered at once that costs a loop iteration and two epoll
updates per reply.  A :class:`ReplyWriter` gathers the replies to one batch
of requests (one read), then sends them straight to the socket when
Twisted's own buffer is empty, and leaves any remainder, and every other
case, to the transport as usual, so backpressure, errors and closing behave
exactly as Twisted's.

It also knows how far the bytes written have got: a message whose reply
the peer never acknowledged (on TCP; elsewhere, that never all reached the
kernel) when the connection broke was never handed over, and
:meth:`ReplyWriter.settle` names it, once the kernel knows, so the server
can put it back.

Measured with ``benchmarks/bench.py --workloads pipelined,fan --runs 3`` on
the 2-core VM of the README: fan 48,800 → 71,300 messages/s, pipelined
285,000 → 348,000 requests/s.
"""

from __future__ import annotations

import os
import socket
import sys
from collections import deque
from struct import Struct
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from twisted.internet import tcp

_MOST_PARTS = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in getattr(os, "sysconf_names", {}) else 1024

#: Replies gathered in a batch before they go out: past this they are sent
#: at once, so that a batch of large replies meets backpressure in time.
FLUSH_BYTES = 64 * 1024

#: Messages handed over, or bytes of them, since the writer last asked the
#: kernel which the peer has acknowledged, before it asks again and forgets
#: those: one getsockopt per 32 replies (asking at each reply once more than
#: 32 were in flight cost pipelined Gets three quarters of their rate), and
#: never much memory kept for replies already received.
CHECK_ACKED_MESSAGES = 32
CHECK_ACKED_BYTES = 1024 * 1024

# Linux's struct tcp_info: tcpi_bytes_acked, the bytes the peer has
# acknowledged (Linux 4.1 and later), is a u64 at offset 120.
_TCP_INFO: int = getattr(socket, "TCP_INFO", 0) if sys.platform.startswith("linux") else 0
_BYTES_ACKED = Struct("=Q")
_BYTES_ACKED_OFFSET = 120
_TCP_INFO_LENGTH = _BYTES_ACKED_OFFSET + _BYTES_ACKED.size
_TCP_CLOSE = 7
_LINGER_RESET = Struct("ii").pack(1, 0)

#: After a connection has closed, the longest the writer waits for the peer
#: to acknowledge replies still in flight before it counts them undelivered.
SETTLE_SECONDS = 30.0


def _acked_bytes_probe(handle: socket.socket) -> Optional[socket.socket]:
    """A second handle on a TCP socket that can tell how many bytes the peer
    acknowledged, even after Twisted has closed the first; None where the
    kernel cannot tell."""
    if not _TCP_INFO or handle.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        if len(handle.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LENGTH)) < _TCP_INFO_LENGTH:
            return None
        return handle.dup()
    except OSError:
        return None


class ReplyWriter:
    """Writes replies to one transport, directly to its socket when it can."""

    __slots__ = (
        "transport", "_socket", "_probe", "_batch", "_batch_bytes", "_written",
        "_unflushed", "_since_check", "_since_check_bytes",
    )

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        # Only Twisted's own TCP and UNIX connections are known well enough to
        # write past: TLS, test transports and others get plain writes.
        handle = transport.socket if isinstance(transport, tcp.Connection) else None
        self._socket: Optional[socket.socket] = handle
        self._batch: Optional[list[bytes]] = None
        self._batch_bytes = 0
        # Bytes written so far, and the messages whose replies end past what
        # is known to have reached the kernel: (end, queue, message).
        self._written = 0
        self._unflushed: deque[tuple[int, bytes, bytes]] = deque()
        self._since_check = 0
        self._since_check_bytes = 0
        # Reaching the kernel is not reaching the peer: a consumer gone
        # without our noticing (its FIN stuck behind data we did not read)
        # resets the connection when its reply arrives.  On TCP a message is
        # handed over once the peer has acknowledged all of its reply, which
        # the kernel still tells after the connection broke through this
        # duplicate handle; Twisted closes its own before we hear of the loss.
        self._probe = _acked_bytes_probe(handle) if handle is not None else None

    def begin_batch(self) -> None:
        """Gather what is written until :meth:`end_batch`."""
        # Nested (a skipped oversized frame re-enters the parse): keep the
        # outer batch, or the replies it gathered are lost.
        if self._socket is not None and self._batch is None:
            self._batch = []
            self._batch_bytes = 0

    def end_batch(self) -> None:
        """Send what the batch gathered."""
        batch, self._batch = self._batch, None
        size, self._batch_bytes = self._batch_bytes, 0
        if batch:
            self._send(batch, size)

    def write_message(self, queue: bytes, message: bytes, *parts: bytes) -> None:
        """Write a reply (``parts``) that hands ``message`` from ``queue`` over.

        Until the peer has acknowledged all of its bytes, the message is
        listed by :meth:`undelivered`.
        """
        self.write(*parts)
        if self._socket is not None:
            self._unflushed.append((self._written, queue, message))
            self._since_check += 1
            self._since_check_bytes += len(message)
            if self._since_check > CHECK_ACKED_MESSAGES or self._since_check_bytes > CHECK_ACKED_BYTES:
                self._since_check = self._since_check_bytes = 0
                self._forget_delivered(self._delivered())

    def _forget_delivered(self, delivered: int) -> None:
        unflushed = self._unflushed
        while unflushed and unflushed[0][0] <= delivered:
            unflushed.popleft()

    def settle(
        self,
        clock: IReactorTime,
        aborted: bool,
        put_back: Callable[[list[tuple[bytes, bytes]]], None],
    ) -> Optional[Settlement]:
        """Once the connection has been lost: call ``put_back`` with (queue,
        message) of each message the peer never received all of, oldest first.

        At once where the fate of every reply is known: the peer acknowledged
        it, or it never all reached the kernel, or the connection was reset or
        aborted (which discards what the kernel still holds); then None is
        returned.  After an orderly close the kernel goes on sending what it
        holds, so replies in flight are waited for, up to
        :data:`SETTLE_SECONDS`: the :class:`Settlement` returned then can be
        made to decide at once.
        """
        if self._socket is None:
            return None
        flushed = self._written - self.unsent_bytes()
        probe, self._probe = self._probe, None
        if probe is None:
            put_back(self._undelivered(flushed))
            return None
        settlement = Settlement(clock, probe, list(self._unflushed), flushed, put_back)
        settlement.check(decide=aborted)
        return None if settlement.done.called else settlement

    def _undelivered(self, delivered: int) -> list[tuple[bytes, bytes]]:
        return [(queue, message) for end, queue, message in self._unflushed if end > delivered]

    def undelivered(self) -> list[tuple[bytes, bytes]]:
        """(queue, message) of each message the peer has not yet received all
        of (on TCP; elsewhere, whose reply has not all reached the kernel)."""
        if self._socket is None:
            return []
        return self._undelivered(self._delivered())

    def unsent_bytes(self) -> int:
        """Bytes written that the transport still holds (0 where unknown)."""
        if self._socket is None:
            return 0
        transport = self.transport
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen + self._batch_bytes

    def _delivered(self) -> int:
        """How many of the bytes written are known to have reached the peer
        (on TCP) or the kernel (elsewhere)."""
        flushed = self._written - self.unsent_bytes()
        if self._probe is None:
            return flushed
        try:
            info = self._probe.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LENGTH)
        except OSError:
            return 0
        # The peer's acknowledgement of our FIN counts one byte more.
        return min(flushed, _BYTES_ACKED.unpack_from(info, _BYTES_ACKED_OFFSET)[0])

    @property
    def written(self) -> int:
        """Bytes written so far (sent, or held by the transport to send)."""
        return self._written

    def write(self, *parts: bytes) -> None:
        """Write a reply made of one or more byte strings."""
        size = 0
        for part in parts:
            size += len(part)
        self._written += size
        batch = self._batch
        if batch is None:
            self._send(list(parts), size)
            return
        batch.extend(parts)
        self._batch_bytes += size
        if self._batch_bytes >= FLUSH_BYTES:
            size, self._batch_bytes = self._batch_bytes, 0
            self._batch = []
            self._send(batch, size)

    def _send(self, parts: list[bytes], size: int) -> None:
        transport = self.transport
        sock = self._socket
        if (
            sock is None
            or transport.dataBuffer
            or transport._tempDataBuffer
            or not transport.connected
            or transport.disconnecting
            or getattr(transport, "_aborting", False)
        ):
            transport.writeSequence(parts)
            return
        if len(parts) > _MOST_PARTS:
            # sendmsg takes at most IOV_MAX buffers.  A batch that long is
            # made of short replies (it is sent at FLUSH_BYTES), cheap to join.
            parts = [b"".join(parts)]
        try:
            sent = sock.sendmsg(parts) if len(parts) > 1 else sock.send(parts[0])
        except OSError:
            # Full (EAGAIN) or broken: Twisted sends later, or reports the error.
            sent = 0
        if sent == size:
            if self._unflushed and self._probe is None:
                # Everything written so far is in the kernel's hands.
                self._unflushed.clear()
            return
        for index, part in enumerate(parts):
            if sent < len(part):
                rest = parts[index:]
                if sent:
                    rest[0] = part[sent:]
                transport.writeSequence(rest)
                return
            sent -= len(part)


class Settlement:
    """The replies of a lost TCP connection that the kernel is still sending.

    Polls the kernel until the peer has acknowledged each of them, or the
    connection is reset, or :data:`SETTLE_SECONDS` pass, then puts back the
    messages the peer never received all of.
    """

    def __init__(
        self,
        clock: IReactorTime,
        probe: socket.socket,
        entries: list[tuple[int, bytes, bytes]],
        flushed: int,
        put_back: Callable[[list[tuple[bytes, bytes]]], None],
    ) -> None:
        self.clock = clock
        self.probe = probe
        self.entries = entries
        self.flushed = flushed
        self.put_back = put_back
        self.give_up = clock.seconds() + SETTLE_SECONDS
        self.timer: Optional[IDelayedCall] = None
        self.delay = 0.001
        #: Fires once the undelivered messages have been put back.
        self.done: defer.Deferred[None] = defer.Deferred()

    def _kernel_says(self) -> tuple[int, int]:
        try:
            info = self.probe.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LENGTH)
        except OSError:
            return _TCP_CLOSE, 0
        return info[0], _BYTES_ACKED.unpack_from(info, _BYTES_ACKED_OFFSET)[0]

    def check(self, decide: bool = False) -> None:
        """Decide if the kernel knows each reply's fate (or ``decide``); else look again later."""
        self.timer = None
        state, acked = self._kernel_says()
        # Only a reply all in the kernel's hands may still reach the peer;
        # one cut short in Twisted's buffer never will.
        in_flight = any(acked < end <= self.flushed for end, _, _ in self.entries)
        if in_flight and not decide and state != _TCP_CLOSE and self.clock.seconds() < self.give_up:
            self.timer = self.clock.callLater(self.delay, self.check)
            self.delay = min(2 * self.delay, 1.0)
            return
        if in_flight and state != _TCP_CLOSE:
            # Giving up on a peer that has not acknowledged: a reset, so that
            # what the kernel still holds never reaches it after the message
            # went back (which would deliver it twice).
            try:
                self.probe.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
            state, acked = self._kernel_says()
        self.probe.close()
        delivered = min(self.flushed, acked)
        self.put_back([(queue, message) for end, queue, message in self.entries if end > delivered])
        self.done.callback(None)

    def decide_now(self) -> None:
        """Decide with what the kernel knows now (the server is stopping)."""
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if not self.done.called:
            self.check(decide=True)
