"""Backpressure: the server stops reading rather than piling up replies or requests.

First with ``StringTransport`` (which records the producer registered with it
and whether we asked it to pause) and ``task.Clock``; then over real loopback
TCP against a client that stops reading.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent

from mqmq.server import protocol as server_module
from mqmq.client import connect
from mqmq.wire.codec import decode_frames, encode_frame
from mqmq.broker.limits import Limits
from mqmq.server.liveness import peer_has_gone
from mqmq.server.protocol import LIVENESS_INTERVAL, MQServerProtocol
from mqmq.server.service import MQService
from wire import Connection, Frame, Server, sqlite_store

# Every fake-transport server here runs on each store (conftest.both_stores).
pytestmark = pytest.mark.usefixtures("both_stores")



class SmallBufferTransport(StringTransport):
    """Pauses its producer once more than ``limit`` bytes are written, as TCP's does."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.producer_paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.value()) > self.limit and self.producer is not None and not self.producer_paused:
            self.producer_paused = True
            self.producer.pauseProducing()

    def writeSequence(self, data: Sequence[bytes]) -> None:
        self.write(b"".join(data))

    def drain(self) -> bytes:
        """Everything written goes out; the producer is resumed."""
        data = self.value()
        self.clear()
        if self.producer_paused and self.producer is not None:
            self.producer_paused = False
            self.producer.resumeProducing()
        return data


def gone_for(*transports: object) -> Callable[[object], bool]:
    """A stand-in for ``peer_has_gone``: true for these transports only."""
    return lambda transport: any(transport is gone for gone in transports)


# -- the transport's producer ------------------------------------------------------


def test_protocol_registers_as_a_streaming_producer() -> None:
    server = Server()
    conn = server.connect()
    assert conn.transport.producer is conn.protocol
    assert conn.transport.streaming is True
    assert conn.reading


def test_paused_protocol_parses_nothing_and_stops_reading() -> None:
    server = Server()
    conn = server.connect()
    conn.send([b"Put", b"q", b"first"])
    assert conn.replies() == [[b"OK"]]
    conn.protocol.pauseProducing()
    assert not conn.reading
    conn.send([b"Put", b"q", b"second"], [b"Get", b"q"], [b"Info"])
    conn.send([b"Get", b"q"])
    assert conn.replies() == []
    assert server.broker.num_messages == 1
    assert conn.protocol.buffered_bytes > 0
    conn.protocol.resumeProducing()
    assert conn.reading
    server.settle()
    replies = conn.replies()
    assert replies[:2] == [[b"OK"], [b"OK", b"first"]]
    assert json.loads(replies[2][1])["NumMessages"] == 1
    assert replies[3:] == [[b"OK", b"second"]]
    assert conn.protocol.buffered_bytes == 0


_HELD_ELSEWHERE = ("a durable store holds replies until its write: "
                   "test_a_pipeline_on_a_durable_store_stops_once_its_held_messages_fill_a_buffer")


@pytest.mark.memory_only(_HELD_ELSEWHERE)
def test_pause_during_a_pipeline_stops_at_the_reply_that_filled_the_buffer() -> None:
    server = Server()
    for i in range(20):
        server.broker.put(b"q", b"%02d" % i)
    conn = server.connect(SmallBufferTransport(limit=50))
    transport = conn.transport
    assert isinstance(transport, SmallBufferTransport)
    conn.send(*([b"Get", b"q"] for _ in range(20)))
    # Each reply is 16 bytes: the fourth passes 50 and pauses the parsing.
    assert conn.replies() == [[b"OK", b"%02d" % i] for i in range(4)]
    assert server.broker.num_messages == 16
    assert not conn.reading
    transport.drain()
    received: list[Frame] = []
    for _ in range(4):
        assert server.broker.num_messages == 16 - len(received) - 4
        frames, rest = decode_frames(transport.drain())
        assert rest == b""
        assert len(frames) == 4
        received.extend(frames)
    assert received == [[b"OK", b"%02d" % i] for i in range(4, 20)]
    assert server.broker.num_messages == 0
    assert conn.reading


@pytest.mark.memory_only(_HELD_ELSEWHERE)
def test_pause_during_a_pipeline_stops_exactly_there() -> None:
    server = Server()
    for i in range(6):
        server.broker.put(b"q", b"%02d" % i)
    conn = server.connect(SmallBufferTransport(limit=20))
    conn.send(*([b"Get", b"q"] for _ in range(6)))
    # Two replies of 16 bytes pass 20: the rest wait, their messages still queued.
    assert conn.replies() == [[b"OK", b"00"], [b"OK", b"01"]]
    assert server.broker.num_messages == 4
    assert not conn.reading


def test_a_pipeline_on_a_durable_store_stops_once_its_held_messages_fill_a_buffer(
    both_stores: str, tmp_path: Path
) -> None:
    if both_stores == "memory":
        pytest.skip("replies wait for nothing on the memory store")
    server = Server(store=sqlite_store(tmp_path / "q.db"))
    sent = [b"%02d" % i + b"." * (10 * 1024) for i in range(20)]
    for message in sent:
        server.broker.put(b"q", message)
    server.clock.advance(0)
    conn = server.connect(SmallBufferTransport(limit=50))
    transport = conn.transport
    assert isinstance(transport, SmallBufferTransport)
    conn.send(*([b"Get", b"q"] for _ in range(20)))
    # The replies wait for the write of the removals; taking stops once the
    # messages they carry pass 64 KiB (the seventh), as a full buffer would.
    assert transport.value() == b""
    assert server.broker.num_messages == 13
    assert conn.protocol.buffered_bytes > 0
    server.clock.advance(0)
    # Written: the seven go out (none is left taken and unsent), and the
    # transport, full now, stops the reading.
    assert not conn.reading
    received: list[Frame] = []
    while len(received) < 20:
        frames, rest = decode_frames(transport.drain())
        assert rest == b""
        received.extend(frames)
        server.clock.advance(0)
    assert received == [[b"OK", message] for message in sent]
    assert server.broker.num_messages == 0
    assert conn.reading


def test_resume_answers_buffered_requests_in_order_and_resumes_reading() -> None:
    server = Server()
    conn = server.connect()
    conn.protocol.pauseProducing()
    conn.send(*([b"Put", b"q", b"m%d" % i] for i in range(5)))
    conn.send(*([b"Get", b"q"] for _ in range(5)))
    assert conn.replies() == []
    assert not conn.reading
    conn.protocol.resumeProducing()
    assert conn.replies() == [[b"OK"]] * 5 + [[b"OK", b"m%d" % i] for i in range(5)]
    assert conn.reading


# -- requests behind a waiting Get ----------------------------------------------------


@pytest.mark.not_redis("counts the broker's turns: a Redis store answers a Get a turn later, after its take")
def test_requests_behind_a_waiting_get_beyond_max_pending_bytes_pause_reading() -> None:
    server = Server(Limits(max_pending_bytes=100))
    conn = server.connect()
    producer = server.connect()
    conn.send([b"Get", b"q", b"60000"])
    put = [b"Put", b"r", b"x" * 20]  # 40 bytes on the wire
    conn.send(put, put)
    assert conn.protocol.buffered_bytes == 80
    assert conn.reading
    conn.send(put)
    assert conn.protocol.buffered_bytes == 120
    assert not conn.reading
    assert conn.replies() == []
    # Answering the Get resumes reading; the held requests follow from the reactor.
    producer.send([b"Put", b"q", b"wake"])
    assert conn.replies() == [[b"OK", b"wake"]]
    assert conn.reading
    server.clock.advance(0)
    assert conn.replies() == [[b"OK"]] * 3
    assert server.broker.num_messages == 3


@pytest.mark.not_redis("counts the broker's turns: a Redis store answers a Get a turn later, after its take")
def test_a_get_timing_out_resumes_reading_too() -> None:
    server = Server(Limits(max_pending_bytes=10))
    conn = server.connect()
    conn.send([b"Get", b"q", b"500"], [b"Info"], [b"Info"])
    assert not conn.reading
    server.clock.advance(0.5)
    assert conn.reading
    server.clock.advance(0)
    replies = conn.replies()
    assert replies[0] == [b"Timeout"]
    assert [frame[0] for frame in replies[1:]] == [b"OK", b"OK"]


@pytest.mark.not_redis("counts the broker's turns: a Redis store answers a Get a turn later, after its take")
def test_a_second_waiting_get_with_a_backlog_pauses_again() -> None:
    server = Server(Limits(max_pending_bytes=30))
    conn = server.connect()
    producer = server.connect()
    info = encode_frame([b"Info"])
    conn.send([b"Get", b"q", b"60000"], [b"Get", b"q", b"60000"])
    conn.protocol.dataReceived(info * 3)
    assert not conn.reading
    producer.send([b"Put", b"q", b"one"])
    server.clock.advance(0)
    # The second Get waits now, with 24 bytes behind it: under the limit.
    assert conn.reading
    conn.protocol.dataReceived(info)
    assert not conn.reading
    producer.send([b"Put", b"q", b"two"])
    server.settle()
    replies = conn.replies()
    assert replies[:2] == [[b"OK", b"one"], [b"OK", b"two"]]
    assert len(replies) == 6
    assert conn.reading


# -- liveness of a peer we no longer read from -----------------------------------------


def paused_waiter(server: Server, queue: bytes = b"q") -> Connection:
    """A connection whose Get waits, with enough behind it to stop reading."""
    conn = server.connect()
    conn.send([b"Get", queue, b"60000"], [b"Info"], [b"Info"], [b"Info"])
    assert not conn.reading
    return conn


@pytest.mark.not_redis("counts the broker's turns: a Redis store answers a Get a turn later, after its take")
def test_a_paused_waiter_whose_peer_is_there_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    server = Server(Limits(max_pending_bytes=20))
    conn = paused_waiter(server)
    asked: list[object] = []

    def still_there(transport: object) -> bool:
        asked.append(transport)
        return False

    monkeypatch.setattr(server_module, "peer_has_gone", still_there)
    for _ in range(5):
        server.clock.advance(LIVENESS_INTERVAL)
    assert asked == [conn.transport] * 5
    assert not conn.transport.disconnecting
    producer = server.connect()
    producer.send([b"Put", b"q", b"for you"])
    assert conn.replies() == [[b"OK", b"for you"]]


def test_a_paused_waiter_whose_peer_went_away_is_aborted(monkeypatch: pytest.MonkeyPatch) -> None:
    server = Server(Limits(max_pending_bytes=20))
    conn = paused_waiter(server)
    monkeypatch.setattr(server_module, "peer_has_gone", gone_for(conn.transport))
    with capturedLogs() as events:
        server.clock.advance(LIVENESS_INTERVAL - 2.0**-10)
        assert not conn.transport.disconnecting
        server.clock.advance(2.0**-10)
    assert conn.transport.disconnected  # aborted, not closed gracefully
    assert any("went away" in formatEvent(event) for event in events)
    # Before the reactor reports the connection lost, a Put stays queued.
    producer = server.connect()
    producer.send([b"Put", b"q", b"not for the departed"])
    assert producer.replies() == [[b"OK"]]
    assert server.broker.num_messages == 1
    conn.lose()
    producer.send([b"Put", b"q", b"second"], [b"Get", b"q"], [b"Get", b"q"])
    assert producer.replies() == [[b"OK"], [b"OK", b"not for the departed"], [b"OK", b"second"]]
    assert conn.replies() == []
    assert server.broker.num_connections == 1
    assert server.clock.getDelayedCalls() == []


def test_a_waiter_paused_by_its_transport_is_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    server = Server()
    conn = server.connect()
    conn.send([b"Get", b"q", b"60000"])
    conn.protocol.pauseProducing()  # its unsent replies piled up
    assert not conn.reading
    monkeypatch.setattr(server_module, "peer_has_gone", gone_for(conn.transport))
    server.clock.advance(LIVENESS_INTERVAL)
    assert conn.transport.disconnected
    producer = server.connect()
    producer.send([b"Put", b"q", b"kept"])
    conn.lose()
    assert server.broker.num_messages == 1
    assert conn.replies() == []


def test_a_put_for_a_departed_paused_waiter_goes_back_to_the_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = Server(Limits(max_pending_bytes=20))
    conn = paused_waiter(server)
    monkeypatch.setattr(server_module, "peer_has_gone", gone_for(conn.transport))
    producer = server.connect()
    producer.send([b"Put", b"q", b"kept"])
    assert producer.replies() == [[b"OK"]]
    assert conn.replies() == []
    assert conn.transport.disconnected
    assert dict(server.broker.queue_sizes()) == {b"q": 1}
    conn.lose()
    consumer = server.connect()
    consumer.send([b"Get", b"q"])
    assert consumer.replies() == [[b"OK", b"kept"]]


def test_a_put_for_a_departed_paused_waiter_goes_to_the_next_waiter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = Server(Limits(max_pending_bytes=20))
    departed = paused_waiter(server)
    next_waiter = server.connect()
    next_waiter.send([b"Get", b"q", b"60000"])
    also_departed = paused_waiter(server)
    last_waiter = server.connect()
    last_waiter.send([b"Get", b"q", b"60000"])
    monkeypatch.setattr(
        server_module, "peer_has_gone", gone_for(departed.transport, also_departed.transport)
    )
    producer = server.connect()
    producer.send([b"Put", b"q", b"one"], [b"Put", b"q", b"two"], [b"Put", b"q", b"three"])
    assert producer.replies() == [[b"OK"]] * 3
    assert next_waiter.replies() == [[b"OK", b"one"]]
    assert last_waiter.replies() == [[b"OK", b"two"]]
    assert departed.replies() == also_departed.replies() == []
    assert departed.transport.disconnected and also_departed.transport.disconnected
    assert server.broker.num_messages == 1
    producer.send([b"Get", b"q"])
    assert producer.replies() == [[b"OK", b"three"]]


def test_a_reading_waiter_is_not_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    server = Server()
    conn = server.connect()
    conn.send([b"Get", b"q", b"60000"])
    monkeypatch.setattr(server_module, "peer_has_gone", gone_for(conn.transport))
    server.clock.advance(10 * LIVENESS_INTERVAL)
    assert not conn.transport.disconnecting
    # No liveness check is scheduled for it: only its Get's timer.
    assert len(server.clock.getDelayedCalls()) == 1


@pytest.mark.not_redis("counts the broker's turns: a Redis store answers a Get a turn later, after its take")
def test_liveness_checks_stop_when_reading_resumes(monkeypatch: pytest.MonkeyPatch) -> None:
    server = Server(Limits(max_pending_bytes=20))
    conn = paused_waiter(server)
    calls: list[object] = []

    def still_there(transport: object) -> bool:
        calls.append(transport)
        return False

    monkeypatch.setattr(server_module, "peer_has_gone", still_there)
    server.clock.advance(LIVENESS_INTERVAL)
    assert len(calls) == 1
    server.connect().send([b"Put", b"q", b"m"])
    # Asked once more, before the message was handed over.
    assert len(calls) == 2
    assert conn.replies() == [[b"OK", b"m"]]
    server.clock.advance(0)
    assert conn.reading
    server.clock.advance(10 * LIVENESS_INTERVAL)
    assert len(calls) == 2
    assert server.clock.getDelayedCalls() == []


def test_pausing_and_resuming_keeps_a_single_liveness_check() -> None:
    server = Server()
    conn = server.connect()
    conn.send([b"Get", b"q", b"60000"])
    for _ in range(5):
        conn.protocol.pauseProducing()
        conn.protocol.resumeProducing()
    conn.protocol.pauseProducing()
    # The Get's timer and one liveness check, however often reading toggled.
    assert len(server.clock.getDelayedCalls()) == 2
    server.clock.advance(LIVENESS_INTERVAL)
    assert len(server.clock.getDelayedCalls()) == 2
    conn.lose()
    assert server.clock.getDelayedCalls() == []


# -- peer_has_gone on real sockets ----------------------------------------------------


class SocketTransport:
    """Just enough of a TCP transport for ``peer_has_gone``."""

    def __init__(self, handle: socket.socket) -> None:
        self.handle = handle

    def getHandle(self) -> socket.socket:
        return self.handle


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="needs TCP_INFO")
def test_peer_has_gone_reads_the_kernel_state_of_a_tcp_socket() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        with accepted:
            transport = SocketTransport(accepted)
            client.sendall(b"unread")
            assert peer_has_gone(transport) is False
            client.close()
            deadline = time.monotonic() + 5
            while not peer_has_gone(transport):
                assert time.monotonic() < deadline, "the peer's FIN was never seen"
                time.sleep(0.001)
    assert peer_has_gone(StringTransport()) is False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        assert peer_has_gone(SocketTransport(unix)) is False


# -- over loopback TCP ----------------------------------------------------------------



async def until(condition: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    """Let the reactor run until ``condition()`` holds."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await task.deferLater(reactor, 0.005, lambda: None)


class StallingClient(Protocol):
    """Sends a pipeline, reads nothing until told, then checks each reply as it comes."""

    def __init__(self, requests: bytes, check: Callable[[int, Frame], None], expected: int) -> None:
        self.requests = requests
        self.check = check
        self.expected = expected
        self.count = 0
        self.bytes_received = 0
        self._rest = b""
        self.done: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]
        self.transport.write(self.requests)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.bytes_received += len(data)
        frames, self._rest = decode_frames(self._rest + data)
        for frame in frames:
            self.check(self.count, frame)
            self.count += 1
        if self.count == self.expected and not self.done.called:
            self.done.callback(None)


def server_write_buffer(protocol: MQServerProtocol) -> int:
    transport: Any = protocol.transport
    return len(transport.dataBuffer) + int(transport._tempDataLen)


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_gets_the_server_to_stop_too(
    loopback_service: MQService,
) -> None:
    service = loopback_service
    queues = 2000
    pairs = 2000
    broker = service.broker
    for i in range(queues):
        broker.take(b"queue-%05d" % i)
    for i in range(pairs):
        broker.put(b"order", b"%d" % i)
    info_size = len(encode_frame([b"OK", broker.info_json()]))
    assert info_size > 60_000
    requests = (encode_frame([b"Info"]) + encode_frame([b"Get", b"order"])) * pairs

    def check(index: int, frame: Frame) -> None:
        if index % 2 == 0:
            assert frame[0] == b"OK" and frame[1].startswith(b'{"NumConnections":'), index
            # "order" and the other client's queue count too.
            head = frame[1][:80]
            assert b'"NumQueues":2001,' in head or b'"NumQueues":2002,' in head, index
        else:
            assert frame == [b"OK", b"%d" % (index // 2)], index

    port = service.ports[0].getHost().port  # type: ignore[attr-defined]
    stalling = StallingClient(requests, check, expected=2 * pairs)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), stalling)
    await until(lambda: len(service.factory.connections) == 1, "the server saw the connection")
    (stalled,) = service.factory.connections
    await until(lambda: stalled.paused, "the server paused the stalled connection")
    assert not stalled._reading
    assert stalling.bytes_received == 0

    # Another client is served promptly meanwhile.
    other = await connect(reactor, f"127.0.0.1:{port}")
    try:
        started = time.monotonic()
        for i in range(20):
            await other.put("other", b"m%d" % i).addTimeout(5, reactor)
            assert await other.get("other", 1).addTimeout(5, reactor) == b"m%d" % i
        assert time.monotonic() - started < 5
        info = await other.info()
        assert info.num_connections == 2
    finally:
        await other.disconnect()

    # The stalled connection's replies did not pile up in the server.
    assert stalled.paused
    assert server_write_buffer(stalled) < 4 * 1024 * 1024
    assert stalled.buffered_bytes > 0
    answered = pairs - broker.num_messages
    assert answered * info_size < 32 * 1024 * 1024

    stalling.transport.resumeProducing()  # type: ignore[union-attr]
    await stalling.done.addTimeout(30, reactor)
    assert stalling.count == 2 * pairs
    assert stalling._rest == b""
    assert broker.num_messages == 0
    await until(lambda: not stalled.paused and stalled._reading, "the server resumed")
    assert server_write_buffer(stalled) == 0
    stalling.transport.loseConnection()  # type: ignore[union-attr]
    await until(lambda: not service.factory.connections, "the connection closed")


@pytest.mark.not_redis("counts the broker's turns: a Redis store answers a Get a turn later, after its take")
def test_a_paused_get_timing_out_for_a_departed_peer_answers_nothing_behind_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = Server(Limits(max_pending_bytes=20))
    producer = server.connect()
    producer.send([b"Put", b"other", b"keep me"])
    conn = server.connect()
    # A Get that will time out, and behind it a Get that would take a message.
    conn.send([b"Get", b"q", b"500"], [b"Get", b"other", b"1"], [b"Info"], [b"Info"])
    assert not conn.reading
    monkeypatch.setattr(server_module, "peer_has_gone", gone_for(conn.transport))
    server.clock.advance(0.5)
    server.clock.advance(0)
    assert conn.replies() == []
    assert conn.transport.disconnected  # aborted
    assert server.broker.take(b"other") == b"keep me"
