"""Soak test: producers and consumers with random disconnects, then an audit.

    python benchmarks/soak.py --duration 60
    python benchmarks/soak.py --duration 60 --reserve [--store sqlite:PATH] [--kill-every 5]

Starts its own server (``python -m mqmq start``) on loopback port 0 (reading
the port it got from its log), or drives an existing one with ``--addr``.  Producers put uniquely numbered
messages, consumers take them; both drop their connections at random moments
(abortConnection, like a crash or RST) and reconnect.  At the end every queue
is drained and audited:

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
  unsent: hence two.)  Every delivered message is intact.

With ``--reserve`` (at-least-once delivery) consumers ``Reserve`` and
``Ack`` instead, and are killed at random between the two: a consumer that
drops acks part of what it reserved (maybe none) and aborts its
connection, and the server hands the rest out again.  ``--kill-every S``
also kills the server with SIGKILL about every S seconds and starts it
again on the same ``--store`` (a durable one: ``sqlite:PATH``); clients
reconnect.  The audit then requires:

- every ``Put`` answered ``OK`` acked exactly once: none ``missing``, none
  ``acked_twice``.  (A message whose ``Ack`` a server kill cut off may have
  been acked before the kill: ``ack_cut`` counts those, and one that never
  comes back is not missing.)
- every redelivery accounted for: a message is handed out again only after
  a delivery of it that was not acked (its consumer killed, or its ``Ack``
  cut off), with a higher deliveries count each time (``redelivered``;
  ``unaccounted`` must be 0);
- every delivered message intact, none that nobody put.

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
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from twisted.internet import defer, error, task, threads

from mqmq import ConnectionClosed, GetTimeout, MQClient, connect
from mqmq.client import Delivery


def _body(message_id: bytes, size: int) -> bytes:
    seed = hashlib.sha256(message_id).digest()
    return message_id + b":" + (seed * (size // 32 + 1))[:size]


def _intact(message: bytes) -> bool:
    message_id, _, rest = message.partition(b":")
    return _body(message_id, len(rest)) == message


#: How a delivery in at-least-once mode ended (Audit.ended).
_ACKED, _ABANDONED, _CUT = "acked", "abandoned", "cut"


@dataclass
class Audit:
    mode: str = "get"
    duration_s: float = 0.0
    puts_acked: int = 0
    puts_unacked: int = 0
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
    # At-least-once mode (--reserve).
    acks: int = 0
    acked_twice: int = 0
    ack_cut: int = 0
    redelivered: int = 0
    unaccounted: int = 0
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

    def summary(self) -> dict[str, Any]:
        hidden = ("acked_ids", "delivered", "sent_ids", "redeliverable", "ended", "counts",
                  "consumer_acks", "cut_ids")
        return {k: v for k, v in asdict(self).items() if k not in hidden}


class Soak:
    def __init__(self, reactor: Any, args: argparse.Namespace,
                 server: Optional[subprocess.Popen[str]] = None) -> None:
        self.reactor = reactor
        self.args = args
        self.random = random.Random(args.seed)
        self.audit = Audit(mode="reserve" if args.reserve else "get")
        self.queues = [f"soak-{i}".encode() for i in range(args.queues)]
        self.deadline = 0.0
        #: The server this run started (and kills, with --kill-every).
        self.server = server

    def _running(self) -> bool:
        return time.monotonic() < self.deadline

    async def _connect(self) -> Optional[MQClient]:
        """A new connection, tried again while the server is down (being
        restarted); None once the time is up."""
        while True:
            try:
                return await connect(self.reactor, self.args.addr)
            except (error.ConnectError, ConnectionClosed):
                if not self._running():
                    return None
                await task.deferLater(self.reactor, 0.05, lambda: None)

    def _drop_later(self, client: MQClient) -> None:
        delay = self.random.uniform(0, self.args.drop_delay)
        self.reactor.callLater(delay, lambda: client.transport and client.transport.abortConnection())

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

    def _delivered(self, message: bytes) -> bytes:
        self.audit.gets_delivered += 1
        message_id = message.partition(b":")[0]
        self.audit.delivered[message_id] += 1
        if not _intact(message):
            self.audit.corrupt += 1
        return message_id

    async def consumer(self) -> None:
        while self._running():
            client = await self._connect()
            if client is None:
                return
            dropping = False
            previous_batch: list[bytes] = []
            while self._running() and not dropping:
                batch: list[bytes] = []
                gets = [client.get(self.random.choice(self.queues), 0.05)
                        for _ in range(self.args.window)]
                if self.random.random() < self.args.drop_rate:
                    dropping = True
                    self.audit.consumer_drops += 1
                    self._drop_later(client)
                for get in gets:
                    try:
                        batch.append(self._delivered(await get))
                    except GetTimeout:
                        pass
                    except ConnectionClosed:
                        # The server may have written a message to us already.
                        self.audit.vanished_bound += 1
                if dropping:
                    self.audit.redeliverable.update(previous_batch, batch)
                previous_batch = batch
            await self._done_with(client, dropping)

    # At-least-once (--reserve) ------------------------------------------------

    def _reserved(self, delivery: Delivery) -> bytes:
        audit = self.audit
        message_id = self._delivered(delivery.message)
        if message_id in audit.ended or message_id in audit.counts:
            audit.redelivered += 1
            # Handed out again: only after a delivery that was not acked,
            # and counted one more time.
            if audit.ended.get(message_id) == _ACKED or delivery.deliveries <= audit.counts[message_id]:
                audit.unaccounted += 1
        audit.counts[message_id] = delivery.deliveries
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
                    held.append((self._reserved(delivery), delivery))
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
                    for message_id, _ in held:
                        audit.ended[message_id] = _ABANDONED
                else:
                    broken = not await self._ack(held)
            await self._done_with(client, dropping or broken)

    async def killer(self) -> None:
        """Kill the server with SIGKILL about every --kill-every seconds and
        start it again (on the same store)."""
        every = self.args.kill_every
        while True:
            await task.deferLater(self.reactor, self.random.uniform(0.5, 1.5) * every, lambda: None)
            if time.monotonic() + 1 > self.deadline or self.server is None:
                return
            self.server.kill()
            self.server.wait()
            self.audit.server_kills += 1
            self.server, self.args.addr = await threads.deferToThread(_start_server, self.args.store)

    async def drain(self) -> None:
        client = await connect(self.reactor, self.args.addr)
        for queue in self.queues:
            while True:
                # A window at a time; done once a whole window found none.
                # (Every worker has stopped: a queue with none ready is
                # empty.  The server answers a connection's requests in
                # order, so each waits out the Timeout of the one before.)
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
                        held.append((self._reserved(got), got))
                    else:
                        self._delivered(got)
                await self._ack(held)
                self.audit.drained += found
                if not found:
                    break
        await client.disconnect()

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
        if self.args.reserve:
            audit.acked_twice = sum(1 for count in audit.consumer_acks.values() if count > 1)
            # An Ack cut off by a kill may have been done: not missing.
            audit.missing = len(audit.acked_ids - audit.consumer_acks.keys() - audit.cut_ids)
            audit.passed = (
                audit.missing == audit.acked_twice == audit.unaccounted == 0
                and audit.corrupt == audit.unknown == 0
            )
            return audit
        twice = {message_id for message_id, count in audit.delivered.items() if count > 1}
        audit.duplicates_after_drop = len(twice & audit.redeliverable)
        audit.duplicates = len(twice - audit.redeliverable)
        audit.missing = len(audit.acked_ids - audit.delivered.keys())
        audit.passed = (
            audit.duplicates == 0 and audit.corrupt == 0 and audit.unknown == 0
            and audit.missing <= audit.vanished_bound
        )
        return audit


def _start_server(store: Optional[str] = None) -> tuple[subprocess.Popen[str], str]:
    """``mqmq start`` on port 0 of loopback, and the address it got; its log
    goes on to this process's standard error (each server's lines once it
    starts, so that a failure shows what the server said)."""
    command = [sys.executable, "-m", "mqmq", "start", "-addr", "127.0.0.1:0"]
    if store is not None:
        command += ["--store", store]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert server.stderr is not None
    for line in server.stderr:
        match = re.search(r"starting server: (127\.0\.0\.1:\d+)", line)
        if match:
            # Keep reading its log, so that the server never blocks writing it.
            threading.Thread(target=_copy_log, args=(server.stderr,), daemon=True).start()
            return server, match.group(1)
    server.kill()
    raise SystemExit("the server did not start")


def _copy_log(log: Any) -> None:
    for line in log:
        sys.stderr.write("server: " + line)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addr", help="drive this server instead of starting one")
    parser.add_argument("--store", help="the started server's --store (e.g. sqlite:PATH)")
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
                        help="kill the server with SIGKILL about this often and start it again "
                             "(with --reserve, on a durable --store)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print the audit as JSON only")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "big")
    if args.kill_every and not (args.reserve and args.addr is None and args.store
                                and not args.store.startswith("memory")):
        parser.error("--kill-every needs --reserve and a durable --store of a server it starts")

    server = None
    if args.addr is None:
        server, args.addr = _start_server(args.store)
    soak: list[Soak] = []
    try:
        result: list[Audit] = []

        async def run(reactor: Any) -> None:
            soak.append(Soak(reactor, args, server))
            result.append(await soak[0].run())

        try:
            task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
        except SystemExit as exit_status:
            if exit_status.code:
                raise
    finally:
        running = soak[0].server if soak else server
        if running is not None:
            running.send_signal(signal.SIGTERM)
            running.wait(10)
    summary = result[0].summary()
    summary["seed"] = args.seed
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>22}: {value}")
    raise SystemExit(0 if result[0].passed else 1)


if __name__ == "__main__":
    main()
