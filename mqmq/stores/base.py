"""The interface every store satisfies, and the batch of changes a durable one commits."""

from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Optional, Protocol, Sequence

from mqmq.stores.health import StoreHealth


class Entry(NamedTuple):
    """A message as acknowledged delivery sees it."""

    #: Unique among the messages a store holds (a durable store's, across
    #: restarts too); its decimal digits are the id on the wire.
    message_id: int
    message: bytes
    #: How many times it was handed out (by ``Get`` or ``Reserve``).
    deliveries: int


class StoredQueue(Protocol):
    """One queue's messages as a store keeps them, oldest first.

    Every call answers at once, and never waits for a disk or a network:

    - a change is recorded in the store's open :class:`Batch`, and whoever
      answers a client for it waits for that batch (``Store.pending``) to be
      written (the memory store has none: its changes are done at once);
    - :meth:`pop` answers from what the store has at hand.  A store that
      keeps messages elsewhere (on disk, in another server) fetches them
      ahead, and when none is at hand answers ``None`` although
      ``len(queue)`` counts some; it then owes ``Store.arrived(name)``
      once it has them, and the broker hands them to the waiting ``Get`` requests.

    So the memory store keeps its synchronous fast path, and a store whose
    answers come later (a Deferred's) fits without changing the broker.
    """

    name: bytes

    @property
    def num_bytes(self) -> int:
        """Bytes of message payload held."""

    def __len__(self) -> int: ...

    def push(self, message: bytes) -> Optional[int]:
        """Add a message at the back; a durable store returns its id (see
        :meth:`Batch.refused`), the memory store ``None``."""

    def push_front(self, message: bytes) -> None:
        """Put back a message that could not be delivered, to go out next."""

    def pop(self) -> Optional[bytes]:
        """Remove and return the oldest message, or ``None`` when it has none
        at hand (then, if ``len()`` is not 0, ``Store.arrived`` follows)."""


class ReservingQueue(StoredQueue, Protocol):
    """A stored queue that keeps what acknowledged delivery needs (see
    ``Store.acknowledged_delivery``).

    ``len()`` and ``num_bytes`` count the messages ready to be handed out.
    The broker holds each reservation (its entry, owner and lease) and counts
    reserved and buried messages; the store keeps each message until it is
    acked.  A durable store keeps reservations across a restart as the
    protocol says: a reserved message is ready again, at the front, its
    deliveries kept (``front_deliveries``); a buried one is still buried
    (``num_buried``, ``buried_bytes``).
    """

    def front_deliveries(self) -> int:
        """How many times the message :meth:`pop` or :meth:`reserve` would
        take next was handed out before (0 for a new one, or none at hand)."""

    def reserve(self) -> Optional[Entry]:
        """Hand out the oldest message at hand, kept as reserved: its entry,
        its deliveries counting this one; ``None`` as :meth:`pop`."""

    def reserve_new(self, message: bytes) -> Entry:
        """A new message (a ``Put``) handed at once to a waiting ``Reserve``:
        kept as reserved, delivered once."""

    def reserve_again(self, entry: Entry) -> Entry:
        """A reserved message that came back (lease ended, released) handed
        at once to a waiting ``Reserve``: still reserved, delivered once more."""

    def ack(self, entry: Entry) -> None:
        """A reserved message is done with (``Ack``; or taken by a ``Get``
        as it came back): gone for good."""

    def release(self, entry: Entry) -> None:
        """A reserved message goes back to the front, ready, its deliveries kept."""

    def bury(self, entry: Entry) -> None:
        """A reserved message is set aside (``Bury``)."""

    def bury_front(self) -> None:
        """The oldest ready message is set aside unhanded: it has been handed
        out as many times as allowed (``--max-deliveries``)."""

    def kick(self, most: int) -> int:
        """Bring back up to ``most`` buried messages, oldest first, to the
        back of the queue as new ones; how many came back."""

    @property
    def num_buried(self) -> int:
        """How many of its messages are buried (read back by a durable store)."""

    @property
    def buried_bytes(self) -> int:
        """Bytes of payload of its buried messages."""


class RemoteQueue(ReservingQueue, Protocol):
    """A queue kept elsewhere and shared with other servers (Redis): the
    broker never hands its messages over in-process, but tells it of its
    waiters and leases, and the store takes for them (``Store.arrived``)."""

    def want(self) -> None:
        """The broker has (new) waiters on the queue: take for them."""

    def lease(self, entry: Entry, seconds: float) -> None:
        """A reservation's lease (re)starts, or a delayed release's wait."""

    @property
    def fetching(self) -> bool:
        """A take for the queue's waiters is on its way (or about to be)."""


class RemoteStore(Protocol):
    """What a store whose queues are :class:`RemoteQueue` ones has besides
    :class:`Store` (its ``remote`` is True)."""

    #: Set by the broker: the leases (ms; -1 for a ``Get``) of a queue's
    #: waiters, oldest first.
    waiting: Optional[Callable[[bytes], Sequence[int]]]
    #: Set by the broker: a queue's counts changed by other servers (or
    #: read afresh): ready, their bytes, buried, their bytes.
    recounted: Optional[Callable[[bytes, int, int, int, int], object]]
    #: Set by the broker: ``--max-deliveries`` (0: none).
    max_deliveries: int


class Store(Protocol):
    """Where messages are kept.  The broker knows stores only through this."""

    #: The batch collecting changes not yet written, if any; ``None`` when
    #: everything done so far is already as safe as the store makes it.
    pending: Optional[Batch]
    #: Why the store cannot take new messages now (a failing disk), if so.
    failure: Optional[str]
    #: Whether its batches are written somewhere (replies wait for them).
    durable: bool
    #: Whether its queues are :class:`ReservingQueue` ones (else the broker
    #: refuses ``Reserve``, and there is nothing to ``Ack``).
    acknowledged_delivery: bool
    #: Whether its queues are :class:`RemoteQueue` ones, shared with other
    #: servers (then it is a :class:`RemoteStore` too).
    remote: bool
    #: Set by the broker: called with (queue name, message) for each message
    #: a store had taken but dropped because writing it failed.
    dropped: Optional[Callable[[bytes, bytes], object]]
    #: Set by the broker: called with a queue's name when messages it did
    #: not have at hand (its ``pop()`` answered ``None`` while it held some)
    #: are at hand, from the reactor thread, never from within a call of
    #: the broker's.
    arrived: Optional[Callable[[bytes], object]]

    @property
    def health(self) -> Optional[StoreHealth]:
        """A durable store's commits, their times and its last error; ``None``
        for a store that writes nothing."""

    def queue(self, name: bytes) -> StoredQueue:
        """A new, empty queue (recorded in the store)."""

    def forget(self, queue: StoredQueue) -> None:
        """Drop an empty queue the broker no longer keeps."""

    def recovered(self) -> Iterable[StoredQueue]:
        """The queues found at start-up, with their messages, in name order."""

    def open(self) -> None:
        """Open and read back what is stored, before :meth:`recovered`.

        :raises StoreError: it cannot be opened or read.
        """

    def start(self) -> None:
        """Start writing (called once opened, before serving)."""

    def stop(self) -> object:
        """Write what is pending and close; may return a Deferred."""

    def describe(self) -> str:
        """A short description for the log, e.g. ``sqlite:/var/lib/mqmq.db``."""


class Batch:
    """Changes that go to disk in one transaction, and who waits for them.

    Batches are written one at a time, in the order they were opened; one
    with nothing to write may be done before earlier ones.  Whoever holds
    replies for batches keeps each client's replies in the order of its
    requests (a reply waits behind the ones held before it).
    """

    __slots__ = ("_listeners", "done", "_refused", "retry")

    def __init__(self) -> None:
        self._listeners: list[Callable[[Batch], object]] = []
        #: True once written, or once its write failed (then see ``retry``).
        self.done = False
        self._refused: frozenset[int] = frozenset()
        #: When its write failed: the batch that writes what is kept of it.
        #: Replies held for this one but refused Puts wait for that one.
        self.retry: Optional[Batch] = None

    def when_done(self, listener: Callable[[Batch], object]) -> None:
        """Call ``listener(batch)`` once the batch is done (at once if it is)."""
        if self.done:
            listener(self)
        else:
            self._listeners.append(listener)

    def refused(self, message_id: int) -> bool:
        """True when the ``Put`` that stored ``message_id`` was not written
        (the disk failed): it must be answered with an error, not ``OK``."""
        return message_id in self._refused

    def finish(self, refused: frozenset[int] = frozenset()) -> None:
        """Mark the batch done and tell everyone waiting for it."""
        self.done = True
        self._refused = refused
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener(self)
