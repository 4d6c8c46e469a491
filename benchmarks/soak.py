"""Soak test: producers and consumers with random disconnects, then an audit.

    python benchmarks/soak.py --duration 60
    python benchmarks/soak.py --duration 60 --reserve [--store sqlite:PATH] [--kill-every 5]
    python benchmarks/soak.py --duration 60 --store redis://127.0.0.1:6379/0 --servers 3 \\
        [--reserve --lease 2] [--kill-every 5]

Starts its own server (``python -m mqmq start``) on loopback port 0 (reading
the port it got from its log), or drives an existing one with ``--addr``.
``--servers N`` starts N servers on one shared store (a Redis one, each run
with a ``--redis-prefix`` of its own unless given) and spreads the clients
over them round-robin: each new connection, a reconnection included, goes
to the next live server.  Producers put uniquely numbered
messages, consumers take them; both drop their connections at random moments
(abortConnection, like a crash or RST) and reconnect.  At the end every queue
is drained (through any live server) and audited:

- every message acknowledged with ``OK`` was delivered, except messages the
  server wrote to a consumer that then vanished, whose kernel had
  acknowledged them: at most one per ``Get`` in flight when a consumer
  dropped ("vanished" below);
- no message was delivered twice, except one a consumer received in its last
  two batches before it dropped: the server puts back a message whose reply
  the consumer's kernel had not acknowledged when the connection broke, and
  a consumer that read it and crashed before its kernel's delayed ACK went
  out gets it again ("duplicates_after_drop").  (The ACK of one batch's
  replies rides on the next batch's requests, which a drop may cut off
  unsent: hence two.)  Every delivered message is intact;
- each consumer connection sees each producer's acknowledged messages on a
  queue in the order they were put (``out_of_order`` counts those it saw
  after a later one).  A message put back goes to the front, out of its
  place, so this is required only of runs where no consumer dropped
  (``order_checked``).

``--kill-every S`` on a Redis store kills one random server (SIGKILL) about
every S seconds and starts it again.  A ``Get`` cut off by a kill may lose
its message, as the protocol says (at most once): the take that handed it
over removed it from Redis.  Such a ``Get`` fails with its connection like
those of a dropped consumer and counts in "vanished"; the dead server puts
nothing back, so a kill excuses no duplicate.

With ``--reserve`` (at-least-once delivery) consumers ``Reserve`` and
``Ack`` instead, and are killed at random between the two: a consumer that
drops acks part of what it reserved (maybe none) and aborts its
connection, and the server hands the rest out again.  ``--kill-every S``
also kills the server with SIGKILL about every S seconds and starts it
again on the same ``--store`` (a durable one: ``sqlite:PATH``, or Redis);
clients reconnect.  The audit then requires:

- every ``Put`` answered ``OK`` acked exactly once: none ``missing``, none
  ``acked_twice``.  (A message whose ``Ack`` a server kill cut off may have
  been acked before the kill: ``ack_cut`` counts those, and one that never
  comes back is not missing.)
- every redelivery accounted for: a message is handed out again only after
  a delivery of it that was not acked (its consumer killed, its ``Ack`` cut
  off, or refused because its lease had run out: ``ack_refused``), with a
  higher deliveries count each time (``redelivered``; ``unaccounted`` must
  be 0);
- every delivered message intact, none that nobody put;
- order as above, where only a message handed out before (deliveries above
  1) may come out of its place, consumer drops or not.

On Redis a killed server's reservations come back once their leases end
(plus 2 s of grace) and a surviving server sweeps (every second): use a
short ``--lease``; the drain goes on until ``--lease`` + 5 s after the last
kill.  ``held_at_kill`` counts reservations in a consumer's hands when a
kill cut its connection; ``reclaimed`` messages handed out again after a
kill cut their delivery (in hand, or their ``Ack``), ``reclaim_wait_s`` the
shortest and longest time from that delivery to the next,
``reclaimed_deliveries`` their deliveries counts then; ``reclaimed_unseen``
messages first seen with a deliveries count above 1 (reserved by a server
killed before its reply went out).

Exits 0 when the audit passes, 1 when it fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from twisted.internet import defer, error, task, threads

from mqmq import ConnectionClosed, GetTimeout, MQClient, connect
from mqmq.client import Delivery
from mqmq.errors import UNKNOWN_ID, ServerError


def _body(message_id: bytes, size: int) -> bytes:
    seed = hashlib.sha256(message_id).digest()
    return message_id + b":" + (seed * (size // 32 + 1))[:size]


def _intact(message: bytes) -> bool:
    message_id, _, rest = message.partition(b":")
    return _body(message_id, len(rest)) == message


#: How a delivery in at-least-once mode ended (Audit.ended): acked, left
#: unacked by a consumer killed on purpose (or refused its Ack: lease over),
#: its Ack cut off by a server kill, or its connection cut by a server kill.
_ACKED, _ABANDONED, _CUT, _KILLED = "acked", "abandoned", "cut", "killed"


@dataclass
class Audit:
    mode: str = "get"
    duration_s: float = 0.0
    servers: int = 1
    #: Connections made to each server (by its place in the list).
    server_connections: list[int] = field(default_factory=list)
    puts_acked: int = 0
    puts_unacked: int = 0
    puts_refused: int = 0
    gets_delivered: int = 0
    producer_drops: int = 0
    consumer_drops: int = 0
    server_kills: int = 0
    vanished_bound: int = 0
    missing: int = 0
    duplicates_after_drop: int = 0
    duplicates: int = 0
    corrupt: int = 0
    unknown: int = 0
    drained: int = 0
    out_of_order: int = 0
    order_checked: bool = True
    # At-least-once mode (--reserve).
    acks: int = 0
    acked_twice: int = 0
    ack_cut: int = 0
    ack_refused: int = 0
    redelivered: int = 0
    unaccounted: int = 0
    held_at_kill: int = 0
    reclaimed: int = 0
    reclaimed_unseen: int = 0
    reclaim_wait_s: list[float] = field(default_factory=list)
    reclaimed_deliveries: dict[int, int] = field(default_factory=dict)
    passed: bool = False
    acked_ids: set[bytes] = field(default_factory=set, repr=False)
    delivered: Counter[bytes] = field(default_factory=Counter, repr=False)
    sent_ids: set[bytes] = field(default_factory=set, repr=False)
    #: Messages a consumer received in its last two batches before it dropped.
    redeliverable: set[bytes] = field(default_factory=set, repr=False)
    #: At-least-once: how each message's last delivery ended, its deliveries
    #: count then, the messages acked by consumers (how many times), and
    #: those whose Ack a server kill cut off.
    ended: dict[bytes, str] = field(default_factory=dict, repr=False)
    counts: dict[bytes, int] = field(default_factory=dict, repr=False)
    consumer_acks: Counter[bytes] = field(default_factory=Counter, repr=False)
    cut_ids: set[bytes] = field(default_factory=set, repr=False)
    #: When each message was last handed out (monotonic seconds).
    handed_at: dict[bytes, float] = field(default_factory=dict, repr=False)
    #: What each consumer connection saw of each producer on each queue, in
    #: order: (connection, queue, producer) -> sequence * 8 + deliveries
    #: (at most 7; 0 for a Get, which does not say).
    seen: dict[tuple[int, bytes, bytes], array] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, Any]:
        hidden = ("acked_ids", "delivered", "sent_ids", "redeliverable", "ended", "counts",
                  "consumer_acks", "cut_ids", "handed_at", "seen")
        return {k: v for k, v in asdict(self).items() if k not in hidden}


class Soak:
    def __init__(self, reactor: Any, args: argparse.Namespace,
                 servers: Optional[list[tuple[subprocess.Popen[str], str]]] = None) -> None:
        self.reactor = reactor
        self.args = args
        self.random = random.Random(args.seed)
        self.audit = Audit(mode="reserve" if args.reserve else "get")
        self.queues = [f"soak-{i}".encode() for i in range(args.queues)]
        self.deadline = 0.0
        #: The servers this run started (and kills, with --kill-every), and
        #: their addresses (None while one is down); or only --addr.
        self.servers: list[Optional[subprocess.Popen[str]]] = [s for s, _ in servers or ()] or [None]
        self.addresses: list[Optional[str]] = [a for _, a in servers or ()] or [args.addr]
        self.audit.servers = len(self.addresses)
        self.audit.server_connections = [0] * len(self.addresses)
        self._turn = 0
        self._connections = 0
        self.last_kill: Optional[float] = None

    def _running(self) -> bool:
        return time.monotonic() < self.deadline

    def _next_server(self) -> Optional[int]:
        """The next live server, round-robin."""
        for _ in range(len(self.addresses)):
            index = self._turn % len(self.addresses)
            self._turn += 1
            if self.addresses[index] is not None:
                return index
        return None

    async def _connect(self) -> Optional[MQClient]:
        """A new connection to the next live server, tried again while
        none is up (being restarted); None once the time is up."""
        while True:
            index = self._next_server()
            address = None if index is None else self.addresses[index]
            if index is not None and address is not None:
                try:
                    client = await connect(self.reactor, address)
                except (error.ConnectError, ConnectionClosed):
                    pass
                else:
                    self.audit.server_connections[index] += 1
                    self._connections += 1
                    client.soak_number = self._connections  # type: ignore[attr-defined]
                    return client
            if not self._running():
                return None
            await task.deferLater(self.reactor, 0.05, lambda: None)

    def _drop_later(self, client: MQClient) -> None:
        delay = self.random.uniform(0, self.args.drop_delay)
        def drop() -> None:
            if client.transport is not None:
                client.transport.abortConnection()

        self.reactor.callLater(delay, drop)

    async def producer(self, number: int) -> None:
        sequence = 0
        while self._running():
            client = await self._connect()
            if client is None:
                return
            dropping = broken = False
            while self._running() and not (dropping or broken):
                batch = []
                for _ in range(self.args.window):
                    message_id = f"p{number}-{sequence}".encode()
                    sequence += 1
                    self.audit.sent_ids.add(message_id)
                    queue = self.random.choice(self.queues)
                    put = client.put(queue, _body(message_id, self.random.randrange(self.args.max_size)))
                    batch.append((message_id, put))
                if self.random.random() < self.args.drop_rate:
                    dropping = True
                    self.audit.producer_drops += 1
                    self._drop_later(client)
                for message_id, put in batch:
                    try:
                        await put
                    except ConnectionClosed:
                        self.audit.puts_unacked += 1
                        broken = True
                    except ServerError:
                        # Refused (a store that failed): not OK, but it may
                        # have been stored even so.
                        self.audit.puts_refused += 1
                    else:
                        self.audit.puts_acked += 1
                        self.audit.acked_ids.add(message_id)
            await self._done_with(client, dropping or broken)

    async def _done_with(self, client: MQClient, dropped: bool) -> None:
        if dropped:
            await client.when_closed()
        else:
            try:
                await client.disconnect()
            except ConnectionClosed:
                pass

    def _delivered(self, message: bytes, client: MQClient, queue: bytes, deliveries: int = 0) -> bytes:
        audit = self.audit
        audit.gets_delivered += 1
        message_id = message.partition(b":")[0]
        audit.delivered[message_id] += 1
        if not _intact(message):
            audit.corrupt += 1
        producer, _, sequence = message_id.partition(b"-")
        if sequence.isdigit():
            view = (client.soak_number, queue, producer)  # type: ignore[attr-defined]
            seen = audit.seen.get(view)
            if seen is None:
                seen = audit.seen[view] = array("q")
            seen.append(int(sequence) * 8 + min(deliveries, 7))
        return message_id

    async def consumer(self) -> None:
        while self._running():
            client = await self._connect()
            if client is None:
                return
            dropping = broken = False
            previous_batch: list[bytes] = []
            while self._running() and not (dropping or broken):
                batch: list[bytes] = []
                queues = [self.random.choice(self.queues) for _ in range(self.args.window)]
                gets = [client.get(queue, 0.05) for queue in queues]
                if self.random.random() < self.args.drop_rate:
                    dropping = True
                    self.audit.consumer_drops += 1
                    self._drop_later(client)
                for queue, get in zip(queues, gets):
                    try:
                        batch.append(self._delivered(await get, client, queue))
                    except GetTimeout:
                        pass
                    except ConnectionClosed:
                        # The server may have written a message to us
                        # already; cut off by our drop, or by a server kill
                        # (then the connection is done with too).
                        self.audit.vanished_bound += 1
                        broken = True
                if dropping:
                    self.audit.redeliverable.update(previous_batch, batch)
                previous_batch = batch
            await self._done_with(client, dropping or broken)

    # At-least-once (--reserve) ------------------------------------------------

    def _reserved(self, delivery: Delivery, client: MQClient) -> bytes:
        audit = self.audit
        message_id = self._delivered(delivery.message, client, delivery.queue, delivery.deliveries)
        now = time.monotonic()
        if message_id in audit.ended or message_id in audit.counts:
            audit.redelivered += 1
            # Handed out again: only after a delivery that was not acked,
            # and counted one more time.
            ended = audit.ended.get(message_id)
            if ended == _ACKED or delivery.deliveries <= audit.counts[message_id]:
                audit.unaccounted += 1
            elif ended in (_CUT, _KILLED):
                audit.reclaimed += 1
                waited = round(now - audit.handed_at[message_id], 2)
                if audit.reclaim_wait_s:
                    low, high = audit.reclaim_wait_s
                    audit.reclaim_wait_s = [min(low, waited), max(high, waited)]
                else:
                    audit.reclaim_wait_s = [waited, waited]
                dlv = audit.reclaimed_deliveries
                dlv[delivery.deliveries] = dlv.get(delivery.deliveries, 0) + 1
        elif delivery.deliveries > 1:
            # Handed out before, but its reply never reached a consumer:
            # reserved by a server killed before it answered.
            audit.reclaimed_unseen += 1
        audit.counts[message_id] = delivery.deliveries
        audit.handed_at[message_id] = now
        audit.ended.pop(message_id, None)
        return message_id

    async def _ack(self, deliveries: list[tuple[bytes, Delivery]]) -> bool:
        """Ack them all (pipelined); False if the connection broke meanwhile."""
        audit = self.audit
        acks = [(message_id, delivery.ack()) for message_id, delivery in deliveries]
        whole = True
        for message_id, ack in acks:
            try:
                await ack
            except ConnectionClosed:
                whole = False
                audit.ack_cut += 1
                audit.cut_ids.add(message_id)
                audit.ended[message_id] = _CUT
            except ServerError as refused:
                if refused.error_type != UNKNOWN_ID:
                    raise
                # Its lease ran out first: it is handed out again.
                audit.ack_refused += 1
                audit.ended[message_id] = _ABANDONED
            else:
                audit.acks += 1
                audit.consumer_acks[message_id] += 1
                audit.ended[message_id] = _ACKED
        return whole

    async def reserving_consumer(self) -> None:
        audit = self.audit
        while self._running():
            client = await self._connect()
            if client is None:
                return
            dropping = broken = False
            while self._running() and not (dropping or broken):
                reserves = [client.reserve(self.random.choice(self.queues), 0.05, self.args.lease)
                            for _ in range(self.args.window)]
                held: list[tuple[bytes, Delivery]] = []
                for reserve in reserves:
                    try:
                        delivery = await reserve
                    except GetTimeout:
                        continue
                    except ConnectionClosed:
                        broken = True
                        continue
                    held.append((self._reserved(delivery, client), delivery))
                if not broken and self.random.random() < self.args.drop_rate:
                    # Killed between Reserve and Ack: some acked first, maybe none.
                    dropping = True
                    audit.consumer_drops += 1
                    done = self.random.randrange(len(held) + 1)
                    broken = not await self._ack(held[:done])
                    for message_id, _ in held[done:]:
                        audit.ended[message_id] = _ABANDONED
                    if client.transport is not None:
                        client.transport.abortConnection()
                elif broken:
                    # A server kill cut the connection.
                    audit.held_at_kill += len(held)
                    for message_id, _ in held:
                        audit.ended[message_id] = _KILLED
                else:
                    broken = not await self._ack(held)
            await self._done_with(client, dropping or broken)

    async def killer(self) -> None:
        """Kill a random server with SIGKILL about every --kill-every seconds
        and start it again (on the same store)."""
        every = self.args.kill_every
        while True:
            await task.deferLater(self.reactor, self.random.uniform(0.5, 1.5) * every, lambda: None)
            live = [index for index, address in enumerate(self.addresses) if address is not None]
            if time.monotonic() + 1 > self.deadline or not live:
                return
            index = self.random.choice(live)
            server = self.servers[index]
            if server is None:
                return
            self.addresses[index] = None
            server.kill()
            server.wait()
            self.audit.server_kills += 1
            self.last_kill = time.monotonic()
            self.servers[index], self.addresses[index] = await threads.deferToThread(
                _start_server, self.args, index)

    def _live_address(self) -> str:
        return next(address for address in self.addresses if address is not None)

    async def drain(self) -> None:
        # A killed server's reservations come back on a Redis store only
        # once their leases (and grace) end and a survivor sweeps.
        until = time.monotonic()
        if self.last_kill is not None and self.args.reserve and _is_redis(self.args.store):
            until = self.last_kill + self.args.lease + 5
        client = await connect(self.reactor, self._live_address())
        client.soak_number = 0  # type: ignore[attr-defined]
        while True:
            found = 0
            for queue in self.queues:
                found += await self._drain_queue(client, queue)
            if not found:
                if time.monotonic() >= until:
                    break
                await task.deferLater(self.reactor, 0.2, lambda: None)
        await client.disconnect()

    async def _drain_queue(self, client: MQClient, queue: bytes) -> int:
        total = 0
        while True:
            # A window at a time; done once a whole window found none.
            # (Every worker has stopped: a queue with none ready is
            # empty.  The server answers a connection's requests in
            # order, so each waits out the Timeout of the one before.)
            asked: list[defer.Deferred[Any]]
            if self.args.reserve:
                asked = [client.reserve(queue, 0, self.args.lease) for _ in range(self.args.window)]
            else:
                asked = [client.get(queue, 0) for _ in range(self.args.window)]
            held: list[tuple[bytes, Delivery]] = []
            found = 0
            for answer in asked:
                try:
                    got = await answer
                except GetTimeout:
                    continue
                found += 1
                if self.args.reserve:
                    held.append((self._reserved(got, client), got))
                else:
                    self._delivered(got, client, queue)
            await self._ack(held)
            self.audit.drained += found
            total += found
            if not found:
                return total

    def _out_of_order(self) -> int:
        """Acknowledged messages a connection saw after a later one of their
        producer on their queue (in at-least-once mode, of their first
        deliveries only)."""
        audit = self.audit
        late = 0
        for (_, _, producer), seen in audit.seen.items():
            highest = -1
            for entry in seen:
                sequence, deliveries = entry >> 3, entry & 7
                if b"%s-%d" % (producer, sequence) not in audit.acked_ids:
                    continue
                if sequence < highest:
                    if deliveries <= 1:
                        late += 1
                else:
                    highest = sequence
        return late

    async def run(self) -> Audit:
        started = time.monotonic()
        self.deadline = started + self.args.duration
        workers = [defer.ensureDeferred(self.producer(i)) for i in range(self.args.producers)]
        consumer = self.reserving_consumer if self.args.reserve else self.consumer
        workers += [defer.ensureDeferred(consumer()) for _ in range(self.args.consumers)]
        if self.args.kill_every:
            workers.append(defer.ensureDeferred(self.killer()))
        await defer.gatherResults(workers, consumeErrors=True)
        await self.drain()
        audit = self.audit
        audit.duration_s = round(time.monotonic() - started, 1)
        audit.unknown = len(audit.delivered.keys() - audit.sent_ids)
        audit.out_of_order = self._out_of_order()
        if self.args.reserve:
            audit.acked_twice = sum(1 for count in audit.consumer_acks.values() if count > 1)
            # An Ack cut off by a kill may have been done: not missing.
            audit.missing = len(audit.acked_ids - audit.consumer_acks.keys() - audit.cut_ids)
            audit.passed = (
                audit.missing == audit.acked_twice == audit.unaccounted == 0
                and audit.corrupt == audit.unknown == audit.out_of_order == 0
            )
            return audit
        twice = {message_id for message_id, count in audit.delivered.items() if count > 1}
        audit.duplicates_after_drop = len(twice & audit.redeliverable)
        audit.duplicates = len(twice - audit.redeliverable)
        audit.missing = len(audit.acked_ids - audit.delivered.keys())
        # Messages put back after a consumer dropped go to the front.
        audit.order_checked = audit.consumer_drops == 0
        audit.passed = (
            audit.duplicates == 0 and audit.corrupt == 0 and audit.unknown == 0
            and audit.missing <= audit.vanished_bound
            and (audit.out_of_order == 0 or not audit.order_checked)
        )
        return audit


def _is_redis(store: Optional[str]) -> bool:
    return store is not None and store.startswith(("redis://", "redis+cluster://"))


def _spawn_server(args: argparse.Namespace) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "mqmq", "start", "-addr", "127.0.0.1:0"]
    if args.store is not None:
        command += ["--store", args.store]
    if args.redis_prefix is not None:
        command += ["--redis-prefix", args.redis_prefix]
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True)


def _started(server: subprocess.Popen[str], index: int) -> str:
    """The address a server logged it got; its log goes on to this
    process's standard error (each server's lines once it starts, so that a
    failure shows what the server said)."""
    assert server.stderr is not None
    for line in server.stderr:
        match = re.search(r"starting server: (127\.0\.0\.1:\d+)", line)
        if match:
            # Keep reading its log, so that the server never blocks writing it.
            threading.Thread(target=_copy_log, args=(server.stderr, index), daemon=True).start()
            return match.group(1)
    server.kill()
    raise SystemExit(f"server {index} did not start")


def _start_server(args: argparse.Namespace, index: int = 0) -> tuple[subprocess.Popen[str], str]:
    """``mqmq start`` on port 0 of loopback, and the address it got."""
    server = _spawn_server(args)
    return server, _started(server, index)


def _start_servers(args: argparse.Namespace) -> list[tuple[subprocess.Popen[str], str]]:
    """``--servers`` of them, started side by side."""
    spawned = [_spawn_server(args) for _ in range(args.servers)]
    started = []
    try:
        for index, server in enumerate(spawned):
            started.append((server, _started(server, index)))
    except BaseException:
        for server in spawned:
            server.kill()
        raise
    return started


def _copy_log(log: Any, index: int) -> None:
    for line in log:
        sys.stderr.write(f"server {index}: " + line)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addr", help="drive this server instead of starting one")
    parser.add_argument("--store", help="the started servers' --store (e.g. sqlite:PATH, redis://HOST:PORT/DB)")
    parser.add_argument("--servers", type=int, default=1,
                        help="servers to start on the --store (more than one: a Redis store)")
    parser.add_argument("--redis-prefix",
                        help="the servers' --redis-prefix [default with a Redis store: one of this run's own]")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--consumers", type=int, default=4)
    parser.add_argument("--queues", type=int, default=4)
    parser.add_argument("--window", type=int, default=16,
                        help="requests in flight per producer or consumer")
    parser.add_argument("--max-size", type=int, default=2048, help="largest random payload")
    parser.add_argument("--drop-rate", type=float, default=0.02,
                        help="chance that a batch or get ends with a dropped connection")
    parser.add_argument("--drop-delay", type=float, default=0.002,
                        help="longest delay before a drop, seconds")
    parser.add_argument("--reserve", action="store_true",
                        help="at-least-once: consumers Reserve and Ack, killed at random between the two")
    parser.add_argument("--lease", type=float, default=60.0, help="a Reserve's lease, seconds")
    parser.add_argument("--kill-every", type=float, default=0.0, metavar="SECONDS",
                        help="kill a server with SIGKILL about this often and start it again "
                             "(with --reserve, on a durable --store; without, on a Redis one)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print the audit as JSON only")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "big")
    redis = _is_redis(args.store)
    if args.kill_every and not (args.addr is None and args.store and (
            redis or args.reserve and not args.store.startswith("memory"))):
        parser.error("--kill-every needs --reserve and a durable --store of a server it starts "
                     "(or a Redis --store)")
    if args.servers < 1 or args.servers > 1 and (args.addr is not None or not redis):
        parser.error("--servers above 1 needs a Redis --store (servers sharing their queues), not --addr")
    if redis and args.redis_prefix is None and args.addr is None:
        # Runs sharing a Redis keep apart.
        args.redis_prefix = f"soak:{os.getpid()}:{os.urandom(4).hex()}:"

    servers = None
    if args.addr is None:
        servers = _start_servers(args)
    soak: list[Soak] = []
    try:
        result: list[Audit] = []

        async def run(reactor: Any) -> None:
            soak.append(Soak(reactor, args, servers))
            result.append(await soak[0].run())

        try:
            task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
        except SystemExit as exit_status:
            if exit_status.code:
                raise
    finally:
        running = soak[0].servers if soak else [server for server, _ in servers or ()]
        for server in running:
            if server is not None and server.poll() is None:
                server.send_signal(signal.SIGTERM)
        for server in running:
            if server is not None:
                server.wait(10)
    summary = result[0].summary()
    summary["seed"] = args.seed
    if args.redis_prefix is not None:
        summary["redis_prefix"] = args.redis_prefix
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>22}: {value}")
    raise SystemExit(0 if result[0].passed else 1)


if __name__ == "__main__":
    main()
