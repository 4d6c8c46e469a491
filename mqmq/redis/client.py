"""The client's interface (:class:`Redis`), scripts, the one-node client and ``redis://`` URLs."""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Optional, Protocol, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall


from mqmq.redis.connection import Command, Node, RedisUnavailable, Subscription, address_of, log
from mqmq.redis.resp import Arg, RedisError, bulk_strings, encode

__all__ = ["Redis", "RedisError", "RedisUnavailable", "Script", "SingleRedis", "check_url", "from_url", "single"]

#: Redis's port when a URL names none.
DEFAULT_PORT = 6379


class Script:
    """A Lua script: its source and SHA1 (computed with hashlib)."""

    __slots__ = ("source", "sha")

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()

    def __repr__(self) -> str:
        return f"<Script {self.sha[:12].decode()}>"


class Redis(Protocol):
    """What both clients (:func:`single`, :func:`cluster`) do."""

    #: Why Redis cannot be used now (e.g. "connection refused to Redis at
    #: 127.0.0.1:6379"); None when every node is connected.
    failure: Optional[str]
    #: Called with the new :attr:`failure` when it changes (None: healthy again).
    on_state: Optional[Callable[[Optional[str]], object]]

    def call(self, key: Optional[bytes], *args: Arg) -> Deferred[Any]:
        """Send one command to the node serving ``key``'s slot (any node when
        None) and fire with the reply: bytes for bulk and simple strings, int,
        list (nested), None for nil.  An error reply fails with
        :class:`RedisError`; transport trouble with :class:`RedisUnavailable`."""

    def eval(self, script: Script, keys: Sequence[bytes], args: Sequence[Arg]) -> Deferred[Any]:
        """EVALSHA on the node of ``keys[0]``; if the node does not have the
        script (NOSCRIPT), EVAL it once, transparently."""

    def subscribe(self, channel: bytes, on_message: Callable[[bytes, bytes], object],
                  on_subscribed: Callable[[bytes], object]) -> None:
        """Subscribe to a shard channel (SSUBSCRIBE) on the node owning its slot.

        ``on_message(channel, payload)`` for each message;
        ``on_subscribed(channel)`` each time Redis confirms the subscription:
        the first time and again after every reconnection or slot move, since
        what was published meanwhile is lost.  Subscribing again to a channel
        replaces its callbacks."""

    def unsubscribe(self, channel: bytes) -> None:
        """Stop delivering ``channel``'s messages."""

    def start(self) -> None:
        """Connect, and keep reconnecting (with backoff) until :meth:`stop`."""

    def stop(self) -> Deferred[None]:
        """Close every connection; pending commands fail with :class:`RedisUnavailable`."""

    def describe(self) -> str:
        """Where Redis is, as a URL: ``redis://127.0.0.1:6379/0``."""


def script_command(script: Script, keys: Sequence[bytes], args: Sequence[Arg],
                   kind: Callable[[bytes], Command] = Command) -> Command:
    """EVALSHA of ``script``, able to fall back to EVAL (see :meth:`Command.refused`)."""
    rest = bulk_strings((len(keys), *keys, *args))
    count = 3 + len(keys) + len(args)
    command = kind(b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%b\r\n%b" % (count, script.sha, rest))
    command.source = script.source
    command.rest = rest
    command.count = count
    return command


class SingleRedis:
    """A client of one Redis server (which may also be a one-node cluster).

    While the server cannot be reached, commands fail at once with
    :class:`RedisUnavailable`: nothing is queued for later.
    """

    def __init__(self, reactor: Any, host: str, port: int, db: int = 0, timeout: float = 2.0,
                 name: bytes = b"") -> None:
        self._reactor = reactor
        self._db = db
        self._scripts: dict[bytes, bytes] = {}
        self._node = Node(reactor, host, port, timeout, db, name, self._scripts,
                          self._changed, self._refused, self._dropped)
        self._retries: dict[bytes, IDelayedCall] = {}
        self._stopped = False
        self.failure: Optional[str] = self._node.failure
        self.on_state: Optional[Callable[[Optional[str]], object]] = None

    def describe(self) -> str:
        return f"redis://{self._node.address}/{self._db}"

    def call(self, key: Optional[bytes], *args: Arg) -> Deferred[Any]:
        command = Command(encode(args))
        self._node.send(command)
        return command.deferred

    def eval(self, script: Script, keys: Sequence[bytes], args: Sequence[Arg]) -> Deferred[Any]:
        if script.sha not in self._scripts:
            self._scripts[script.sha] = script.source
        command = script_command(script, keys, args)
        self._node.send(command)
        return command.deferred

    def subscribe(self, channel: bytes, on_message: Callable[[bytes, bytes], object],
                  on_subscribed: Callable[[bytes], object]) -> None:
        retry = self._retries.pop(channel, None)
        if retry is not None:
            retry.cancel()
        self._node.subscribe(Subscription(channel, on_message, on_subscribed))

    def unsubscribe(self, channel: bytes) -> None:
        retry = self._retries.pop(channel, None)
        if retry is not None:
            retry.cancel()
        self._node.unsubscribe(channel)

    def start(self) -> None:
        self._node.start()

    def stop(self) -> Deferred[None]:
        self._stopped = True
        for retry in self._retries.values():
            retry.cancel()
        self._retries.clear()
        stopping = self._node.stop()
        self.failure = self._node.failure
        return stopping

    def _changed(self, node: Node) -> None:
        if self._stopped or node.failure == self.failure:
            return
        self.failure = node.failure
        if self.on_state is not None:
            self.on_state(self.failure)

    def _refused(self, node: Node, subscription: Subscription, problem: RedisError) -> None:
        # Redis refused SSUBSCRIBE (older than 7.0, or still loading its data):
        # said once, tried again after a while.
        log.error("Redis at {address} refused SSUBSCRIBE {channel!r}: {problem}",
                  address=node.address, channel=subscription.channel, problem=str(problem))
        self._retries[subscription.channel] = self._reactor.callLater(
            node.timeout, self._subscribe_again, subscription)

    def _subscribe_again(self, subscription: Subscription) -> None:
        del self._retries[subscription.channel]
        self._node.subscribe(subscription)

    def _dropped(self, node: Node, subscription: Subscription) -> None:
        # Only a cluster moves a slot away; on one node, subscribe again.
        self._node.subscribe(subscription)


def single(reactor: Any, host: str, port: int, db: int = 0, timeout: float = 2.0,
           name: bytes = b"") -> SingleRedis:
    """A client of the Redis server at ``host:port``, using database ``db``.

    Each connection selects ``db`` and is named ``name`` (CLIENT SETNAME) if
    one is given; a command without a reply after ``timeout`` seconds fails.
    Call :meth:`~Redis.start` to connect.
    """
    return SingleRedis(reactor, host, port, db, timeout, name)


def from_url(reactor: Any, url: str, timeout: float = 2.0, name: bytes = b"") -> Redis:
    """The client a URL names: ``redis://HOST[:PORT][/DB]`` (one server) or
    ``redis+cluster://HOST[:PORT][,HOST[:PORT]...]`` (a cluster, found from
    those nodes); IPv6 addresses in brackets, ``[::1]:6379``.

    :raises ValueError: the URL is not one of these, with what is wrong.
    """
    scheme, seeds, db = parse_url(url)
    if scheme == "redis":
        host, port = seeds[0]
        return single(reactor, host, port, db, timeout, name)
    from mqmq.redis.cluster import cluster

    return cluster(reactor, seeds, timeout, name)


def check_url(url: str) -> None:
    """Nothing if :func:`from_url` accepts ``url``.

    :raises ValueError: it does not, with what is wrong.
    """
    parse_url(url)


def parse_url(url: str) -> tuple[str, list[tuple[str, int]], int]:
    """A Redis URL's scheme, addresses and database (see :func:`from_url`)."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        raise ValueError(f"{url!r} is not a Redis URL: want redis://HOST:PORT/DB "
                         "or redis+cluster://HOST:PORT[,HOST:PORT...]")
    if scheme not in ("redis", "redis+cluster"):
        raise ValueError(f"{url!r}: unknown scheme {scheme!r}: want redis:// or redis+cluster://")
    for character, what in (("@", "a user or password"), ("?", "options"), ("#", "a fragment")):
        if character in rest:
            raise ValueError(f"{url!r}: {what} is not supported here")
    hosts, slash, path = rest.partition("/")
    db = 0
    if scheme == "redis":
        if "," in hosts:
            raise ValueError(f"{url!r}: redis:// names one server; for a cluster's nodes use redis+cluster://")
        if path:
            if not path.isdigit() or not path.isascii():
                raise ValueError(f"{url!r}: the database {path!r} is not a number")
            db = int(path)
    elif path not in ("", "0"):
        raise ValueError(f"{url!r}: a Redis Cluster has only database 0")
    return scheme, [_host_port(url, part) for part in hosts.split(",")], db


def _host_port(url: str, text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, bracket, tail = text[1:].partition("]")
        if not bracket or not host:
            raise ValueError(f"{url!r}: {text!r} is not an address: want [IPv6]:PORT")
        if tail and not tail.startswith(":"):
            raise ValueError(f"{url!r}: {text!r}: want a colon and a port after the bracket")
        port_text = tail[1:] if tail else None
    else:
        host, colon, port_text_or_empty = text.partition(":")
        if ":" in port_text_or_empty:
            raise ValueError(f"{url!r}: {text!r}: put an IPv6 address in brackets, [::1]:6379")
        port_text = port_text_or_empty if colon else None
        if not host:
            raise ValueError(f"{url!r}: a host is missing" + (f" in {text!r}" if text else ""))
    if port_text is None:
        return host, DEFAULT_PORT
    if not (port_text.isdigit() and port_text.isascii() and 0 < int(port_text) < 65536):
        raise ValueError(f"{url!r}: the port {port_text!r} is not a number from 1 to 65535")
    return host, int(port_text)


def describe_addresses(addresses: Sequence[tuple[str, int]]) -> str:
    """``h:p,h:p`` for a cluster's URL."""
    return ",".join(address_of(host, port) for host, port in addresses)
