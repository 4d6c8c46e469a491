"""Kill a durable server with SIGKILL under load, again and again, and audit what survived.

    python benchmarks/crash.py [--cycles 100] [--producers 4] [--consumers 4]
                               [--queues 2] [--fsync always] [--seed N] [--json FILE]

Each cycle starts ``mqmq start --store sqlite:DB`` (the same database every
cycle) on a loopback port of its choosing, lets the producers and consumers
(a thread and a plain socket each) run against it for a random 0.2–1.2 s,
and kills it with SIGKILL.  The clients reconnect to the next cycle's
server.  After the last cycle a final server drains every queue, and the
audit requires:

- every ``Put`` answered ``OK`` delivered exactly once, except messages
  taken by a plain ``Get`` whose reply the kill cut off (at-most-once, as
  the protocol says): at most one per ``Get`` in flight at a kill, and
  counted;
- no message delivered twice, none that nobody put;
- a ``Put`` whose reply the kill cut off delivered at most once;
- within a queue, each consumer sees each producer's messages in the order
  they were put;
- the server empty at the end.

Exits 0 and prints the figures (JSON with ``--json``) when the audit
passes, 1 with the reasons when it does not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
_STARTED = re.compile(rb"starting server: 127\.0\.0\.1:(\d+)")
_UINT32 = struct.Struct(">I")
#: A client's socket gives up on a reply after this long (the server is gone).
REPLY_TIMEOUT_S = 5.0
#: A consumer's Get waits this long for a message.
GET_TIMEOUT_MS = 200


def frame(*values: bytes) -> bytes:
    payload = b"".join(_UINT32.pack(len(value)) + value for value in values)
    return _UINT32.pack(len(payload)) + payload


def read_reply(sock: socket.socket) -> list[bytes]:
    def exactly(count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    (length,) = _UINT32.unpack(exactly(4))
    payload = exactly(length)
    values = []
    while payload:
        (size,) = _UINT32.unpack(payload[:4])
        values.append(payload[4 : 4 + size])
        payload = payload[4 + size :]
    return values


class Server:
    """``mqmq start --store sqlite:DB`` in a subprocess, cycle after cycle."""

    def __init__(self, python: str, database: str, fsync: str, directory: str) -> None:
        self.python = python
        self.database = database
        self.fsync = fsync
        self.directory = directory
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.port = 0
        #: Goes up by one each start: a client that lost its connection waits for it.
        self.generation = 0
        self.changed = threading.Condition()
        self.starts = 0

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        self.starts += 1
        log = os.path.join(self.directory, f"server{self.starts}.log")
        with open(log, "wb") as err:
            process = subprocess.Popen(
                [self.python, "-m", "mqmq", "start", "-addr", "127.0.0.1:0",
                 "--store", f"sqlite:{self.database}", "--fsync", self.fsync],
                stdout=subprocess.DEVNULL, stderr=err, cwd=self.directory, env=env,
            )
        deadline = time.monotonic() + 60
        while True:
            found = _STARTED.search(Path(log).read_bytes())
            if found:
                break
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"the server did not start: {Path(log).read_text(errors='replace')}")
            time.sleep(0.01)
        with self.changed:
            self.process = process
            self.port = int(found.group(1))
            self.generation += 1
            self.changed.notify_all()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def connections(self, stopping: threading.Event) -> Iterator[socket.socket]:
        """A connection to each server in turn, until ``stopping``: the next one
        once the caller is done with (and has lost) the last."""
        generation = 0
        while not stopping.is_set():
            sock, generation = self.connect(generation, stopping)
            if sock is not None:
                with sock:
                    yield sock

    def connect(self, seen: int, stopping: threading.Event) -> tuple[Optional[socket.socket], int]:
        """A connection to the current server, once there is one newer than ``seen``."""
        with self.changed:
            while self.generation <= seen and not stopping.is_set():
                self.changed.wait(0.1)
            if stopping.is_set():
                return None, seen
            port, generation = self.port, self.generation
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT_S)
        except OSError:
            return None, generation  # already killed: wait for the next
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, generation


@dataclass
class Tally:
    """What the clients saw; lists are appended to by one thread each."""

    acknowledged: dict[bytes, tuple[int, int]] = field(default_factory=dict)  # message -> (queue, producer)
    uncertain: set[bytes] = field(default_factory=set)
    refused: int = 0
    delivered: list[tuple[int, bytes]] = field(default_factory=list)  # (consumer, message)
    gets_cut: int = 0
    timeouts: int = 0


def message_of(producer: int, seq: int, size: int) -> bytes:
    head = b"p%d:%d:" % (producer, seq)
    return head + b"x" * max(0, size - len(head))


def producer(server: Server, tally: Tally, number: int, queue: bytes, queue_index: int,
             size: int, stopping: threading.Event) -> None:
    seq = 0
    for sock in server.connections(stopping):
        while not stopping.is_set():
            message = message_of(number, seq, size)
            seq += 1
            try:
                sock.sendall(frame(b"Put", queue, message))
                reply = read_reply(sock)
            except OSError:
                tally.uncertain.add(message)
                break
            if reply == [b"OK"]:
                tally.acknowledged[message] = (queue_index, number)
            elif reply[:1] == [b"Error"]:
                tally.refused += 1
            else:
                raise AssertionError(f"unexpected reply to Put: {reply!r}")


def consumer(server: Server, tally: Tally, number: int, queue: bytes, stopping: threading.Event) -> None:
    get = frame(b"Get", queue, b"%d" % GET_TIMEOUT_MS)
    for sock in server.connections(stopping):
        while not stopping.is_set():
            try:
                sock.sendall(get)
                reply = read_reply(sock)
            except OSError:
                tally.gets_cut += 1
                break
            if reply[:1] == [b"OK"] and len(reply) == 2:
                tally.delivered.append((number, reply[1]))
            elif reply == [b"Timeout"]:
                tally.timeouts += 1
            else:
                raise AssertionError(f"unexpected reply to Get: {reply!r}")


def drain(port: int, queues: list[bytes], tally: Tally) -> int:
    """Take every message left; the number taken."""
    taken = 0
    with socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT_S) as sock:
        for queue in queues:
            while True:
                sock.sendall(frame(b"Get", queue, b"50"))
                reply = read_reply(sock)
                if reply == [b"Timeout"]:
                    break
                tally.delivered.append((-1, reply[1]))
                taken += 1
        sock.sendall(frame(b"Info"))
        info = json.loads(read_reply(sock)[1])
    if info["NumMessages"] != 0:
        raise AssertionError(f"the server still holds {info['NumMessages']} messages after draining")
    return taken


@dataclass
class Report:
    cycles: int
    fsync: str
    acknowledged: int
    refused: int
    uncertain_puts: int
    uncertain_delivered: int
    delivered: int
    drained: int
    gets_cut: int
    lost_to_cut_gets: int
    duplicates: int
    unknown: int
    order_violations: int
    seconds: float
    problems: list[str]


def audit(tally: Tally, cycles: int, fsync: str, drained: int, seconds: float) -> Report:
    problems: list[str] = []
    seen: dict[bytes, int] = {}
    for _, message in tally.delivered:
        seen[message] = seen.get(message, 0) + 1
    duplicates = sum(count - 1 for count in seen.values() if count > 1)
    if duplicates:
        examples = [m[:24] for m, c in seen.items() if c > 1][:3]
        problems.append(f"{duplicates} deliveries of messages already delivered, e.g. {examples}")
    unknown = [m for m in seen if m not in tally.acknowledged and m not in tally.uncertain]
    if unknown:
        problems.append(f"{len(unknown)} messages delivered that no Put sent, e.g. {unknown[:3]}")
    missing = [m for m in tally.acknowledged if m not in seen]
    if len(missing) > tally.gets_cut:
        problems.append(f"{len(missing)} acknowledged messages never delivered, more than the "
                        f"{tally.gets_cut} Gets the kills cut off, e.g. {[m[:24] for m in missing[:3]]}")
    # Order: each consumer sees each producer's messages in increasing sequence.
    last: dict[tuple[int, int], int] = {}
    violations = 0
    for consumer_number, message in tally.delivered:
        if consumer_number < 0:
            continue
        producer_part, seq_part, _ = message.split(b":", 2)
        key = (consumer_number, int(producer_part[1:]))
        seq = int(seq_part)
        if seq <= last.get(key, -1):
            violations += 1
        last[key] = seq
    if violations:
        problems.append(f"{violations} messages came before one put earlier by the same producer")
    return Report(
        cycles=cycles, fsync=fsync, acknowledged=len(tally.acknowledged), refused=tally.refused,
        uncertain_puts=len(tally.uncertain),
        uncertain_delivered=sum(1 for m in tally.uncertain if m in seen),
        delivered=len(tally.delivered), drained=drained, gets_cut=tally.gets_cut,
        lost_to_cut_gets=len(missing), duplicates=duplicates, unknown=len(unknown),
        order_violations=violations, seconds=round(seconds, 1), problems=problems,
    )


def run(cycles: int, producers: int = 4, consumers: int = 4, queues: int = 2, fsync: str = "always",
        size: int = 100, seed: Optional[int] = None, python: str = sys.executable,
        directory: Optional[str] = None, least_s: float = 0.2, most_s: float = 1.2) -> Report:
    """Run the cycles and the audit; the report (``problems`` empty when it passed)."""
    rng = random.Random(seed)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mqmq-crash-", dir=directory) as scratch:
        server = Server(python, os.path.join(scratch, "queues.db"), fsync, scratch)
        tally = Tally()
        stopping = threading.Event()
        names = [b"crash-%d" % index for index in range(queues)]
        threads = [
            threading.Thread(target=producer, args=(server, tally, n, names[n % queues], n % queues,
                                                    size, stopping), daemon=True)
            for n in range(producers)
        ] + [
            threading.Thread(target=consumer, args=(server, tally, n, names[n % queues], stopping),
                             daemon=True)
            for n in range(consumers)
        ]
        try:
            server.start()
            for thread in threads:
                thread.start()
            for cycle in range(cycles):
                time.sleep(rng.uniform(least_s, most_s))
                server.kill()
                if cycle < cycles - 1:
                    server.start()
            stopping.set()
            for thread in threads:
                thread.join(30)
            server.start()
            drained = drain(server.port, names, tally)
        finally:
            stopping.set()
            server.stop()
    return audit(tally, cycles, fsync, drained, time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--consumers", type=int, default=4)
    parser.add_argument("--queues", type=int, default=2)
    parser.add_argument("--fsync", default="always", choices=("always", "everysec", "no"))
    parser.add_argument("--size", type=int, default=100, help="message size in bytes")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--python", default=sys.executable, help="the Python that runs the server")
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON")
    args = parser.parse_args()
    report = run(args.cycles, args.producers, args.consumers, args.queues, args.fsync,
                 args.size, args.seed, args.python)
    figures: dict[str, Any] = asdict(report)
    for key, value in figures.items():
        if key != "problems":
            print(f"{key:22} {value}")
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    print("audit passed" if not report.problems else "audit FAILED")
    return 0 if not report.problems else 1


if __name__ == "__main__":
    sys.exit(main())
