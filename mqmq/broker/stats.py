"""What the server has done and holds: counters kept on the hot path, and
snapshots of them read a slice of queues per reactor turn.

Counters are plain integers that the protocol and the broker add to as
they go; nothing is computed until somebody asks (a Prometheus scrape, the
dashboard's ``/stats``).  A snapshot walks every queue for the largest
ones and the waiting consumers, a slice per turn, so that a server with
100,000 queues answers its clients between the slices.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from mqmq import errors
from mqmq.stores.health import StoreHealth
from mqmq.wire.commands import Ack, Bury, Get, Info, Kick, Put, Quit, Release, Reserve, Touch

if TYPE_CHECKING:
    from mqmq.broker.broker import Broker, QueueState

#: Each request type, by the name metrics give it.
COMMANDS: dict[type, str] = {
    Put: "put", Get: "get", Info: "info", Quit: "quit", Reserve: "reserve", Ack: "ack",
    Release: "release", Touch: "touch", Bury: "bury", Kick: "kick",
}

#: The error types a server answers with (``Error`` replies).
ERROR_TYPES = (
    errors.UNKNOWN_COMMAND, errors.BAD_PARAMS, errors.BAD_QUEUE_NAME, errors.BAD_TIMEOUT,
    errors.MESSAGE_TOO_LARGE, errors.TOO_MANY_QUEUES, errors.STORAGE_FULL, errors.INFO_TOO_LARGE,
    errors.STORAGE_ERROR, errors.BAD_LEASE, errors.UNKNOWN_ID,
)

#: Queues walked per reactor turn by a snapshot.
QUEUES_PER_TURN = 500
#: Queues listed one by one (the largest); the rest are only counted.
LARGEST_QUEUES = 20


class Counters:
    """Counts since the server started, added to as things happen."""

    __slots__ = (
        "requests", "errors", "malformed", "connections", "connections_refused",
        "deliveries", "redeliveries", "wait_timeouts", "lease_expirations", "abandoned", "buried",
        "kicked", "returned", "bytes_in", "bytes_out",
    )

    def __init__(self) -> None:
        #: Requests by type (the parsed command's class).
        self.requests: dict[type, int] = dict.fromkeys(COMMANDS, 0)
        #: Error replies by error type.
        self.errors: dict[str, int] = dict.fromkeys(ERROR_TYPES, 0)
        #: Connections closed for a frame that could not be read (too long, malformed).
        self.malformed = 0
        #: Connections accepted, and refused (``--max-connections``).
        self.connections = 0
        self.connections_refused = 0
        #: Messages handed out, by ``Get`` or ``Reserve`` (whether or not the
        #: reply then reached the consumer: see ``returned``, ``abandoned``);
        #: of them, messages handed out before (a ``Reserve``'s delivery
        #: count above one).
        self.deliveries = 0
        self.redeliveries = 0
        #: ``Get``s and ``Reserve``s answered ``Timeout``.
        self.wait_timeouts = 0
        #: Reservations whose lease ran out, and those whose connection
        #: closed before their Ack (their messages went back).
        self.lease_expirations = 0
        self.abandoned = 0
        #: Messages buried (by ``Bury``, or past ``--max-deliveries``), and kicked back.
        self.buried = 0
        self.kicked = 0
        #: Messages handed out by ``Get`` whose reply never reached their
        #: consumer, put back.
        self.returned = 0
        #: Bytes read from and written to connections already closed (the
        #: open ones keep their own until they close).
        self.bytes_in = 0
        self.bytes_out = 0

    def error(self, error_type: str) -> None:
        self.errors[error_type] = self.errors.get(error_type, 0) + 1


@dataclass
class QueueStats:
    name: str
    ready: int
    reserved: int
    buried: int
    waiting: int

    @property
    def held(self) -> int:
        return self.ready + self.reserved + self.buried


@dataclass
class Snapshot:
    """The server's state and counters at one moment (over a few reactor turns)."""

    time: float
    uptime: float
    store: str
    durable: bool
    connections: int
    queues: int
    waiting: int
    ready: int
    reserved: int
    buried: int
    held_bytes: int
    largest: list[QueueStats]
    requests: dict[str, int]
    errors: dict[str, int]
    counters: dict[str, int]
    #: Failing now: why the store refuses new messages.
    store_failure: Optional[str] = None
    health: Optional[StoreHealth] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The snapshot as ``/stats`` gives it."""
        health = self.health
        store: dict[str, Any] = {
            "kind": self.store, "durable": self.durable, "healthy": self.store_failure is None,
            "failure": self.store_failure,
        }
        if health is not None:
            store.update(
                commits=health.commits, rows=health.rows,
                commit_seconds_total=health.commit_seconds.total,
                last_error=health.last_error, last_error_time=health.last_error_time,
            )
        return {
            "time": self.time,
            "uptime_seconds": self.uptime,
            "connections": {
                "current": self.connections, "total": self.counters["connections"],
                "refused": self.counters["connections_refused"],
            },
            "waiting": self.waiting,
            "queues": {
                "count": self.queues,
                "largest": [
                    {"name": q.name, "ready": q.ready, "reserved": q.reserved, "buried": q.buried,
                     "waiting": q.waiting}
                    for q in self.largest
                ],
            },
            "messages": {"ready": self.ready, "reserved": self.reserved, "buried": self.buried,
                         "bytes": self.held_bytes},
            "commands": self.requests,
            "errors": self.errors,
            "events": {name: value for name, value in self.counters.items()
                       if name not in ("connections", "connections_refused", "bytes_in", "bytes_out")},
            "bytes": {"in": self.counters["bytes_in"], "out": self.counters["bytes_out"]},
            "store": store,
            **self.extra,
        }


def queue_label(name: bytes) -> str:
    """A queue name as text that tells every name apart: an invalid UTF-8
    byte as ``\\xNN``, a backslash doubled."""
    return name.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def _queue_stats(queue: QueueState) -> QueueStats:
    return QueueStats(queue_label(queue.name), len(queue.messages), queue.reserved,
                      queue.buried, len(queue.waiters))


class _Walk:
    """Goes through every queue a slice per turn: waiting consumers, the largest queues."""

    def __init__(self, broker: Broker, clock: IReactorTime, largest: int, per_turn: int) -> None:
        self.clock = clock
        # The queues as they are now; one forgotten meanwhile is still
        # counted as it was (empty, or it would not have been forgotten).
        self.queues = list(broker.queues())
        self.largest = largest
        self.per_turn = per_turn
        self.index = 0
        self.waiting = 0
        self.top: list[tuple[int, int, QueueState]] = []
        self.done: defer.Deferred[tuple[int, list[QueueStats]]] = defer.Deferred()

    def step(self) -> None:
        queues, top, most = self.queues, self.top, self.largest
        end = min(self.index + self.per_turn, len(queues))
        waiting = 0
        for index in range(self.index, end):
            queue = queues[index]
            waiting += len(queue.waiters)
            held = len(queue.messages) + queue.reserved + queue.buried
            # (Among equals, the first walked stay: -index is larger.)
            if len(top) < most:
                heapq.heappush(top, (held, -index, queue))
            elif held > top[0][0]:
                heapq.heapreplace(top, (held, -index, queue))
        self.waiting += waiting
        self.index = end
        if end < len(queues):
            self.clock.callLater(0, self.step)
            return
        largest = [_queue_stats(queue) for _, _, queue in sorted(top, key=lambda t: (-t[0], -t[1]))]
        self.done.callback((self.waiting, largest))


def snapshot(
    broker: Broker,
    open_bytes: Callable[[], tuple[int, int]] = lambda: (0, 0),
    largest: int = LARGEST_QUEUES,
    per_turn: int = QUEUES_PER_TURN,
) -> defer.Deferred[Snapshot]:
    """A snapshot of ``broker``, taken over as many turns as its queues need
    (one, up to ``per_turn`` queues).

    :param open_bytes: bytes read from and written to the connections
        open now, which :class:`Counters` counts only once they close.
    """
    clock = broker.clock
    walk = _Walk(broker, clock, largest, per_turn)

    def made(result: tuple[int, list[QueueStats]]) -> Snapshot:
        waiting, queues = result
        counters = broker.counters
        store = broker.store
        now = clock.seconds()
        counted = {name: getattr(counters, name) for name in Counters.__slots__
                   if name not in ("requests", "errors")}
        bytes_in, bytes_out = open_bytes()
        counted["bytes_in"] += bytes_in
        counted["bytes_out"] += bytes_out
        return Snapshot(
            time=now,
            uptime=now - broker.started,
            store=store.describe(),
            durable=store.durable,
            connections=broker.num_connections,
            queues=broker.num_queues,
            waiting=waiting,
            ready=broker.num_messages,
            reserved=broker.num_reserved,
            buried=broker.num_buried,
            held_bytes=broker.num_bytes,
            largest=queues,
            requests={COMMANDS[kind]: count for kind, count in counters.requests.items()},
            errors=dict(counters.errors),
            counters=counted,
            store_failure=store.failure,
            health=getattr(store, "health", None),
        )

    taken = walk.done.addCallback(made)
    walk.step()
    return taken
