"""A Redis client for fake-clock tests: each command a blocking round trip to a real redis-server.

The Redis store's logic then runs against real Redis (its scripts, its
order) while the broker, the protocol and their timers run on a
``task.Clock``: every Deferred the store gets has already fired.
Subscriptions are only confirmed (a test's single server wakes itself).
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Optional, Sequence

from twisted.internet import defer

from mqmq.redis import RedisError, RedisUnavailable, Script
from mqmq.redis.resp import Parser, encode


class SyncRedis:
    """The store's ``Redis`` interface, answered at once over a blocking socket."""

    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self.failure: Optional[str] = None
        self.on_state: Optional[Callable[[Optional[str]], object]] = None
        self._socket: Optional[socket.socket] = None
        #: Set to make every command fail as if Redis were unreachable.
        self.down = False
        self.subscribed: set[bytes] = set()
        #: Commands sent, by name (tests count scripts).
        self.sent: list[bytes] = []

    def describe(self) -> str:
        return "redis://%s:%d/0" % self.address

    def start(self) -> None:
        self._socket = socket.create_connection(self.address)
        self._parser = Parser()
        self._replies: list[Any] = []

    def stop(self) -> defer.Deferred[None]:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        return defer.succeed(None)

    def set_down(self, down: bool) -> None:
        """Redis (un)reachable, as the store hears it."""
        self.down = down
        self.failure = "Redis is down (test)" if down else None
        if self.on_state is not None:
            self.on_state(self.failure)

    def _read(self) -> Any:
        """One reply (an error reply as a RedisError value), read as the client reads."""
        while not self._replies:
            data = self._socket.recv(65536) if self._socket is not None else b""
            if not data:
                raise RedisUnavailable("Redis closed the connection (test)")
            self._replies.extend(self._parser.feed(data))
        return self._replies.pop(0)

    def command(self, *args: Any) -> Any:
        """One command, answered (an error reply raised)."""
        assert self._socket is not None, "not started"
        self.sent.append(str(args[0]).encode() if not isinstance(args[0], bytes) else args[0])
        self._socket.sendall(encode(args))
        reply = self._read()
        if isinstance(reply, RedisError):
            raise reply
        return reply

    def call(self, key: Optional[bytes], *args: Any) -> defer.Deferred[Any]:
        if self.down:
            return defer.fail(RedisUnavailable("Redis is down (test)"))
        try:
            return defer.succeed(self.command(*args))
        except RedisError:
            return defer.fail()

    def eval(self, script: Script, keys: Sequence[bytes], args: Sequence[Any]) -> defer.Deferred[Any]:
        if self.down:
            return defer.fail(RedisUnavailable("Redis is down (test)"))
        try:
            try:
                return defer.succeed(self.command(b"EVALSHA", script.sha, len(keys), *keys, *args))
            except RedisError as error:
                if not str(error).startswith("NOSCRIPT"):
                    raise
            return defer.succeed(self.command(b"EVAL", script.source, len(keys), *keys, *args))
        except RedisError:
            return defer.fail()

    def subscribe(self, channel: bytes, on_message: Callable[[bytes, bytes], object],
                  on_subscribed: Callable[[bytes], object]) -> None:
        self.subscribed.add(channel)
        on_subscribed(channel)

    def unsubscribe(self, channel: bytes) -> None:
        self.subscribed.discard(channel)
