"""One named FIFO queue: its messages and the ``Get``s waiting on it."""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from mqmq.broker import Waiter


class MessageQueue:
    """Messages oldest first, and waiters in the order they started waiting.

    A queue never holds messages and waiters at once: a message arriving
    while someone waits goes straight to the oldest waiter.
    """

    __slots__ = ("name", "_messages", "num_bytes", "waiters")

    def __init__(self, name: bytes) -> None:
        self.name = name
        self._messages: deque[bytes] = deque()
        #: Bytes of message payload held.
        self.num_bytes = 0
        # An OrderedDict is an ordered set with O(1) removal of any waiter,
        # which a departing or timed-out waiter needs.
        self.waiters: OrderedDict[Waiter, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._messages)

    def push(self, message: bytes) -> None:
        """Add a message at the back."""
        self._messages.append(message)
        self.num_bytes += len(message)

    def push_front(self, message: bytes) -> None:
        """Put back a message that could not be delivered, to go out next."""
        self._messages.appendleft(message)
        self.num_bytes += len(message)

    def pop(self) -> Optional[bytes]:
        """Remove and return the oldest message, or ``None`` when empty."""
        if not self._messages:
            return None
        message = self._messages.popleft()
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
