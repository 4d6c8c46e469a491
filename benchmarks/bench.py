#!/usr/bin/env python3
"""Throughput, latency and memory of an mqmq server, beside a "floor" server.

    python benchmarks/bench.py [--addr HOST:PORT]
        [--workloads sync,pipelined,client,fan,memory,large,idle,scaling]
        [--runs N] [--json FILE] [--chart FILE.png] [--quick]

Starts our server (``python -m mqmq start``) on a free loopback port, or
drives an existing one with ``--addr``.  It always starts a *floor* server
too: a loop in this file that walks frame lengths and answers at once,
holding no queues.  Every throughput workload runs against both; when the
floor is well ahead, the figures measured for mqmq are the server's, not the
load generator's.

The load generator runs in worker processes: blocking sockets, requests
encoded once, replies checked against the expected bytes while walking frame
lengths in large receive buffers.  The ``client`` workload instead measures
our own Deferred client (``mqmq.client``) on a reactor.  A reply that is not
the expected one, or a count that does not add up, is an error: the run goes
on with the next workload and the exit status is 1.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import multiprocessing
import os
import platform
import re
import resource
import selectors
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from array import array
from dataclasses import asdict, dataclass
from multiprocessing.connection import wait as wait_for_results
from typing import Any, Callable, Optional, Sequence

perf_ns = time.perf_counter_ns

#: Seconds without a reply before a workload is declared stuck.
STALL_S = 30.0
#: Seconds a whole load-generator job may take.
JOB_TIMEOUT_S = 600.0
#: Size of the messages of every workload except ``large``.
MESSAGE_SIZE = 100
LARGE_SIZE = 1024 * 1024
PIPELINE_WINDOW = 128
CLIENT_WINDOW = 128
FAN_WINDOW = 128
FAN_PRODUCERS = 4
FAN_CONSUMERS = 4
FAN_GET_TIMEOUT_MS = 1000
SCALING_WINDOW = 16
SCALING_CONNECTIONS = (1, 2, 4, 8, 16, 32, 64)

WORKLOADS = ("sync", "pipelined", "client", "fan", "memory", "large", "idle", "scaling")

#: The original Go server's figures on a 2-core machine of this class; for
#: the reader, never checked.
GO_FIGURES = {
    ("sync", "us_per_pair"): "110–125",
    ("pipelined", "rate"): "100,000–112,000",
    ("fan", "rate"): "34,000–43,000",
    ("memory", "rss_full_mb"): "234",
}

#: Targets set for our server (the project's issue); shown beside the figures.
TARGETS = {
    ("client", "put_rate"): "≥ 100,000 (target)",
}


class BenchError(Exception):
    """A workload failed: a bad reply, a count that does not add up, a stall."""


# --- The wire ---------------------------------------------------------------

_U32 = struct.Struct(">I")
_pack = _U32.pack
_unpack_from = _U32.unpack_from
MAX_FRAME = 4 + 3 + 4 + 1024 + 4 + 32 * 1024 * 1024


def frame(*values: bytes) -> bytes:
    payload = b"".join(_pack(len(value)) + value for value in values)
    return _pack(len(payload)) + payload


def decode(data: bytes) -> Optional[list[bytes]]:
    """The values of one whole frame, or None when it is malformed."""
    if len(data) < 4 or _unpack_from(data, 0)[0] != len(data) - 4:
        return None
    values, offset = [], 4
    while offset < len(data):
        if len(data) - offset < 4:
            return None
        (length,) = _unpack_from(data, offset)
        offset += 4
        if length > len(data) - offset:
            return None
        values.append(data[offset:offset + length])
        offset += length
    return values


OK_REPLY = frame(b"OK")
TIMEOUT_REPLY = frame(b"Timeout")
INFO_REQUEST = frame(b"Info")
_PATTERN = b"mqmq benchmark message: 0123456789 abcdefghijklmnopqrstuvwxyz\n"


def message_body(size: int) -> bytes:
    return (_PATTERN * (size // len(_PATTERN) + 1))[:size]


def size_of_queue(queue: bytes) -> int:
    """Message size named by a benchmark queue: its last dot-separated field."""
    tail = queue.rpartition(b".")[2]
    return int(tail) if tail.isdigit() else 0


def put_request(queue: bytes) -> bytes:
    return frame(b"Put", queue, message_body(size_of_queue(queue)))


def get_request(queue: bytes, timeout_ms: int) -> bytes:
    return frame(b"Get", queue, str(timeout_ms).encode())


def get_reply(queue: bytes) -> bytes:
    return frame(b"OK", message_body(size_of_queue(queue)))


def _short(values: Optional[list[bytes]]) -> str:
    if values is None:
        return "a malformed frame"
    shown = [v if len(v) <= 40 else v[:32] + b"...(%d bytes)" % len(v) for v in values]
    return "[" + ", ".join(repr(v) for v in shown) + "]"


def describe_unexpected(got: bytes, expected: bytes, good: int) -> str:
    values = decode(got)
    after = f"after {good:,} good replies"
    if values is None:
        return f"malformed reply {got[:48]!r} ({len(got)} bytes) {after}"
    if values[:1] == [b"Timeout"] and expected != TIMEOUT_REPLY:
        return f"a Get was answered Timeout {after}: messages went missing"
    if values[:1] == [b"Error"]:
        return f"the server answered {_short(values)} {after}"
    return f"unexpected reply {_short(values)} {after}; expected {_short(decode(expected))}"


def split_address(address: str) -> tuple[str, int]:
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise BenchError(f"bad address {address!r}: want HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def connect(address: str, timeout: Optional[float] = None) -> socket.socket:
    host, port = split_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except OSError as error:
        raise BenchError(f"cannot connect to {address}: {error}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(STALL_S if timeout is None else timeout)
    return sock


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    chunks, left = [], count
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise BenchError("the server closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def call(sock: socket.socket, request: bytes) -> list[bytes]:
    """Send one request, read one reply frame: for checks, not for load."""
    sock.sendall(request)
    header = _recv_exactly(sock, 4)
    reply = header + _recv_exactly(sock, _unpack_from(header, 0)[0])
    values = decode(reply)
    if values is None:
        raise BenchError(f"malformed reply {reply[:48]!r}")
    return values


def info_on(sock: socket.socket) -> dict[str, Any]:
    values = call(sock, INFO_REQUEST)
    if len(values) < 2 or values[0] != b"OK":
        raise BenchError(f"Info was answered {_short(values)}")
    try:
        return dict(json.loads(values[1]))
    except ValueError as error:
        raise BenchError(f"Info carried bad JSON: {error}") from None


def info(address: str) -> dict[str, Any]:
    with connect(address, 10) as sock:
        return info_on(sock)


# --- Process helpers ----------------------------------------------------------

try:
    _LIBC: Optional[ctypes.CDLL] = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _LIBC = None


def die_with_parent() -> None:
    """Linux: be sent SIGTERM when the benchmark process dies, even by SIGKILL."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def raise_open_files(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return soft


def read_rss(pid: Optional[int]) -> Optional[int]:
    """Resident bytes of a process (VmRSS), or None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _mb(size: Optional[float]) -> Optional[float]:
    return None if size is None else size / 1e6


# --- The floor server ---------------------------------------------------------


def floor_main(address: str) -> None:
    """Answer frames with the least work possible; run as ``--floor-server``.

    Put and Info get OK; Get gets OK and the message a benchmark queue of that
    name holds (its size is the queue name's last field), the bytes mqmq would
    send.  No queues, no waiting: the answer is immediate.
    """
    die_with_parent()
    raise_open_files(1 << 16)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    host, port = split_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family, backlog=4096)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    bound = listener.getsockname()
    shown = f"[{bound[0]}]:{bound[1]}" if family == socket.AF_INET6 else f"{bound[0]}:{bound[1]}"
    sys.stderr.write(f"{time.strftime('%Y/%m/%d %H:%M:%S')} INFO: starting server: {shown}\n")
    sys.stderr.flush()

    scratch = bytearray(1 << 20)
    scratch_view = memoryview(scratch)
    replies: dict[bytes, bytes] = {}
    ok = OK_REPLY
    unknown = frame(b"Error", b"REQUEST_UNKNOWN_COMMAND")
    unpack = _unpack_from
    READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE

    class Connection:
        __slots__ = ("sock", "inbox", "outbox")

        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock
            self.inbox = bytearray()
            self.outbox = bytearray()

    def close(conn: Connection) -> None:
        selector.unregister(conn.sock)
        conn.sock.close()

    def flush(conn: Connection) -> None:
        try:
            sent = conn.sock.send(conn.outbox)
        except BlockingIOError:
            return
        except OSError:
            close(conn)
            return
        del conn.outbox[:sent]
        if not conn.outbox:
            selector.modify(conn.sock, READ, conn)

    def read(conn: Connection) -> None:
        try:
            count = conn.sock.recv_into(scratch)
        except BlockingIOError:
            return
        except OSError:
            close(conn)
            return
        if not count:
            close(conn)
            return
        inbox = conn.inbox
        inbox += scratch_view[:count]
        end = len(inbox)
        offset = 0
        out: list[bytes] = []
        closing = False
        while end - offset >= 4:
            length = unpack(inbox, offset)[0]
            stop = offset + 4 + length
            if stop > end:
                closing = length > MAX_FRAME
                break
            command = unpack(inbox, offset + 4)[0] if length >= 4 else 0
            first = inbox[offset + 8] if length >= 5 else 0
            if command == 3 and first == 0x50:  # Put
                out.append(ok)
            elif command == 3 and first == 0x47 and length >= 11:  # Get
                name_length = unpack(inbox, offset + 11)[0]
                queue = bytes(inbox[offset + 15:offset + 15 + name_length])
                reply = replies.get(queue)
                if reply is None:
                    reply = replies[queue] = get_reply(queue)
                out.append(reply)
            elif command == 4 and first == 0x49:  # Info
                out.append(ok)
            else:  # Quit, or anything else
                if first != 0x51:
                    out.append(unknown)
                closing = True
                break
            offset = stop
        if offset:
            del inbox[:offset]
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            try:
                sent = conn.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                close(conn)
                return
            if sent < len(data):
                # Stop reading until the replies are out: the client's window
                # bounds what it sends, the kernel's buffers push back.
                conn.outbox += memoryview(data)[sent:]
                selector.modify(conn.sock, WRITE, conn)
        if closing:
            if conn.outbox:
                conn.sock.settimeout(1)
                try:
                    conn.sock.sendall(conn.outbox)
                except OSError:
                    pass
            close(conn)

    while True:
        for key, events in selector.select():
            conn = key.data
            if conn is None:
                while True:
                    try:
                        sock, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # out of descriptors: try again later
                        time.sleep(0.01)
                        break
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    new = Connection(sock)
                    selector.register(sock, READ, new)
            elif events & WRITE:
                flush(conn)
            else:
                read(conn)


# --- Server processes ---------------------------------------------------------

_READY = re.compile(r"INFO: starting server: (\S+)")


class ServerProcess:
    """A server subprocess, ready once it logs ``INFO: starting server: ADDR``."""

    def __init__(self, label: str, argv: list[str]) -> None:
        self.label = label
        self.argv = argv
        handle, self.log_path = tempfile.mkstemp(prefix="mqmq-bench-", suffix=".log")
        os.close(handle)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, preexec_fn=die_with_parent,
            )
        self.address = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def tail(self, lines: int = 20) -> str:
        text = self.output().rstrip().splitlines()[-lines:]
        return "\n".join("    " + line for line in text) or "    (no output)"

    def wait_ready(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            match = _READY.search(self.output())
            if match:
                self.address = match.group(1).rstrip(",")
                break
            if self.proc.poll() is not None:
                raise BenchError(
                    f"the {self.label} server exited with status {self.proc.returncode} "
                    f"before listening.\n  command: {' '.join(self.argv)}\n  its output:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the {self.label} server did not log 'INFO: starting server' within "
                    f"{timeout:g} s.\n  command: {' '.join(self.argv)}\n  its output:\n{self.tail()}"
                )
            time.sleep(0.05)
        connect(self.address, 5).close()
        return self.address

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(
                f"the {self.label} server died (exit status {self.proc.returncode}); "
                f"its last output:\n{self.tail()}"
            )

    def rss(self) -> Optional[int]:
        return read_rss(self.proc.pid) if self.proc.poll() is None else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            os.unlink(self.log_path)
        except OSError:
            pass


def _started(label: str, argv: list[str]) -> ServerProcess:
    server = ServerProcess(label, argv)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def start_mqmq() -> ServerProcess:
    # Port 0: the server logs the port it got, which wait_ready reads.
    return _started("mqmq", [sys.executable, "-m", "mqmq", "start", "-addr", "127.0.0.1:0",
                             "--max-queued-bytes", "0", "--max-queued-messages", "0"])


def start_floor() -> ServerProcess:
    return _started("floor", [sys.executable, os.path.abspath(__file__), "--floor-server", "127.0.0.1:0"])


# --- The load generator --------------------------------------------------------


class Phase:
    """``count`` requests cycling through ``pattern``: (request, expected reply) pairs.

    The requests are encoded once, the pattern repeated enough that any
    ``window`` consecutive requests are one slice of one buffer.
    """

    __slots__ = ("count", "size", "requests", "offsets", "expected")

    def __init__(self, pattern: Sequence[tuple[bytes, bytes]], count: int, window: int) -> None:
        self.count = count
        self.size = len(pattern)
        repeats = (window + 2 * self.size - 1) // self.size
        requests = [request for request, _ in pattern] * repeats
        self.requests = memoryview(b"".join(requests))
        self.offsets = [0]
        for request in requests:
            self.offsets.append(self.offsets[-1] + len(request))
        self.expected = [reply for _, reply in pattern]


class Stream:
    """One connection working through its phases, ``window`` requests in flight.

    Send times are recorded per send call and reply times per receive call
    (cumulative counts with a timestamp), so the hot loops do no per-request
    bookkeeping; per-request latencies are derived afterwards.
    """

    def __init__(self, sock: socket.socket, phases: list[Phase], window: int) -> None:
        self.sock = sock
        self.phases = phases
        self.window = window
        self.total = sum(phase.count for phase in phases)
        largest = max(len(reply) for phase in phases for reply in phase.expected)
        self.capacity = max(1 << 18, 2 * largest + (1 << 16))
        self.buf = bytearray(self.capacity)
        self.view = memoryview(self.buf)
        self.filled = 0
        self.sent = 0
        self.replied = 0
        self.send_phase = 0
        self.send_position = 0
        self.recv_phase = 0
        self.recv_left = phases[0].count
        self.recv_index = 0
        self.send_counts = array("q")
        self.send_times = array("q")
        self.recv_counts = array("q")
        self.recv_times = array("q")

    def send_more(self) -> None:
        batch = min(self.window - (self.sent - self.replied), self.total - self.sent)
        if batch <= 0:
            return
        now = perf_ns()
        left = batch
        try:
            while left:
                phase = self.phases[self.send_phase]
                take = min(left, phase.count - self.send_position)
                first = self.send_position % phase.size
                self.sock.sendall(phase.requests[phase.offsets[first]:phase.offsets[first + take]])
                left -= take
                self.send_position += take
                if self.send_position == phase.count:
                    self.send_phase += 1
                    self.send_position = 0
        except OSError as error:
            raise BenchError(f"sending failed after {self.replied:,} of {self.total:,} "
                             f"replies: {error}") from None
        self.sent += batch
        self.send_counts.append(self.sent)
        self.send_times.append(now)

    def receive(self) -> None:
        try:
            count = self.sock.recv_into(self.view[self.filled:])
        except socket.timeout:
            raise BenchError(f"no reply for {STALL_S:g} s after {self.replied:,} of "
                             f"{self.total:,} replies") from None
        except OSError as error:
            raise BenchError(f"connection failed after {self.replied:,} of {self.total:,} "
                             f"replies: {error}") from None
        now = perf_ns()
        if not count:
            raise BenchError(f"the server closed the connection after {self.replied:,} of "
                             f"{self.total:,} replies")
        buf = self.buf
        end = self.filled + count
        offset = 0
        replied = self.replied
        sent = self.sent
        left = self.recv_left
        index = self.recv_index
        phase = self.phases[self.recv_phase]
        expected = phase.expected[index]
        expected_length = len(expected) - 4
        while end - offset >= 4:
            length = _unpack_from(buf, offset)[0]
            stop = offset + 4 + length
            if stop > end:
                if stop - offset > self.capacity:
                    self._unexpected(offset, end, expected, replied)
                break
            if replied == sent:
                raise BenchError(f"a reply came with no request in flight, after {replied:,} replies")
            if length != expected_length or not buf.startswith(expected, offset):
                self._unexpected(offset, stop, expected, replied)
            offset = stop
            replied += 1
            left -= 1
            if left:
                index += 1
                if index == phase.size:
                    index = 0
            elif replied < self.total:
                self.recv_phase += 1
                phase = self.phases[self.recv_phase]
                left = phase.count
                index = 0
            expected = phase.expected[index]
            expected_length = len(expected) - 4
        rest = end - offset
        if offset and rest:
            self.view[:rest] = self.view[offset:end]
        self.filled = rest
        if replied != self.replied:
            self.replied = replied
            self.recv_left = left
            self.recv_index = index
            self.recv_counts.append(replied)
            self.recv_times.append(now)

    def _unexpected(self, offset: int, stop: int, expected: bytes, good: int) -> None:
        got = bytes(self.buf[offset:stop])
        if stop - offset < 4 + _unpack_from(self.buf, offset)[0]:
            raise BenchError(f"a reply frame announces {_unpack_from(self.buf, offset)[0]:,} bytes, "
                             f"more than any expected reply, after {good:,} good replies")
        raise BenchError(describe_unexpected(got, expected, good))

    def latency_runs(self) -> tuple[array[int], array[int]]:
        """Latencies as runs: (latency ns, number of requests with it)."""
        latencies, counts = array("q"), array("q")
        sent_i = got_i = position = 0
        send_counts, send_times = self.send_counts, self.send_times
        recv_counts, recv_times = self.recv_counts, self.recv_times
        while position < self.replied:
            upto = min(send_counts[sent_i], recv_counts[got_i])
            latencies.append(recv_times[got_i] - send_times[sent_i])
            counts.append(upto - position)
            position = upto
            if send_counts[sent_i] == upto:
                sent_i += 1
            if recv_counts[got_i] == upto:
                got_i += 1
        return latencies, counts


def drive(streams: list[Stream]) -> None:
    """Run streams to completion: one blocking, several over a selector."""
    if len(streams) == 1:
        stream = streams[0]
        stream.send_more()
        while stream.replied < stream.total:
            stream.receive()
            stream.send_more()
        return
    with selectors.DefaultSelector() as selector:
        for stream in streams:
            selector.register(stream.sock, selectors.EVENT_READ, stream)
        for stream in streams:
            stream.send_more()
        active = len(streams)
        while active:
            events = selector.select(STALL_S)
            if not events:
                done = sum(s.replied for s in streams)
                raise BenchError(f"no reply for {STALL_S:g} s after {done:,} of "
                                 f"{sum(s.total for s in streams):,} replies")
            for key, _ in events:
                stream = key.data
                stream.receive()
                if stream.replied >= stream.total:
                    selector.unregister(stream.sock)
                    active -= 1
                else:
                    stream.send_more()


def stream_results(streams: list[Stream]) -> dict[str, Any]:
    latencies, counts = array("q"), array("q")
    for stream in streams:
        runs = stream.latency_runs()
        latencies.extend(runs[0])
        counts.extend(runs[1])
    return {
        "requests": sum(s.replied for s in streams),
        "start": min(s.send_times[0] for s in streams),
        "end": max(s.recv_times[-1] for s in streams),
        "lat": latencies,
        "cnt": counts,
    }


Spec = list[tuple[list[tuple[bytes, bytes]], int]]  # one connection's phases


def pipeline_job(address: str, specs: list[Spec], window: int, barrier: Any = None,
                 warmup: Optional[Spec] = None) -> dict[str, Any]:
    """Drive one connection per spec, ``window`` requests in flight on each.

    ``warmup`` runs first on every connection, untimed: the server's code
    paths and the scheduler's placement of the processes settle before the
    clock starts.
    """
    socks = [connect(address) for _ in specs]
    try:
        if warmup:
            drive([Stream(sock, [Phase(pattern, count, window) for pattern, count in warmup], window)
                   for sock in socks])
        streams = [Stream(sock, [Phase(pattern, count, window) for pattern, count in spec], window)
                   for sock, spec in zip(socks, specs)]
        if barrier is not None:
            barrier.wait(60)
        drive(streams)
        return stream_results(streams)
    finally:
        for sock in socks:
            sock.close()


def consumer_job(address: str, queue: bytes, consumers: int, total: int,
                 barrier: Any) -> dict[str, Any]:
    """``consumers`` connections each with one ``Get`` in flight, until ``total`` arrive.

    A ``Timeout`` reply (the queue stayed empty for the Get's timeout) is
    not an error here: the Get is sent again.
    """
    request = get_request(queue, FAN_GET_TIMEOUT_MS)
    expected = get_reply(queue)
    expected_size, timeout_size = len(expected), len(TIMEOUT_REPLY)
    socks = [connect(address) for _ in range(consumers)]
    buffers = [bytearray(max(expected_size, timeout_size) + 4096) for _ in socks]
    views = [memoryview(buf) for buf in buffers]
    filled = [0] * consumers
    sent_at = [0] * consumers
    latencies = array("q")
    delivered = timeouts = 0
    stall_ns = int(STALL_S * 1e9)
    try:
        barrier.wait(60)
        with selectors.DefaultSelector() as selector:
            start = perf_ns()
            for i, sock in enumerate(socks):
                selector.register(sock, selectors.EVENT_READ, i)
                sent_at[i] = perf_ns()
                sock.sendall(request)
            last_delivery = perf_ns()
            while delivered < total:
                events = selector.select(0.5)
                if not events and perf_ns() - last_delivery > stall_ns:
                    raise BenchError(f"only {delivered:,} of {total:,} messages delivered, "
                                     f"none in the last {STALL_S:g} s")
                for key, _ in events:
                    i = key.data
                    sock = socks[i]
                    have = filled[i]
                    try:
                        count = sock.recv_into(views[i][have:])
                    except OSError as error:
                        raise BenchError(f"consumer connection failed: {error}") from None
                    now = perf_ns()
                    if not count:
                        raise BenchError(f"the server closed a consumer connection after "
                                         f"{delivered:,} messages")
                    have += count
                    buf = buffers[i]
                    if have < 4 or have < 4 + _unpack_from(buf, 0)[0]:
                        if have == len(buf):
                            raise BenchError(describe_unexpected(bytes(buf), expected, delivered))
                        filled[i] = have
                        continue
                    filled[i] = 0
                    if have == expected_size and buf.startswith(expected):
                        if delivered < total:  # the floor answers Gets still in flight
                            delivered += 1
                            latencies.append(now - sent_at[i])
                            last_delivery = now
                    elif have == timeout_size and buf.startswith(TIMEOUT_REPLY):
                        timeouts += 1
                    else:  # also two frames at once: only one Get was in flight
                        raise BenchError(describe_unexpected(bytes(buf[:have]), expected, delivered))
                    if delivered < total:
                        sent_at[i] = perf_ns()
                        sock.sendall(request)
                    elif now - last_delivery > stall_ns:
                        raise BenchError(f"only {delivered:,} of {total:,} messages delivered, "
                                         f"none in the last {STALL_S:g} s")
    finally:
        for sock in socks:
            sock.close()
    return {"requests": delivered, "start": start, "end": last_delivery,
            "lat": latencies, "cnt": array("q", [1]) * len(latencies), "timeouts": timeouts}


def idle_job(address: str, idle: int, spec: Spec, warmup: Spec, check_info: bool,
             server_pid: Optional[int]) -> dict[str, Any]:
    """Hold ``idle`` connections open, then run one sync stream beside them."""
    needed = idle + 64
    limit = raise_open_files(needed)
    if limit < needed:
        raise BenchError(f"cannot hold {idle:,} idle connections: the open-file limit is "
                         f"{limit} (raise the hard limit, ulimit -Hn)")
    host, port = split_address(address)
    idle_socks: list[socket.socket] = []
    sock = None
    try:
        opening = time.monotonic()
        for i in range(idle):
            try:
                idle_socks.append(socket.create_connection((host, port), timeout=10))
            except OSError as error:
                raise BenchError(f"idle connection {i + 1:,} of {idle:,} failed: {error}") from None
        opened_s = time.monotonic() - opening
        sock = connect(address)
        seen = None
        if check_info:
            deadline = time.monotonic() + 30
            while True:
                seen = int(info_on(sock)["NumConnections"])
                if seen >= idle + 1:
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"the server reports {seen:,} connections; expected at "
                                     f"least {idle + 1:,} ({idle:,} idle and this one)")
                time.sleep(0.05)
        drive([Stream(sock, [Phase(pattern, count, 1) for pattern, count in warmup], 1)])
        stream = Stream(sock, [Phase(pattern, count, 1) for pattern, count in spec], 1)
        drive([stream])
        rss = read_rss(server_pid)
        with selectors.DefaultSelector() as selector:
            for idle_sock in idle_socks:
                selector.register(idle_sock, selectors.EVENT_READ)
            dropped = len(selector.select(0))
        if dropped:
            raise BenchError(f"{dropped:,} of the {idle:,} idle connections were closed "
                             f"(or written to) by the server")
        result = stream_results([stream])
        result.update(open_s=opened_s, connections_seen=seen, rss_with_idle=rss)
        return result
    finally:
        if sock is not None:
            sock.close()
        for idle_sock in idle_socks:
            idle_sock.close()


def client_job(address: str, queue: bytes, count: int, window: int, warmup: int) -> dict[str, Any]:
    """Our own Deferred client, on a reactor in this process: ``count`` Puts, then ``count`` Gets.

    ``window`` requests in flight: a set of Deferreds, a new request sent as
    each one fires.  ``warmup`` Puts and Gets go first, untimed.  Unlike the
    other jobs this one measures a client as users run it: the garbage
    collector on, a timestamp and a Deferred per request.
    """
    try:
        from twisted.internet import defer, reactor, task
        from twisted.python.failure import Failure

        from mqmq.client import MQClient, connect as client_connect
    except ImportError as error:
        raise BenchError(f"the client workload needs mqmq and Twisted importable "
                         f"(install the package, or set PYTHONPATH to the checkout): {error}") from None
    gc.enable()
    body = message_body(size_of_queue(queue))

    def pipeline(issue: Callable[[], Any], total: int, what: str) -> Any:
        """Fires with (start ns, end ns, latencies ns) once ``total`` replies came."""
        done: Any = defer.Deferred()
        in_flight: set[Any] = set()
        latencies = array("q")
        state = {"sent": 0, "replied": 0, "start": perf_ns(), "progress": perf_ns()}

        def send() -> None:
            state["sent"] += 1
            sent_at = perf_ns()
            request = issue()
            in_flight.add(request)
            request.addCallbacks(replied, failed, callbackArgs=(request, sent_at),
                                 errbackArgs=(request,))

        def replied(value: Optional[bytes], request: Any, sent_at: int) -> None:
            now = perf_ns()
            in_flight.discard(request)
            if done.called:
                return
            if value is not None and value != body:
                finish(BenchError(f"{what}: unexpected message {value[:48]!r} ({len(value)} bytes) "
                                  f"after {state['replied']:,} good replies"))
                return
            latencies.append(now - sent_at)
            state["replied"] += 1
            state["progress"] = now
            if state["sent"] < total:
                send()
            elif not in_flight:
                finish((state["start"], now, latencies))

        def failed(reason: Any, request: Any) -> None:
            in_flight.discard(request)
            if not done.called:
                finish(BenchError(f"{what}: {reason.getErrorMessage()} "
                                  f"after {state['replied']:,} of {total:,} replies"))

        def stalled() -> None:
            if perf_ns() - state["progress"] > STALL_S * 1e9:
                finish(BenchError(f"{what}: no reply for {STALL_S:g} s after "
                                  f"{state['replied']:,} of {total:,} replies"))

        watchdog = task.LoopingCall(stalled)

        def finish(outcome: Any) -> None:
            if watchdog.running:
                watchdog.stop()
            if isinstance(outcome, Exception):
                done.errback(outcome)
            else:
                done.callback(outcome)

        watchdog.start(1.0, now=False)
        for _ in range(min(window, total)):
            send()
        return done

    async def run() -> dict[str, Any]:
        try:
            client: MQClient = await client_connect(reactor, address, timeout=10)
        except Exception as error:
            raise BenchError(f"cannot connect to {address}: {error}") from None
        try:
            await pipeline(lambda: client.put(queue, body), warmup, "warm-up put")
            await pipeline(lambda: client.get(queue), warmup, "warm-up get")
            puts = await pipeline(lambda: client.put(queue, body), count, "put")
            gets = await pipeline(lambda: client.get(queue), count, "get")
        finally:
            await client.disconnect()
        return {"put": puts, "get": gets}

    outcome: list[Any] = []

    def stop(result: Any) -> None:
        outcome.append(result)
        reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(run()).addBoth(stop))
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]
    if not outcome:
        raise BenchError("the client's reactor stopped before the workload finished")
    if isinstance(outcome[0], Failure):
        if outcome[0].check(BenchError):
            raise BenchError(outcome[0].getErrorMessage())
        raise BenchError("the client failed:\n" + outcome[0].getTraceback())
    results = {}
    for phase, (start, end, latencies) in outcome[0].items():
        results[phase] = {"requests": len(latencies), "start": start, "end": end,
                          "lat": latencies, "cnt": array("q", [1]) * len(latencies)}
    return results


# --- Running jobs in worker processes --------------------------------------------

_MP = multiprocessing.get_context("fork")
_WORKERS: list[Any] = []


def _worker_main(writer: Any, job: Callable[..., Any], args: tuple[Any, ...]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent()
    gc.disable()
    try:
        outcome = ("ok", job(*args))
    except BenchError as error:
        outcome = ("error", str(error))
    except BaseException:  # noqa: B902 - reported to the parent, which decides
        outcome = ("error", "the load generator failed:\n" + traceback.format_exc())
    writer.send(outcome)
    writer.close()


def run_jobs(jobs: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> list[Any]:
    """Run each job in its own process; their results, or BenchError for the first failure."""
    started = []
    try:
        for job, args in jobs:
            reader, writer = _MP.Pipe(duplex=False)
            process = _MP.Process(target=_worker_main, args=(writer, job, args), daemon=True)
            process.start()
            writer.close()
            _WORKERS.append(process)
            started.append((process, reader))
        results: list[Any] = [None] * len(started)
        pending: dict[Any, int] = {reader: i for i, (_, reader) in enumerate(started)}
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while pending:
            left = deadline - time.monotonic()
            ready = wait_for_results(list(pending), max(0.0, left))
            if not ready:
                raise BenchError(f"the load generator did not finish within {JOB_TIMEOUT_S:g} s")
            for ready_reader in ready:
                i = pending.pop(ready_reader)
                try:
                    status, value = started[i][1].recv()
                except EOFError:
                    started[i][0].join(1)
                    raise BenchError(f"a load-generator process died "
                                     f"(exit status {started[i][0].exitcode})") from None
                if status != "ok":
                    raise BenchError(value)
                results[i] = value
        return results
    finally:
        for process, reader in started:
            process.join(2)
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
            reader.close()
            _WORKERS.remove(process)


def stop_workers() -> None:
    for process in list(_WORKERS):
        if process.is_alive():
            process.kill()
        process.join(2)


# --- Measures ---------------------------------------------------------------------


def percentiles(latencies: array[int], counts: array[int],
                points: Sequence[float] = (0.5, 0.99)) -> list[Optional[float]]:
    """Latency percentiles in µs from runs of (latency ns, count)."""
    total = sum(counts)
    if not total:
        return [None] * len(points)
    found: list[Optional[float]] = []
    cumulative = 0
    for i in sorted(range(len(latencies)), key=latencies.__getitem__):
        cumulative += counts[i]
        while len(found) < len(points) and cumulative >= points[len(found)] * total:
            found.append(latencies[i] / 1000)
        if len(found) == len(points):
            break
    return found


def combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    requests = sum(r["requests"] for r in results)
    elapsed = (max(r["end"] for r in results) - min(r["start"] for r in results)) / 1e9
    latencies, counts = array("q"), array("q")
    for r in results:
        latencies.extend(r["lat"])
        counts.extend(r["cnt"])
    p50, p99 = percentiles(latencies, counts)
    return {"requests": requests, "elapsed_s": elapsed, "rate": requests / elapsed if elapsed else None,
            "p50_us": p50, "p99_us": p99}


# --- Workloads ------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    sync_pairs: int = 20_000
    pipelined: int = 200_000
    client: int = 200_000
    fan: int = 200_000
    memory: int = 1_000_000
    large_pairs: int = 200
    idle: int = 1_000
    scaling_pairs: int = 100_000
    #: Untimed Put/Get pairs before each timed workload but memory and fan
    #: (in all, over its connections; large takes a twentieth of its pairs).
    warmup_pairs: int = 2_000

    def scaled(self, divisor: int) -> "Counts":
        return Counts(**{k: max(1, v // divisor) for k, v in asdict(self).items()})


@dataclass
class Target:
    name: str  # "mqmq" or "floor"
    address: str
    server: Optional[ServerProcess]

    @property
    def floor(self) -> bool:
        return self.name == "floor"

    def rss(self) -> Optional[int]:
        return self.server.rss() if self.server is not None else None

    @property
    def pid(self) -> Optional[int]:
        return self.server.pid if self.server is not None else None


class Bench:
    def __init__(self, counts: Counts, token: str) -> None:
        self.counts = counts
        self.token = token
        self.notes: list[str] = []

    def queue(self, workload: str, run: int, size: int) -> bytes:
        return f"bench-{self.token}.{workload}.{run}.{size}".encode()

    def expect_queue(self, target: Target, queue: bytes, messages: int, when: str) -> None:
        """Count check through Info; the floor keeps no queues, so it is skipped there."""
        if target.floor:
            return
        queues = info(target.address).get("Queues", {})
        entry = queues.get(queue.decode())
        if entry is None:
            raise BenchError(f"queue {queue.decode()} is not listed by Info {when}")
        found = entry.get("NumMessages")
        if found != messages:
            raise BenchError(f"Info counts {found:,} messages on {queue.decode()} {when}; "
                             f"expected {messages:,}")

    def pairs_spec(self, queue: bytes, pairs: int) -> Spec:
        pattern = [(put_request(queue), OK_REPLY), (get_request(queue, 0), get_reply(queue))]
        return [(pattern, 2 * pairs)]

    def warmup(self, queue: bytes, connections: int = 1) -> Spec:
        return self.pairs_spec(queue, max(10, self.counts.warmup_pairs // connections))

    # Each workload returns its metrics for one run against one target.

    def sync(self, target: Target, run: int) -> dict[str, Any]:
        pairs = self.counts.sync_pairs
        queue = self.queue("sync", run, MESSAGE_SIZE)
        [result] = run_jobs([(pipeline_job, (target.address, [self.pairs_spec(queue, pairs)], 1,
                                             None, self.warmup(queue)))])
        metrics = combine([result])
        metrics["us_per_pair"] = metrics["elapsed_s"] * 1e6 / pairs
        self.expect_queue(target, queue, 0, "after the sync workload")
        return metrics

    def pipelined(self, target: Target, run: int) -> dict[str, Any]:
        count = self.counts.pipelined
        queue = self.queue("pipelined", run, MESSAGE_SIZE)
        spec: Spec = [([(put_request(queue), OK_REPLY)], count),
                      ([(get_request(queue, 0), get_reply(queue))], count)]
        [result] = run_jobs([(pipeline_job, (target.address, [spec], PIPELINE_WINDOW,
                                             None, self.warmup(queue)))])
        self.expect_queue(target, queue, 0, "after the pipelined workload")
        return combine([result])

    def client(self, target: Target, run: int) -> dict[str, Any]:
        count = self.counts.client
        queue = self.queue("client", run, MESSAGE_SIZE)
        [result] = run_jobs([(client_job, (target.address, queue, count, CLIENT_WINDOW,
                                           max(10, self.counts.warmup_pairs)))])
        puts, gets = result["put"], result["get"]
        if puts["requests"] != count or gets["requests"] != count:
            raise BenchError(f"{puts['requests']:,} puts and {gets['requests']:,} gets answered; "
                             f"expected {count:,} of each")
        self.expect_queue(target, queue, 0, "after the client workload")
        both = combine([puts, gets])
        put, get = combine([puts]), combine([gets])
        both.update(put_rate=put["rate"], get_rate=get["rate"],
                    put_p50_us=put["p50_us"], put_p99_us=put["p99_us"],
                    get_p50_us=get["p50_us"], get_p99_us=get["p99_us"])
        return both

    def fan(self, target: Target, run: int) -> dict[str, Any]:
        total = self.counts.fan
        queue = self.queue("fan", run, MESSAGE_SIZE)
        shares = [total // FAN_PRODUCERS + (i < total % FAN_PRODUCERS) for i in range(FAN_PRODUCERS)]
        specs: list[Spec] = [[([(put_request(queue), OK_REPLY)], share)] for share in shares if share]
        barrier = _MP.Barrier(2)
        produced, consumed = run_jobs([
            (pipeline_job, (target.address, specs, FAN_WINDOW, barrier)),
            (consumer_job, (target.address, queue, FAN_CONSUMERS, total, barrier)),
        ])
        if produced["requests"] != total or consumed["requests"] != total:
            raise BenchError(f"{produced['requests']:,} puts acknowledged and "
                             f"{consumed['requests']:,} messages delivered; expected {total:,}")
        self.expect_queue(target, queue, 0, "after the fan workload")
        elapsed = (max(produced["end"], consumed["end"])
                   - min(produced["start"], consumed["start"])) / 1e9
        puts = combine([produced])
        gets = combine([consumed])
        return {"requests": total, "elapsed_s": elapsed, "rate": total / elapsed,
                "p50_us": puts["p50_us"], "p99_us": puts["p99_us"],
                "put_rate": puts["rate"], "get_p50_us": gets["p50_us"], "get_p99_us": gets["p99_us"],
                "get_timeouts": consumed["timeouts"]}

    def memory(self, target: Target, run: int) -> dict[str, Any]:
        count = self.counts.memory
        queue = self.queue("memory", run, MESSAGE_SIZE)
        before = target.rss()
        fill_spec: Spec = [([(put_request(queue), OK_REPLY)], count)]
        [filled] = run_jobs([(pipeline_job, (target.address, [fill_spec], PIPELINE_WINDOW))])
        full = target.rss()
        self.expect_queue(target, queue, count, "after the fill")
        drain_spec: Spec = [([(get_request(queue, 0), get_reply(queue))], count)]
        [drained] = run_jobs([(pipeline_job, (target.address, [drain_spec], PIPELINE_WINDOW))])
        self.expect_queue(target, queue, 0, "after the drain")
        fill = combine([filled])
        drain = combine([drained])
        per_message = None if before is None or full is None else (full - before) / count
        return {"requests": count, "elapsed_s": fill["elapsed_s"], "rate": fill["rate"],
                "p50_us": fill["p50_us"], "p99_us": fill["p99_us"],
                "fill_rate": fill["rate"], "drain_rate": drain["rate"],
                "rss_before_mb": _mb(before), "rss_full_mb": _mb(full),
                "bytes_per_message": per_message}

    def large(self, target: Target, run: int) -> dict[str, Any]:
        pairs = self.counts.large_pairs
        queue = self.queue("large", run, LARGE_SIZE)
        warmup = self.pairs_spec(queue, max(1, pairs // 20))
        [result] = run_jobs([(pipeline_job, (target.address, [self.pairs_spec(queue, pairs)], 1,
                                             None, warmup))])
        metrics = combine([result])
        metrics["mb_s"] = 2 * pairs * LARGE_SIZE / metrics["elapsed_s"] / 1e6
        self.expect_queue(target, queue, 0, "after the large workload")
        return metrics

    def idle(self, target: Target, run: int) -> dict[str, Any]:
        pairs = self.counts.sync_pairs
        queue = self.queue("idle", run, MESSAGE_SIZE)
        [result] = run_jobs([(idle_job, (target.address, self.counts.idle, self.pairs_spec(queue, pairs),
                                         self.warmup(queue), not target.floor, target.pid))])
        metrics = combine([result])
        metrics.update(us_per_pair=metrics["elapsed_s"] * 1e6 / pairs,
                       rss_with_idle_mb=_mb(result["rss_with_idle"]), open_s=result["open_s"],
                       connections_seen=result["connections_seen"])
        self.expect_queue(target, queue, 0, "after the idle workload")
        return metrics

    def scaling_point(self, target: Target, run: int, connections: int) -> dict[str, Any]:
        queue = self.queue(f"scaling{connections}", run, MESSAGE_SIZE)
        pairs = max(1, self.counts.scaling_pairs // connections)
        specs = [self.pairs_spec(queue, pairs) for _ in range(connections)]
        processes = min(connections, generator_processes())
        groups = [specs[i::processes] for i in range(processes)]
        barrier = _MP.Barrier(processes) if processes > 1 else None
        warmup = self.warmup(queue, connections)
        results = run_jobs([(pipeline_job, (target.address, group, SCALING_WINDOW, barrier, warmup))
                            for group in groups])
        self.expect_queue(target, queue, 0, f"after scaling with {connections} connections")
        metrics = combine(results)
        metrics["connections"] = connections
        metrics["generator_processes"] = processes
        return metrics


def generator_processes() -> int:
    """Load-generator processes for many connections: half the CPUs, the rest for the server."""
    return max(1, (os.cpu_count() or 1) // 2)


# --- Reporting ----------------------------------------------------------------------------


def median_metrics(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = {k for run in runs for k in run}
    merged: dict[str, Any] = {}
    for key in sorted(keys):
        values = [v for v in (run.get(key) for run in runs) if isinstance(v, (int, float))]
        if values:
            merged[key] = statistics.median(values)
    return merged


def fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "—"
    if kind == "int" or (isinstance(value, (int, float)) and abs(value) >= 1000):
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = None
    try:
        with open("/proc/meminfo") as meminfo:
            memory = int(meminfo.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": model,
        "memory_gb": None if memory is None else round(memory / 2**30, 1),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_executable": sys.executable,
        "kernel": f"{platform.system()} {platform.release()}",
        "mqmq_commit": _commit(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _commit() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, timeout=5,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "../mqmq"], cwd=here,
                               timeout=5, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+uncommitted changes in mqmq/" if dirty else "")) or None


# (workload, metric, label, higher is better; None: not compared with the floor)
ROWS: list[tuple[str, str, str, Optional[bool]]] = [
    ("sync", "us_per_pair", "µs per put+get", False),
    ("sync", "rate", "requests/s", True),
    ("pipelined", "rate", "requests/s", True),
    ("client", "put_rate", "put requests/s", True),
    ("client", "get_rate", "get requests/s", True),
    ("fan", "rate", "messages/s", True),
    ("memory", "rss_full_mb", "MB resident, full", None),
    ("memory", "rss_before_mb", "MB resident, before", None),
    ("memory", "bytes_per_message", "bytes per message", None),
    ("memory", "fill_rate", "fill requests/s", True),
    ("memory", "drain_rate", "drain requests/s", True),
    ("large", "mb_s", "MB/s (1 MiB messages)", True),
    ("large", "rate", "requests/s", True),
    ("idle", "us_per_pair", "µs per put+get", False),
    ("idle", "rate", "requests/s", True),
]


def print_tables(results: dict[str, dict[str, Any]], counts: Counts) -> None:
    lines = []
    head = f"{'workload':<10} {'figure':<22} {'mqmq':>11} {'floor':>11} {'floor ÷ mqmq':>13}  Go mqmq / target"
    lines += [head, "-" * len(head)]
    previous = ""
    for workload, key, label, higher in ROWS:
        if workload not in results:
            continue
        ours = results[workload].get("mqmq", {}).get("median", {}).get(key)
        floor = results[workload].get("floor", {}).get("median", {}).get(key) if higher is not None else None
        ratio = ""
        if ours and floor:
            ratio = f"{(floor / ours if higher else ours / floor):.1f}×"
        go = GO_FIGURES.get((workload, key)) or TARGETS.get((workload, key), "")
        if workload == "memory" and go and counts.memory != 1_000_000:
            go += " (1M msgs)"
        shown, previous = ("" if workload == previous else workload), workload
        lines.append(f"{shown:<10} {label:<22} {fmt(ours):>11} {fmt(floor) if higher is not None else '':>11} "
                     f"{ratio:>13}  {go}".rstrip())
    print("\n".join(lines))
    print()
    head = (f"{'workload':<10} {'latency of':<16} {'mqmq p50':>9} {'p99':>9} {'floor p50':>10} {'p99':>9}"
            f"   {'RSS MB mqmq':>11} {'floor':>7}")
    print(head)
    print("-" * len(head))
    what = {"sync": "put, get", "pipelined": "put, get", "client": "put, get", "fan": "put", "memory": "fill put",
            "large": "put, get", "idle": "put, get"}
    for workload in WORKLOADS:
        if workload not in results or workload == "scaling":
            continue
        ours = results[workload].get("mqmq", {}).get("median", {})
        floor = results[workload].get("floor", {}).get("median", {})
        print(f"{workload:<10} {what[workload] + ' (µs)':<16} {fmt(ours.get('p50_us')):>9} {fmt(ours.get('p99_us')):>9} "
              f"{fmt(floor.get('p50_us')):>10} {fmt(floor.get('p99_us')):>9}   "
              f"{fmt(ours.get('rss_mb')):>11} {fmt(floor.get('rss_mb')):>7}")
        if workload == "client":
            for phase in ("put", "get"):
                print(f"{'':<10} {'  ' + phase + ' only (µs)':<16} {fmt(ours.get(phase + '_p50_us')):>9} "
                      f"{fmt(ours.get(phase + '_p99_us')):>9} {fmt(floor.get(phase + '_p50_us')):>10} "
                      f"{fmt(floor.get(phase + '_p99_us')):>9}")
        if workload == "fan" and ours:
            print(f"{'':<10} {'fan get (µs)':<16} {fmt(ours.get('get_p50_us')):>9} {fmt(ours.get('get_p99_us')):>9}"
                  "   (a Get's wait for a message, mqmq)")
    if "idle" in results:
        ours = results["idle"].get("mqmq", {}).get("median", {})
        if ours.get("rss_with_idle_mb") is not None:
            print(f"{'':<10} mqmq RSS with {counts.idle:,} idle connections open: "
                  f"{fmt(ours.get('rss_with_idle_mb'))} MB")


def print_scaling(scaling: dict[str, Any]) -> None:
    head = (f"{'connections':>11} {'mqmq req/s':>12} {'floor req/s':>12} {'floor ÷ mqmq':>13}"
            f"   {'mqmq p50 µs':>11} {'p99 µs':>9}")
    print(head)
    print("-" * len(head))
    for connections in sorted(scaling, key=int):
        ours = scaling[connections].get("mqmq", {}).get("median", {})
        floor = scaling[connections].get("floor", {}).get("median", {})
        ratio = f"{floor['rate'] / ours['rate']:.1f}×" if ours.get("rate") and floor.get("rate") else ""
        print(f"{connections:>11} {fmt(ours.get('rate')):>12} {fmt(floor.get('rate')):>12} {ratio:>13}"
              f"   {fmt(ours.get('p50_us')):>11} {fmt(ours.get('p99_us')):>9}")


def write_chart(path: str, scaling: dict[str, Any], info_line: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return "matplotlib is not installed (pip install '.[bench]'): no chart written"
    points = sorted(scaling, key=int)
    figure, axes = plt.subplots(figsize=(8, 4.8), dpi=120)
    styles: dict[str, dict[str, Any]] = {"mqmq": dict(color="#1f77b4", marker="o", linewidth=2.2, label="mqmq"),
              "floor": dict(color="#7f7f7f", marker="s", linewidth=1.6, linestyle="--",
                            label="floor (answers without queueing: the generator's ceiling)")}
    for name, style in styles.items():
        xs = [int(c) for c in points if scaling[c].get(name, {}).get("median", {}).get("rate")]
        ys = [scaling[str(c)][name]["median"]["rate"] for c in xs]
        if xs:
            axes.plot(xs, ys, **style)
            below = name == "mqmq"  # the lower line's labels go under it, the floor's above
            for x, y in zip(xs, ys):
                axes.annotate(f"{y / 1000:.0f}k", (x, y), textcoords="offset points",
                              xytext=(0, -14 if below else 8), ha="center", fontsize=8,
                              color=style["color"],
                              bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.8))
    axes.set_xscale("log", base=2)
    axes.set_xticks([int(c) for c in points])
    axes.set_xticklabels(points)
    axes.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    axes.set_ylim(bottom=0, top=axes.get_ylim()[1] * 1.08)
    axes.set_xlabel("connections (each pipelining Put/Get pairs, 16 requests in flight)")
    axes.set_ylabel("requests/s")
    axes.set_title("mqmq throughput against connections", fontsize=12, pad=26)
    figure.text(0.99, 0.01, info_line, ha="right", va="bottom", fontsize=7, color="#555555")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False, fontsize=9)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return None


def progress(workload: str, target: str, run: int, runs: int, metrics: dict[str, Any]) -> None:
    parts = []
    if "us_per_pair" in metrics:
        parts.append(f"{metrics['us_per_pair']:.1f} µs/pair")
    if "mb_s" in metrics:
        parts.append(f"{metrics['mb_s']:,.0f} MB/s")
    if workload == "memory":
        if metrics.get("rss_full_mb") is not None:
            parts.append(f"{metrics['rss_full_mb']:.0f} MB full (from {metrics['rss_before_mb']:.0f}, "
                         f"{metrics['bytes_per_message']:.0f} B/message)")
        parts.append(f"fill {metrics['fill_rate']:,.0f} req/s, drain {metrics['drain_rate']:,.0f} req/s")
    elif workload == "client":
        parts.append(f"put {metrics['put_rate']:,.0f} req/s, get {metrics['get_rate']:,.0f} req/s")
    elif "rate" in metrics:
        unit = "msg/s" if workload == "fan" else "req/s"
        parts.append(f"{metrics['rate']:,.0f} {unit}")
    if metrics.get("p50_us") is not None:
        parts.append(f"p50 {fmt(metrics['p50_us'])} µs, p99 {fmt(metrics['p99_us'])} µs")
    if metrics.get("rss_mb") is not None:
        parts.append(f"RSS {metrics['rss_mb']:.0f} MB")
    label = f"{workload}" + (f" run {run + 1}/{runs}" if runs > 1 else "")
    print(f"  {label:<24} {target:<6} " + "; ".join(parts), flush=True)


# --- Main ------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark an mqmq server beside a trivial floor server.",
        epilog="See benchmarks/README.md for what each workload does.")
    parser.add_argument("--addr", help="drive the server at HOST:PORT instead of starting one")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated, from {','.join(WORKLOADS)} (default: all)")
    parser.add_argument("--runs", type=int, default=1,
                        help="repeat each throughput workload N times and report medians")
    parser.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    parser.add_argument("--chart", metavar="FILE.png",
                        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "scaling.png"),
                        help="scaling chart (default: benchmarks/scaling.png)")
    parser.add_argument("--quick", action="store_true", help="every count divided by 10: a smoke run")
    parser.add_argument("--floor-server", metavar="HOST:PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.floor_server:
        return args
    args.workload_list = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in args.workload_list if w not in WORKLOADS]
    if unknown or not args.workload_list:
        parser.error(f"unknown workload {', '.join(unknown) or '(none)'}: choose from {','.join(WORKLOADS)}")
    if args.runs < 1:
        parser.error("--runs must be 1 or more")
    return args


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.floor_server:
        floor_main(args.floor_server)
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    counts = Counts().scaled(10) if args.quick else Counts()
    bench = Bench(counts, os.urandom(3).hex())
    errors: list[str] = []
    servers: list[ServerProcess] = []
    report: dict[str, Any] = {"machine": machine(), "settings": {
        "quick": args.quick, "runs": args.runs, "counts": asdict(counts), "message_size": MESSAGE_SIZE,
        "large_size": LARGE_SIZE, "pipeline_window": PIPELINE_WINDOW,
        "client_window": CLIENT_WINDOW, "scaling_window": SCALING_WINDOW,
        "generator_processes_max": generator_processes()}}
    results: dict[str, dict[str, Any]] = {}
    scaling: dict[str, Any] = {}
    box = report["machine"]
    print(f"mqmq benchmark, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(f"machine: {box['nproc']} CPUs (nproc), {box['cpu_model']}, {box['memory_gb']} GiB, {box['kernel']}")
    print(f"python:  {box['python']} ({sys.executable})")
    load = box["load_average_at_start"]
    if load:
        busy = "  (busy: other work on the machine will skew the figures)" if load[0] > 0.5 else ""
        print(f"load:    {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min){busy}")
    if box["mqmq_commit"]:
        print(f"mqmq:    commit {box['mqmq_commit']}")
    print(f"counts:  {'quick (divided by 10)' if args.quick else 'full'}; runs: {args.runs}; "
          f"messages {MESSAGE_SIZE} B except large ({LARGE_SIZE // 2**20} MiB)")
    try:
        floor = start_floor()
        servers.append(floor)
        if args.addr:
            ours = Target("mqmq", args.addr, None)
            info(args.addr)
            print(f"mqmq:    the server at {args.addr} (not started here: no RSS figures)")
            bench.notes.append(f"mqmq server at {args.addr} was not started by this tool: RSS not measured")
        else:
            server = start_mqmq()
            servers.append(server)
            ours = Target("mqmq", server.address, server)
            print(f"mqmq:    {' '.join(server.argv[1:])}  (pid {server.pid})")
        floor_target = Target("floor", floor.address, floor)
        print(f"floor:   pid {floor.pid} at {floor.address}")
        print()
        targets = [ours, floor_target]

        def alive() -> None:
            for target in targets:
                if target.server is not None:
                    target.server.check_alive()

        for workload in args.workload_list:
            if workload == "scaling":
                for connections in SCALING_CONNECTIONS:
                    point = scaling.setdefault(str(connections), {})
                    for run in range(args.runs):
                        for target in targets:
                            try:
                                metrics = bench.scaling_point(target, run, connections)
                            except BenchError as error:
                                errors.append(f"scaling {connections} ({target.name}): {error}")
                                print(f"  ERROR scaling {connections} ({target.name}): {error}", flush=True)
                                alive()
                                continue
                            metrics["rss_mb"] = _mb(target.rss())
                            point.setdefault(target.name, {"runs": []})["runs"].append(metrics)
                            progress(f"scaling {connections} conns", target.name, run, args.runs, metrics)
                        alive()
                    for entry in point.values():
                        entry["median"] = median_metrics(entry["runs"])
                continue
            runs = 1 if workload == "memory" else args.runs
            if workload == "memory" and ours.server is not None:
                # A fresh server, so that "before" is a clean baseline.
                ours.server.stop()
                servers.remove(ours.server)
                ours.server = start_mqmq()
                servers.append(ours.server)
                ours.address = ours.server.address
                print(f"  (memory runs on a freshly started mqmq server, pid {ours.server.pid})")
            entry = results.setdefault(workload, {})
            for run in range(runs):
                for target in targets:
                    try:
                        metrics = getattr(bench, workload)(target, run)
                    except BenchError as error:
                        errors.append(f"{workload} ({target.name}): {error}")
                        print(f"  ERROR {workload} ({target.name}): {error}", flush=True)
                        alive()
                        continue
                    metrics["rss_mb"] = _mb(target.rss())
                    entry.setdefault(target.name, {"runs": []})["runs"].append(metrics)
                    progress(workload, target.name, run, runs, metrics)
                alive()
            for per_target in entry.values():
                per_target["median"] = median_metrics(per_target["runs"])
        print()
        if results:
            print_tables(results, counts)
            print()
        if scaling:
            print_scaling(scaling)
            print()
            line = (f"{box['nproc']} CPUs, {box['cpu_model']}, {box['python']}; "
                    + ("quick run" if args.quick else f"median of {args.runs} run(s)")
                    + f"; {time.strftime('%Y-%m-%d')}")
            problem = write_chart(args.chart, scaling, line)
            if problem:
                print(f"note: {problem}")
                bench.notes.append(problem)
            else:
                print(f"chart: {args.chart}")
        if "memory" in results and ours.server is None:
            print("note: memory: RSS not measured, the server was not started by this tool")
    except BenchError as error:
        errors.append(str(error))
        print(f"\nERROR: {error}", flush=True)
    except KeyboardInterrupt:
        errors.append("interrupted")
        print("\ninterrupted", flush=True)
    finally:
        stop_workers()
        for server in servers:
            server.stop()
    report.update(workloads=results, scaling=scaling, errors=errors, notes=bench.notes,
                  go_figures={f"{w}.{k}": v for (w, k), v in GO_FIGURES.items()},
                  targets={f"{w}.{k}": v for (w, k), v in TARGETS.items()})
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
            out.write("\n")
        print(f"json:  {args.json}")
    if errors:
        print(f"\n{len(errors)} error(s):")
        for problem in errors:
            print(f"  - {problem}")
        sys.stdout.flush()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
