"""Clients that vanish mid-conversation, and servers stopped under load.

The first half runs the server in this process, on the global reactor, over
real loopback TCP, and plays clients with plain sockets so that a test can cut
a connection anywhere: inside a frame, inside a reply, while a ``Get`` waits,
by reset, by half-close, or while the server has stopped reading.  The second
half runs ``mqmq start`` and ``twistd mqmq`` as a user does, with hundreds of
open connections, and stops them with real signals.
"""

from __future__ import annotations

import fcntl
import json
import re
import resource
import signal
import socket
import struct
import subprocess
import termios
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Optional

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import reactor, task
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from zope.interface import provider

from conftest import bin_path, logged_port
from mqmq.broker.broker import Broker, Waiter
from mqmq.broker.limits import Limits
from mqmq.server.protocol import LIVENESS_INTERVAL, MQServerProtocol
from mqmq.server.service import MQService
from support import read_exactly

_UINT32 = struct.Struct(">I")

#: Longest any in-process condition may take to come true.
DEADLINE = 5.0


def frame(*values: bytes) -> bytes:
    payload = b"".join(_UINT32.pack(len(value)) + value for value in values)
    return _UINT32.pack(len(payload)) + payload


def decode(payload: bytes) -> list[bytes]:
    values = []
    offset = 0
    while offset < len(payload):
        (size,) = _UINT32.unpack_from(payload, offset)
        values.append(payload[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return values


# --- in process: a server on the global reactor, clients as plain sockets -------


async def pause(seconds: float = 0.005) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def until(condition: Callable[[], bool], what: str, within: float = DEADLINE) -> None:
    """Let the reactor run until ``condition`` holds; fail after ``within`` seconds."""
    give_up = time.monotonic() + within
    while not condition():
        if time.monotonic() > give_up:
            pytest.fail(f"not within {within} s: {what}")
        await pause()


class RawClient:
    """A non-blocking client socket, polled so that the reactor keeps running."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.sock.setblocking(False)
        self._received = b""
        #: The server's end, once the server has accepted the connection.
        self.protocol: Optional[MQServerProtocol] = None

    async def send(self, data: bytes, within: float = DEADLINE) -> None:
        view = memoryview(data)
        give_up = time.monotonic() + within
        while view:
            try:
                view = view[self.sock.send(view) :]
            except BlockingIOError:
                if time.monotonic() > give_up:
                    pytest.fail(f"the server did not take {len(view)} more bytes")
                await pause()

    async def send_some(self, data: bytes, within: float = 0.5) -> int:
        """Send as much of ``data`` as the kernel takes within ``within`` seconds."""
        sent = 0
        give_up = time.monotonic() + within
        while sent < len(data) and time.monotonic() < give_up:
            try:
                sent += self.sock.send(data[sent:])
            except BlockingIOError:
                await pause()
        return sent

    async def read_exactly(self, count: int, within: float = DEADLINE) -> bytes:
        give_up = time.monotonic() + within
        while len(self._received) < count:
            try:
                chunk = self.sock.recv(max(65536, count - len(self._received)))
            except BlockingIOError:
                if time.monotonic() > give_up:
                    pytest.fail(f"no reply within {within} s")
                await pause()
                continue
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self._received += chunk
        data, self._received = self._received[:count], self._received[count:]
        return data

    async def read_frame(self, within: float = DEADLINE) -> list[bytes]:
        (length,) = _UINT32.unpack(await self.read_exactly(4, within))
        return decode(await self.read_exactly(length, within))

    async def request(self, *values: bytes) -> list[bytes]:
        await self.send(frame(*values))
        return await self.read_frame()

    async def sees_close(self, within: float = DEADLINE) -> bool:
        """True once the server has closed the connection (EOF or reset)."""
        give_up = time.monotonic() + within
        while time.monotonic() < give_up:
            try:
                if not self.sock.recv(65536):
                    return True
            except BlockingIOError:
                await pause()
            except OSError:
                return True
        return False

    def unsent(self) -> int:
        """Bytes sent that the server's kernel has not acknowledged yet."""
        return int(struct.unpack("i", fcntl.ioctl(self.sock, termios.TIOCOUTQ, b"\0" * 4))[0])

    def close(self) -> None:
        self.sock.close()

    def reset(self) -> None:
        """Close with SO_LINGER 0: the kernel sends RST, not FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def shut_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)


class Harness:
    """A running service, its broker, and the raw clients a test opened."""

    def __init__(self, limits: Limits) -> None:
        self.service = MQService(reactor, ["tcp:0:interface=127.0.0.1"], limits)
        self.service.startService()
        self.broker: Broker = self.service.broker
        address: Any = self.service.ports[0].getHost()
        self.port: int = address.port
        self.clients: list[RawClient] = []

    async def connect(self) -> RawClient:
        """A client the server has accepted (counted in ``num_connections``)."""
        before = set(self.service.factory.connections)
        client = RawClient(self.port)
        self.clients.append(client)
        await until(lambda: len(self.service.factory.connections) == len(before) + 1,
                    "connection accepted")
        (client.protocol,) = self.service.factory.connections - before
        return client

    def waiters(self, queue: bytes) -> int:
        """Gets waiting on ``queue`` right now."""
        found = self.broker._queues.get(queue)
        return 0 if found is None else len(found.waiters)

    def queued(self, queue: bytes) -> int:
        return dict(self.broker.queue_sizes()).get(queue, 0)

    async def waiting_get(self, queue: bytes, timeout_ms: int = 60_000) -> RawClient:
        """A client whose Get on the empty ``queue`` is waiting on the server."""
        before = self.waiters(queue)
        client = await self.connect()
        await client.send(frame(b"Get", queue, b"%d" % timeout_ms))
        await until(lambda: self.waiters(queue) == before + 1, "the Get waits")
        return client

    async def gone(self, expected_connections: int, queue: Optional[bytes] = None,
                   within: float = DEADLINE) -> None:
        """Wait until the server has dropped a departed client and its waiter."""
        await until(lambda: self.broker.num_connections == expected_connections,
                    f"num_connections back to {expected_connections}", within)
        assert len(self.service.factory.connections) == expected_connections
        if queue is not None:
            await until(lambda: self.waiters(queue) == 0, "the waiter withdrawn", within)

    async def still_serves(self) -> None:
        client = await self.connect()
        assert await client.request(b"Put", b"health", b"ok") == [b"OK"]
        assert await client.request(b"Get", b"health", b"1000") == [b"OK", b"ok"]
        info = json.loads((await client.request(b"Info"))[1])
        assert info["NumConnections"] == self.broker.num_connections
        client.close()

    async def stop(self) -> None:
        for client in self.clients:
            client.close()
        # A server that never finishes stopping fails the test instead of hanging it.
        await self.service.stopService().addTimeout(DEADLINE, reactor)
        assert self.broker.num_connections == 0


@pytest.fixture
def logged_errors() -> Iterator[list[dict[str, Any]]]:
    """Error events and failures logged while the test runs; must stay empty."""
    errors: list[dict[str, Any]] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("log_level", LogLevel.info) >= LogLevel.error:
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield errors
    finally:
        globalLogPublisher.removeObserver(observe)
    assert errors == [], "the server logged errors"


@pytest_twisted.async_yield_fixture
async def harness(logged_errors: list[dict[str, Any]]) -> AsyncIterator[Harness]:
    running = Harness(Limits())
    try:
        yield running
    finally:
        await running.stop()


#: Small enough that a test can make the server stop reading from a client.
PENDING = 64 * 1024


@pytest_twisted.async_yield_fixture
async def tight(logged_errors: list[dict[str, Any]]) -> AsyncIterator[Harness]:
    running = Harness(Limits(max_pending_bytes=PENDING))
    try:
        yield running
    finally:
        await running.stop()


@pytest.mark.parametrize("cut", [2, 4, 9, -1], ids=["in-header", "after-header", "in-values", "last-byte"])
@pytest_twisted.ensureDeferred
async def test_disconnect_mid_frame_stores_nothing(harness: Harness, cut: int) -> None:
    whole = frame(b"Put", b"q", b"never stored")
    part = whole[:cut]
    client = await harness.connect()
    await client.send(part)
    protocol = client.protocol
    assert protocol is not None
    await until(lambda: protocol.buffered_bytes == len(part), "the server holds the part")
    client.close()

    await harness.gone(0)
    assert harness.broker.num_messages == 0
    assert harness.queued(b"q") == 0
    await harness.still_serves()


@pytest_twisted.ensureDeferred
async def test_disconnect_mid_reply_of_a_16_mib_message(harness: Harness) -> None:
    big = bytes(range(256)) * (16 * 1024 * 1024 // 256)
    producer = await harness.connect()
    await producer.send(frame(b"Put", b"big", big), within=30)
    assert await producer.read_frame() == [b"OK"]
    assert harness.queued(b"big") == 1

    consumer = await harness.connect()
    await consumer.send(frame(b"Get", b"big", b"1000"))
    head = await consumer.read_exactly(14)
    assert head == _UINT32.pack(4 + 2 + 4 + len(big)) + _UINT32.pack(2) + b"OK" + _UINT32.pack(len(big))
    consumer.close()  # unread reply bytes: the kernel resets the connection

    await harness.gone(1)
    # Most of the reply never reached the kernel: the message was not handed
    # over, so it is back at the front of its queue, whole.
    assert harness.queued(b"big") == 1
    assert await producer.request(b"Put", b"big", b"small") == [b"OK"]
    await producer.send(frame(b"Get", b"big", b"1000"))
    assert await producer.read_frame(within=30) == [b"OK", big]
    assert await producer.request(b"Get", b"big", b"1000") == [b"OK", b"small"]
    await harness.still_serves()


async def depart(client: RawClient, how: str) -> None:
    if how == "close":
        client.close()
    elif how == "reset":
        client.reset()
    else:
        client.shut_write()
        # The server treats end of input as the end of the connection.
        assert await client.sees_close(), "the server kept a half-closed connection open"
        client.close()


DEPARTURES = ["close", "reset", "shutdown-write"]


@pytest.mark.parametrize("how", DEPARTURES)
@pytest_twisted.ensureDeferred
async def test_departed_waiter_never_takes_a_later_message(harness: Harness, how: str) -> None:
    getter = await harness.waiting_get(b"q")
    producer = await harness.connect()
    await depart(getter, how)

    await harness.gone(1, b"q")
    assert await producer.request(b"Put", b"q", b"kept") == [b"OK"]
    assert harness.queued(b"q") == 1
    consumer = await harness.connect()
    assert await consumer.request(b"Get", b"q", b"1000") == [b"OK", b"kept"]
    assert harness.broker.num_messages == 0


@pytest.mark.parametrize("how", DEPARTURES)
@pytest_twisted.ensureDeferred
async def test_put_right_after_a_waiter_departs_stays_queued(harness: Harness, how: str) -> None:
    # The departure and the Put reach the server's kernel with no reactor turn
    # between them: the server must not hand the message to the departed one.
    getter = await harness.waiting_get(b"q")
    producer = await harness.connect()
    if how == "shutdown-write":
        getter.shut_write()  # without waiting for the server's close, unlike depart()
    else:
        await depart(getter, how)
    await producer.send(frame(b"Put", b"q", b"first") + frame(b"Put", b"q", b"second"))
    assert await producer.read_frame() == [b"OK"]
    assert await producer.read_frame() == [b"OK"]

    await harness.gone(1, b"q")
    assert harness.queued(b"q") == 2
    assert await producer.request(b"Get", b"q", b"1000") == [b"OK", b"first"]
    assert await producer.request(b"Get", b"q", b"1000") == [b"OK", b"second"]


@pytest_twisted.ensureDeferred
async def test_waiters_of_one_departed_client_go_and_others_keep_their_turn(harness: Harness) -> None:
    first = await harness.waiting_get(b"q")
    departing = await harness.waiting_get(b"q")
    last = await harness.waiting_get(b"q")
    departing.reset()
    await harness.gone(2)
    assert harness.waiters(b"q") == 2

    producer = await harness.connect()
    assert await producer.request(b"Put", b"q", b"one") == [b"OK"]
    assert await producer.request(b"Put", b"q", b"two") == [b"OK"]
    assert await first.read_frame() == [b"OK", b"one"]
    assert await last.read_frame() == [b"OK", b"two"]
    assert harness.broker.num_messages == 0


#: The server learns of a peer it has stopped reading from through TCP_INFO.
linux_only = pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="needs TCP_INFO")


async def stalled_waiter(tight: Harness, queue: bytes) -> RawClient:
    """A client with a Get waiting and more requests behind it than the server reads.

    Everything it sent has reached the server's kernel, so that a FIN it sends
    next is not stuck behind unsent data (which would hide it from any server).
    """
    client = await tight.waiting_get(queue)
    protocol = client.protocol
    assert protocol is not None and protocol.buffered_bytes == 0
    request = frame(b"Put", b"behind", b"x" * 4000)
    sent = 0
    while protocol.buffered_bytes <= PENDING:
        await client.send(request)
        sent += len(request)
        await until(lambda: protocol.buffered_bytes == sent or protocol.buffered_bytes > PENDING,
                    "the server reads the requests")
    await client.send(request * 4)
    await until(lambda: client.unsent() == 0, "the server's kernel takes the rest")
    # The server has stopped reading: the rest stays in its kernel.
    settled = protocol.buffered_bytes
    await pause(0.05)
    assert protocol.buffered_bytes == settled < sent + 4 * len(request)
    assert tight.waiters(queue) == 1
    return client


@linux_only
@pytest.mark.parametrize("how", ["close", "reset"])
@pytest_twisted.ensureDeferred
async def test_server_not_reading_notices_a_departed_waiter(tight: Harness, how: str) -> None:
    client = await stalled_waiter(tight, b"q")
    started = time.monotonic()
    await depart(client, how)

    await tight.gone(0, b"q", within=LIVENESS_INTERVAL + 1)
    assert time.monotonic() - started < LIVENESS_INTERVAL + 1
    producer = await tight.connect()
    assert await producer.request(b"Put", b"q", b"kept") == [b"OK"]
    assert tight.queued(b"q") == 1
    assert await producer.request(b"Get", b"q", b"1000") == [b"OK", b"kept"]


@linux_only
@pytest.mark.parametrize("how", ["close", "reset"])
@pytest_twisted.ensureDeferred
async def test_message_for_a_departed_unread_waiter_goes_back_to_the_front(
    tight: Harness, how: str
) -> None:
    client = await stalled_waiter(tight, b"q")
    producer = await tight.connect()
    await depart(client, how)
    # At once, before the server's next look at the silent connection.
    await producer.send(frame(b"Put", b"q", b"first") + frame(b"Put", b"q", b"second"))
    assert await producer.read_frame() == [b"OK"]
    assert await producer.read_frame() == [b"OK"]

    await tight.gone(1, b"q", within=LIVENESS_INTERVAL + 1)
    assert tight.queued(b"q") == 2
    consumer = await tight.connect()
    assert await consumer.request(b"Get", b"q", b"1000") == [b"OK", b"first"]
    assert await consumer.request(b"Get", b"q", b"1000") == [b"OK", b"second"]


@linux_only
@pytest_twisted.ensureDeferred
async def test_messages_survive_a_run_of_faults_in_order(tight: Harness) -> None:
    producer = await tight.connect()
    expected: list[bytes] = []

    async def put(message: bytes) -> None:
        assert await producer.request(b"Put", b"ledger", message) == [b"OK"]
        expected.append(message)

    await put(b"m0")
    # A Put cut short.
    client = await tight.connect()
    await client.send(frame(b"Put", b"ledger", b"half")[:-2])
    client.close()
    await tight.gone(1)
    await put(b"m1")
    # Waiters on the still-empty side queue leave every way there is.
    for how in DEPARTURES:
        await depart(await tight.waiting_get(b"side"), how)
        await tight.gone(1, b"side")
    await put(b"m2")
    # A stalled waiter leaves; a message for it is put back.
    await depart(await stalled_waiter(tight, b"side"), "reset")
    assert await producer.request(b"Put", b"side", b"s0") == [b"OK"]
    await put(b"m3")
    # A large reply cut short.
    assert await producer.request(b"Put", b"large", b"L" * (4 * 1024 * 1024)) == [b"OK"]
    reader = await tight.connect()
    await reader.send(frame(b"Get", b"large", b"1000"))
    await reader.read_exactly(100)
    reader.close()
    await tight.gone(1)
    await put(b"m4")

    consumer = await tight.connect()
    for message in expected:
        assert await consumer.request(b"Get", b"ledger", b"1000") == [b"OK", message]
    assert await consumer.request(b"Get", b"ledger", b"1") == [b"Timeout"]
    assert await consumer.request(b"Get", b"side", b"1000") == [b"OK", b"s0"]
    # The cut-short large reply: if the kernel had not taken all of it, the
    # message was not handed over and is back, whole.
    if tight.queued(b"large"):
        await consumer.send(frame(b"Get", b"large", b"1000"))
        assert await consumer.read_frame(within=30) == [b"OK", b"L" * (4 * 1024 * 1024)]
    assert tight.broker.num_messages == 0


def pending_timers() -> list[Any]:
    """Delayed calls on the reactor that belong to a broker waiter or a connection."""
    return [
        call for call in reactor.getDelayedCalls()
        if isinstance(getattr(getattr(call, "func", None), "__self__", None),
                      (Waiter, MQServerProtocol))
    ]


@pytest_twisted.ensureDeferred
async def test_stopping_closes_every_connection_and_cancels_every_timer(
    logged_errors: list[dict[str, Any]],
) -> None:
    running = Harness(Limits(max_pending_bytes=PENDING))
    try:
        waiting = [await running.waiting_get(b"w%d" % (number % 7)) for number in range(40)]
        idle = [await running.connect() for _ in range(10)]
        stalled = await stalled_waiter(running, b"stalled")
        assert len(pending_timers()) >= 41
        started = time.monotonic()
        await running.service.stopService().addTimeout(DEADLINE, reactor)
        # Nothing was left to send: every connection closes at once, none
        # needing the abort that follows the one-second grace.
        assert time.monotonic() - started < 0.9
        assert running.broker.num_connections == 0
        assert not running.service.factory.connections
        assert pending_timers() == []
        assert all(running.waiters(b"w%d" % number) == 0 for number in range(7))
        for client in waiting + idle + [stalled]:
            assert await client.sees_close(within=1)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", running.port), timeout=1).close()
    finally:
        for client in running.clients:
            client.close()
        if running.service.running:
            await running.service.stopService()


# --- as a user runs it: many connections, then a signal -----------------------------


def allow_open_files(count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= count:
        return
    if hard != resource.RLIM_INFINITY and hard < count:
        pytest.skip(f"cannot open {count} files (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (count, hard))


class Server:
    """A server subprocess on a free loopback port; its output goes to files."""

    def __init__(self, argv: list[str], port: int, env: dict[str, str], directory: Path) -> None:
        self.port = port
        self.out = directory / "server.out"
        self.err = directory / "server.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.process = subprocess.Popen(argv, env=env, cwd=directory,
                                            stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        self.sockets: list[socket.socket] = []

    def output(self) -> tuple[str, str]:
        return (self.out.read_text(errors="replace"), self.err.read_text(errors="replace"))

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE)
        self.sockets.append(sock)
        return sock

    def wait_for_port(self) -> None:
        give_up = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode}: {self.output()[1]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > give_up:
                    pytest.fail("the server did not listen")
                time.sleep(0.01)

    def info(self, sock: Optional[socket.socket] = None) -> dict[str, Any]:
        own = sock is None
        sock = sock or socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE)
        try:
            sock.sendall(frame(b"Info"))
            values = read_frame(sock)
        finally:
            if own:
                sock.close()
        assert values[0] == b"OK"
        return dict(json.loads(values[1]))

    def wait_for_info(self, condition: Callable[[dict[str, Any]], bool],
                      sock: Optional[socket.socket] = None) -> None:
        give_up = time.monotonic() + 10
        while not condition(info := self.info(sock)):
            if time.monotonic() > give_up:
                pytest.fail(f"server never reached the state wanted: {info}")
            time.sleep(0.02)

    def signal_and_wait(self, number: int, within: float) -> tuple[int, float]:
        """Send a signal; the exit status and the seconds it took to exit."""
        sent = time.monotonic()
        self.process.send_signal(number)
        try:
            status = self.process.wait(timeout=within + 5)
        except subprocess.TimeoutExpired:
            try:
                state = Path(f"/proc/{self.process.pid}/status").read_text().splitlines()[2:3]
            except OSError:
                state = []
            pytest.fail(f"still running {within + 5} s after signal {number} ({state}); "
                        f"its log ends:\n{self.output()[1][-3000:]}")
        return status, time.monotonic() - sent

    def cleanup(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for sock in self.sockets:
            sock.close()


def read_frame(sock: socket.socket) -> list[bytes]:
    (length,) = _UINT32.unpack(read_exactly(sock, 4))
    return decode(read_exactly(sock, length))


def closed_by_server(sock: socket.socket, within: float = 2.0) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


@pytest.fixture
def spawn(subprocess_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(*argv: str) -> Server:
        # On port 0: the server logs the port it got (twistd to stdout).
        command = [arg.replace("{addr}", "127.0.0.1:0") for arg in argv]
        server = Server(command, 0, subprocess_env, tmp_path)
        started.append(server)
        server.port = logged_port(lambda: "".join(server.output()), server.process)
        server.wait_for_port()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.cleanup()


def load(server: Server, connections: int, waiting: int) -> list[socket.socket]:
    """Open ``connections`` clients, ``waiting`` of them with a Get waiting a minute."""
    allow_open_files(connections + 256)
    clients = [server.connect() for _ in range(connections)]
    for number, sock in enumerate(clients[:waiting]):
        sock.sendall(frame(b"Get", b"wait%d" % number, b"60000"))
    server.wait_for_info(
        lambda info: info["NumConnections"] == connections + 1 and info["NumQueues"] == waiting
    )
    return clients


LOG_LINE = r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d"


@pytest.mark.parametrize(
    "number, name", [(signal.SIGTERM, "terminated"), (signal.SIGINT, "interrupt")]
)
def test_start_stops_promptly_with_hundreds_of_clients(
    spawn: Callable[..., Server], number: int, name: str
) -> None:
    server = spawn(bin_path("mqmq"), "start", "-addr", "{addr}")
    clients = load(server, 300, 200)

    status, took = server.signal_and_wait(number, within=2)
    stdout, stderr = server.output()
    assert status == 0, stderr
    assert took < 2, f"exited {took:.2f} s after the signal"
    assert "Traceback" not in stderr and "Traceback" not in stdout
    assert "Unhandled" not in stderr
    assert not re.search(rf"^{LOG_LINE} (ERROR|CRITICAL)", stderr, re.MULTILINE), stderr
    assert re.search(rf"^{LOG_LINE} INFO: received signal: {name}$", stderr, re.MULTILINE), stderr
    assert re.search(rf"^{LOG_LINE} INFO: server stopped: 127\.0\.0\.1:{server.port}$",
                     stderr, re.MULTILINE), stderr
    assert all(closed_by_server(sock) for sock in clients)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_twistd_stops_promptly_with_waiting_clients(spawn: Callable[..., Server]) -> None:
    server = spawn(bin_path("twistd"), "-n", "--pidfile=", "mqmq", "--addr", "{addr}")
    clients = load(server, 100, 100)

    status, took = server.signal_and_wait(signal.SIGTERM, within=2)
    stdout, stderr = server.output()
    # twistd re-raises the stopping signal on itself after a clean shutdown.
    assert status in (0, -signal.SIGTERM), stdout + stderr
    assert took < 2, f"exited {took:.2f} s after the signal"
    assert "Traceback" not in stdout and "Traceback" not in stderr
    assert "Unhandled" not in stdout
    assert "Server Shut Down." in stdout
    assert all(closed_by_server(sock) for sock in clients)


def test_start_refuses_a_connection_beyond_max_connections(spawn: Callable[..., Server]) -> None:
    server = spawn(bin_path("mqmq"), "start", "-addr", "{addr}", "--max-connections", "5")
    first = server.connect()
    # The port probe may still count until the server has seen it go.
    server.wait_for_info(lambda info: info["NumConnections"] == 1, first)
    admitted = [first] + [server.connect() for _ in range(4)]
    server.wait_for_info(lambda info: info["NumConnections"] == 5, first)
    for sock in admitted:
        assert server.info(sock)["NumConnections"] == 5

    started = time.monotonic()
    extra = server.connect()
    assert closed_by_server(extra, within=2)
    assert time.monotonic() - started < 2
    for number, sock in enumerate(admitted):
        sock.sendall(frame(b"Put", b"q", b"%d" % number))
        assert read_frame(sock) == [b"OK"]
    assert server.info(admitted[0])["NumConnections"] == 5
    assert server.info(admitted[-1])["Queues"] == {"q": {"NumMessages": 5}}

    give_up = time.monotonic() + DEADLINE
    while "refused a connection" not in server.output()[1]:
        if time.monotonic() > give_up:
            pytest.fail(f"no log line about the refused connection: {server.output()[1]}")
        time.sleep(0.02)
    assert re.search(rf"^{LOG_LINE} \w+: refused a connection from .*127\.0\.0\.1.*limit is 5",
                     server.output()[1], re.MULTILINE), server.output()[1]
    assert server.process.poll() is None
