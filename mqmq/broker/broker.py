"""The broker: every queue, the ``Get``s waiting on them, and their timeouts.

A Twisted service that knows Deferreds and a clock, not transports.  The
server protocol calls it for each request; an application can call it
directly, with no socket at all.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable, Iterator, Optional, Union, cast

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mqmq import errors
from mqmq.errors import ConsumerGone, GetTimeout
from mqmq.wire.info import (
    ENTRY_OVERHEAD,
    INFO_END,
    ServerInfo,
    encode_extended_end,
    encode_extended_entry,
    encode_info_entry,
    encode_info_header,
    queue_name_text,
)
from mqmq.broker.leases import Leases
from mqmq.broker.limits import Limits
from mqmq.broker.stats import Counters
from mqmq.stores.base import Entry, RemoteQueue, RemoteStore, ReservingQueue, Store, StoredQueue
from mqmq.stores.memory import MemoryStore

#: Work done in one turn of the reactor while building a large ``Info``:
#: at most this many queues' entries, or this many bytes of JSON.  Measured
#: (``python benchmarks/info_attack.py``, and per entry in-process): plain
#: ASCII names cost about 1 us an entry, accented or invalid UTF-8 ones up to
#: 10 us an entry and 45 us a KiB, so a slice takes a few milliseconds at most.
INFO_SLICE_QUEUES = 500
INFO_SLICE_BYTES = 64 * 1024

#: A ``get`` whose timeout ends while its queue holds messages that the
#: store has not yet fetched (from the disk) waits up to this much longer
#: for them rather than answer ``Timeout`` on a queue that is not empty.
FETCH_GRACE_SECONDS = 5.0

# The shortest possible Info: no queue, every count a single digit.
_INFO_FIXED_BYTES = len(encode_info_header(0, 0, 0)) + len(INFO_END)


def _check_name(queue_name: object) -> None:
    if type(queue_name) is not bytes:
        raise TypeError(
            f"queue names are bytes, not {type(queue_name).__name__}: {queue_name!r}"
        )


class QueueState:
    """One queue as the broker sees it: its messages (kept by the store) and
    the ``Get``s waiting on it.

    A queue never holds messages *at hand* and waiters at once: a message
    arriving while someone waits goes straight to the oldest waiter.  It may
    hold messages that its store is still fetching (``pop()`` answers
    ``None``) while ``Get``s wait: those go to the waiters when the store
    says they have arrived, and new messages wait behind them.
    """

    __slots__ = ("name", "messages", "waiters", "reserved", "buried", "reservers")

    def __init__(self, name: bytes, messages: StoredQueue) -> None:
        self.name = name
        self.messages = messages
        #: Its messages handed out by ``Reserve`` and not yet done with
        #: (released with a delay included), and those buried.
        self.reserved = 0
        self.buried = 0
        #: Its waiters that are Reserves: a message handed to one is kept.
        self.reservers = 0
        # An OrderedDict is an ordered set with O(1) removal of any waiter,
        # which a departing or timed-out waiter needs.
        self.waiters: OrderedDict[Waiter, None] = OrderedDict()

    def pop_waiter(self) -> Optional[Waiter]:
        """Remove and return the waiter that has waited longest, if any."""
        if not self.waiters:
            return None
        waiter = self.waiters.popitem(last=False)[0]
        if waiter.lease is not None:
            self.reservers -= 1
        return waiter

    @property
    def holds_nothing(self) -> bool:
        """No message ready, reserved or buried, and nobody waiting: it may be forgotten."""
        return not self.messages and not self.waiters and not self.reserved and not self.buried


class Waiter:
    """A ``Get`` waiting on an empty queue for a message or its timeout.

    ``present``, when given, says whether the consumer is still there; a
    waiter whose consumer has gone is passed over and fails with
    :class:`ConsumerGone`, and the message goes to the next one.
    """

    __slots__ = ("broker", "queue", "deferred", "timer", "present", "extended", "lease", "owner")

    def __init__(
        self, broker: Broker, queue: QueueState, present: Optional[Callable[[], bool]],
        lease: Optional[float] = None, owner: object = None,
    ) -> None:
        self.broker = broker
        self.queue = queue
        self.present = present
        # Fires with the message (a Get), or its Entry (a Reserve).
        self.deferred: defer.Deferred[Any] = defer.Deferred(self._cancel)
        #: A ``Reserve``'s lease (seconds) and who will hold the reservation;
        #: None for a ``Get``.
        self.lease = lease
        self.owner = owner
        self.timer: Optional[IDelayedCall] = None
        # Whether its timeout was put off once while the store fetched.
        self.extended = False

    def _cancel(self, _deferred: defer.Deferred[Any]) -> None:
        # The consumer went away: it must never take a message.
        self.broker._withdraw(self)
        if self.timer is not None and self.timer.active():
            self.timer.cancel()

    def _time_out(self, timeout: float) -> None:
        messages = self.queue.messages
        if not self.extended and (messages or self.broker._remote and cast(RemoteQueue, messages).fetching):
            # The queue is not empty: its store is fetching messages (from a
            # disk), which go to the waiters as soon as they are in.
            self.extended = True
            self.timer = self.broker.clock.callLater(FETCH_GRACE_SECONDS, self._time_out, timeout)
            return
        self._expire(timeout)

    def _expire(self, timeout: float) -> None:
        self.broker._withdraw(self)
        self.deferred.errback(
            GetTimeout(f"no message on queue {queue_name_text(self.queue.name)!r} "
                       f"within {timeout:g} s")
        )

    def _consumer_gone(self) -> bool:
        if self.present is None:
            return False
        try:
            return not self.present()
        except Exception:
            Broker.log.failure("checking whether a waiting consumer is there failed")
            return True


class Reservation:
    """A message handed out by ``Reserve``: its owner's until acked,
    released, buried, or its lease ends (then it goes back to the front)."""

    __slots__ = ("queue_name", "entry", "owner", "timer")

    def __init__(self, queue_name: bytes, entry: Entry, owner: object) -> None:
        self.queue_name = queue_name
        self.entry = entry
        #: None once released with a delay: nobody's, back when it ends.
        self.owner: object = owner
        #: Once released with a delay: when it comes back.  (Its lease is
        #: kept by the broker's Leases.)
        self.timer: Optional[IDelayedCall] = None


#: What the hand-over loop carries: a message, or a reservation's entry that came back.
_Item = Union[bytes, Entry]


class Broker(service.Service):
    """Named FIFO queues with blocking ``get``.

    Queue names are ``bytes``; every method refuses anything else with
    :class:`TypeError`.

    :param clock: the time source for ``get`` timeouts; ``task.Clock`` in tests.
    :param limits: bounds on queues and stored messages; see :class:`Limits`.
    :param store: where messages are kept (:class:`MemoryStore` unless
        given); a durable store's queues are read back at once.  Whoever
        runs the broker starts the store before serving and stops it once
        every connection has closed (``MQService`` does).
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, limits: Limits = Limits(), store: Optional[Store] = None) -> None:
        self.clock = clock
        self.limits = limits
        #: When it was made (``clock.seconds()``), and what it has done since.
        self.started = clock.seconds()
        self.counters = Counters()
        self.store: Store = store if store is not None else MemoryStore()
        self._queues: dict[bytes, QueueState] = {}
        # Queue names in byte order, for Info; kept sorted as queues come and
        # go, since sorting 100,000 names at each Info would stall the reactor.
        self._sorted_names: list[bytes] = []
        # Bytes of all queue names: with it, Info's least possible size is
        # known without encoding anything.
        self._names_bytes = 0
        # Queues that hold nothing (no messages, no waiters), least recently
        # used first: the ones forgotten to make room for a new queue at
        # --max-queues.  A queue leaves it as soon as it holds something.
        # (An OrderedDict: taking from the front of a plain dict, again and
        # again, rescans the slots freed before: 100,000 queues took 5 s.)
        self._idle: OrderedDict[bytes, None] = OrderedDict()
        #: Messages held across all queues.
        self.num_messages = 0
        #: Bytes of message payload held across all queues.
        self.num_bytes = 0
        #: Open client connections; the server protocol keeps this up to date.
        self.num_connections = 0
        # Messages being handed to waiters.  A waiter's callback may put a
        # message back (its consumer turned out gone); that one waits here for
        # the loop in _offer instead of recursing, one frame per waiter.
        self._offers: Optional[deque[tuple[bytes, tuple[_Item, ...], bool]]] = None
        # The id of the message a put stored after passing over departed waiters.
        self._stored_id: Optional[int] = None
        self.store.dropped = self._dropped
        self.store.arrived = self._arrived
        # Acknowledged delivery: reservations by (queue, id), and each
        # owner's, oldest first.
        self._reservations: dict[tuple[bytes, int], Reservation] = {}
        self._owned: dict[object, dict[tuple[bytes, int], Reservation]] = {}
        # Released with a delay, waiting to come back.
        self._delayed: set[Reservation] = set()
        # Each reservation's lease (not those released with a delay).
        self._leases: Leases[Reservation] = Leases(clock, self._lease_ended)
        #: Messages reserved (delayed releases included) and buried, across queues.
        self.num_reserved = 0
        self.num_buried = 0
        #: Whether any queue has held a reserved or buried message: from
        #: then on Info carries their counts.
        self.reservations_seen = False
        self._max_deliveries = limits.max_deliveries if self.store.acknowledged_delivery else 0
        self._store_open = False
        #: Whether queues live elsewhere, shared with other servers (Redis):
        #: then messages reach waiters through the store, never in-process.
        self._remote = self.store.remote
        if self._remote:
            remote = cast(RemoteStore, self.store)
            remote.waiting = self._waiting_leases
            remote.recounted = self._recounted
            remote.max_deliveries = self._max_deliveries

    def privilegedStartService(self) -> None:
        """Open the store and read its queues back (before any listener listens).

        :raises StoreError: the store cannot be opened.
        """
        self._open_store()
        super().privilegedStartService()

    def startService(self) -> None:
        """As :meth:`privilegedStartService`, if that was not called."""
        self._open_store()
        super().startService()

    def _open_store(self) -> None:
        if self._store_open:
            return
        self.store.open()
        self._store_open = True
        for messages in self.store.recovered():
            queue = self._queues[messages.name] = QueueState(messages.name, messages)
            insort(self._sorted_names, messages.name)
            self._names_bytes += len(messages.name)
            self.num_messages += len(messages)
            self.num_bytes += messages.num_bytes
            if self.store.acknowledged_delivery:
                self._recover_reservations(queue)
            if queue.holds_nothing:
                self._idle[queue.name] = None
        if not isinstance(self.store, MemoryStore):
            self.log.info("keeping messages in {store}: {queues} queues and {messages} messages read back",
                          store=self.store.describe(), queues=len(self._queues),
                          messages=self.num_messages)
        self.store.start()

    def _recover_reservations(self, queue: QueueState) -> None:
        # Buried messages are still buried; reserved ones are ready again,
        # at the front, their deliveries counted.
        messages = cast(ReservingQueue, queue.messages)
        queue.buried = messages.num_buried
        self.num_buried += queue.buried
        self.num_bytes += messages.buried_bytes
        if queue.buried or messages.front_deliveries():
            self.reservations_seen = True

    # Queues ----------------------------------------------------------------

    def _queue(self, name: bytes, limited: bool = True) -> QueueState:
        queue = self._queues.get(name)
        if queue is None:
            max_queues = self.limits.max_queues
            if (
                limited and max_queues and len(self._queues) >= max_queues
                and not self._forget_an_idle_queue()
            ):
                raise errors.RequestError(
                    errors.TOO_MANY_QUEUES, f"the server holds its limit of {max_queues} queues"
                )
            queue = self._queues[name] = QueueState(name, self.store.queue(name))
            insort(self._sorted_names, name)
            self._names_bytes += len(name)
        return queue

    def _forget_an_idle_queue(self) -> bool:
        """Forget the least recently used queue that holds nothing, if any."""
        idle = self._idle
        while idle:
            name, _ = idle.popitem(last=False)
            queue = self._queues[name]
            if queue.holds_nothing:
                self.store.forget(queue.messages)
                del self._queues[name]
                del self._sorted_names[bisect_left(self._sorted_names, name)]
                self._names_bytes -= len(name)
                return True
        return False

    def _touch_idle(self, queue: QueueState) -> None:
        # Moved to the end: the most recently used of the idle queues.
        idle = self._idle
        if queue.name in idle:
            idle.move_to_end(queue.name)
        else:
            idle[queue.name] = None

    def _check_room(self, message: bytes) -> None:
        failure = self.store.failure
        if failure is not None:
            raise errors.RequestError(errors.STORAGE_ERROR, failure)
        limits = self.limits
        if limits.max_queued_messages and (
            self.num_messages + self.num_reserved + self.num_buried >= limits.max_queued_messages
        ):
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

    # Messages in -----------------------------------------------------------

    def put(self, queue_name: bytes, message: bytes) -> Optional[int]:
        """Store a message, or hand it at once to the longest waiting ``get``.

        Returns the message's id in a durable store, to be checked against
        the store's pending batch (:meth:`Batch.refused`) before answering
        ``OK``; ``None`` when there is nothing to wait for.

        :raises RequestError: when storing it would pass a limit (too many
            queues, too many messages or bytes held); nothing is stored then.
        :raises TypeError: when ``queue_name`` or ``message`` is not ``bytes``.
        """
        if type(queue_name) is not bytes or type(message) is not bytes:
            _check_name(queue_name)
            raise TypeError(f"messages are bytes, not {type(message).__name__}")
        existing = self._queues.get(queue_name)
        if self._remote:
            return self._put_remote(queue_name, message)
        if existing is None or not existing.waiters or existing.messages or existing.reservers:
            # Before creating the queue: a refused Put leaves nothing behind.
            # (Waiters and messages at once: the store is fetching those, and
            # this one will be stored behind them, so it must fit.  A waiting
            # Reserve keeps what it takes: that must fit too.)
            self._check_room(message)
        elif self.store.failure is not None:
            raise errors.RequestError(errors.STORAGE_ERROR, self.store.failure)
        queue = self._queue(queue_name)
        if not queue.waiters and self._offers is None:
            # The common case, inline: nobody waits, no hand-over loop to enter.
            messages = queue.messages
            if not messages:
                self._idle.pop(queue_name, None)
            self.num_messages += 1
            self.num_bytes += len(message)
            return messages.push(message)
        # Waiters first; the message is stored if none is still there.
        self._stored_id = None
        handed: Optional[int] = None
        if self.store.durable and not queue.messages:
            # Recorded as added and taken in the store's open batch (which
            # never writes the two): the OK and the reply to the waiter then
            # both wait for that batch, so neither goes out alone.
            handed = queue.messages.push(message)
            queue.messages.pop()
        self._offer(queue_name, (message,), front=False)
        return self._stored_id if self._stored_id is not None else handed

    def _put_remote(self, queue_name: bytes, message: bytes) -> Optional[int]:
        # Into the store, whoever waits: the store's take hands it over, in
        # the order the queue's servers put their messages.
        self._check_room(message)
        queue = self._queue(queue_name)
        messages = queue.messages
        self._idle.pop(queue_name, None)
        self.num_messages += 1
        self.num_bytes += len(message)
        return messages.push(message)

    def _waiting_leases(self, queue_name: bytes) -> list[int]:
        """The leases (ms; -1 for a ``Get``) of a queue's waiters, oldest first."""
        queue = self._queues.get(queue_name)
        if queue is None:
            return []
        return [-1 if waiter.lease is None else int(waiter.lease * 1000) for waiter in queue.waiters]

    def _recounted(self, queue_name: bytes, ready: int, ready_bytes: int, buried: int,
                   buried_bytes: int) -> None:
        # A remote store's queue changed by other servers (or counted afresh).
        self.num_messages += ready
        self.num_bytes += ready_bytes + buried_bytes
        self.num_buried += buried
        queue = self._queues.get(queue_name)
        if queue is None:
            return
        queue.buried += buried
        if queue.buried:
            self.reservations_seen = True
        if queue.holds_nothing:
            self._touch_idle(queue)
        else:
            self._idle.pop(queue_name, None)

    def put_back(self, queue_name: bytes, *messages: bytes) -> None:
        """Return messages that could not be delivered, oldest first, to the
        front of their queue, in their order.

        Waiting ``get``s take them at once, the oldest first, as they would new
        messages.  Limits do not apply: the messages were already accepted.
        Their queue comes back if it was forgotten meanwhile, whatever
        ``--max-queues`` says, rather than lose them.
        """
        _check_name(queue_name)
        if messages:
            self.counters.returned += len(messages)
            self._offer(queue_name, messages, front=True)

    def _store(self, queue: QueueState, message: bytes, front: bool) -> None:
        messages = queue.messages
        if not messages:
            self._idle.pop(queue.name, None)
        if front:
            messages.push_front(message)
        else:
            self._stored_id = messages.push(message)
        self.num_messages += 1
        self.num_bytes += len(message)

    def _offer(self, queue_name: bytes, messages: tuple[_Item, ...], front: bool) -> None:
        """Hand messages to the oldest waiters still there, and keep the rest."""
        if self._remote:
            # Back into the store: its take hands them to the waiters.
            self._keep(queue_name, messages, front)
            queue = self._queues.get(queue_name)
            if queue is not None and queue.waiters:
                cast(RemoteQueue, queue.messages).want()
            return
        offers = self._offers
        if offers is not None:
            # From a waiter's callback, inside the loop below: they go next.
            offers.append((queue_name, messages, front))
            return
        self._offers = offers = deque([(queue_name, messages, front)])
        handed = [0]
        try:
            while offers:
                queue_name, messages, front = offers[0]
                handed[0] = 0
                self._hand_over(queue_name, messages, front, handed)
                offers.popleft()
        finally:
            self._offers = None
            # Only if something raised: no message is dropped on the way.
            if offers:
                queue_name, messages, front = offers.popleft()
                offers.appendleft((queue_name, messages[handed[0]:], front))
            for queue_name, messages, front in offers:
                self._keep(queue_name, messages, front)

    def _hand_over(
        self, queue_name: bytes, messages: tuple[_Item, ...], front: bool, handed: list[int]
    ) -> None:
        if not front:
            queue = self._queues.get(queue_name)
            if queue is not None and queue.messages:
                # Older messages the store is still fetching come first
                # (see Store.arrived); a new one waits behind them.
                self._keep(queue_name, messages, front)
                return
        for index, message in enumerate(messages):
            if self._max_deliveries and self._spent(message):
                # A reservation back from a lease or a release, handed out
                # as many times as allowed: buried, not handed out again.
                handed[0] = index + 1
                self._bury_reserved(self._queue(queue_name, limited=False), cast(Entry, message))
                continue
            waiter = self._next_waiter(queue_name)
            if waiter is None:
                self._keep(queue_name, messages[index:], front)
                return
            handed[0] = index + 1
            if waiter.lease is None:
                if type(message) is Entry:
                    # A Get takes a reservation that came back: done with.
                    self._done_with(self._queue(queue_name, limited=False), message)
                    waiter.deferred.callback(message.message)
                else:
                    waiter.deferred.callback(message)
            else:
                waiter.deferred.callback(self._reserve_handed(queue_name, message, waiter))

    def _spent(self, item: _Item) -> bool:
        """Whether a reservation that came back was handed out as many times
        as ``--max-deliveries`` allows (then it is buried, wherever it lands).
        Asked only when there is such a limit (the hand-over loop is hot)."""
        return type(item) is Entry and item.deliveries >= self._max_deliveries

    def _keep(self, queue_name: bytes, messages: tuple[_Item, ...], front: bool) -> None:
        # Looked up afresh: a callback may have let the queue be forgotten.
        queue = self._queue(queue_name, limited=False)
        for message in reversed(messages) if front else messages:
            if self._max_deliveries and self._spent(message):
                # Handed out as many times as allowed: buried, not ready.
                self._bury_reserved(queue, cast(Entry, message))
                continue
            if type(message) is Entry:
                # A reservation back to the front, ready again.
                if not queue.messages:
                    self._idle.pop(queue.name, None)
                cast(ReservingQueue, queue.messages).release(message)
                queue.reserved -= 1
                self.num_reserved -= 1
                self.num_messages += 1
            else:
                self._store(queue, cast(bytes, message), front)

    def _next_waiter(self, queue_name: bytes) -> Optional[Waiter]:
        """The longest waiting ``get`` whose consumer is still there, if any.

        A loop, not recursion: thousands of departed waiters are passed over
        (each failing with ConsumerGone) in one frame.
        """
        while True:
            queue = self._queues.get(queue_name)
            waiter = queue.pop_waiter() if queue is not None else None
            if queue is None or waiter is None:
                return None
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            if not queue.waiters:
                self._touch_idle(queue)
            if not waiter._consumer_gone():
                return waiter
            waiter.deferred.errback(ConsumerGone("the consumer went away while it waited"))

    # Messages out ----------------------------------------------------------

    def take(self, queue_name: bytes) -> Optional[bytes]:
        """Remove and return the oldest message of a queue, or ``None`` if it
        has none at hand (it is empty, or its store is fetching them: a
        ``get`` then waits for them).

        Creates the queue if it does not exist, as a ``Get`` does.
        """
        if type(queue_name) is not bytes:
            _check_name(queue_name)
        if self._remote:
            self._check_reachable()
        queue = self._queue(queue_name)
        if queue.waiters:
            # Gets that came first wait for what the store is fetching.
            return None
        return self._pop(queue)

    def _check_reachable(self) -> None:
        # A store kept elsewhere that cannot be reached has nothing to hand out.
        failure = self.store.failure
        if failure is not None:
            raise errors.RequestError(errors.STORAGE_ERROR, failure)

    def _pop(self, queue: QueueState) -> Optional[bytes]:
        if self._max_deliveries:
            self._bury_spent(queue)
        messages = queue.messages
        message = messages.pop()
        if message is not None:
            self.num_messages -= 1
            self.num_bytes -= len(message)
        if not messages and not queue.waiters:
            self._touch_idle(queue)
        return message

    def _arrived(self, queue_name: bytes) -> None:
        # The store has at hand messages it had to fetch (or kicked back):
        # they go to the Gets and Reserves that found none at hand and wait,
        # oldest first, each taking its message as it would have at once.
        queue = self._queues.get(queue_name)
        while queue is not None and queue.waiters and queue.messages:
            waiter = self._first_present(queue)
            if waiter is None:
                return
            if waiter.lease is None:
                item: Any = self._pop(queue)
            else:
                item = self._reserve(queue, waiter.lease, waiter.owner)
            if item is None:
                return  # the rest are still being fetched
            self._withdraw(waiter)
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            waiter.deferred.callback(item)
            queue = self._queues.get(queue_name)
        if self._remote and queue is not None and queue.waiters:
            self._expire_overdue(queue)

    def _expire_overdue(self, queue: QueueState) -> None:
        # Waiters whose timeouts passed while the store took for them, and
        # got nothing: their wait is over.
        if cast(RemoteQueue, queue.messages).fetching:
            return
        for waiter in [waiter for waiter in queue.waiters if waiter.extended]:
            timer = waiter.timer
            if timer is not None and timer.active():
                (timeout,) = cast(Any, timer).args
                timer.cancel()
                waiter.timer = None
                waiter._expire(timeout)

    def _first_present(self, queue: QueueState) -> Optional[Waiter]:
        """The longest waiting waiter whose consumer is still there, left
        waiting (those gone before it are passed over, as in ``_next_waiter``)."""
        while queue.waiters:
            waiter = next(iter(queue.waiters))
            if not waiter._consumer_gone():
                return waiter
            self._withdraw(waiter)
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            waiter.deferred.errback(ConsumerGone("the consumer went away while it waited"))
        return None

    def _dropped(self, queue_name: bytes, message: bytes) -> None:
        # The store lost a message it had taken (its write failed): the
        # Put is answered with an error, and the counts follow.
        self.num_messages -= 1
        self.num_bytes -= len(message)
        queue = self._queues.get(queue_name)
        if queue is not None and not queue.messages and not queue.waiters:
            self._touch_idle(queue)

    def wait(
        self, queue_name: bytes, timeout: float, present: Optional[Callable[[], bool]] = None
    ) -> defer.Deferred[bytes]:
        """Wait for the next message put on a queue.

        The Deferred fires with the message, fails with :class:`GetTimeout`
        after ``timeout`` seconds, and cancelling it withdraws the waiter.
        Waiters are served in the order they started waiting.

        :param present: says whether the consumer is still there, asked just
            before a message is handed over: a consumer that has gone is
            passed over (its Deferred fails with :class:`ConsumerGone`) and
            never takes a message.
        """
        return self._wait(queue_name, timeout, present, None, None)

    def _wait(
        self, queue_name: bytes, timeout: float, present: Optional[Callable[[], bool]],
        lease: Optional[float], owner: object,
    ) -> defer.Deferred[Any]:
        _check_name(queue_name)
        queue = self._queue(queue_name)
        self._idle.pop(queue_name, None)
        waiter = Waiter(self, queue, present, lease, owner)
        queue.waiters[waiter] = None
        if lease is not None:
            queue.reservers += 1
        if self._remote:
            cast(RemoteQueue, queue.messages).want()
        waiter.timer = self.clock.callLater(timeout, waiter._time_out, timeout)
        return waiter.deferred

    def _withdraw(self, waiter: Waiter) -> None:
        queue = waiter.queue
        if waiter in queue.waiters:
            del queue.waiters[waiter]
            if waiter.lease is not None:
                queue.reservers -= 1
        if queue.holds_nothing:
            self._touch_idle(queue)

    def get(self, queue_name: bytes, timeout: float) -> defer.Deferred[bytes]:
        """The oldest message of a queue, waiting up to ``timeout`` seconds for one."""
        message = self.take(queue_name)
        if message is not None:
            return defer.succeed(message)
        return self.wait(queue_name, timeout)

    # Reports ---------------------------------------------------------------

    def queues(self) -> Iterable[QueueState]:
        """Every queue kept now."""
        return self._queues.values()

    def queue_sizes(self) -> Iterator[tuple[bytes, int]]:
        """Each queue's name and the number of messages it holds."""
        for name, queue in self._queues.items():
            yield name, len(queue.messages)

    @property
    def num_queues(self) -> int:
        return len(self._queues)

    def least_info_bytes(self) -> int:
        """A lower bound of the ``Info`` reply's size, known without building it."""
        count = len(self._queues)
        # Each name at least as long escaped, between quotes, with a one-digit
        # count; one comma fewer than entries.
        return _INFO_FIXED_BYTES + self._names_bytes + count * (2 + ENTRY_OVERHEAD + 1) - min(count, 1)

    def info_json(self) -> bytes:
        """The ``Info`` reply body, as the original server encodes it, built at once
        (extended with reserved and buried counts once reservations were seen)."""
        queues = self._queues
        extended = self.reservations_seen
        entries = b",".join([_info_entry(name, queues[name], extended) for name in self._sorted_names])
        return (
            encode_info_header(self.num_connections, len(queues), self.num_messages)
            + entries + _info_end(self.num_reserved, self.num_buried, extended)
        )

    def build_info(self, max_bytes: int) -> defer.Deferred[list[bytes]]:
        """The ``Info`` reply body, built a slice per turn of the reactor.

        Fires with the body in pieces (of about :data:`INFO_SLICE_BYTES`
        each, so that no one copy of it all is made), at once when one slice
        holds it all.  A larger one is built over
        several turns so that no other client waits long: each queue's count
        is the one at the moment its entry was made, ``NumMessages`` their sum.
        Fails with ``RequestError`` (``SERVER_INFO_TOO_LARGE``) when the body
        would pass ``max_bytes``; cancelling stops the build.
        """
        try:
            self.check_info_size(max_bytes)
        except errors.RequestError:
            return defer.fail()
        return _InfoBuild(self, max_bytes).deferred

    def check_info_size(self, max_bytes: int) -> None:
        """Refuse an ``Info`` that its queue names alone make larger than ``max_bytes``.

        :raises RequestError: ``SERVER_INFO_TOO_LARGE``.
        """
        least = self.least_info_bytes()
        if least > max_bytes:
            raise _info_too_large(f"at least {least} bytes", max_bytes)

    def info(self) -> ServerInfo:
        """A snapshot of connections, queues and messages."""
        return ServerInfo.from_json(self.info_json())

    # Acknowledged delivery ---------------------------------------------------
    #
    # A Reserve takes a message as a Get does (the same waiters, in one
    # order) but the store keeps it, reserved, until its owner acks it.
    # Released, or when its lease ends or its owner's connection closes, it
    # goes back to the front of its queue, to the waiters first.

    def check_acknowledged_delivery(self) -> None:
        """:raises RequestError: ``REQUEST_UNKNOWN_COMMAND`` when the store does
        not keep reservations (as the original server knows no such command)."""
        if not self.store.acknowledged_delivery:
            raise errors.RequestError(
                errors.UNKNOWN_COMMAND,
                f"the store ({self.store.describe()}) does not keep reservations yet",
            )

    def reserve_now(self, queue_name: bytes, lease: float, owner: object) -> Optional[Entry]:
        """Reserve the oldest message of a queue for ``owner`` for ``lease``
        seconds, or ``None`` if it has none at hand (``wait_reserve`` then)."""
        # The common case first, with no checks to repeat: a queue that exists.
        queue = self._queues.get(queue_name) if type(queue_name) is bytes else None
        if queue is None:
            _check_name(queue_name)
            self.check_acknowledged_delivery()
            queue = self._queue(queue_name)
        elif not self.store.acknowledged_delivery:
            self.check_acknowledged_delivery()
        if self._remote:
            self._check_reachable()
        if queue.waiters:
            return None  # those that came first go first
        return self._reserve(queue, lease, owner)

    def _reserve(self, queue: QueueState, lease: float, owner: object) -> Optional[Entry]:
        if self._max_deliveries:
            self._bury_spent(queue)
        entry = cast(ReservingQueue, queue.messages).reserve()
        if entry is None:
            if queue.holds_nothing:
                self._touch_idle(queue)
            return None
        self.num_messages -= 1
        queue.reserved += 1
        self.num_reserved += 1
        self._hold(queue.name, entry, lease, owner)
        return entry

    def wait_reserve(
        self, queue_name: bytes, timeout: float, lease: float, owner: object,
        present: Optional[Callable[[], bool]] = None,
    ) -> defer.Deferred[Entry]:
        """As :meth:`wait`, for a ``Reserve``: fires with the reserved message's entry."""
        self.check_acknowledged_delivery()
        return self._wait(queue_name, timeout, present, lease, owner)

    def _reserve_handed(self, queue_name: bytes, item: _Item, waiter: Waiter) -> Entry:
        # A message handed to a waiting Reserve: reserved for its owner.
        queue = self._queue(queue_name, limited=False)
        messages = cast(ReservingQueue, queue.messages)
        if type(item) is Entry:
            entry = messages.reserve_again(item)  # was reserved, still is
        else:
            message = cast(bytes, item)
            entry = messages.reserve_new(message)
            queue.reserved += 1
            self.num_reserved += 1
            self.num_bytes += len(message)
        assert waiter.lease is not None
        self._hold(queue_name, entry, waiter.lease, waiter.owner)
        return entry

    def _hold(self, queue_name: bytes, entry: Entry, lease: float, owner: object) -> None:
        reservation = Reservation(queue_name, entry, owner)
        key = (queue_name, entry.message_id)
        self._reservations[key] = reservation
        owned = self._owned.get(owner)
        if owned is None:
            owned = self._owned[owner] = {}
        owned[key] = reservation
        self._leases.start(reservation, lease)
        self.reservations_seen = True
        if self._remote:
            cast(RemoteQueue, self._queues[queue_name].messages).lease(entry, lease)

    def _reservation(self, queue_name: bytes, message_id: int, owner: object) -> Reservation:
        reservation = self._reservations.get((queue_name, message_id))
        if reservation is None or reservation.owner is not owner:
            raise errors.RequestError(
                errors.UNKNOWN_ID,
                f"id {message_id} is not reserved on queue {queue_name_text(queue_name)!r} "
                f"by this connection",
            )
        return reservation

    def _end(self, queue_name: bytes, message_id: int, owner: object) -> Reservation:
        """Take a reservation away from its owner (and its lease's timer)."""
        reservation = self._reservation(queue_name, message_id, owner)
        self._forget_reservation(reservation)
        return reservation

    def _forget_reservation(self, reservation: Reservation) -> None:
        """Drop a reservation from the books (by id, and its owner's), its timer stopped."""
        key = (reservation.queue_name, reservation.entry.message_id)
        del self._reservations[key]
        owned = self._owned[reservation.owner]
        del owned[key]
        if not owned:
            del self._owned[reservation.owner]
        self._leases.end(reservation)

    def _done_with(self, queue: QueueState, entry: Entry) -> None:
        cast(ReservingQueue, queue.messages).ack(entry)
        queue.reserved -= 1
        self.num_reserved -= 1
        self.num_bytes -= len(entry.message)
        if not queue.reserved and queue.holds_nothing:
            self._touch_idle(queue)

    def _bury_reserved(self, queue: QueueState, entry: Entry) -> None:
        self.counters.buried += 1
        cast(ReservingQueue, queue.messages).bury(entry)
        queue.reserved -= 1
        queue.buried += 1
        self.num_reserved -= 1
        self.num_buried += 1

    def _bury_spent(self, queue: QueueState) -> None:
        # Ready messages at the front handed out as many times as allowed.
        messages = cast(ReservingQueue, queue.messages)
        while messages.front_deliveries() >= self._max_deliveries:
            messages.bury_front()
            self.counters.buried += 1
            queue.buried += 1
            self.num_messages -= 1
            self.num_buried += 1
            self.reservations_seen = True

    def ack(self, queue_name: bytes, message_id: int, owner: object) -> None:
        """The owner is done with a reserved message: gone for good.

        :raises RequestError: ``REQUEST_UNKNOWN_ID`` if ``owner`` does not
            hold it reserved on that queue.
        """
        reservation = self._end(queue_name, message_id, owner)
        self._done_with(self._queue(queue_name, limited=False), reservation.entry)

    def release(self, queue_name: bytes, message_id: int, owner: object, delay: float = 0) -> None:
        """A reserved message goes back to the front of its queue, at once or
        after ``delay`` seconds (nobody's meanwhile, still counted reserved)."""
        reservation = self._end(queue_name, message_id, owner)
        if delay > 0:
            if self._remote:
                # Redis keeps when it comes back, should this server be gone then.
                cast(RemoteQueue, self._queue(queue_name, limited=False).messages).lease(reservation.entry, delay)
            reservation.owner = None
            self._delayed.add(reservation)
            reservation.timer = self.clock.callLater(delay, self._come_back, reservation)
        else:
            self._offer(queue_name, (reservation.entry,), front=True)

    def touch(self, queue_name: bytes, message_id: int, owner: object, lease: float) -> None:
        """Restart a reservation's lease: ``lease`` seconds from now."""
        reservation = self._reservation(queue_name, message_id, owner)
        self._leases.start(reservation, lease)
        if self._remote:
            cast(RemoteQueue, self._queue(queue_name, limited=False).messages).lease(reservation.entry, lease)

    def bury(self, queue_name: bytes, message_id: int, owner: object) -> None:
        """Set a reserved message aside until kicked."""
        reservation = self._end(queue_name, message_id, owner)
        self._bury_reserved(self._queue(queue_name, limited=False), reservation.entry)

    def kick(self, queue_name: bytes, most: int) -> int:
        """Bring back up to ``most`` buried messages of a queue, oldest first,
        to its back, as new ones; how many came back."""
        _check_name(queue_name)
        self.check_acknowledged_delivery()
        queue = self._queues.get(queue_name)
        if self._remote:
            # Other servers may have buried what this one never saw: Redis kicks.
            self._check_reachable()
            queue = self._queue(queue_name)
        elif queue is None or not queue.buried:
            return 0  # (no queue made for it)
        messages = cast(ReservingQueue, queue.messages)
        if not messages:
            self._idle.pop(queue_name, None)
        kicked = messages.kick(most)
        self.counters.kicked += kicked
        queue.buried -= kicked
        self.num_buried -= kicked
        self.num_messages += kicked
        # Ready now: to the waiters first (they found the queue empty).
        self._arrived(queue_name)
        return kicked

    def release_all(self, owner: object) -> None:
        """Every message ``owner`` holds reserved goes back to the front of
        its queue, oldest first (its connection closed)."""
        by_queue: dict[bytes, list[Entry]] = {}
        owned = self._owned.get(owner, {})
        self.counters.abandoned += len(owned)
        for reservation in list(owned.values()):
            self._forget_reservation(reservation)
            by_queue.setdefault(reservation.queue_name, []).append(reservation.entry)
        for queue_name, entries in by_queue.items():
            self._offer(queue_name, tuple(entries), front=True)

    def _lease_ended(self, reservation: Reservation) -> None:
        self.counters.lease_expirations += 1
        self._forget_reservation(reservation)
        self._offer(reservation.queue_name, (reservation.entry,), front=True)

    def _come_back(self, reservation: Reservation) -> None:
        self._delayed.discard(reservation)
        self._offer(reservation.queue_name, (reservation.entry,), front=True)

    def stopService(self) -> defer.Deferred[None] | None:
        """Withdraw every waiting ``get`` and cancel its timer; messages stay
        (delayed releases come back to their queues at once)."""
        for queue in self._queues.values():
            while (waiter := queue.pop_waiter()) is not None:
                waiter.deferred.cancel()
        for reservation in list(self._delayed):
            if reservation.timer is not None and reservation.timer.active():
                reservation.timer.cancel()
            self._come_back(reservation)
        return super().stopService()


def _info_entry(name: bytes, queue: QueueState, extended: bool) -> bytes:
    if extended:
        return encode_extended_entry(name, len(queue.messages), queue.reserved, queue.buried)
    return encode_info_entry(name, len(queue.messages))


def _info_end(reserved: int, buried: int, extended: bool) -> bytes:
    # Until acknowledged delivery is used, the original's Info, byte for byte.
    return encode_extended_end(reserved, buried) if extended else INFO_END


def _info_too_large(size: str, max_bytes: int) -> errors.RequestError:
    return errors.RequestError(
        errors.INFO_TOO_LARGE,
        f"the Info reply would be {size}, the limit is {max_bytes} (--max-info-bytes)",
    )


class _InfoBuild:
    """An ``Info`` body being built, :data:`INFO_SLICE_QUEUES` entries a turn."""

    def __init__(self, broker: Broker, max_bytes: int) -> None:
        self.broker = broker
        self.max_bytes = max_bytes
        # Each slice's entries, joined, after a comma but for the first.
        self.pieces: list[bytes] = []
        self.num_queues = 0
        self.size = _INFO_FIXED_BYTES
        self.num_messages = 0
        self.num_reserved = 0
        self.num_buried = 0
        # Whether its entries carry reserved and buried counts: decided once,
        # so that every entry of one Info has the same keys.
        self.extended = broker.reservations_seen
        # The last name written: the next slice starts after it, so queues
        # added or forgotten meanwhile shift nothing.
        self.after: Optional[bytes] = None
        self.timer: Optional[IDelayedCall] = None
        self.deferred: defer.Deferred[list[bytes]] = defer.Deferred(self._cancel)
        self._step()

    def _cancel(self, _deferred: defer.Deferred[list[bytes]]) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.pieces = []

    def _step(self) -> None:
        self.timer = None
        names = self.broker._sorted_names
        queues = self.broker._queues
        entries: list[bytes] = []
        start = 0 if self.after is None else bisect_right(names, self.after)
        stop = min(len(names), start + INFO_SLICE_QUEUES)
        slice_bytes = 0
        index = start
        while index < stop and slice_bytes < INFO_SLICE_BYTES:
            name = names[index]
            queue = queues[name]
            entry = _info_entry(name, queue, self.extended)
            entries.append(entry)
            slice_bytes += len(entry) + 1
            self.num_messages += len(queue.messages)
            self.num_reserved += queue.reserved
            self.num_buried += queue.buried
            index += 1
        if entries:
            self.pieces.append((b"," if self.pieces else b"") + b",".join(entries))
            self.num_queues += len(entries)
        self.size += slice_bytes
        if self.size - 1 > self.max_bytes:
            self.pieces = []
            self.deferred.errback(_info_too_large(f"over {self.size - 1} bytes", self.max_bytes))
            return
        if index < len(names):
            self.after = names[index - 1]
            self.timer = self.broker.clock.callLater(0, self._step)
            return
        header = encode_info_header(self.broker.num_connections, self.num_queues, self.num_messages)
        end = _info_end(self.num_reserved, self.num_buried, self.extended)
        pieces, self.pieces = [header, *self.pieces, end], []
        size = sum(map(len, pieces))
        if size > self.max_bytes:
            self.deferred.errback(_info_too_large(f"{size} bytes", self.max_bytes))
        else:
            self.deferred.callback(pieces)
