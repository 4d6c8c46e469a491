"""The Redis Cluster client: key slots, the slot map, redirections and retries
(modelled on redis-py's ``redis/asyncio/cluster.py``)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure

from mqmq.redis.client import Script, describe_addresses, script_command
from mqmq.redis.connection import (
    Command,
    Node,
    RedisProtocol,
    RedisUnavailable,
    Subscription,
    address_of,
    connect_failure,
    log,
)
from mqmq.redis.resp import Arg, RedisError, encode

#: How many slots a Redis Cluster has.
SLOTS = 16384

#: Most MOVED or ASK redirections one command follows.
MAX_REDIRECTS = 5

#: First wait before a command is sent again (it doubles, up to RETRY_MOST).
RETRY_FIRST = 0.01
RETRY_MOST = 0.25

#: Shortest time between two readings of the slot map; how often it is read
#: again while some node is down or some subscription has no node.
REFRESH_LEAST = 0.1
REFRESH_UNHEALTHY = 0.5


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), as Redis Cluster computes it."""
    crc = 0
    table = _CRC16
    for byte in data:
        crc = ((crc << 8) & 0xFF00) ^ table[(crc >> 8) ^ byte]
    return crc


def key_slot(key: bytes) -> int:
    """The slot of ``key``: of its hash tag (the first ``{...}`` with
    something inside), else of the whole key."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc16(key) & (SLOTS - 1)


def _asking() -> Command:
    asking = Command(b"*1\r\n$6\r\nASKING\r\n")
    asking.deferred.addErrback(lambda _: None)  # the command after it reports
    return asking


class _Request(Command):
    """A command of the cluster client: it follows redirections."""

    __slots__ = ("cluster", "slot", "give_up_at", "redirects", "tries", "ask", "asked")

    def __init__(self, payload: bytes) -> None:
        super().__init__(payload)
        self.cluster: Optional[ClusterRedis] = None
        self.slot: Optional[int] = None
        self.give_up_at = 0.0
        self.redirects = 0
        self.tries = 0
        #: The node an ASK sent it to, for the next try only.
        self.ask: Optional[Node] = None
        #: Whether it was last sent after ASKING.
        self.asked = False

    def refused(self, reply: RedisError, connection: RedisProtocol) -> None:
        message = str(reply)
        if message.startswith(("MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN")):
            assert self.cluster is not None
            self.cluster._redirected(self, message)
            return
        if self.asked and self.source is not None and message.startswith("NOSCRIPT"):
            connection.send(_asking())  # EVAL follows it, on the same node
        super().refused(reply, connection)


class _OneQuestion(ClientFactory):
    """A connection made to ask one command, closed once answered."""

    noisy = False

    def __init__(self, reactor: Any, host: str, port: int, timeout: float, args: Sequence[Arg]) -> None:
        self.address = address_of(host, port)
        self.timeout = timeout
        self.reactor = reactor
        self.args = args
        self.answer: Deferred[Any] = Deferred()

    def buildProtocol(self, addr: Any) -> RedisProtocol:
        protocol = RedisProtocol(self.reactor, self.timeout, self.address)
        protocol.on_made = self._ask
        return protocol

    def _ask(self, protocol: RedisProtocol) -> None:
        command = Command(encode(self.args))
        protocol.send(command)
        command.deferred.addBoth(self._answered, protocol)

    def _answered(self, result: Any, protocol: RedisProtocol) -> None:
        if protocol.transport is not None:
            protocol.transport.loseConnection()
        if not self.answer.called:
            self.answer.callback(result)  # a Failure fails it

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.answer.called:
            self.answer.errback(RedisUnavailable(connect_failure(self.address, reason, self.timeout)))


def _from(reply: Any, host: str) -> tuple[str, Any]:
    return host, reply


class ClusterRedis:
    """A client of a Redis Cluster: each command goes to the master serving
    its key's slot, over one connection per master (and one more for the
    subscriptions on it).

    During a slot move or a failover a command is sent again (MOVED, ASK,
    TRYAGAIN, CLUSTERDOWN, or a master not reachable when it was to be
    written) for at most ``timeout`` seconds in all; a command whose
    connection was lost after it was written is not, since it may have run.
    """

    def __init__(self, reactor: Any, seeds: Sequence[tuple[str, int]], timeout: float = 2.0,
                 name: bytes = b"") -> None:
        if not seeds:
            raise ValueError("a Redis Cluster client needs at least one node's address")
        self._reactor = reactor
        self._seeds = list(seeds)
        self._timeout = timeout
        self._name = name
        self._scripts: dict[bytes, bytes] = {}
        self._nodes: dict[str, Node] = {}
        self._slots: list[Optional[Node]] = [None] * SLOTS
        self._known = False
        self._masters: list[Node] = []
        self._uncovered = 0
        self._map_failure = f"the Redis Cluster's slot map is not known yet ({describe_addresses(self._seeds)})"
        self._slot_cache: dict[bytes, int] = {}
        self._subscriptions: dict[bytes, Subscription] = {}
        self._waiting: dict[_Request, IDelayedCall] = {}
        self._retiring: dict[Node, IDelayedCall] = {}
        self._replacing: dict[bytes, IDelayedCall] = {}
        self._refresh_timer: Optional[IDelayedCall] = None
        self._refreshing = False
        self._refresh_wanted = False
        self._last_refresh = -REFRESH_LEAST
        self._running = False
        self._stopped = False
        self.failure: Optional[str] = self._map_failure
        self.on_state: Optional[Callable[[Optional[str]], object]] = None

    def describe(self) -> str:
        return "redis+cluster://" + describe_addresses(self._seeds)

    # Commands.

    def _slot(self, key: bytes) -> int:
        slot = self._slot_cache.get(key)
        if slot is None:
            if len(self._slot_cache) > 10000:
                self._slot_cache.clear()
            slot = self._slot_cache[key] = key_slot(key)
        return slot

    def call(self, key: Optional[bytes], *args: Arg) -> Deferred[Any]:
        request = _Request(encode(args))
        return self._start(request, key)

    def eval(self, script: Script, keys: Sequence[bytes], args: Sequence[Arg]) -> Deferred[Any]:
        if script.sha not in self._scripts:
            self._scripts[script.sha] = script.source
        request = script_command(script, keys, args, _Request)
        assert isinstance(request, _Request)
        return self._start(request, keys[0] if keys else None)

    def _start(self, request: _Request, key: Optional[bytes]) -> Deferred[Any]:
        request.cluster = self
        if key is not None:
            request.slot = self._slot(key)
        request.give_up_at = self._reactor.seconds() + self._timeout
        self._send(request)
        return request.deferred

    def _send(self, request: _Request) -> None:
        if self._stopped:
            request.lost(RedisUnavailable("the Redis Cluster client is stopped"))
            return
        ask, request.ask = request.ask, None
        if ask is not None:
            node: Optional[Node] = ask
        elif request.slot is not None:
            node = self._slots[request.slot]
        else:
            node = self._any_node()
        protocol = node.protocol if node is not None else None
        if protocol is None:
            request.ask = ask
            if node is not None:
                why = node.failure or "not connected"
            elif request.slot is not None and self._known:
                why = f"no node of the Redis Cluster serves slot {request.slot}"
            else:
                why = self._map_failure if not self._known else "no node of the Redis Cluster is connected"
            self._retry_later(request, why)
            return
        request.asked = ask is not None
        if ask is not None:
            protocol.send(_asking())
        protocol.send(request)

    def _any_node(self) -> Optional[Node]:
        for node in self._masters:
            if node.protocol is not None:
                return node
        return None

    def _retry_later(self, request: _Request, why: str) -> None:
        now = self._reactor.seconds()
        if now >= request.give_up_at:
            request.lost(RedisUnavailable(f"{why} (for {self._timeout:g} s)"))
            return
        self._refresh_soon()
        delay = min(RETRY_FIRST * 2 ** request.tries, RETRY_MOST, request.give_up_at - now)
        request.tries += 1
        self._waiting[request] = self._reactor.callLater(delay, self._resend, request)

    def _resend(self, request: _Request) -> None:
        del self._waiting[request]
        self._send(request)

    def _redirected(self, request: _Request, message: str) -> None:
        kind, _, rest = message.partition(" ")
        if kind in ("MOVED", "ASK"):
            request.redirects += 1
            if request.redirects > MAX_REDIRECTS:
                request.lost(RedisUnavailable(f"more than {MAX_REDIRECTS} redirections; the last: {message}"))
                return
            slot, node = self._target(rest)
            if node is None:
                request.deferred.errback(RedisError(message))
                return
            if kind == "MOVED":
                # That slot now; the rest of the map may have changed too.
                self._slots[slot] = node
                self._refresh_soon()
            else:
                request.ask = node
            self._send(request)
            return
        # TRYAGAIN (a multi-key command during a slot move) or CLUSTERDOWN.
        self._retry_later(request, f"Redis Cluster: {message}")

    def _target(self, text: str) -> tuple[int, Optional[Node]]:
        """The slot and node of a MOVED's or ASK's ``SLOT HOST:PORT``."""
        slot_text, _, address = text.partition(" ")
        host, colon, port_text = address.rpartition(":")
        if not colon or not slot_text.isdigit() or not port_text.isdigit():
            return 0, None
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return int(slot_text), self._node_for(host or self._seeds[0][0], int(port_text))

    # Nodes and the slot map.

    def _node_for(self, host: str, port: int) -> Node:
        address = address_of(host, port)
        node = self._nodes.get(address)
        if node is None:
            node = Node(self._reactor, host, port, self._timeout, 0, self._name, self._scripts,
                        self._node_changed, self._subscription_refused, self._subscription_dropped)
            self._nodes[address] = node
            if self._running:
                node.start()
        retiring = self._retiring.pop(node, None)
        if retiring is not None:
            retiring.cancel()
        return node

    def _node_changed(self, node: Node) -> None:
        if self._stopped:
            return
        if node.failure is not None:
            self._refresh_soon()
        self._update_failure()

    def _update_failure(self) -> None:
        if not self._known:
            failure: Optional[str] = self._map_failure
        elif self._uncovered:
            failure = f"{self._uncovered} slots of the Redis Cluster are served by no node"
        else:
            failure = next((node.failure for node in self._masters if node.failure is not None), None)
        if failure != self.failure:
            self.failure = failure
            if self.on_state is not None:
                self.on_state(failure)

    def _refresh_soon(self) -> None:
        """Read the slot map again, soon (at most once per REFRESH_LEAST)."""
        if self._refreshing:
            self._refresh_wanted = True
            return
        if not self._running:
            return
        now = self._reactor.seconds()
        delay = max(0.0, self._last_refresh + REFRESH_LEAST - now)
        if self._refresh_timer is None:
            self._refresh_timer = self._reactor.callLater(delay, self._refresh)
        elif self._refresh_timer.getTime() > now + delay:
            self._refresh_timer.reset(delay)  # a slower, routine reading was due

    def _refresh(self) -> None:
        self._refresh_timer = None
        self._refreshing = True
        self._refresh_wanted = False
        self._last_refresh = self._reactor.seconds()
        reading = self._read_map()
        reading.addCallback(self._apply)
        reading.addErrback(self._map_unread)
        reading.addBoth(self._refreshed)

    def _read_map(self) -> Deferred[tuple[str, Any]]:
        """``CLUSTER SLOTS`` from a connected master, else from any node
        known or given (each on a connection of its own): the host asked, and
        the reply."""
        result: Deferred[tuple[str, Any]] = Deferred()
        connected = [node for node in self._masters if node.protocol is not None]

        def ask_next(problem: Optional[Failure] = None) -> None:
            if connected:
                node = connected.pop(0)
                command = Command(encode((b"CLUSTER", b"SLOTS")))
                if node.protocol is None:
                    ask_next()
                    return
                node.protocol.send(command)
                command.deferred.addCallbacks(lambda reply: result.callback((node.host, reply)), ask_next)
                return
            ask_everyone()

        def ask_everyone() -> None:
            addresses = dict.fromkeys([(node.host, node.port) for node in self._nodes.values()] + self._seeds)
            questions = []
            for host, port in addresses:
                question = _OneQuestion(self._reactor, host, port, self._timeout, (b"CLUSTER", b"SLOTS"))
                self._reactor.connectTCP(host, port, question, timeout=self._timeout)
                questions.append(question.answer.addCallback(_from, host))
            problems: list[str] = []

            def answered(value: tuple[str, Any]) -> None:
                if not result.called:
                    result.callback(value)

            def failed(reason: Failure) -> None:
                problems.append(reason.getErrorMessage())
                if len(problems) == len(questions) and not result.called:
                    result.errback(RedisUnavailable("no node of the Redis Cluster answered: " + "; ".join(problems)))

            for question_answer in questions:
                question_answer.addCallbacks(answered, failed)

        ask_next()
        return result

    def _apply(self, answer: tuple[str, Any]) -> None:
        if self._stopped:
            return
        asked_host, reply = answer
        slots: list[Optional[Node]] = [None] * SLOTS
        masters: dict[Node, None] = {}
        for entry in reply:
            start, end, master = entry[0], entry[1], entry[2]
            host = master[0].decode() if master[0] not in (b"", b"?") else asked_host
            node = self._node_for(host, int(master[1]))
            masters[node] = None
            slots[start : end + 1] = [node] * (end + 1 - start)
        self._slots = slots
        self._masters = sorted(masters, key=lambda node: node.address)
        self._uncovered = slots.count(None)
        if not self._known:
            log.info("Redis Cluster: {count} masters serve its slots", count=len(masters))
        self._known = True
        for node in list(self._nodes.values()):
            if node not in masters and node not in self._retiring:
                self._retire(node)
        for subscription in list(self._subscriptions.values()):
            self._place(subscription)
        self._update_failure()

    def _map_unread(self, reason: Failure) -> None:
        why = f"cannot read the Redis Cluster's slot map: {reason.getErrorMessage()}"
        if why != self._map_failure and not self._known:
            log.warn("{why}", why=why)
        self._map_failure = why
        self._update_failure()

    def _refreshed(self, _: object) -> None:
        self._refreshing = False
        if self._stopped:
            return
        if self._refresh_wanted:
            self._refresh_soon()
        elif self.failure is not None or any(s.node is None for s in self._subscriptions.values()):
            # Nothing may ask again: look again in a while.
            self._refresh_timer = self._reactor.callLater(REFRESH_UNHEALTHY, self._refresh)

    def _retire(self, node: Node) -> None:
        # Not a master any more: its replies still in flight are awaited,
        # then it is closed (a command is never failed just for this).
        def close() -> None:
            del self._retiring[node]
            if self._nodes.get(node.address) is node:
                del self._nodes[node.address]
            node.stop()

        self._retiring[node] = self._reactor.callLater(self._timeout, close)

    # Subscriptions.

    def subscribe(self, channel: bytes, on_message: Callable[[bytes, bytes], object],
                  on_subscribed: Callable[[bytes], object]) -> None:
        subscription = self._subscriptions.get(channel)
        if subscription is not None:
            subscription.on_message = on_message
            subscription.on_subscribed = on_subscribed
            return
        subscription = self._subscriptions[channel] = Subscription(channel, on_message, on_subscribed)
        self._place(subscription)

    def unsubscribe(self, channel: bytes) -> None:
        subscription = self._subscriptions.pop(channel, None)
        replacing = self._replacing.pop(channel, None)
        if replacing is not None:
            replacing.cancel()
        if subscription is not None and subscription.node is not None:
            subscription.node.unsubscribe(channel)

    def _place(self, subscription: Subscription) -> None:
        """Subscribe on the node owning the channel's slot, leaving any other."""
        if not self._known or self._stopped:
            return
        owner = self._slots[self._slot(subscription.channel)]
        if owner is subscription.node or owner is None:
            return
        if subscription.node is not None:
            subscription.node.unsubscribe(subscription.channel)
        owner.subscribe(subscription)

    def _subscription_refused(self, node: Node, subscription: Subscription, problem: RedisError) -> None:
        message = str(problem)
        if message.startswith("MOVED "):
            slot, owner = self._target(message.partition(" ")[2])
            if owner is not None:
                self._slots[slot] = owner
        else:
            log.warn("Redis at {address} refused SSUBSCRIBE {channel!r}: {problem}",
                     address=node.address, channel=subscription.channel, problem=message)
        self._refresh_soon()
        self._place_later(subscription)

    def _subscription_dropped(self, node: Node, subscription: Subscription) -> None:
        # The slot moved away: the map, read again, says where to (and is
        # read again while any subscription has no node).
        self._refresh_soon()

    def _place_later(self, subscription: Subscription) -> None:
        channel = subscription.channel
        if channel in self._replacing or self._subscriptions.get(channel) is not subscription:
            return

        def place() -> None:
            del self._replacing[channel]
            if self._subscriptions.get(channel) is subscription:
                self._place(subscription)

        self._replacing[channel] = self._reactor.callLater(REFRESH_LEAST, place)

    # Starting and stopping.

    def start(self) -> None:
        self._running = True
        for node in list(self._nodes.values()):
            node.start()
        self._refresh_soon()

    def stop(self) -> Deferred[None]:
        self._stopped = True
        self._running = False
        self.failure = "the Redis Cluster client is stopped"
        timers = [*self._waiting.values(), *self._retiring.values(), *self._replacing.values()]
        if self._refresh_timer is not None:
            timers.append(self._refresh_timer)
        for timer in timers:
            timer.cancel()
        waiting, self._waiting = self._waiting, {}
        self._retiring.clear()
        self._replacing.clear()
        self._refresh_timer = None
        for request in waiting:
            request.lost(RedisUnavailable(self.failure))
        stopping = [node.stop() for node in self._nodes.values()]
        return DeferredList(stopping).addCallback(lambda _: None)


def cluster(reactor: Any, seeds: Sequence[tuple[str, int]], timeout: float = 2.0,
            name: bytes = b"") -> ClusterRedis:
    """A client of the Redis Cluster that the nodes at ``seeds`` (any of
    them) belong to; see :class:`ClusterRedis`.  Call :meth:`~ClusterRedis.start`
    to connect."""
    return ClusterRedis(reactor, seeds, timeout, name)
