"""The broker: every queue, the ``Get``s waiting on them, and their timeouts.

A Twisted service that knows Deferreds and a clock, not transports.  The
server protocol calls it for each request; an application can call it
directly, with no socket at all.
"""

from __future__ import annotations

from typing import Iterator, Optional

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mqmq import errors
from mqmq.errors import GetTimeout
from mqmq.info import ServerInfo, encode_info_entries, queue_key, queue_name_text
from mqmq.limits import Limits
from mqmq.queue import MessageQueue


class Waiter:
    """A ``Get`` waiting on an empty queue for a message or its timeout."""

    __slots__ = ("queue", "deferred", "timer")

    def __init__(self, queue: MessageQueue) -> None:
        self.queue = queue
        self.deferred: defer.Deferred[bytes] = defer.Deferred(self._cancel)
        self.timer: Optional[IDelayedCall] = None

    def _cancel(self, _deferred: defer.Deferred[bytes]) -> None:
        # The consumer went away: it must never take a message.
        self.queue.remove_waiter(self)
        if self.timer is not None and self.timer.active():
            self.timer.cancel()

    def _time_out(self, timeout: float) -> None:
        self.queue.remove_waiter(self)
        self.deferred.errback(
            GetTimeout(f"no message on queue {queue_name_text(self.queue.name)!r} "
                       f"within {timeout:g} s")
        )


class Broker(service.Service):
    """Named FIFO queues with blocking ``get``.

    :param clock: the time source for ``get`` timeouts; ``task.Clock`` in tests.
    :param limits: bounds on queues and stored messages; see :class:`Limits`.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, limits: Limits = Limits()) -> None:
        self.clock = clock
        self.limits = limits
        self._queues: dict[bytes, MessageQueue] = {}
        #: Messages held across all queues.
        self.num_messages = 0
        #: Bytes of message payload held across all queues.
        self.num_bytes = 0
        #: Open client connections; the server protocol keeps this up to date.
        self.num_connections = 0
        # Every queue's escaped Info key, in name order, until a queue is added:
        # a server with 100,000 queues answers Info in 25 ms rather than 165
        # (measured in-process), so a client asking for it stalls others less.
        self._info_keys: Optional[list[tuple[str, MessageQueue]]] = None

    def _queue(self, name: bytes) -> MessageQueue:
        queue = self._queues.get(name)
        if queue is None:
            max_queues = self.limits.max_queues
            if max_queues and len(self._queues) >= max_queues:
                raise errors.RequestError(
                    errors.TOO_MANY_QUEUES, f"the server holds its limit of {max_queues} queues"
                )
            queue = self._queues[name] = MessageQueue(name)
            self._info_keys = None
        return queue

    def _check_room(self, message: bytes) -> None:
        limits = self.limits
        if limits.max_queued_messages and self.num_messages >= limits.max_queued_messages:
            raise errors.RequestError(
                errors.STORAGE_FULL,
                f"the server holds its limit of {limits.max_queued_messages} messages",
            )
        if limits.max_queued_bytes and self.num_bytes + len(message) > limits.max_queued_bytes:
            raise errors.RequestError(
                errors.STORAGE_FULL,
                f"the server holds {self.num_bytes} bytes of messages, "
                f"{limits.max_queued_bytes} at most",
            )

    def put(self, queue_name: bytes, message: bytes) -> None:
        """Store a message, or hand it at once to the longest waiting ``get``.

        :raises RequestError: when storing it would pass a limit (too many
            queues, too many messages or bytes held); nothing is stored then.
        """
        existing = self._queues.get(queue_name)
        if existing is None or not existing.waiters:
            # Before creating the queue: a refused Put leaves nothing behind.
            self._check_room(message)
        queue = self._queue(queue_name)
        waiter = queue.pop_waiter()
        if waiter is None:
            queue.push(message)
            self.num_messages += 1
            self.num_bytes += len(message)
            return
        if waiter.timer is not None:
            waiter.timer.cancel()
        waiter.deferred.callback(message)

    def put_back(self, queue_name: bytes, message: bytes) -> None:
        """Return a message that could not be delivered to the front of its queue.

        A waiting ``get`` takes it at once, as it would a new message.  Limits
        do not apply: the message was already accepted.
        """
        queue = self._queue(queue_name)
        if queue.waiters:
            self.put(queue_name, message)
            return
        queue.push_front(message)
        self.num_messages += 1
        self.num_bytes += len(message)

    def take(self, queue_name: bytes) -> Optional[bytes]:
        """Remove and return the oldest message of a queue, or ``None`` if empty.

        Creates the queue if it does not exist, as a ``Get`` does.
        """
        message = self._queue(queue_name).pop()
        if message is not None:
            self.num_messages -= 1
            self.num_bytes -= len(message)
        return message

    def wait(self, queue_name: bytes, timeout: float) -> defer.Deferred[bytes]:
        """Wait for the next message put on a queue.

        The Deferred fires with the message, fails with :class:`GetTimeout`
        after ``timeout`` seconds, and cancelling it withdraws the waiter.
        Waiters are served in the order they started waiting.
        """
        queue = self._queue(queue_name)
        waiter = Waiter(queue)
        queue.add_waiter(waiter)
        waiter.timer = self.clock.callLater(timeout, waiter._time_out, timeout)
        return waiter.deferred

    def get(self, queue_name: bytes, timeout: float) -> defer.Deferred[bytes]:
        """The oldest message of a queue, waiting up to ``timeout`` seconds for one."""
        message = self.take(queue_name)
        if message is not None:
            return defer.succeed(message)
        return self.wait(queue_name, timeout)

    def queue_sizes(self) -> Iterator[tuple[bytes, int]]:
        """Each queue's name and the number of messages it holds."""
        for name, queue in self._queues.items():
            yield name, len(queue)

    @property
    def num_queues(self) -> int:
        return len(self._queues)

    def info_json(self) -> bytes:
        """The ``Info`` reply body, as the original server encodes it."""
        if self._info_keys is None:
            self._info_keys = [(queue_key(name), self._queues[name]) for name in sorted(self._queues)]
        return encode_info_entries(
            self.num_connections, self.num_messages,
            [(key, len(queue)) for key, queue in self._info_keys],
        )

    def info(self) -> ServerInfo:
        """A snapshot of connections, queues and messages."""
        return ServerInfo.from_json(self.info_json())

    def stopService(self) -> defer.Deferred[None] | None:
        """Withdraw every waiting ``get`` and cancel its timer; messages stay."""
        for queue in self._queues.values():
            while (waiter := queue.pop_waiter()) is not None:
                waiter.deferred.cancel()
        return super().stopService()
