"""Soak test: producers and consumers with random disconnects, then an audit.

    python benchmarks/soak.py --duration 60

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

from twisted.internet import defer, task

from mqmq import ConnectionClosed, GetTimeout, MQClient, connect


def _body(message_id: bytes, size: int) -> bytes:
    seed = hashlib.sha256(message_id).digest()
    return message_id + b":" + (seed * (size // 32 + 1))[:size]


def _intact(message: bytes) -> bool:
    message_id, _, rest = message.partition(b":")
    return _body(message_id, len(rest)) == message


@dataclass
class Audit:
    duration_s: float = 0.0
    puts_acked: int = 0
    puts_unacked: int = 0
    gets_delivered: int = 0
    producer_drops: int = 0
    consumer_drops: int = 0
    vanished_bound: int = 0
    missing: int = 0
    duplicates_after_drop: int = 0
    duplicates: int = 0
    corrupt: int = 0
    unknown: int = 0
    drained: int = 0
    passed: bool = False
    acked_ids: set[bytes] = field(default_factory=set, repr=False)
    delivered: Counter[bytes] = field(default_factory=Counter, repr=False)
    sent_ids: set[bytes] = field(default_factory=set, repr=False)
    #: Messages a consumer received in its last two batches before it dropped.
    redeliverable: set[bytes] = field(default_factory=set, repr=False)

    def summary(self) -> dict[str, Any]:
        hidden = ("acked_ids", "delivered", "sent_ids", "redeliverable")
        return {k: v for k, v in asdict(self).items() if k not in hidden}


class Soak:
    def __init__(self, reactor: Any, args: argparse.Namespace) -> None:
        self.reactor = reactor
        self.args = args
        self.random = random.Random(args.seed)
        self.audit = Audit()
        self.queues = [f"soak-{i}".encode() for i in range(args.queues)]
        self.deadline = 0.0

    def _drop_later(self, client: MQClient) -> None:
        delay = self.random.uniform(0, self.args.drop_delay)
        self.reactor.callLater(delay, lambda: client.transport and client.transport.abortConnection())

    async def producer(self, number: int) -> None:
        sequence = 0
        while time.monotonic() < self.deadline:
            client = await connect(self.reactor, self.args.addr)
            dropping = False
            while time.monotonic() < self.deadline and not dropping:
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
                    else:
                        self.audit.puts_acked += 1
                        self.audit.acked_ids.add(message_id)
            if not dropping:
                await client.disconnect()
            else:
                await client.when_closed()

    def _delivered(self, message: bytes) -> bytes:
        self.audit.gets_delivered += 1
        message_id = message.partition(b":")[0]
        self.audit.delivered[message_id] += 1
        if not _intact(message):
            self.audit.corrupt += 1
        return message_id

    async def consumer(self) -> None:
        while time.monotonic() < self.deadline:
            client = await connect(self.reactor, self.args.addr)
            dropping = False
            previous_batch: list[bytes] = []
            while time.monotonic() < self.deadline and not dropping:
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
            if not dropping:
                await client.disconnect()
            else:
                await client.when_closed()

    async def drain(self) -> None:
        client = await connect(self.reactor, self.args.addr)
        for queue in self.queues:
            while True:
                try:
                    self._delivered(await client.get(queue, 0.2))
                    self.audit.drained += 1
                except GetTimeout:
                    break
        await client.disconnect()

    async def run(self) -> Audit:
        started = time.monotonic()
        self.deadline = started + self.args.duration
        workers = [defer.ensureDeferred(self.producer(i)) for i in range(self.args.producers)]
        workers += [defer.ensureDeferred(self.consumer()) for _ in range(self.args.consumers)]
        await defer.gatherResults(workers, consumeErrors=True)
        await self.drain()
        audit = self.audit
        audit.duration_s = round(time.monotonic() - started, 1)
        twice = {message_id for message_id, count in audit.delivered.items() if count > 1}
        audit.duplicates_after_drop = len(twice & audit.redeliverable)
        audit.duplicates = len(twice - audit.redeliverable)
        audit.missing = len(audit.acked_ids - audit.delivered.keys())
        audit.unknown = len(audit.delivered.keys() - audit.sent_ids)
        audit.passed = (
            audit.duplicates == 0 and audit.corrupt == 0 and audit.unknown == 0
            and audit.missing <= audit.vanished_bound
        )
        return audit


def _start_server() -> tuple[subprocess.Popen[str], str]:
    """``mqmq start`` on port 0 of loopback, and the address it got."""
    server = subprocess.Popen([sys.executable, "-m", "mqmq", "start", "-addr", "127.0.0.1:0"],
                              stderr=subprocess.PIPE, text=True)
    assert server.stderr is not None
    for line in server.stderr:
        match = re.search(r"starting server: (127\.0\.0\.1:\d+)", line)
        if match:
            # Keep reading its log, so that the server never blocks writing it.
            threading.Thread(target=server.stderr.read, daemon=True).start()
            return server, match.group(1)
    server.kill()
    raise SystemExit("the server did not start")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addr", help="drive this server instead of starting one")
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
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print the audit as JSON only")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "big")

    server = None
    if args.addr is None:
        server, args.addr = _start_server()
    try:
        result: list[Audit] = []

        async def run(reactor: Any) -> None:
            result.append(await Soak(reactor, args).run())

        try:
            task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
        except SystemExit as exit_status:
            if exit_status.code:
                raise
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(10)
    summary = result[0].summary()
    summary["seed"] = args.seed
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>16}: {value}")
    raise SystemExit(0 if result[0].passed else 1)


if __name__ == "__main__":
    main()
