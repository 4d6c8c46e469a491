"""One named FIFO queue: its messages and the ``Get``s waiting on it."""

from __future__ import annotations

import sys
from collections import OrderedDict, deque
from struct import Struct
from typing import TYPE_CHECKING, Optional, Union

if TYPE_CHECKING:
    from mqmq.broker import Waiter

_UINT32 = Struct(">I")

#: Messages shorter than this are packed together once a queue backs up.
PACK_BELOW = 512
#: Bytes of short messages gathered before they are packed into one segment.
#: CPython frees the tail's messages the moment they are packed.  PyPy's GC
#: moves those a minor collection finds in the tail to the old generation,
#: where they wait for the next major collection, so its tail is kept short.
#: Resident after 1,000,000 100-byte Puts (``mqmq start``, one connection,
#: 128 in flight): CPython 133.5 MB at 64 KiB, 150.9 MB at 4 KiB; PyPy 7.3.11
#: 244-246 MB at 64 KiB, 227 at 16 KiB, 218 at 8 KiB, 209-218 at 4 KiB, 217
#: at 2 KiB.
SEGMENT_BYTES = 4 * 1024 if sys.implementation.name == "pypy" else 64 * 1024


class _Segment:
    """Short messages packed into one bytes object, each behind its length.

    A bytes object costs 33 bytes of header and rounding on top of its
    payload, plus 8 for its slot in a deque: for 100-byte messages, 40% more
    memory than the payload.  Packed, a message costs its length prefix.
    """

    __slots__ = ("data", "offset", "remaining")

    def __init__(self, messages: deque[bytes]) -> None:
        pack = _UINT32.pack
        self.data = b"".join([part for message in messages for part in (pack(len(message)), message)])
        self.offset = 0
        self.remaining = len(messages)

    def pop(self) -> bytes:
        (length,) = _UINT32.unpack_from(self.data, self.offset)
        start = self.offset + 4
        self.offset = start + length
        self.remaining -= 1
        return self.data[start : self.offset]


class MessageQueue:
    """Messages oldest first, and waiters in the order they started waiting.

    A queue never holds messages and waiters at once: a message arriving
    while someone waits goes straight to the oldest waiter.

    New messages gather in a short *tail*; once the tail holds
    :data:`SEGMENT_BYTES` of short messages it is packed into one segment.
    A consumer that keeps up takes messages from the tail and never pays
    for packing.
    """

    __slots__ = ("name", "_packed", "_tail", "_tail_bytes", "_count", "num_bytes", "waiters")

    def __init__(self, name: bytes) -> None:
        self.name = name
        # Older messages: segments, and long (or returned) messages as they are.
        self._packed: deque[Union[bytes, _Segment]] = deque()
        self._tail: deque[bytes] = deque()
        self._tail_bytes = 0
        self._count = 0
        #: Bytes of message payload held.
        self.num_bytes = 0
        # An OrderedDict is an ordered set with O(1) removal of any waiter,
        # which a departing or timed-out waiter needs.
        self.waiters: OrderedDict[Waiter, None] = OrderedDict()

    def __len__(self) -> int:
        return self._count

    def push(self, message: bytes) -> None:
        """Add a message at the back."""
        self._count += 1
        self.num_bytes += len(message)
        if len(message) >= PACK_BELOW:
            # Copying a long message into a segment would cost more than it saves.
            self._seal()
            self._packed.append(message)
            return
        self._tail.append(message)
        self._tail_bytes += len(message) + 4
        if self._tail_bytes >= SEGMENT_BYTES:
            self._seal()

    def _seal(self) -> None:
        if self._tail:
            self._packed.append(_Segment(self._tail))
            self._tail = deque()
            self._tail_bytes = 0

    def push_front(self, message: bytes) -> None:
        """Put back a message that could not be delivered, to go out next."""
        self._count += 1
        self.num_bytes += len(message)
        self._packed.appendleft(message)

    def pop(self) -> Optional[bytes]:
        """Remove and return the oldest message, or ``None`` when empty."""
        if not self._count:
            return None
        self._count -= 1
        packed = self._packed
        if packed:
            oldest = packed[0]
            if isinstance(oldest, _Segment):
                message = oldest.pop()
                if not oldest.remaining:
                    packed.popleft()
            else:
                message = oldest
                packed.popleft()
        else:
            message = self._tail.popleft()
            self._tail_bytes -= len(message) + 4
        self.num_bytes -= len(message)
        return message

    def add_waiter(self, waiter: Waiter) -> None:
        self.waiters[waiter] = None

    def remove_waiter(self, waiter: Waiter) -> None:
        self.waiters.pop(waiter, None)

    def pop_waiter(self) -> Optional[Waiter]:
        """Remove and return the waiter that has waited longest, if any."""
        if not self.waiters:
            return None
        return self.waiters.popitem(last=False)[0]
