"""Consume a queue with acknowledged delivery: a handler per message, acked
when it succeeds, released when it fails, its lease kept alive while it runs.

::

    def handle(delivery):
        print(delivery.message)       # or return a Deferred, or be ``async``

    consumer = consume(client, "jobs", handle)
    ...
    yield consumer.stop()            # once the message in hand is settled
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mqmq import errors
from mqmq.client import Delivery, MQClient, QueueName

Handler = Callable[[Delivery], Any]


class Consumer:
    """Reserves messages of one queue, one at a time, and runs a handler on each.

    - The handler gets the :class:`~mqmq.client.Delivery` (its ``message``,
      ``deliveries`` ...) and may return a value, a Deferred or a coroutine.
    - It succeeds: the message is acked.  It raises or fails: the failure is
      logged and the message released (after ``retry_delay`` seconds) for
      another try, or for ``--max-deliveries`` to bury.
    - While it runs, the reservation is touched every ``lease / 2`` seconds,
      so work longer than a lease keeps the message.
    - :meth:`stop` ends it once the message in hand (if any) is settled; a
      ``Reserve`` still waiting is let finish, and what it brings handled.

    :attr:`done` fires when it has stopped, or fails with what ended it (the
    connection closed, the server refused the commands).
    """

    log = Logger()

    def __init__(
        self,
        client: MQClient,
        queue: QueueName,
        handler: Handler,
        *,
        lease: float = 30.0,
        wait: float = 5.0,
        retry_delay: float = 0.0,
        clock: Optional[IReactorTime] = None,
    ) -> None:
        """:param lease: seconds of each reservation (and of each touch).
        :param wait: seconds each ``Reserve`` waits for a message before
            asking again (and at most how long :meth:`stop` waits for one).
        :param retry_delay: seconds a failed message stays out of its queue.
        :param clock: times the touches; the client's clock if not given.
        """
        self.client = client
        self.queue = queue
        self.handler = handler
        self.lease = lease
        self.wait = wait
        self.retry_delay = retry_delay
        self.clock = clock if clock is not None else client.clock
        self._stopping = False
        #: Fires once it has stopped (None), or with the failure that ended it.
        self.done: defer.Deferred[None] = defer.Deferred()
        #: Messages acked, and released after a failure of the handler.
        self.acked = 0
        self.released = 0

    def start(self) -> Consumer:
        defer.ensureDeferred(self._run()).chainDeferred(self.done)
        return self

    def stop(self) -> defer.Deferred[None]:
        """Stop once the message in hand is settled; fires when it has
        (whether it ended well or not: see :attr:`done`)."""
        self._stopping = True
        finished: defer.Deferred[None] = defer.Deferred()

        def ended(result: object) -> object:
            finished.callback(None)
            return result  # done keeps its outcome for whoever else waits on it

        self.done.addBoth(ended)
        return finished

    async def _run(self) -> None:
        while not self._stopping:
            try:
                delivery = await self.client.reserve(self.queue, self.wait, self.lease)
            except errors.GetTimeout:
                continue
            # Handled even when stopping meanwhile: giving it back would count
            # a delivery nobody made use of (and may bury it at --max-deliveries).
            await self._handle(delivery)

    async def _handle(self, delivery: Delivery) -> None:
        touching = task.LoopingCall(self._touch, delivery)
        if self.clock is not None:
            touching.clock = self.clock
        touching.start(self.lease / 2, now=False)
        try:
            result = self.handler(delivery)
            if inspect.iscoroutine(result):
                result = defer.ensureDeferred(result)
            if isinstance(result, defer.Deferred):
                await result
        except Exception:
            self.log.failure("handling message {id} of {queue!r} failed; it goes back",
                             id=delivery.message_id.decode("ascii", "replace"), queue=delivery.queue)
            touching.stop()
            await delivery.release(self.retry_delay)
            self.released += 1
        else:
            touching.stop()
            await delivery.ack()
            self.acked += 1

    def _touch(self, delivery: Delivery) -> defer.Deferred[None]:
        def lost(failure: Any) -> None:
            # The next ack or release finds out for good; keep handling.
            self.log.warn("touching message {id} failed: {error}",
                          id=delivery.message_id.decode("ascii", "replace"), error=failure.value)

        return delivery.touch(self.lease).addErrback(lost)


def consume(
    client: MQClient,
    queue: QueueName,
    handler: Handler,
    **options: Any,
) -> Consumer:
    """Start a :class:`Consumer` of ``queue`` on ``client`` (options as its)."""
    return Consumer(client, queue, handler, **options).start()
