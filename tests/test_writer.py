"""ReplyWriter: replies straight to the socket, coalesced per batch, Twisted's way otherwise.

Over real loopback TCP (a ``tcp.Server`` transport, so the fast path is on),
with the global reactor; then with ``StringTransport`` (no fast path); then
end to end through the server.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, AsyncIterator, Optional, Sequence

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import defer, reactor, task, tcp, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mqmq.wire.codec import encode_frame
from mqmq.broker.limits import Limits
from mqmq.server.service import MQService
from mqmq.server.writer import FLUSH_BYTES, ReplyWriter

TIMEOUT = 30


def frame(index: int, size: int = 0) -> bytes:
    """A distinct frame, so that a lost, duplicated or reordered one shows."""
    return encode_frame([b"OK", b"%06d" % index + b"x" * size])


def unsent(transport: Any) -> bytes:
    """What Twisted's TCP transport holds, not yet given to the kernel."""
    return bytes(transport.dataBuffer[transport.offset:]) + b"".join(transport._tempDataBuffer)


# -- a server whose protocol writes through a ReplyWriter ----------------------------------


class WriterProtocol(Protocol):
    """Writes nothing by itself: each test drives ``writer``."""

    factory: WriterFactory
    writer: ReplyWriter

    def __init__(self) -> None:
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.reason: Optional[Failure] = None

    def connectionMade(self) -> None:
        self.writer = ReplyWriter(self.transport)
        self.factory.protocols.append(self)
        self.factory.accepted.put(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.lost.callback(None)

    @property
    def tcp(self) -> tcp.Server:
        assert isinstance(self.transport, tcp.Server)
        return self.transport


class WriterFactory(ServerFactory[WriterProtocol]):
    def __init__(self) -> None:
        self.accepted: defer.DeferredQueue[WriterProtocol] = defer.DeferredQueue()
        self.protocols: list[WriterProtocol] = []

    def buildProtocol(self, addr: Any) -> WriterProtocol:
        protocol = WriterProtocol()
        protocol.factory = self
        return protocol


class Listener:
    def __init__(self, factory: WriterFactory, port: IListeningPort) -> None:
        self.factory = factory
        self.port = port
        self.address = ("127.0.0.1", port.getHost().port)  # type: ignore[attr-defined]

    async def accept(self) -> WriterProtocol:
        protocol = await self.factory.accepted.get().addTimeout(TIMEOUT, reactor)
        assert isinstance(protocol, WriterProtocol)
        return protocol

    async def accept_stalled(self) -> WriterProtocol:
        """The next accepted server side, with a send buffer small enough to fill at once."""
        server = await self.accept()
        server.tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return server

    async def connect_collector(self) -> tuple[Collector, WriterProtocol]:
        collector = Collector()
        await connectProtocol(TCP4ClientEndpoint(reactor, *self.address), collector)
        return collector, await self.accept()

    def connect_raw(self, receive_buffer: int = 4096) -> socket.socket:
        """A blocking socket that reads nothing unless told: its peer's sends soon fill up."""
        peer = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        peer.connect(self.address)
        return peer


@pytest_twisted.async_yield_fixture
async def listener() -> AsyncIterator[Listener]:
    factory = WriterFactory()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[arg-type]
    try:
        yield Listener(factory, port)
    finally:
        await defer.maybeDeferred(port.stopListening)
        for protocol in factory.protocols:
            if not protocol.lost.called:
                protocol.transport.abortConnection()  # type: ignore[union-attr]
            await protocol.lost.addTimeout(TIMEOUT, reactor)


class Collector(Protocol):
    """A client that reads everything, fires ``closed`` with it all when the server closes."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.closed: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(b"".join(self.chunks))

    def pause(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resume(self) -> None:
        self.transport.resumeProducing()  # type: ignore[union-attr]


async def everything_sent(collector: Collector, server: WriterProtocol) -> bytes:
    """Close the server's side once it has sent what it holds; what the client got."""
    server.transport.loseConnection()  # type: ignore[union-attr]
    return await collector.closed.addTimeout(TIMEOUT, reactor)


class RecordingSocket:
    """Stands in for the writer's socket: records each send, optionally sends less."""

    def __init__(self, sock: socket.socket, accept: Optional[int] = None) -> None:
        self.sock = sock
        self.accept = accept
        self.calls: list[tuple[int, object]] = []  # (parts, bytes sent or the exception)
        self.sent = bytearray()

    def send(self, data: bytes) -> int:
        return self._send([data])

    def sendmsg(self, parts: Sequence[bytes]) -> int:
        return self._send(list(parts))

    def _send(self, parts: list[bytes]) -> int:
        try:
            if self.accept is None:
                count = self.sock.sendmsg(parts)
            elif self.accept == 0:
                raise BlockingIOError(11, "pretend the socket is full")
            else:
                count = self.sock.send(b"".join(parts)[:self.accept])
        except OSError as error:
            self.calls.append((len(parts), error))
            raise
        self.calls.append((len(parts), count))
        self.sent += b"".join(parts)[:count]
        return count


def record_sends(server: WriterProtocol, accept: Optional[int] = None) -> RecordingSocket:
    recording = RecordingSocket(server.tcp.socket, accept)
    server.writer._socket = recording  # type: ignore[assignment]
    return recording


def record_write_sequences(server: WriterProtocol, monkeypatch: pytest.MonkeyPatch) -> list[list[bytes]]:
    calls: list[list[bytes]] = []
    original = server.tcp.writeSequence

    def writeSequence(parts: Sequence[bytes]) -> None:
        calls.append(list(parts))
        original(parts)

    monkeypatch.setattr(server.tcp, "writeSequence", writeSequence)
    return calls


class RecordingProducer:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass


# -- the fast path -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_fast_path_is_on_for_a_tcp_server_transport(listener: Listener) -> None:
    collector, server = await listener.connect_collector()
    assert server.writer._socket is server.tcp.socket
    assert ReplyWriter(StringTransport())._socket is None
    await everything_sent(collector, server)


@pytest_twisted.ensureDeferred
async def test_a_reply_goes_straight_to_the_socket(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    collector, server = await listener.connect_collector()
    through_transport = record_write_sequences(server, monkeypatch)
    recording = record_sends(server)
    header, body = frame(1)[:6], frame(1)[6:]
    server.writer.write(frame(0))
    server.writer.write(header, body)
    # Sent during write, not on a later turn of the reactor: Twisted holds nothing.
    assert unsent(server.tcp) == b""
    assert through_transport == []
    assert [parts for parts, _ in recording.calls] == [1, 2]
    assert bytes(recording.sent) == frame(0) + frame(1)
    assert await everything_sent(collector, server) == frame(0) + frame(1)


@pytest_twisted.ensureDeferred
async def test_a_batch_goes_out_in_one_send_at_its_end(listener: Listener) -> None:
    collector, server = await listener.connect_collector()
    recording = record_sends(server)
    writer = server.writer
    writer.begin_batch()
    for i in range(50):
        writer.write(frame(i))
    assert recording.calls == []
    assert unsent(server.tcp) == b""
    writer.end_batch()
    assert len(recording.calls) == 1
    expected = b"".join(frame(i) for i in range(50))
    assert recording.calls[0] == (50, len(expected))
    writer.end_batch()  # nothing gathered: nothing sent
    assert len(recording.calls) == 1
    assert await everything_sent(collector, server) == expected


@pytest_twisted.ensureDeferred
async def test_a_batch_nested_in_another_keeps_what_the_outer_one_gathered(listener: Listener) -> None:
    collector, server = await listener.connect_collector()
    writer = server.writer
    writer.begin_batch()
    writer.write(frame(0))
    writer.begin_batch()
    writer.write(frame(1))
    writer.end_batch()
    writer.write(frame(2))
    writer.end_batch()
    assert await everything_sent(collector, server) == frame(0) + frame(1) + frame(2)


@pytest_twisted.ensureDeferred
async def test_more_parts_than_sendmsg_takes_at_once_all_arrive(listener: Listener) -> None:
    # Linux's IOV_MAX is 1024; a batch of many small replies stays under FLUSH_BYTES.
    collector, server = await listener.connect_collector()
    frames = [frame(i) for i in range(3000)]
    assert sum(map(len, frames)) < FLUSH_BYTES
    server.writer.begin_batch()
    for item in frames:
        server.writer.write(item)
    server.writer.end_batch()
    assert await everything_sent(collector, server) == b"".join(frames)


@pytest_twisted.ensureDeferred
async def test_a_batch_of_small_frames_and_a_large_part_arrives_whole_and_in_order(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    collector, server = await listener.connect_collector()
    # Not reading, and with a small send buffer: the large part cannot go at once.
    collector.pause()
    server.tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    recording = record_sends(server)
    through_transport = record_write_sequences(server, monkeypatch)
    writer = server.writer
    large = bytes(range(256)) * (16 * 1024)  # 4 MiB, no two offsets alike in a 256-byte run
    before = [frame(i) for i in range(100)]
    after = [frame(i) for i in range(100, 200)]
    # A Get's reply as the server writes it: header, message length, message.
    header = (4 + 2 + 4 + len(large)).to_bytes(4, "big") + (2).to_bytes(4, "big") + b"OK"

    writer.begin_batch()
    for item in before:
        writer.write(item)
    assert recording.calls == []
    writer.write(header, len(large).to_bytes(4, "big"), large)  # past FLUSH_BYTES: sent now
    assert len(recording.calls) == 1
    parts, count = recording.calls[0]
    assert parts == 100 + 3
    assert isinstance(count, int) and 0 < count < 4 * 1024 * 1024
    # The unsent rest went to Twisted's buffer, right after what the socket took.
    assert through_transport and unsent(server.tcp)
    for item in after:
        writer.write(item)
    writer.end_batch()
    writer.write(frame(200))  # not in a batch, but Twisted holds data: after it
    assert len(recording.calls) == 1

    expected = b"".join(before) + header + len(large).to_bytes(4, "big") + large + b"".join(after) + frame(200)
    assert bytes(recording.sent) + unsent(server.tcp) == expected
    collector.resume()
    got = await everything_sent(collector, server)
    assert len(got) == len(expected)
    assert got == expected


SPLIT_PARTS = [b"a" * 10, b"bb" * 7, bytes(range(256)) * 40, b"ccccc"]  # ends 10, 24, 10264, 10269


@pytest.mark.parametrize(
    "accept",
    [0, 1, 9, 10, 11, 23, 24, 25, 1000, 10_263, 10_264, 10_265, 10_268, 10_269],
    ids=lambda count: f"socket-takes-{count}",
)
@pytest_twisted.ensureDeferred
async def test_whatever_the_socket_takes_the_rest_follows_it_exactly(
    listener: Listener, accept: int
) -> None:
    """Partial sends ending before, inside and at the end of each part; and EAGAIN."""
    collector, server = await listener.connect_collector()
    recording = record_sends(server, accept)
    server.writer.write(*SPLIT_PARTS)
    expected = b"".join(SPLIT_PARTS)
    assert len(recording.calls) == 1
    assert len(recording.sent) == accept
    assert bytes(recording.sent) + unsent(server.tcp) == expected
    assert len(unsent(server.tcp)) == len(expected) - accept
    assert await everything_sent(collector, server) == expected


@pytest_twisted.ensureDeferred
async def test_writes_while_twisted_holds_data_go_through_the_transport_in_order(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    collector, server = await listener.connect_collector()
    recording = record_sends(server)
    through_transport = record_write_sequences(server, monkeypatch)
    # Twisted's own write never sends at once: this stays in its buffer.
    server.tcp.write(b"first, through Twisted;")
    server.writer.write(frame(0))
    server.writer.begin_batch()
    server.writer.write(frame(1))
    server.writer.write(frame(2), frame(3))
    server.writer.end_batch()
    assert recording.calls == []
    assert through_transport == [[frame(0)], [frame(1), frame(2), frame(3)]]
    expected = b"first, through Twisted;" + b"".join(frame(i) for i in range(4))
    assert await everything_sent(collector, server) == expected


# -- backpressure ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_batch_is_sent_once_it_passes_flush_bytes_so_backpressure_comes_in_time(
    listener: Listener,
) -> None:
    peer = listener.connect_raw()
    try:
        server = await listener.accept_stalled()
        producer = RecordingProducer()
        server.tcp.registerProducer(producer, True)
        recording = record_sends(server)
        writer = server.writer
        reply = frame(0, 1000)
        per_flush = -(-FLUSH_BYTES // len(reply))

        writer.begin_batch()
        for _ in range(per_flush - 1):
            writer.write(reply)
        assert recording.calls == [] and unsent(server.tcp) == b""
        writer.write(reply)
        assert len(recording.calls) == 1  # FLUSH_BYTES reached: sent within the batch

        # The peer reads nothing: Twisted's buffer fills and pauses the producer,
        # long before the batch ends.
        written = per_flush
        while not producer.paused and written < 100 * per_flush:
            writer.write(reply)
            written += 1
        assert producer.paused == 1
        assert len(unsent(server.tcp)) > server.tcp.bufferSize
        assert written <= 4 * per_flush
        writer.end_batch()
        assert producer.resumed == 0
        server.tcp.unregisterProducer()
    finally:
        peer.close()


@pytest_twisted.ensureDeferred
async def test_a_full_socket_leaves_the_reply_to_twisted_which_pauses_the_producer(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer = listener.connect_raw()
    try:
        server = await listener.accept_stalled()
        producer = RecordingProducer()
        server.tcp.registerProducer(producer, True)
        through_transport = record_write_sequences(server, monkeypatch)
        large = b"z" * (server.tcp.bufferSize * 4)
        server.writer.write(large)
        assert through_transport and 0 < len(unsent(server.tcp)) < len(large)
        assert producer.paused == 1
        server.tcp.unregisterProducer()
    finally:
        peer.close()


# -- messages not yet handed over ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_message_is_undelivered_until_the_peer_acknowledges_it(listener: Listener) -> None:
    # Reaching the kernel is not reaching the peer (a consumer gone unseen
    # resets the connection when the reply arrives): on TCP, a message is
    # handed over once the peer's kernel has acknowledged all of its reply.
    collector, server = await listener.connect_collector()
    server.writer.write_message(b"q", b"small", frame(0), b"small")
    assert unsent(server.tcp) == b""
    give_up = time.monotonic() + 5
    while server.writer.undelivered():
        assert time.monotonic() < give_up, "the peer never acknowledged the reply"
        await task.deferLater(reactor, 0.001, lambda: None)
    await everything_sent(collector, server)


@pytest_twisted.ensureDeferred
async def test_messages_whose_replies_did_not_reach_the_kernel_are_undelivered_in_order(
    listener: Listener,
) -> None:
    peer = listener.connect_raw()
    try:
        server = await listener.accept_stalled()
        server.writer.write_message(b"q", b"first", frame(1), b"first")
        large = b"L" * (1024 * 1024)
        server.writer.write_message(b"q", large, frame(2), large)
        server.writer.write_message(b"r", b"last", frame(3), b"last")
        assert unsent(server.tcp), "the socket should not have taken a whole MiB"
        undelivered = server.writer.undelivered()
        # Whatever the kernel took whole is handed over; the rest, in order.
        assert undelivered[-2:] == [(b"q", large), (b"r", b"last")]
        assert undelivered in ([(b"q", large), (b"r", b"last")],
                               [(b"q", b"first"), (b"q", large), (b"r", b"last")])
    finally:
        peer.close()


@pytest_twisted.ensureDeferred
async def test_once_the_buffer_drains_nothing_is_undelivered(listener: Listener) -> None:
    collector, server = await listener.connect_collector()
    collector.pause()
    large = b"L" * (8 * 1024 * 1024)
    server.writer.write_message(b"q", large, frame(1), large)
    assert server.writer.undelivered() == [(b"q", large)]
    collector.resume()
    while unsent(server.tcp) or server.writer.undelivered():
        await task.deferLater(reactor, 0.01, lambda: None)
    assert server.writer.undelivered() == []
    received = await everything_sent(collector, server)
    assert received == frame(1) + large


def test_with_a_test_transport_nothing_is_tracked() -> None:
    out = ReplyWriter(StringTransport())
    out.write_message(b"q", b"m", b"m")
    assert out.undelivered() == []


# -- closing -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_replies_written_after_lose_connection_still_go_out_first(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    collector, server = await listener.connect_collector()
    through_transport = record_write_sequences(server, monkeypatch)
    server.writer.write(frame(0))
    server.tcp.loseConnection()
    server.writer.write(frame(1))
    server.writer.begin_batch()
    server.writer.write(frame(2))
    server.writer.end_batch()
    # Disconnecting: no fast path, Twisted sends them, then closes.
    assert through_transport == [[frame(1)], [frame(2)]]
    assert await collector.closed.addTimeout(TIMEOUT, reactor) == frame(0) + frame(1) + frame(2)


@pytest_twisted.ensureDeferred
async def test_writes_after_the_connection_is_lost_do_not_raise(listener: Listener) -> None:
    collector, server = await listener.connect_collector()
    server.tcp.loseConnection()
    await collector.closed.addTimeout(TIMEOUT, reactor)
    await server.lost.addTimeout(TIMEOUT, reactor)
    server.writer.write(frame(0))
    server.writer.write(frame(1), b"", frame(2))
    server.writer.begin_batch()
    server.writer.write(b"x" * (2 * FLUSH_BYTES))
    server.writer.end_batch()


@pytest_twisted.ensureDeferred
async def test_writes_to_a_peer_that_reset_the_connection_do_not_raise(listener: Listener) -> None:
    peer = listener.connect_raw()
    server = await listener.accept()
    # Closing with a zero linger sends RST: the socket's next sends fail.
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    peer.close()
    for i in range(3):
        server.writer.write(frame(i))
    server.writer.begin_batch()
    server.writer.write(b"x" * (2 * FLUSH_BYTES))
    server.writer.end_batch()
    # Twisted sees the error and closes, as it would without the writer.
    await server.lost.addTimeout(TIMEOUT, reactor)
    server.writer.write(frame(9))


# -- without the fast path: StringTransport ----------------------------------------------


class SequenceRecordingTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.sequences: list[list[bytes]] = []

    def writeSequence(self, data: Sequence[bytes]) -> None:
        self.sequences.append(list(data))
        super().writeSequence(data)


def test_with_a_test_transport_every_write_is_one_write_sequence() -> None:
    transport = SequenceRecordingTransport()
    writer = ReplyWriter(transport)
    writer.write(frame(0))
    writer.write(b"head", b"body")
    assert transport.sequences == [[frame(0)], [b"head", b"body"]]
    assert transport.value() == frame(0) + b"headbody"


def test_with_a_test_transport_a_batch_holds_nothing_back() -> None:
    transport = SequenceRecordingTransport()
    writer = ReplyWriter(transport)
    writer.begin_batch()
    writer.write(frame(0))
    assert transport.value() == frame(0)
    writer.write(frame(1), frame(2))
    assert transport.sequences == [[frame(0)], [frame(1), frame(2)]]
    writer.end_batch()
    writer.end_batch()
    assert transport.sequences == [[frame(0)], [frame(1), frame(2)]]
    assert transport.value() == frame(0) + frame(1) + frame(2)


def test_with_a_test_transport_large_writes_pass_through_whole() -> None:
    transport = SequenceRecordingTransport()
    writer = ReplyWriter(transport)
    large = b"L" * (3 * FLUSH_BYTES)
    writer.begin_batch()
    writer.write(b"h", large)
    writer.end_batch()
    assert transport.sequences == [[b"h", large]]


def test_with_a_test_transport_writes_after_closing_do_not_raise() -> None:
    transport = StringTransport()
    writer = ReplyWriter(transport)
    transport.loseConnection()
    writer.write(frame(0))
    writer.begin_batch()
    writer.write(frame(1))
    writer.end_batch()
    assert transport.value() == frame(0) + frame(1)  # StringTransport keeps what it is given


# -- end to end through the server ---------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def service() -> AsyncIterator[MQService]:
    service = MQService(reactor, ["tcp:0:interface=127.0.0.1"], Limits(max_message_bytes=1000))
    service.startService()
    try:
        yield service
    finally:
        await service.stopService()


def exchange(port: int, requests: bytes) -> bytes:
    """Send everything from one thread, read to the end in this one: never a deadlock."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        failure: list[BaseException] = []

        def send() -> None:
            try:
                sock.sendall(requests)
            except BaseException as error:  # reported below
                failure.append(error)

        sender = threading.Thread(target=send)
        sender.start()
        chunks = []
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        sender.join(TIMEOUT)
        assert not failure, failure
        return b"".join(chunks)


def ask(service: MQService, requests: bytes) -> defer.Deferred[bytes]:
    port = service.ports[0].getHost().port  # type: ignore[attr-defined]
    return threads.deferToThread(exchange, port, requests + encode_frame([b"Quit"]))


@pytest_twisted.ensureDeferred
async def test_5000_pipelined_puts_then_gets_through_the_server(service: MQService) -> None:
    count = 5000
    messages = [b"message %05d " % i + b"m" * (i % 300) for i in range(count)]
    requests = b"".join(encode_frame([b"Put", b"writer", m]) for m in messages)
    requests += encode_frame([b"Get", b"writer", b"0"]) * count
    expected = encode_frame([b"OK"]) * count + b"".join(encode_frame([b"OK", m]) for m in messages)
    got = await ask(service, requests).addTimeout(TIMEOUT, reactor)
    assert len(got) == len(expected)
    assert got == expected
    assert service.broker.num_messages == 0


@pytest_twisted.ensureDeferred
async def test_a_refused_oversized_frame_loses_no_reply_read_with_it(service: MQService) -> None:
    # The skipped frame's tail re-enters the parse, inside the read's batch.
    requests = (encode_frame([b"Put", b"q", b"before"])
                + encode_frame([b"Put", b"q", b"x" * 5000])
                + encode_frame([b"Put", b"q", b"after"])
                + encode_frame([b"Get", b"q", b"0"]))
    got = await ask(service, requests).addTimeout(TIMEOUT, reactor)
    assert got == (encode_frame([b"OK"]) + encode_frame([b"Error", b"REQUEST_MESSAGE_TOO_LARGE"])
                   + encode_frame([b"OK"]) + encode_frame([b"OK", b"before"]))


def test_a_batch_of_more_parts_than_sendmsg_takes_still_uses_the_socket() -> None:
    from mqmq.server import writer as writer_module

    class Recording:
        def __init__(self) -> None:
            self.calls: list[int] = []

        def sendmsg(self, parts: list[bytes]) -> int:
            raise AssertionError("sendmsg must not get more than IOV_MAX parts")

        def send(self, data: bytes) -> int:
            self.calls.append(len(data))
            return len(data)

    class Transport:
        dataBuffer = b""
        _tempDataBuffer: list[bytes] = []
        connected = True
        disconnecting = False

        def writeSequence(self, parts: list[bytes]) -> None:
            raise AssertionError("the socket took everything")

    out = writer_module.ReplyWriter(Transport())
    sock = Recording()
    out._socket = sock  # type: ignore[assignment]
    parts = [b"ab"] * (writer_module._MOST_PARTS + 1)
    out._send(parts, 2 * len(parts))
    assert sock.calls == [2 * len(parts)]
