"""The Redis store: queues kept in Redis (or a Redis Cluster), shared by every mqmq server that uses it.

Each queue's messages live in Redis only (``redis_scripts`` says how); a
server holds no message of its own between requests.  What the broker does
to a queue in one turn of the reactor goes to Redis as one script for that
queue, and the replies that depend on it wait for it (``pending``), as a
durable store's wait for its disk.  A ``Get`` or ``Reserve`` that finds
nothing at hand waits while the store *takes* for it: one script per queue
takes for all its waiters of a turn, oldest first, and the broker hands
what came to them (``arrived``).  So a message goes to exactly one consumer
whichever server it waited on: Redis runs one script at a time.

Servers wake each other through Redis: a take that finds a queue empty
records the server in the queue's ``sleep`` set, and a script that makes a
message ready publishes on the queue's shard channel while anyone sleeps.
Each server subscribes only to the queues it has waiters on, over one
subscriber connection per Redis node, so waiting costs no connection.

Reservations are kept in Redis with their deadlines: a server killed with
reservations leaves them to the others, which sweep the lease index every
second and put due reservations back at the front of their queues.
"""

from __future__ import annotations

import os
import random
from collections import deque
from typing import Any, Callable, Iterable, Optional, Sequence, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mqmq.redis import Redis, RedisError, RedisUnavailable, Script, from_url
from mqmq.stores import redis_scripts
from mqmq.stores.base import Batch, Entry, StoredQueue
from mqmq.stores.health import StoreHealth

#: Added to every reservation's deadline in Redis: the server that holds it
#: acts on its lease's end itself (its timer), and only a server that is
#: gone leaves it to the others' sweep.
GRACE_MS = 2000
#: How often a server sweeps the lease index, and checks its waiters' queues
#: for messages a lost wake-up left unseen (seconds; jittered by a tenth).
TICK_SECONDS = 1.0
#: Index entries swept per tick.
SWEEP_MOST = 64
#: Due entries read per sweep, among which each server picks its SWEEP_MOST
#: at random: servers sweeping at once mostly sweep different queues.
SWEEP_READ = 4 * SWEEP_MOST
#: An index entry found without reservations is dropped only when found so
#: again this long after (ms), with nobody recording the queue meanwhile.
LINGER_MS = 10000
#: A server records a queue in the lease index at most this often (seconds).
INDEX_EVERY_SECONDS = 5.0
#: A queue with no waiters for this long is unsubscribed (seconds).
UNSUBSCRIBE_AFTER_SECONDS = 30.0
#: Queues whose counts are read afresh each tick (round the queues this
#: server holds), so that its ``Info`` follows what other servers did.
RECOUNT_PER_TICK = 100
#: A batch that Redis could not take is tried again after this long.
RETRY_SECONDS = 1.0

_APPLY = Script(redis_scripts.APPLY)
_RECLAIM = Script(redis_scripts.RECLAIM)
_INDEX_TOUCH = Script(redis_scripts.INDEX_TOUCH)
_INDEX_DUE = Script(redis_scripts.INDEX_DUE)
_INDEX_SETTLE = Script(redis_scripts.INDEX_SETTLE)
_COUNTS = Script(redis_scripts.COUNTS)

#: Operations a failed script's batch tries again.  Those on a reservation
#: check it is still this server's, and a put-back keeping its id checks
#: it is not there already, so they change nothing twice; a Kick, and a
#: put-back with a new id, are done twice if the first try had been run.
_RETRIED = frozenset("FARBLNKG")
#: Operations nobody waits for, tried again with the queue's next script
#: (forgetting a take's record, putting back what a lost take took).
_LATER = frozenset("XY")


def queue_tag(name: bytes) -> bytes:
    """The hash tag of a queue's keys: every key of one queue in one slot.

    (``q:`` keeps the tag non-empty for the empty name: Redis hashes a
    whole key whose braces hold nothing.)
    """
    escaped = name.replace(b"%", b"%25").replace(b"{", b"%7B").replace(b"}", b"%7D")
    return b"{q:" + escaped + b"}"


class _Taken:
    """A message a take brought, waiting for its waiter (within one reply)."""

    __slots__ = ("message_id", "deliveries", "message", "lease_ms")

    def __init__(self, message_id: int, deliveries: int, message: bytes, lease_ms: int) -> None:
        self.message_id = message_id
        self.deliveries = deliveries
        self.message = message
        #: -1: taken for a Get (gone from Redis); else reserved by this server.
        self.lease_ms = lease_ms


class _Script:
    """One queue's operations of one batch: one ``APPLY`` call."""

    __slots__ = ("queue", "ops", "puts", "takes", "delta", "batch", "counted", "flying")

    def __init__(self, queue: RedisQueue) -> None:
        self.queue = queue
        self.ops: list[tuple[Any, ...]] = []
        #: Its Puts: (the id the broker checks, the message).
        self.puts: list[tuple[int, bytes]] = []
        #: Its takes: (take number, waiters taken for).
        self.takes: list[tuple[int, int]] = []
        #: What it changes of the queue's ready count, their bytes, buried
        #: count and bytes, as far as known before Redis answers.
        self.delta = [0, 0, 0, 0]
        #: The batch whose replies wait for it, if any.
        self.batch: Optional[Batch] = None
        #: Counted among that batch's scripts (it may wait a flush or more).
        self.counted = False
        #: Counted in its queue's changes in flight (sent, or waiting to be).
        self.flying = False


class RedisQueue:
    """One queue as this server sees it: counts from Redis's last answer,
    changes on their way, and (only while a take's reply is being handed
    out) the messages it brought."""

    __slots__ = ("name", "_store", "keys", "channel", "_base", "_unconfirmed", "_flying", "_at_hand",
                 "_taking", "_subscribed", "_idle_since", "_indexed_at", "_gate", "_leases", "_later", "_number",
                 "_resume_at", "_indexed_until", "_rewake")

    def __init__(self, store: RedisStore, name: bytes) -> None:
        self.name = name
        self._store = store
        tagged = store.prefix + queue_tag(name) + b":"
        self.keys = [tagged + part for part in (b"ready", b"body", b"dlv", b"resv", b"own",
                                                 b"buried", b"meta", b"sleep")]
        self.keys.append(tagged + b"taken:" + store.server_id)
        self.channel = tagged + b"wake"
        # Ready count, their bytes, buried count, their bytes: as Redis last said.
        self._base = [0, 0, 0, 0]
        self._unconfirmed: list[_Script] = []
        # The sum of their deltas (counted on every len()).
        self._flying = [0, 0, 0, 0]
        self._at_hand: deque[_Taken] = deque()
        # Waiters that takes on their way take for.
        self._taking = 0
        self._subscribed = False
        self._idle_since: Optional[float] = None
        self._indexed_at: Optional[float] = None
        # While the lease index records this queue: its scripts wait for that.
        self._gate: Optional[Deferred[Any]] = None
        # Leases (ms) of reserved messages at hand, as taken.
        self._leases: dict[int, int] = {}
        # Operations nobody waits for (forgetting a take's record, or putting
        # back what a take whose answer was lost took): they go with the
        # queue's next script, or within a tick.
        self._later: list[tuple[Any, ...]] = []
        # The queue's number (its ids begin with it), once this server has
        # one for it: given by Redis (the first server's wins).
        self._number: Optional[int] = None
        # After a script Redis did not take: nothing more goes for this
        # queue before then (reactor seconds), so a node that is down costs
        # its own queues a retry a second, and the others nothing.
        self._resume_at = 0.0
        # The earliest deadline the lease index was told of, then.
        self._indexed_until = 0.0
        # Woken while a take was out: take again if it comes back short.
        self._rewake = False

    def _count(self, index: int) -> int:
        total = self._base[index] + self._flying[index]
        opened = self._store._scripts.get(self)
        if opened is not None:
            total += opened.delta[index]
        return total

    def counts(self) -> tuple[int, int, int, int]:
        """Ready messages (those at hand included), their bytes, buried ones, theirs."""
        at_hand = self._at_hand
        return (self._count(0) + len(at_hand), self._count(1) + sum(len(t.message) for t in at_hand),
                self._count(2), self._count(3))

    def __len__(self) -> int:
        return self._count(0) + len(self._at_hand)

    @property
    def num_bytes(self) -> int:
        return self.counts()[1]

    @property
    def num_buried(self) -> int:
        return self._count(2)

    @property
    def buried_bytes(self) -> int:
        return self._count(3)

    @property
    def fetching(self) -> bool:
        """A take for this queue's waiters is on its way (or about to be)."""
        return bool(self._taking) or self in self._store._dirty

    # Messages in ------------------------------------------------------------

    def push(self, message: bytes) -> int:
        store = self._store
        script = store._script(self, waited=True)
        put_id = store._next_put
        store._next_put = put_id + 1
        script.ops.append(("P", message))
        script.puts.append((put_id, message))
        delta = script.delta
        delta[0] += 1
        delta[1] += len(message)
        if self._subscribed:
            # Waiters here, or lately: a take goes right behind the Put.
            store._dirty.add(self)
        return put_id

    def push_front(self, message: bytes) -> None:
        self._to_front("", 0, message)

    def _to_front(self, message_id: object, deliveries: int, message: bytes) -> None:
        script = self._store._script(self, waited=True)
        script.ops.append(("F", message_id, deliveries, message))
        script.delta[0] += 1
        script.delta[1] += len(message)

    # Messages out ----------------------------------------------------------

    def want(self) -> None:
        """The broker has (new) waiters on this queue: take for them."""
        self._store._want(self)

    def pop(self) -> Optional[bytes]:
        if not self._at_hand:
            return None
        taken = self._at_hand.popleft()
        if taken.lease_ms >= 0:
            # Reserved for a Reserve that left; a Get takes it: gone.
            self._leases.pop(taken.message_id, None)
            self._store._script(self, waited=True).ops.append(("A", taken.message_id))
        return taken.message

    def front_deliveries(self) -> int:
        # Messages handed out as often as allowed are buried by the take.
        return 0

    def reserve(self) -> Optional[Entry]:
        if not self._at_hand:
            return None
        taken = self._at_hand.popleft()
        if taken.lease_ms < 0:
            # Taken for a Get that left: held again, reserved (its lease follows).
            self._store._script(self, waited=True).ops.append(
                ("N", taken.message_id, taken.deliveries, taken.message, 0))
            self._leases[taken.message_id] = 0
        else:
            self._leases[taken.message_id] = taken.lease_ms
        return Entry(taken.message_id, taken.message, taken.deliveries)

    def reserve_new(self, message: bytes) -> Entry:
        raise NotImplementedError("the broker hands messages to waiters through Redis")

    def reserve_again(self, entry: Entry) -> Entry:
        raise NotImplementedError("the broker hands messages to waiters through Redis")

    def lease(self, entry: Entry, seconds: float) -> None:
        """A reservation's lease (re)starts: its deadline in Redis follows."""
        ms = int(seconds * 1000)
        if self._leases.pop(entry.message_id, None) == ms:
            return  # taken with this lease: Redis has it already
        self._store._script(self, waited=True).ops.append(("L", entry.message_id, ms))

    def ack(self, entry: Entry) -> None:
        self._leases.pop(entry.message_id, None)
        self._store._script(self, waited=True).ops.append(("A", entry.message_id))

    def release(self, entry: Entry) -> None:
        script = self._store._script(self, waited=True)
        script.ops.append(("R", entry.message_id))
        script.delta[0] += 1
        script.delta[1] += len(entry.message)

    def bury(self, entry: Entry) -> None:
        script = self._store._script(self, waited=True)
        script.ops.append(("B", entry.message_id))
        script.delta[2] += 1
        script.delta[3] += len(entry.message)

    def bury_front(self) -> None:
        raise NotImplementedError("the take buries what was handed out too often")

    def kick(self, most: int) -> int:
        # Redis kicks up to ``most`` of what it holds; the answer is as many
        # as this server knows of, and Redis's reply corrects the counts.
        kicked = max(0, min(most, self._count(2)))
        script = self._store._script(self, waited=True)
        script.ops.append(("K", most))
        script.delta[0] += kicked
        script.delta[2] -= kicked
        return kicked

    # From the store ------------------------------------------------------------

    def _give_back(self) -> None:
        """Messages a take brought that no waiter took go back to the front,
        in their order, not counted as handed out."""
        at_hand = self._at_hand
        if not at_hand:
            return
        script = self._store._script(self, waited=False)
        while at_hand:
            taken = at_hand.pop()  # newest first: each goes before the last
            if taken.lease_ms >= 0:
                self._leases.pop(taken.message_id, None)
                script.ops.append(("G", taken.message_id))
            else:
                script.ops.append(("F", taken.message_id, taken.deliveries - 1, taken.message))
            script.delta[0] += 1
            script.delta[1] += len(taken.message)


class RedisStore:
    """Queues kept in Redis, shared with every server that uses the same Redis and prefix."""

    log = Logger()

    durable = True
    acknowledged_delivery = True
    #: Queues live elsewhere and change behind this server's back: the
    #: broker hands messages over through the store, never in-process.
    remote = True

    def __init__(
        self, url: str, reactor: IReactorTime, prefix: bytes = b"mqmq:",
        timeout: float = 2.0, client: Optional[Redis] = None,
    ) -> None:
        self.url = url
        self.prefix = prefix
        #: Added to deadlines in Redis: at least the Redis timeout, so that a
        #: take answered that late still ends its lease here first.
        #: (GRACE_MS set to 0, in tests: none.)
        self.grace_ms = max(GRACE_MS, int(timeout * 1000)) if GRACE_MS else 0
        self._reactor = reactor
        #: This process among the servers sharing the queues.
        self.server_id = b"%s-%d-%s" % (os.uname().nodename.encode("ascii", "replace")[:20],
                                        os.getpid(), os.urandom(4).hex().encode("ascii"))
        self.client: Redis = client if client is not None else from_url(
            reactor, url, timeout=timeout, name=b"mqmq:" + self.server_id)
        self.pending: Optional[Batch] = None
        self.failure: Optional[str] = "not connected to Redis yet"
        self.dropped: Optional[Callable[[bytes, bytes], object]] = None
        self.arrived: Optional[Callable[[bytes], object]] = None
        #: Set by the broker: a queue's counts changed by other servers (or
        #: found out from Redis): ready, their bytes, buried, their bytes.
        self.recounted: Optional[Callable[[bytes, int, int, int, int], object]] = None
        #: Set by the broker: the leases (ms; -1 for a Get) of a queue's
        #: waiters, oldest first.
        self.waiting: Optional[Callable[[bytes], Sequence[int]]] = None
        #: Set by the broker: ``--max-deliveries`` (0: none).
        self.max_deliveries = 0
        self.health = StoreHealth()
        self._queues: dict[bytes, RedisQueue] = {}
        self._recount_order: deque[bytes] = deque()
        # Queues new to this server: their counts are read at the next flush.
        self._uncounted: list[bytes] = []
        self._scripts: dict[RedisQueue, _Script] = {}
        # Scripts of queues waiting for their retry, in order: they go before
        # anything newer for the queue, and are closed to new operations.
        self._deferred: dict[RedisQueue, list[_Script]] = {}
        # Stopped: nothing more goes to Redis.
        self._stopped = False
        self._dirty: set[RedisQueue] = set()
        self._next_put = 1
        self._next_take = 1
        self._flush_call: Optional[IDelayedCall] = None
        self._flushing = False
        self._retry_call: Optional[IDelayedCall] = None
        self._tick_call: Optional[IDelayedCall] = None
        # Batches sent: how many of their scripts are out, Puts refused, and
        # the batch trying again what failed.
        self._outstanding: dict[Batch, list[Any]] = {}
        self._in_flight = 0
        self._stopping: Optional[Deferred[None]] = None
        # A script failed while stopping: what is left is refused, not retried.
        self._stop_failed = False
        self._started = False
        # Why this Redis must not keep messages (too old, or evicting), once known.
        self._refusal: Optional[str] = None
        # Whether Redis has taken work yet (a first connection is no news).
        self._worked = False
        self._checked = False
        index = prefix + b"{idx}:"
        self._index_keys = [index + b"leases", index + b"ver", index + b"empty"]
        self._sharded = url.startswith("redis+cluster:")
        self._numbers_key = index + b"numbers"

    def describe(self) -> str:
        return self.client.describe()

    # Life ------------------------------------------------------------------

    def open(self) -> None:
        self.client.on_state = self._state_changed
        self.client.start()
        self._state_changed(self.client.failure)

    def _check_server(self) -> None:
        """Refuse a Redis too old for the scripts (7.0: shard channels), or
        one that evicts keys when full: it would drop messages it said OK to."""
        checking = self.client.call(None, b"INFO", b"server")
        checking.addCallback(self._check_version)
        checking.addCallback(lambda _: self.client.call(None, b"CONFIG", b"GET", b"maxmemory-policy"))
        checking.addCallbacks(self._check_policy, self._not_checked)

    def _check_version(self, info: bytes) -> None:
        for line in info.decode("ascii", "replace").splitlines():
            if line.startswith("redis_version:"):
                version = line.partition(":")[2].strip()
                major = version.split(".")[0]
                if major.isdigit() and int(major) < 7:
                    self._refuse(f"Redis {version} at {self.describe()} is too old: "
                                 f"the Redis store needs Redis 7.0 or later")

    def _check_policy(self, reply: list[bytes]) -> None:
        policy = reply[1].decode("ascii", "replace") if len(reply) > 1 else "noeviction"
        if policy != "noeviction":
            self._refuse(f"Redis at {self.describe()} evicts keys when full (maxmemory-policy "
                         f"{policy}), which would lose messages: set maxmemory-policy noeviction")

    def _not_checked(self, reason: Failure) -> None:
        if self._refusal is None:
            self.log.warn("could not check Redis's version and maxmemory-policy at {store}: {error}",
                          store=self.describe(), error=reason.getErrorMessage())

    def _refuse(self, why: str) -> None:
        if self._refusal is None:
            self.log.error("refusing to keep messages: {why}", why=why)
        self._refusal = why
        self.failure = why
        self.health.failed(why, self._reactor.seconds())

    def recovered(self) -> Iterable[RedisQueue]:
        # Queues live in Redis; the broker learns them as they are used.
        return ()

    def start(self) -> None:
        self._started = True
        self._schedule_tick()

    def stop(self) -> Deferred[None]:
        self._started = False
        for call in (self._tick_call, self._retry_call):
            if call is not None and call.active():
                call.cancel()
        self._tick_call = self._retry_call = None
        stopping = self._stopping = Deferred()
        for queue in self._queues.values():
            if queue._later:  # (what a lost take took goes back first)
                self._script(queue, waited=False)
        self._flush()
        self._maybe_stopped()
        return stopping

    def _maybe_stopped(self) -> None:
        if self._stopping is None or self._in_flight:
            return
        if self._scripts or self._deferred:
            if self.failure is None and not self._stop_failed:
                self._schedule_flush()  # (what came back with the last answers)
                return
            # Redis is not taking them, and the server is going: what waits
            # for them is never answered (an OK would be a lie, and an Ack
            # not written is as if never sent: its reservation comes back).
            self._scripts = {}
            self._deferred = {}
            self.pending = None
        stopping, self._stopping = self._stopping, None
        self._stopped = True
        for call in (self._flush_call, self._retry_call):
            if call is not None and call.active():
                call.cancel()
        self._flush_call = self._retry_call = None
        for queue in self._queues.values():
            if queue._subscribed:
                self.client.unsubscribe(queue.channel)
        self.client.stop().addBoth(lambda _: stopping.callback(None))

    def _state_changed(self, failure: Optional[str]) -> None:
        was = self.failure
        if failure is not None:
            self.health.failed(failure, self._reactor.seconds())
            if self._sharded:
                # A Redis Cluster's node down: its own queues' scripts fail
                # and wait, and the other queues go on.
                failure = None
        if failure is None and self._refusal is not None:
            failure = self._refusal
        self.failure = failure
        if failure is None and self.client.failure is None and not self._checked:
            self._checked = True
            self._check_server()
            if self._refusal is not None:
                return
        if failure is None and (was is not None or self._sharded and self.client.failure is None):
            self.health.failing = False
            if self._worked and was is not None:
                self.log.info("Redis takes work again: {store}", store=self.describe())
            self._worked = True
            # Back: what waits goes out, and waiters look again.
            for queue in self._queues.values():
                queue._resume_at = 0.0
            self._dirty.update(q for q in self._queues.values() if q._subscribed)
            for queue in self._queues.values():
                if queue._later:
                    self._script(queue, waited=False)
            self._schedule_flush()

    def queue(self, name: bytes) -> RedisQueue:
        queue = self._queues[name] = RedisQueue(self, name)
        # Its counts, for Info, once the broker holds it (in the next turn).
        self._uncounted.append(name)
        self._schedule_flush()
        return queue

    def forget(self, stored: StoredQueue) -> None:
        queue = self._queues.pop(stored.name, None)
        if queue is not None and queue._subscribed:
            queue._subscribed = False
            self.client.unsubscribe(queue.channel)

    def _counted(self, counts: list[int], queue: RedisQueue) -> None:
        if (self._queues.get(queue.name) is not queue or queue._unconfirmed or queue in self._scripts
                or queue in self._deferred):
            return  # a script's answer says more
        before = queue.counts()
        queue._base = [int(c) for c in counts]
        self._tell_recounted(queue, before)

    def _tell_recounted(self, queue: RedisQueue, before: tuple[int, int, int, int]) -> None:
        after = queue.counts()
        if after != before and self.recounted is not None and self._queues.get(queue.name) is queue:
            self.recounted(queue.name, *(a - b for a, b in zip(after, before)))

    # Batches -----------------------------------------------------------------

    def _script(self, queue: RedisQueue, waited: bool) -> _Script:
        script = self._scripts.get(queue)
        if script is None:
            script = self._scripts[queue] = _Script(queue)
            if queue._later:
                script.ops.extend(queue._later)
                queue._later = []
            self._schedule_flush()
        if waited and script.batch is None:
            if self.pending is None:
                self.pending = Batch()
            script.batch = self.pending
        return script

    def _want(self, queue: RedisQueue) -> None:
        self._dirty.add(queue)
        queue._idle_since = None
        if not queue._subscribed and self._started:
            queue._subscribed = True
            self.client.subscribe(queue.channel, self._woken, self._subscribed)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        # (After a failure, the retry's timer flushes.)
        if self._flush_call is None and not self._flushing and not self._stopped:
            self._flush_call = self._reactor.callLater(0, self._flush)

    def _woken(self, channel: bytes, _payload: bytes) -> None:
        queue = self._queue_of_channel(channel)
        if queue is not None:
            if queue._taking:
                queue._rewake = True  # the take out may have missed it
            self._dirty.add(queue)
            self._schedule_flush()

    def _subscribed(self, channel: bytes) -> None:
        # Published before the subscription was live: look now.
        self._woken(channel, b"")

    def _queue_of_channel(self, channel: bytes) -> Optional[RedisQueue]:
        name = _channel_name(channel, self.prefix)
        queue = self._queues.get(name) if name is not None else None
        return queue if queue is not None and queue.channel == channel else None

    def _flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        now = self._reactor.seconds()
        self._flushing = True
        try:
            if self._dirty:
                dirty, self._dirty = self._dirty, set()
                if self.failure is None and self._stopping is None:
                    for queue in dirty:
                        if queue._resume_at > now:
                            self._dirty.add(queue)  # (looks again once it may)
                        else:
                            self._plan_take(queue)
        finally:
            self._flushing = False
        if self._uncounted and self.failure is None:
            names, self._uncounted = self._uncounted, []
            self._count(names)
        scripts, self._scripts = self._scripts, {}
        batch, self.pending = self.pending, None
        if batch is not None:
            self._outstanding[batch] = [0, set(), None]
        ready = []
        for queue in list(self._deferred):
            if queue._resume_at <= now or self._stopping is not None:
                ready.extend(self._deferred.pop(queue))
        for queue, script in scripts.items():
            if script.batch is not None and not script.counted:
                script.counted = True
                self._outstanding[script.batch][0] += 1
            if queue in self._deferred or queue._resume_at > now and self._stopping is None:
                # Waits for its queue's retry, behind what waits already.
                self._deferred.setdefault(queue, []).append(script)
                self._fly(script)
            else:
                ready.append(script)
        if batch is not None and not self._outstanding[batch][0]:
            self._finish(batch)
        for script in ready:
            self._send(script)

    def _fly(self, script: _Script) -> None:
        if not script.flying:
            script.flying = True
            script.queue._unconfirmed.append(script)
            _add(script.queue._flying, script.delta, 1)

    def _plan_take(self, queue: RedisQueue) -> None:
        waiting = self.waiting(queue.name) if self.waiting is not None else ()
        wanted = waiting[queue._taking:]
        if not wanted:
            if not waiting and queue._idle_since is None:
                queue._idle_since = self._reactor.seconds()
            return
        script = self._script(queue, waited=False)
        take = self._next_take
        self._next_take = take + 1
        script.ops.append(("T", take, len(wanted), *wanted))
        script.takes.append((take, len(wanted)))
        queue._taking += len(wanted)

    def _send(self, script: _Script) -> None:
        queue = script.queue
        self._fly(script)
        self._in_flight += 1
        if queue._gate is not None:
            # Behind a script that waits: in order (and failed with it).
            cast(Any, queue._gate).addCallback(self._after_gate, script)
            return
        now = self._reactor.seconds()
        numbered = queue._number is not None
        shortest = _shortest_lease(script)
        deadline = now + (shortest + self.grace_ms) / 1000
        indexed = shortest < 0 or (
            queue._indexed_at is not None and now - queue._indexed_at < INDEX_EVERY_SECONDS
            and queue._indexed_until <= deadline)
        if numbered and indexed:
            self._send_now(script)
            return
        gate = queue._gate = Deferred()
        preparing: Deferred[Any] = succeed(None)
        if not numbered:
            # A number for the queue's ids, should it have none yet.
            preparing.addCallback(lambda _: self.client.call(self._numbers_key, b"INCR", self._numbers_key))
            preparing.addCallback(lambda number: setattr(queue, "_number", int(number)))
        if not indexed:
            # Recorded in the lease index before it holds a reservation (by
            # its earliest deadline): should this server die, the others
            # find it there in time.
            queue._indexed_at = now
            queue._indexed_until = deadline
            preparing.addCallback(lambda _: self.client.eval(
                _INDEX_TOUCH, self._index_keys[:2], [queue.name, shortest + self.grace_ms]))
        outcome: list[Optional[Failure]] = [None]

        def not_ready(reason: Failure) -> None:
            queue._indexed_at = None
            outcome[0] = reason
            self._failed_running(reason, script)

        def open_gate(_: object) -> None:
            queue._gate = None
            gate.callback(outcome)

        preparing.addCallbacks(lambda _: self._send_now(script), not_ready)
        preparing.addBoth(open_gate)

    def _after_gate(self, outcome: list[Optional[Failure]], script: _Script) -> list[Optional[Failure]]:
        # What waited behind a failed preparation fails with it: sent, it
        # could hold a reservation the lease index does not know of.
        failed = outcome[0]
        if failed is None:
            self._send_now(script)
        else:
            self._failed_running(failed, script)
        return outcome

    def _send_now(self, script: _Script) -> None:
        number = script.queue._number
        args: list[Any] = [self.server_id, script.queue.channel, self.max_deliveries, self.grace_ms,
                           b"" if number is None else number]
        for op in script.ops:
            args.extend(op)
        started = self._reactor.seconds()
        running = self.client.eval(_APPLY, script.queue.keys, args)
        running.addCallbacks(self._applied, self._failed_running,
                             callbackArgs=(script, started), errbackArgs=(script,))

    def _failed_running(self, reason: Failure, script: _Script) -> None:
        self._in_flight -= 1
        self._failed(reason, script)

    def _applied(self, result: list[Any], script: _Script, started: float) -> None:
        self._in_flight -= 1
        self.health.committed(len(script.ops), self._reactor.seconds() - started)
        queue = script.queue
        before = queue.counts()
        queue._unconfirmed.remove(script)
        _add(queue._flying, script.delta, -1)
        queue._base = [int(result[0]), int(result[1]), int(result[2]), int(result[3])]
        taken = result[5:]
        for take, count in script.takes:
            queue._taking -= count
            queue._later.append(("X", take))
        if script.takes and queue._rewake and not queue._taking:
            queue._rewake = False
            self._dirty.add(queue)  # woken meanwhile: look again for what is left
            self._schedule_flush()
        at_hand = queue._at_hand
        for i in range(0, len(taken), 4):
            at_hand.append(_Taken(int(taken[i]), int(taken[i + 1]), taken[i + 2], int(taken[i + 3])))
        self._tell_recounted(queue, before)
        if script.batch is not None:
            self._script_done(script.batch)
        if script.takes:
            if self.arrived is not None and self._stopping is None and self._queues.get(queue.name) is queue:
                self.arrived(queue.name)
            queue._give_back()
        self._maybe_stopped()

    def _failed(self, reason: Failure, script: _Script) -> None:
        queue = script.queue
        error = reason.value
        if not isinstance(error, (RedisError, RedisUnavailable)):
            self.log.failure("a script on queue {queue!r} failed", reason, queue=queue.name)
        else:
            self.log.info("Redis did not take a batch for queue {queue!r}: {error}",
                          queue=queue.name, error=error)
        self.health.failed(str(error), self._reactor.seconds(), writing=False)
        before = queue.counts()
        if script in queue._unconfirmed:
            queue._unconfirmed.remove(script)
            _add(queue._flying, script.delta, -1)
        for take, count in script.takes:
            queue._taking -= count
            # It may have run and its answer been lost: what it took comes
            # back, and the waiters take again.
            queue._later.append(("Y", take))
            self._dirty.add(queue)
        if self._stopping is not None:
            self._stop_failed = True
        elif not self._stopped:
            # Nothing more goes for this queue until then (a retry loop would spin).
            queue._resume_at = self._reactor.seconds() + RETRY_SECONDS
            if self._retry_call is None:
                self._retry_call = self._reactor.callLater(RETRY_SECONDS, self._retry)
        # (Before the Y planned above: ops keep their order.)
        queue._later[:0] = [op for op in script.ops if op[0] in _LATER]
        kept = [op for op in script.ops if op[0] in _RETRIED]
        retry: Optional[_Script] = None
        if kept:
            retry = self._script(queue, waited=True)
            retry.ops[:0] = kept
            delta = list(script.delta)
            for _, message in script.puts:
                delta[0] -= 1
                delta[1] -= len(message)
            for index, change in enumerate(delta):
                retry.delta[index] += change
        self._tell_recounted(queue, before)
        if script.batch is not None:
            state = self._outstanding[script.batch]
            state[1].update(put_id for put_id, _ in script.puts)
            if retry is not None:
                state[2] = retry.batch
            self._script_done(script.batch)
        self._maybe_stopped()

    def _retry(self) -> None:
        self._retry_call = None
        for queue in self._queues.values():
            if queue._later:
                self._script(queue, waited=False)
        self._flush()
        waiting = [queue._resume_at for queue in self._deferred] + [queue._resume_at for queue in self._dirty]
        later = max(0.0, min(waiting, default=0.0) - self._reactor.seconds())
        if self._retry_call is None and (self._deferred or self._dirty) and self._stopping is None \
                and not self._stopped:
            self._retry_call = self._reactor.callLater(later or RETRY_SECONDS, self._retry)

    def _script_done(self, batch: Batch) -> None:
        state = self._outstanding[batch]
        state[0] -= 1
        if state[0] <= 0:
            self._finish(batch)

    def _finish(self, batch: Batch) -> None:
        _, refused, retry = self._outstanding.pop(batch)
        batch.retry = retry
        batch.finish(frozenset(refused))

    # Every second ----------------------------------------------------------------

    def _schedule_tick(self) -> None:
        if self._started:
            delay = TICK_SECONDS * random.uniform(0.9, 1.1)
            self._tick_call = self._reactor.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._tick_call = None
        now = self._reactor.seconds()
        for queue in list(self._queues.values()):
            if not queue._subscribed:
                continue
            if queue._idle_since is not None and now - queue._idle_since >= UNSUBSCRIBE_AFTER_SECONDS:
                queue._subscribed = False
                queue._idle_since = None
                self.client.unsubscribe(queue.channel)
            elif not queue._taking:
                # A wake-up lost (Redis publishes at most once): look anyway.
                self._dirty.add(queue)
        for queue in self._queues.values():
            if queue._later and queue not in self._scripts:
                self._script(queue, waited=False)
        if self._dirty:
            self._schedule_flush()
        if self.failure is None:
            self._sweep()
            self._recount()
        self._schedule_tick()

    def _recount(self) -> None:
        """Read afresh the counts of the next few queues, for ``Info``."""
        order = self._recount_order
        if not order:
            order.extend(self._queues)
        self._count([order.popleft() for _ in range(min(RECOUNT_PER_TICK, len(order)))])

    def _count(self, names: list[bytes]) -> None:
        for name in names:
            queue = self._queues.get(name)
            if queue is not None and not queue._unconfirmed and queue not in self._scripts:
                counting = self.client.eval(_COUNTS, [queue.keys[0], queue.keys[5], queue.keys[6]], [])
                counting.addCallbacks(self._counted, lambda _: None, (queue,))

    def _sweep(self) -> None:
        """Reservations whose servers are gone, due now, go back to their queues."""
        due = self.client.eval(_INDEX_DUE, self._index_keys[:2], [SWEEP_READ])
        due.addCallbacks(self._swept, self._sweep_failed)

    def _swept(self, found: list[bytes]) -> None:
        entries = [(found[i], found[i + 1]) for i in range(0, len(found), 2)]
        if len(entries) > SWEEP_MOST:
            entries = random.sample(entries, SWEEP_MOST)
        for name, version in entries:
            queue = self._queues.get(name) or RedisQueue(self, name)
            keys = queue.keys
            reclaiming = self.client.eval(
                _RECLAIM, [keys[0], keys[1], keys[2], keys[3], keys[4], keys[6], keys[7]],
                [queue.channel, 1000])
            reclaiming.addCallback(self._reclaimed, name, version)
            reclaiming.addErrback(self._sweep_failed)

    def _reclaimed(self, result: list[int], name: bytes, version: bytes) -> Deferred[Any]:
        came_back, next_deadline = int(result[0]), int(result[1])
        if came_back:
            self.log.info("{count} reservations on queue {queue!r} outlived their leases and "
                          "servers: ready again", count=came_back, queue=name)
            queue = self._queues.get(name)
            if queue is not None:
                self._dirty.add(queue)
                self._schedule_flush()
        return self.client.eval(_INDEX_SETTLE, self._index_keys,
                                [name, version, next_deadline, LINGER_MS])

    def _sweep_failed(self, reason: Failure) -> None:
        if not reason.check(RedisError, RedisUnavailable):
            self.log.failure("sweeping the lease index failed", reason)


def _shortest_lease(script: _Script) -> int:
    """The shortest lease (ms) a script may leave a reservation with; -1 if none."""
    shortest = -1
    for op in script.ops:
        code = op[0]
        leases: Sequence[int] = ()
        if code == "T":
            leases = [lease for lease in op[3:] if lease >= 0]
        elif code == "L" or code == "N":
            leases = (op[-1],)
        for lease in leases:
            if shortest < 0 or lease < shortest:
                shortest = lease
    return shortest


def _add(total: list[int], delta: list[int], sign: int) -> None:
    for index, change in enumerate(delta):
        total[index] += sign * change


def _channel_name(channel: bytes, prefix: bytes) -> Optional[bytes]:
    """The queue name in a wake channel's name, if it is one."""
    head = prefix + b"{q:"
    if not channel.startswith(head) or not channel.endswith(b"}:wake"):
        return None
    escaped = channel[len(head):-len(b"}:wake")]
    return escaped.replace(b"%7D", b"}").replace(b"%7B", b"{").replace(b"%25", b"%")


def redis_store(url: str, reactor: Any, prefix: str = "mqmq:", timeout: float = 2.0) -> RedisStore:
    """The store a ``--store redis://…`` or ``redis+cluster://…`` names."""
    return RedisStore(url, reactor, prefix.encode("utf-8"), timeout)
