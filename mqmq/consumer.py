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
import math
from typing import Any, Callable, Optional, Union

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mqmq import errors
from mqmq.client import Delivery, MQClient, QueueName
from mqmq.reconnecting import ReconnectingClient

Handler = Callable[[Delivery], Any]

#: What a connection that breaks does to a request in flight.
_LOST = (errors.ConnectionClosed, errors.ReplyTimeout)


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

    On a :class:`~mqmq.reconnecting.ReconnectingClient` a broken connection
    does not end it: it waits for the next connection and reserves again.
    A message in hand when the connection broke is handed out again by the
    server (its ack fails, and is logged), so it may be handled twice.
    """

    log = Logger()

    def __init__(
        self,
        client: Union[MQClient, ReconnectingClient],
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
        #: A wait for the reconnecting client's next connection, while there is one.
        self._connecting: Optional[defer.Deferred[MQClient]] = None
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
        if self._connecting is not None:
            self._connecting.cancel()
        finished: defer.Deferred[None] = defer.Deferred()

        def ended(result: object) -> object:
            finished.callback(None)
            return result  # done keeps its outcome for whoever else waits on it

        self.done.addBoth(ended)
        return finished

    async def _run(self) -> None:
        while not self._stopping:
            connection = await self._connection()
            if connection is None:
                return  # stopped while waiting for a connection
            try:
                delivery = await connection.reserve(self.queue, self.wait, self.lease)
            except errors.GetTimeout:
                continue
            except _LOST as lost:
                if not self._reconnecting:
                    raise
                self.log.warn("reserving from {queue!r} failed: {error}; reserving again once reconnected",
                              queue=self.queue, error=lost)
                continue
            # Handled even when stopping meanwhile: giving it back would count
            # a delivery nobody made use of (and may bury it at --max-deliveries).
            await self._handle(delivery)

    @property
    def _reconnecting(self) -> bool:
        return isinstance(self.client, ReconnectingClient)

    async def _connection(self) -> Optional[MQClient]:
        """The connection to reserve on; None when stopped while waiting for one."""
        if not isinstance(self.client, ReconnectingClient):
            return self.client
        self._connecting = self.client.when_connected(math.inf)
        try:
            return await self._connecting
        except defer.CancelledError:
            return None
        finally:
            self._connecting = None

    async def _settled(self, delivery: Delivery, settling: defer.Deferred[None]) -> bool:
        """Whether an ack or release was done; on a reconnecting client, a
        connection that broke first is logged, not raised."""
        try:
            await settling
        except _LOST as lost:
            if not self._reconnecting:
                raise
            self.log.warn("message {id} of {queue!r} not settled ({error}): the server hands it out again",
                          id=delivery.message_id.decode("ascii", "replace"), queue=delivery.queue, error=lost)
            return False
        return True

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
            if await self._settled(delivery, delivery.release(self.retry_delay)):
                self.released += 1
        else:
            touching.stop()
            if await self._settled(delivery, delivery.ack()):
                self.acked += 1

    def _touch(self, delivery: Delivery) -> defer.Deferred[None]:
        def lost(failure: Any) -> None:
            # The next ack or release finds out for good; keep handling.
            self.log.warn("touching message {id} failed: {error}",
                          id=delivery.message_id.decode("ascii", "replace"), error=failure.value)

        return delivery.touch(self.lease).addErrback(lost)


def consume(
    client: Union[MQClient, ReconnectingClient],
    queue: QueueName,
    handler: Handler,
    **options: Any,
) -> Consumer:
    """Start a :class:`Consumer` of ``queue`` on ``client`` (options as its)."""
    return Consumer(client, queue, handler, **options).start()
