"""Hostile clients against one broker: whatever they send, the server stays sound.

Several connections, well-behaved and hostile, share a broker with small
limits.  Their byte streams are cut at arbitrary points and interleaved, with
time passing, transports pausing the server when replies pile up, and peers
vanishing while the server is not reading from them.  After every step the
broker's books must balance; at the end every message acknowledged with
``OK`` to a well-behaved client is still there, unless a ``Get`` carried it
out, and a new client is served as usual.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure

from mqmq.server import protocol as server_module
from mqmq.broker.broker import Broker
from mqmq.wire.codec import MAX_FRAME_LENGTH, decode_frames, encode_frame, encode_payload
from mqmq.broker.limits import Limits
from mqmq.server.protocol import LIVENESS_INTERVAL, MQServerFactory, MQServerProtocol
from wire import sqlite_store

Frame = list[bytes]

LIMITS = Limits(
    max_message_bytes=64,
    max_connections=4,
    max_queued_bytes=150,
    max_queued_messages=5,
    max_queues=3,
    idle_timeout=3.0,
    max_pending_bytes=60,
)
MAX_FRAME = LIMITS.max_frame_bytes
NAMES = [b"q", b"r", b"", b"s"]
LARGEST_CHUNK = 300

OK = b"OK"
ERROR = b"Error"
TIMEOUT = b"Timeout"
PUT_ERRORS = {b"REQUEST_MESSAGE_TOO_LARGE", b"SERVER_STORAGE_FULL", b"SERVER_TOO_MANY_QUEUES"}


class PeerTransport(StringTransport):
    """A TCP transport as the reactor drives it, with a peer that may vanish.

    Like TCP's, it pauses its producer when more than ``buffer_size`` bytes are
    unsent, resumes it when drained, and reports the connection lost (after
    ``stopProducing`` its producer) on the next turn after a close.  Writes to
    a vanished peer are lost; the server must write nothing after a close.
    """

    def __init__(self, clock: task.Clock, peer: IPv4Address, buffer_size: int) -> None:
        super().__init__(peerAddress=peer, lenient=True)
        self.clock = clock
        self.buffer_size = buffer_size
        self.protocol: Optional[MQServerProtocol] = None
        self.gone = False
        self.lost = False
        self.write_paused = False
        self.unsent = 0
        self.after_close: list[bytes] = []
        self._lost_scheduled = False

    # What the server calls.

    def write(self, data: bytes) -> None:
        if self.disconnecting:
            self.after_close.append(data)
            return
        if self.gone:
            return
        super().write(data)
        self.unsent += len(data)
        if self.unsent > self.buffer_size and self.producer is not None and not self.write_paused:
            self.write_paused = True
            self.producer.pauseProducing()

    def writeSequence(self, data: Sequence[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        super().loseConnection()
        self._schedule_lost()

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None

    def resumeProducing(self) -> None:
        super().resumeProducing()
        if self.gone:
            # Reading again, the reactor sees the peer's FIN.
            self._schedule_lost()

    # What the peer and the reactor do.

    @property
    def readable(self) -> bool:
        return not (self.lost or self.gone or self.disconnecting) and self.producerState == "producing"

    def drain(self) -> None:
        if self.lost or self.gone or self.disconnecting:
            return
        self.unsent = 0
        if self.write_paused and self.producer is not None:
            self.write_paused = False
            self.producer.resumeProducing()

    def vanish(self) -> None:
        if self.lost or self.gone:
            return
        if self.producerState == "producing" and not self.disconnecting:
            # The server reads from it: the reactor sees the close at once.
            self.report_lost()
            return
        self.gone = True
        if self.write_paused:
            # Writes to it now fail: the reactor finds out on its next turn.
            self._schedule_lost()

    def _schedule_lost(self) -> None:
        if not (self._lost_scheduled or self.lost):
            self._lost_scheduled = True
            self.clock.callLater(0, self.report_lost)

    def report_lost(self) -> None:
        if self.lost:
            return
        self.lost = True
        assert self.protocol is not None
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        self.protocol.connectionLost(Failure(ConnectionDone()))


@dataclass
class Request:
    """A request a well-behaved client sent."""

    command: bytes
    queue: bytes = b""
    message: bytes = b""


@dataclass
class Client:
    """One connection's stream, and for a well-behaved one its requests in order."""

    stream: bytes
    buffer_size: int
    requests: Optional[list[Request]] = None  # None: hostile
    transport: Optional[PeerTransport] = None
    protocol: Optional[MQServerProtocol] = None
    sent: int = 0


@dataclass
class World:
    #: A directory for an SQLite store, or None for the memory store.
    database_directory: Optional[str] = None
    clock: task.Clock = field(default_factory=task.Clock)
    broker: Broker = field(init=False)
    factory: MQServerFactory = field(init=False)
    clients: list[Client] = field(default_factory=list)
    put_backs: int = 0
    _port: int = 40000

    def __post_init__(self) -> None:
        store = None
        if self.database_directory is not None:
            # Real SQLite; its writes run at once when the clock advances.
            store = sqlite_store(os.path.join(self.database_directory, "queues.db"))(self.clock)
        self.broker = Broker(self.clock, LIMITS, store)
        self.broker.startService()
        self.factory = MQServerFactory(self.broker)
        put_back = self.broker.put_back

        def counting_put_back(queue_name: bytes, *messages: bytes) -> None:
            self.put_backs += len(messages)
            put_back(queue_name, *messages)

        self.broker.put_back = counting_put_back  # type: ignore[method-assign]

    def open_clients(self) -> list[Client]:
        return [c for c in self.clients if c.transport is not None and not c.transport.lost]

    def connect(self, client: Client) -> bool:
        self._port += 1
        addr = IPv4Address("TCP", "127.0.0.1", self._port)
        already_open = len(self.open_clients())
        protocol = self.factory.buildProtocol(addr)
        if protocol is None:
            assert already_open >= LIMITS.max_connections
            return False
        assert already_open < LIMITS.max_connections
        transport = PeerTransport(self.clock, addr, client.buffer_size)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        client.transport, client.protocol = transport, protocol
        self.clients.append(client)
        return True


# -- streams ---------------------------------------------------------------------------

# Mostly one queue, so that clients meet on it; one name more than max_queues.
names = st.sampled_from([b"q", b"q", b"q", *NAMES[1:]])
timeouts = st.sampled_from(
    [b"1", b"0", b"-3", b"200", b"2500", b"60000", b"60000", b"x", b"3600001"]
)

valid_frames = st.one_of(
    st.builds(lambda q, m: encode_frame([b"Put", q, m]), names, st.binary(max_size=80)),
    st.builds(lambda q, t: encode_frame([b"Get", q, t]), names, timeouts),
    st.builds(lambda q: encode_frame([b"Get", q]), names),
    st.just(encode_frame([b"Info"])),
    st.just(encode_frame([b"Put", b"q"])),
    st.just(encode_frame([b"Get", b"n" * 1025, b"1"])),
    # Acknowledged delivery: ids are small numbers, so some are this
    # connection's own reservations; leases short and long, some refused.
    st.builds(lambda q, t, lease: encode_frame([b"Reserve", q, t, lease]), names, timeouts,
              st.sampled_from([b"1", b"250", b"30000", b"0", b"x"])),
    st.builds(lambda command, q, message_id, extra: encode_frame([command, q, message_id, *extra]),
              st.sampled_from([b"Ack", b"Release", b"Touch", b"Bury"]), names,
              st.sampled_from([b"1", b"2", b"3", b"7", b"01", b"x", b"\xff"]),
              st.sampled_from([[], [b"0"], [b"100"], [b"43200001"]])),
    st.builds(lambda q, count: encode_frame([b"Kick", q, count]), names,
              st.sampled_from([b"1", b"3", b"0", b"many"])),
)
junk = st.one_of(
    st.binary(max_size=30),
    st.just(encode_frame([b"Quit"])),
    st.just(b"\x00\x00\x00\x00"),  # empty frame
    st.lists(st.binary(max_size=6), max_size=4).map(encode_frame),  # unknown commands
    # A header over max_frame_bytes: its frame is skipped, whatever follows.
    st.integers(MAX_FRAME + 1, MAX_FRAME + 400).map(lambda n: struct.pack(">I", n)),
    # A header over the protocol's limit: the connection is closed.
    st.integers(MAX_FRAME_LENGTH + 1, 2**32 - 1).map(lambda n: struct.pack(">I", n)),
    # A value running past the end of its frame.
    st.builds(lambda v: struct.pack(">I", len(v) + 4) + struct.pack(">I", len(v) + 9) + v,
              st.binary(max_size=8)),
)
hostile_streams = st.one_of(
    st.lists(st.one_of(valid_frames, valid_frames, valid_frames, junk), max_size=20).map(
        b"".join
    ),
    # A Get that waits with enough behind it that the server stops reading.
    st.builds(lambda q, rest: encode_frame([b"Get", q, b"60000"]) + encode_frame([b"Info"]) * 6
              + b"".join(rest), names, st.lists(st.one_of(valid_frames, junk), max_size=4)),
)

# A well-behaved client's requests; Put messages are made unique when the test runs.
well_requests = st.lists(
    st.one_of(
        st.tuples(st.just(b"Put"), names, st.sampled_from([5, 20, 64, 65, 1200])),
        st.tuples(st.just(b"Get"), names, st.sampled_from([b"1", b"0", b"200", b"2500", b"60000"])),
        st.tuples(st.just(b"Info"), st.just(b""), st.just(0)),
    ),
    min_size=2,
    max_size=16,
)
buffer_sizes = st.sampled_from([30, 200, 10**9])

ADVANCES = [0.0, 0.001, 0.25, LIVENESS_INTERVAL, LIMITS.idle_timeout, 30.0]
actions = st.lists(
    st.tuples(
        st.sampled_from(["send"] * 6 + ["advance"] * 3 + ["drain", "drain", "vanish", "connect"]),
        st.integers(0, 7),
        st.integers(1, LARGEST_CHUNK),
        st.sampled_from(ADVANCES),
    ),
    min_size=10,
    max_size=80,
)
client_specs = st.lists(
    st.one_of(
        st.tuples(st.just(True), well_requests, buffer_sizes),
        st.tuples(st.just(False), hostile_streams, buffer_sizes),
    ),
    min_size=2,
    max_size=7,
)


def make_clients(specs: list[tuple[bool, Any, int]]) -> list[Client]:
    clients: list[Client] = []
    serial = 0
    for well, content, buffer_size in specs:
        if not well:
            clients.append(Client(stream=content, buffer_size=buffer_size))
            continue
        requests: list[Request] = []
        frames: list[bytes] = []
        for command, queue, detail in content:
            if command == b"Put":
                serial += 1
                message = (b"w%03d" % serial).ljust(detail, b"-")
                requests.append(Request(command, queue, message))
                frames.append(encode_frame([command, queue, message]))
            elif command == b"Get":
                requests.append(Request(command, queue))
                frames.append(encode_frame([command, queue, detail]))
            else:
                requests.append(Request(command))
                frames.append(encode_frame([command]))
        clients.append(Client(stream=b"".join(frames), buffer_size=buffer_size, requests=requests))
    return clients


# -- invariants ------------------------------------------------------------------------


def check_books(world: World) -> None:
    broker = world.broker
    open_clients = world.open_clients()
    assert broker.num_connections == len(open_clients)
    assert world.factory.connections == {c.protocol for c in open_clients}
    queues = list(broker._queues.values())
    assert broker.num_queues == len(queues) <= LIMITS.max_queues
    assert broker.num_messages == sum(len(q.messages) for q in queues)
    # Held apart: reserved (delayed releases included) and buried messages.
    reservations = [*broker._reservations.values(), *broker._delayed]
    assert broker.num_reserved == len(reservations) == sum(q.reserved for q in queues)
    buried = [entry for q in queues for entry in getattr(q.messages, "_buried", ())]
    assert broker.num_buried == len(buried) == sum(q.buried for q in queues)
    assert broker.num_bytes == (sum(q.messages.num_bytes for q in queues)
                                + sum(len(r.entry.message) for r in reservations)
                                + sum(len(entry.message) for entry in buried))
    # Only a message that could not be delivered (or came back from a
    # reservation) may pass the storage limits.
    assert (broker.num_messages + broker.num_reserved + broker.num_buried
            <= LIMITS.max_queued_messages + world.put_backs)
    for queue in queues:
        assert not (len(queue.messages) and queue.waiters), queue.name
    # Every waiter belongs to a connection that is still open.
    assert sum(len(q.waiters) for q in queues) == sum(
        1 for c in open_clients if c.protocol is not None and c.protocol._waiting is not None
    )
    for client in world.clients:
        assert client.transport is not None and client.protocol is not None
        assert client.transport.after_close == []
        if not client.transport.lost:
            # Memory per connection is bounded: a frame, or what waits behind a Get.
            assert client.protocol.buffered_bytes <= (
                LIMITS.max_pending_bytes + MAX_FRAME + 4 + 2 * LARGEST_CHUNK
            )


def check_reading(client: Client) -> None:
    """After a segment: past max_pending_bytes behind a waiting Get, reading stops."""
    protocol, transport = client.protocol, client.transport
    assert protocol is not None and transport is not None
    if protocol._waiting is not None and protocol.buffered_bytes > LIMITS.max_pending_bytes:
        assert not transport.readable
    if transport.write_paused:
        assert not transport.readable


def check_replies(world: World, acked: Counter[bytes], carried: Counter[bytes]) -> None:
    """Match each client's replies to its requests; count acknowledged and delivered."""
    for client in world.clients:
        assert client.transport is not None
        replies, rest = decode_frames(client.transport.value())
        # A large Info reply is written a piece at a time as the peer reads:
        # a connection lost meanwhile ends with the start of that frame.
        assert rest == b"" or rest[4:12] == b"\x00\x00\x00\x02OK\x00\x00", rest[:12]
        if client.requests is None:
            for reply in replies:
                assert reply[0] in (OK, ERROR, TIMEOUT), reply
                if reply[0] == OK and len(reply) in (2, 4):
                    # A message (a Get's or a Reserve's), an Info or a Kick's count.
                    carried[reply[1]] += 1
            continue
        assert len(replies) <= len(client.requests)
        for request, reply in zip(client.requests, replies):
            if request.command == b"Put":
                if len(request.message) > LIMITS.max_message_bytes:
                    assert reply == [ERROR, b"REQUEST_MESSAGE_TOO_LARGE"]
                elif reply == [OK]:
                    acked[request.message] += 1
                else:
                    assert reply[0] == ERROR and reply[1] in PUT_ERRORS, reply
            elif request.command == b"Get":
                assert reply in ([TIMEOUT], [ERROR, b"SERVER_TOO_MANY_QUEUES"]) or (
                    reply[0] == OK and len(reply) == 2
                ), reply
                if reply[0] == OK:
                    carried[reply[1]] += 1
            else:
                assert reply[0] == OK
                info = json.loads(reply[1])
                assert info["NumMessages"] == sum(
                    q["NumMessages"] for q in info["Queues"].values()
                )


def fresh_client_works(world: World) -> Counter[bytes]:
    """A new well-behaved client is served, and drains every queue."""
    client = Client(stream=b"", buffer_size=10**9, requests=[])
    assert world.connect(client)
    transport, protocol = client.transport, client.protocol
    assert transport is not None and protocol is not None
    read = 0

    def ask(*frames: Sequence[bytes]) -> list[Frame]:
        nonlocal read
        protocol.dataReceived(b"".join(encode_frame(f) for f in frames))
        if len(transport.value()) == read:
            world.clock.advance(0.001)
        data = transport.value()[read:]
        read += len(data)
        replies, rest = decode_frames(data)
        assert rest == b""
        return replies

    (info,) = ask([b"Info"])
    document = json.loads(info[1])
    assert document["NumConnections"] == 1
    assert document["NumMessages"] == world.broker.num_messages
    drained: Counter[bytes] = Counter()
    for name, _ in list(world.broker.queue_sizes()):
        while (reply := ask([b"Get", name, b"1"])) != [[TIMEOUT]]:
            assert reply[0][0] == OK and len(reply) == 1, reply
            drained[reply[0][1]] += 1
    assert world.broker.num_messages == world.broker.num_bytes == 0
    probe_queue = next(iter(world.broker._queues), b"probe")
    assert ask([b"Put", probe_queue, b"probe"], [b"Get", probe_queue]) == [
        [OK], [OK, b"probe"]
    ]
    assert not transport.disconnecting
    return drained


# -- the property ----------------------------------------------------------------------


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=client_specs, steps=actions, liveness_interval=st.sampled_from([LIVENESS_INTERVAL, 20.0]))
def test_hostile_clients_never_break_the_server(
    specs: list[tuple[bool, Any, int]],
    steps: list[tuple[str, int, int, float]],
    liveness_interval: float,
) -> None:
    hostile_clients(World(), specs, steps, liveness_interval)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=client_specs, steps=actions, liveness_interval=st.sampled_from([LIVENESS_INTERVAL, 20.0]))
def test_hostile_clients_never_break_the_server_on_the_sqlite_store(
    specs: list[tuple[bool, Any, int]],
    steps: list[tuple[str, int, int, float]],
    liveness_interval: float,
) -> None:
    with tempfile.TemporaryDirectory(prefix="mqmq-hostile-") as directory:
        hostile_clients(World(directory), specs, steps, liveness_interval)


def hostile_clients(
    world: World,
    specs: list[tuple[bool, Any, int]],
    steps: list[tuple[str, int, int, float]],
    liveness_interval: float,
) -> None:
    pending = make_clients(specs)
    # A longer interval leaves departed waiters around for longer, for Puts to find.
    with mock.patch.object(
        server_module, "peer_has_gone", lambda transport: bool(getattr(transport, "gone", False))
    ), mock.patch.object(
        server_module, "LIVENESS_INTERVAL", liveness_interval
    ), capturedLogs() as events:
        while pending and len(world.clients) < LIMITS.max_connections:
            world.connect(pending.pop(0))
        for kind, which, size, seconds in steps:
            clients = world.clients
            client = clients[which % len(clients)] if clients else None
            if kind == "advance":
                world.clock.advance(seconds)
            elif kind == "connect":
                if pending:
                    world.connect(pending.pop(0))
            elif client is not None and client.transport is not None:
                transport = client.transport
                if kind == "send" and transport.readable and client.sent < len(client.stream):
                    chunk = client.stream[client.sent : client.sent + size]
                    client.sent += len(chunk)
                    assert client.protocol is not None
                    client.protocol.dataReceived(chunk)
                    check_reading(client)
                elif kind == "drain":
                    transport.drain()
                elif kind == "vanish":
                    # Mostly one the server does not read from: only it can fool the server.
                    unread = [c for c in world.open_clients()
                              if c.transport is not None and not c.transport.readable]
                    if unread and size % 4:
                        unread[which % len(unread)].transport.vanish()  # type: ignore[union-attr]
                    else:
                        transport.vanish()
            check_books(world)

        # The clients still connected send the rest, reading their replies;
        # the others connect as slots free up.
        for _ in range(30):
            while pending and len(world.open_clients()) < LIMITS.max_connections:
                world.connect(pending.pop(0))
            for client in world.open_clients():
                assert client.transport is not None and client.protocol is not None
                client.transport.drain()
                if client.transport.readable and client.sent < len(client.stream):
                    chunk = client.stream[client.sent : client.sent + 97]
                    client.sent += len(chunk)
                    client.protocol.dataReceived(chunk)
                    check_reading(client)
            world.clock.advance(0.25)
            check_books(world)

        # Everyone leaves; the reactor reports each connection lost.
        for client in world.open_clients():
            assert client.transport is not None
            client.transport.vanish()
        world.clock.advance(0)
        for client in world.open_clients():
            assert client.transport is not None
            client.transport.report_lost()
        check_books(world)
        assert world.broker.num_connections == 0
        # No timer, idle or liveness check outlives its connection (a store's
        # write of the put-backs just made may be due).  A lease length's
        # timer waits out its time, with no lease left to end.
        world.clock.advance(0)
        leases = world.broker._leases
        assert len(leases) == 0
        assert [call for call in world.clock.getDelayedCalls() if call.func != leases._run_out] == []

        acked: Counter[bytes] = Counter()
        carried: Counter[bytes] = Counter()
        check_replies(world, acked, carried)
        drained = fresh_client_works(world)

    assert [e for e in events if "log_failure" in e] == []
    assert [e for e in events if e["log_level"] >= LogLevel.error] == []
    # Nothing acknowledged was lost: what no Get carried out is still queued.
    missing = (acked - carried) - drained
    assert not missing, f"acknowledged messages lost: {sorted(missing)}"


# -- a few streams spelled out ------------------------------------------------------------


def run_single(chunks: list[bytes], advance: float = 0.0) -> tuple[World, Client]:
    world = World()
    client = Client(stream=b"", buffer_size=10**9)
    assert world.connect(client)
    assert client.protocol is not None and client.transport is not None
    for chunk in chunks:
        if client.transport.readable:
            client.protocol.dataReceived(chunk)
        world.clock.advance(advance)
        check_books(world)
    return world, client


def test_skipped_frame_swallows_what_follows_it_then_parsing_resumes() -> None:
    put = encode_frame([b"Put", b"q", b"m"])
    oversized = struct.pack(">I", MAX_FRAME + 1)
    world, client = run_single([oversized, b"\x00" * MAX_FRAME, b"\x00" + put])
    assert client.transport is not None
    assert decode_frames(client.transport.value()) == (
        [[ERROR, b"REQUEST_MESSAGE_TOO_LARGE"], [OK]], b""
    )
    assert dict(world.broker.queue_sizes()) == {b"q": 1}


def test_frames_inside_a_skipped_frame_are_not_requests() -> None:
    inner = encode_frame([b"Put", b"q", b"smuggled"]) * 200
    payload = encode_payload([b"Put", b"q", inner])
    assert len(payload) > MAX_FRAME
    world, client = run_single([struct.pack(">I", len(payload)) + payload + encode_frame([b"Info"])])
    assert client.transport is not None
    replies, _ = decode_frames(client.transport.value())
    assert replies[0] == [ERROR, b"REQUEST_MESSAGE_TOO_LARGE"]
    assert json.loads(replies[1][1])["NumQueues"] == 0
    assert world.broker.num_messages == 0


def test_a_hostile_waiter_that_vanishes_unread_loses_no_message() -> None:
    world = World()
    hostile = Client(stream=b"", buffer_size=10**9)
    producer = Client(stream=b"", buffer_size=10**9, requests=[])
    assert world.connect(hostile) and world.connect(producer)
    assert hostile.protocol is not None and hostile.transport is not None
    assert producer.protocol is not None and producer.transport is not None
    with mock.patch.object(
        server_module, "peer_has_gone", lambda transport: bool(getattr(transport, "gone", False))
    ):
        hostile.protocol.dataReceived(
            encode_frame([b"Get", b"q", b"60000"]) + encode_frame([b"Info"]) * 6
        )
        assert not hostile.transport.readable
        hostile.transport.vanish()
        assert hostile.transport.gone and not hostile.transport.lost
        producer.protocol.dataReceived(encode_frame([b"Put", b"q", b"precious"]))
        assert producer.transport.value() == encode_frame([OK])
        assert hostile.transport.value() == b""
        world.clock.advance(0)
        check_books(world)
        assert world.broker.num_connections == 1
        assert dict(world.broker.queue_sizes()) == {b"q": 1}
        producer.transport.report_lost()
        assert fresh_client_works(world) == Counter({b"precious": 1})
