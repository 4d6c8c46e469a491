"""A Redis client for fake-clock tests: each command a blocking round trip to a real redis-server.

The Redis store's logic then runs against real Redis (its scripts, its
order) while the broker, the protocol and their timers run on a
``task.Clock``: every Deferred the store gets has already fired.
Subscriptions are only confirmed (a test's single server wakes itself).
"""

from __future__ import annotations

import hashlib
import socket
from typing import Any, Callable, Optional, Sequence

from twisted.internet import defer

from mqmq.redis import RedisError, RedisUnavailable, Script


def _encode(args: Sequence[Any]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode("utf-8")
        elif isinstance(arg, int):
            arg = b"%d" % arg
        elif isinstance(arg, float):
            arg = repr(arg).encode("ascii")
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class SyncRedis:
    """The store's ``Redis`` interface, answered at once over a blocking socket."""

    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self.failure: Optional[str] = None
        self.on_state: Optional[Callable[[Optional[str]], object]] = None
        self._socket: Optional[socket.socket] = None
        self._file: Any = None
        #: Set to make every command fail as if Redis were unreachable.
        self.down = False
        self.subscribed: set[bytes] = set()
        #: Commands sent, by name (tests count scripts).
        self.sent: list[bytes] = []

    def describe(self) -> str:
        return "redis://%s:%d/0" % self.address

    def start(self) -> None:
        self._socket = socket.create_connection(self.address)
        self._file = self._socket.makefile("rb")

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
        line = self._file.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b"-":
            return RedisError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = self._file.read(size + 2)
            return data[:-2]
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [self._read() for _ in range(size)]
        raise AssertionError(f"unexpected reply {line!r}")

    def command(self, *args: Any) -> Any:
        """One command, answered (an error reply raised)."""
        assert self._socket is not None, "not started"
        self.sent.append(str(args[0]).encode() if not isinstance(args[0], bytes) else args[0])
        self._socket.sendall(_encode(args))
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
        sha = hashlib.sha1(script.source).hexdigest()
        try:
            try:
                return defer.succeed(self.command(b"EVALSHA", sha, len(keys), *keys, *args))
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
