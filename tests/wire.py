"""Server protocols on fake transports: frames in, replies out, no sockets.

Shared by the tests of the protocol, its limits and its backpressure.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Optional, Sequence, Union, cast

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from mqmq.broker.broker import Broker
from mqmq.wire.codec import decode_frames, encode_frame
from mqmq.broker.limits import Limits
from mqmq.server.protocol import MQServerFactory, MQServerProtocol
from mqmq.stores.base import Store
from mqmq.stores.sqlite import SqliteStore

Frame = list[bytes]


def sqlite_store(path: Union[str, os.PathLike[str]], fsync: str = "always") -> Callable[[task.Clock], SqliteStore]:
    """Makes an SQLite store at ``path`` (real SQLite, no thread) whose writes
    run at once, when the clock that drives it advances."""

    def make(clock: task.Clock) -> SqliteStore:
        return SqliteStore(os.fspath(path), fsync, clock, run_writes=defer.maybeDeferred)

    return make


def redis_store(address: str, prefix: Optional[bytes] = None) -> Callable[[task.Clock], Store]:
    """Makes a Redis store on the real redis-server at ``address`` (HOST:PORT),
    under ``prefix`` (one of its own if None: servers with one prefix share
    their queues), whose every command is answered at once
    (``redis_sync.SyncRedis``)."""
    from mqmq.stores.redis import RedisStore
    from redis_sync import SyncRedis

    host, _, port = address.rpartition(":")

    def make(clock: task.Clock) -> Store:
        keys = prefix if prefix is not None else b"t%s:" % os.urandom(6).hex().encode("ascii")
        return RedisStore(f"redis://{address}/0", clock, keys, client=SyncRedis(host, int(port)))

    return make


def crashed(clock: task.Clock, broker: Broker) -> None:
    """As kill -9 of a server on the SQLite store once every reply was sent
    (so everything was written): its database closed, nothing stopped."""
    clock.advance(0)
    store = broker.store
    assert isinstance(store, SqliteStore) and store.pending is None
    for db in (store._db, store._reader):
        assert db is not None
        db.close()


def has_due_calls(clock: task.Clock) -> bool:
    """Whether calls are due now on ``clock`` (``advance(0)`` would run them)."""
    return any(call.getTime() <= clock.seconds() for call in clock.getDelayedCalls())


class Server:
    """One broker with the given limits and its factory, on a fake clock.

    ``store``, if given, makes the broker's store from the clock; the broker
    is then started (which opens the store).  ``write_before_reading``: a
    durable store's pending write runs (``clock.advance(0)``) before each
    read of replies, so that tests of other things see replies as at once.
    """

    def __init__(
        self,
        limits: Limits = Limits(),
        store: Optional[Callable[[task.Clock], Store]] = None,
        write_before_reading: bool = False,
        remote: bool = False,
    ) -> None:
        self.clock = task.Clock()
        # A remote store (Redis): on a clock of its own, its takes answered
        # later, run (with the broker's due calls) before each read.
        self._takes_later = remote
        if remote:
            self.store_clock = task.Clock()
            write_before_reading = True
        #: The clock that runs the store's writes: the broker's, but for
        #: MQMQ_TEST_STORE=sqlite and remote stores.
        if not remote:
            self.store_clock = self.clock
        if store is None and os.environ.get("MQMQ_TEST_STORE") == "sqlite":
            # Every fake-transport test on the SQLite store (in a fresh file),
            # its writes on a clock of their own: run before each read of
            # replies, they leave the broker's timers alone (tests count them).
            directory = tempfile.mkdtemp(prefix="mqmq-wire-", dir=os.environ.get("MQMQ_TEST_STORE_DIR"))
            store = sqlite_store(os.path.join(directory, "queues.db"))
            self.store_clock = task.Clock()
            write_before_reading = True
        elif store is None and os.environ.get("MQMQ_TEST_STORE") == "redis":
            # Real Redis, answered at once: its batches and takes run before
            # each read of replies, on a clock of their own.
            store = redis_store(os.environ["MQMQ_TEST_REDIS"])
            self.store_clock = task.Clock()
            write_before_reading = True
            self._takes_later = True
        self.broker = Broker(self.clock, limits, None if store is None else store(self.store_clock))
        # A durable store holds replies until its write, which the clock runs.
        self._write_before_reading = store is not None and write_before_reading
        if store is not None:
            self.broker.startService()
        self.factory = MQServerFactory(self.broker)
        self._port = 40000

    def settle(self) -> None:
        """Run what is due now on the broker's clock and the store's, until
        nothing is: every turn the reactor would take at once."""
        clocks = [self.clock] if self.store_clock is self.clock else [self.clock, self.store_clock]
        while True:
            due = [clock for clock in clocks if has_due_calls(clock)]
            if not due:
                return
            for clock in due:
                clock.advance(0)

    def build(self) -> Optional[MQServerProtocol]:
        """A protocol for a new connection, or None if the factory refuses it."""
        self._port += 1
        return self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", self._port))

    def connect(self, transport: Optional[StringTransport] = None) -> Connection:
        """A new connection, made on ``transport`` (a fresh StringTransport by default)."""
        protocol = self.build()
        assert protocol is not None
        if transport is None:
            transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", self._port))
        protocol.makeConnection(transport)
        return Connection(protocol, transport, self.store_clock if self._write_before_reading else None,
                          own_writes_clock=self.store_clock is not self.clock,
                          server_clock=self.clock if self._takes_later else None)

    def queue_contents(self) -> dict[bytes, list[bytes]]:
        """Every queue and its messages, read (and put back) through the broker
        (read from Redis, for the Redis store)."""
        contents: dict[bytes, list[bytes]] = {}
        if self._takes_later:
            self.settle()
            client = cast(Any, self.broker.store).client
            for name, _ in list(self.broker.queue_sizes()):
                queue = cast(Any, self.broker._queues[name].messages)
                ids = client.command(b"LRANGE", queue.keys[0], 0, -1)
                contents[name] = [client.command(b"HGET", queue.keys[1], i) for i in ids]
            return contents
        for name, _ in list(self.broker.queue_sizes()):
            messages: list[bytes] = []
            while (message := self.broker.take(name)) is not None:
                messages.append(message)
            for message in messages:
                self.broker.put(name, message)
            contents[name] = messages
        return contents


class Connection:
    """A server protocol with helpers to send frames and read its replies."""

    def __init__(
        self, protocol: MQServerProtocol, transport: StringTransport, clock: Optional[task.Clock] = None,
        own_writes_clock: bool = False, server_clock: Optional[task.Clock] = None,
    ) -> None:
        self.protocol = protocol
        # With a store whose takes answer later (Redis): the broker's clock
        # too, whose due calls (the requests behind an answered Get) run
        # with the store's until nothing is due.
        self._server_clock = server_clock
        self.transport = transport
        self._read = 0
        # With a durable store: the clock that runs its writes, before replies
        # are read; a clock for the writes alone is run until nothing is due.
        self._writes_clock = clock
        self._own_writes_clock = own_writes_clock

    def send(self, *frames: Sequence[bytes]) -> None:
        """Send frames in a single segment."""
        self.protocol.dataReceived(b"".join(encode_frame(f) for f in frames))

    def send_raw(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def raw(self) -> bytes:
        """Everything written since the last ``raw``/``replies`` call."""
        clock = self._writes_clock
        if clock is not None:
            clock.advance(0)
            if self._own_writes_clock:
                # A write's replies may let held requests go on to changes of
                # their own: written too, until nothing is due.
                server_clock = self._server_clock
                while has_due_calls(clock) or server_clock is not None and has_due_calls(server_clock):
                    clock.advance(0)
                    if server_clock is not None:
                        server_clock.advance(0)
        data = self.transport.value()[self._read :]
        self._read += len(data)
        return data

    def replies(self) -> list[Frame]:
        """Whole frames written since the last call; there must be no partial frame."""
        frames, rest = decode_frames(self.raw())
        assert rest == b""
        return frames

    def close(self) -> None:
        """The connection goes away, as the reactor reports it."""
        self.transport.loseConnection()
        self.protocol.connectionLost()

    def lose(self) -> None:
        """The reactor reports the connection closed (the transport may not know)."""
        self.protocol.connectionLost()

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    @property
    def reading(self) -> bool:
        """Whether the protocol lets its transport read."""
        return bool(self.transport.producerState == "producing")
