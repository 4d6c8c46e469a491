"""The broker's acknowledged delivery against a model: any sequence of Puts,
Gets, Reserves, Acks, Releases, Buries, Kicks, leases running out and
connections closing keeps every message in exactly one place, in order; on
the SQLite store, across restarts too."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from unittest import mock

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet import task

from mqmq.broker.broker import Broker
from mqmq.broker.limits import Limits
from mqmq.errors import RequestError
from mqmq.stores.base import Entry
from mqmq.stores import sqlite
from wire import crashed, sqlite_store

LEASE = 10.0
MAX_DELIVERIES = 3
QUEUE = b"q"


@dataclass
class Model:
    ready: list[bytes] = field(default_factory=list)
    # Each owner's reservations, oldest first: message -> id.
    reserved: dict[str, dict[bytes, int]] = field(default_factory=lambda: {"a": {}, "b": {}})
    buried: list[bytes] = field(default_factory=list)
    deliveries: dict[bytes, int] = field(default_factory=dict)
    done: list[bytes] = field(default_factory=list)  # acked, or taken by a Get
    # Reservations in the order their leases end.
    leases: list[tuple[str, bytes]] = field(default_factory=list)
    # Where each message is in its queue's order on disk (a durable store's):
    # new and kicked ones after the last, returning ones before the first.
    pos: dict[bytes, int] = field(default_factory=dict)
    back: int = 0
    front: int = 0

    def to_back(self, message: bytes) -> None:
        self.back += 1
        self.pos[message] = self.back
        self.ready.append(message)

    def to_front(self, message: bytes) -> None:
        self.front -= 1
        self.pos[message] = self.front
        self.ready.insert(0, message)

    def restart(self) -> None:
        # Reserved messages are ready again, where they were taken from.
        for owner in self.reserved.values():
            self.ready += list(owner)
            owner.clear()
        self.leases.clear()
        self.ready.sort(key=self.pos.__getitem__)

    def come_back(self, message: bytes) -> None:
        # Back to the front, or buried if handed out as often as allowed.
        if self.deliveries[message] >= MAX_DELIVERIES:
            self.buried.append(message)
        else:
            self.to_front(message)

    def hand_out(self) -> Optional[bytes]:
        while self.ready and self.deliveries[self.ready[0]] >= MAX_DELIVERIES:
            self.buried.append(self.ready.pop(0))
        if not self.ready:
            return None
        message = self.ready.pop(0)
        self.deliveries[message] += 1
        return message

    def end(self, owner: str, message: bytes) -> None:
        del self.reserved[owner][message]
        self.leases.remove((owner, message))


ACTIONS = ["put", "put", "get", "reserve", "reserve", "ack", "release", "bury", "kick", "expire", "close"]


def steps(actions: list[str]) -> st.SearchStrategy[list[tuple[str, str, int]]]:
    return st.lists(st.tuples(st.sampled_from(actions), st.sampled_from(["a", "b"]), st.integers(0, 5)),
                    max_size=80)


@settings(max_examples=200, deadline=None)
@given(steps=steps(ACTIONS))
# A closed connection's reservations, the later one handed out as often as allowed.
@example(steps=[("put", "a", 0), ("reserve", "b", 0), ("release", "b", 0), ("reserve", "b", 0),
                ("put", "a", 0), ("reserve", "a", 0), ("release", "b", 0), ("reserve", "a", 0),
                ("close", "a", 0)])
def test_every_message_is_in_exactly_one_place_in_order(steps: list[tuple[str, str, int]]) -> None:
    check(steps, None)


@settings(max_examples=100, deadline=None)
@given(steps=steps(ACTIONS + ["restart"]))
# Reserved, released, reserved again and buried, kicked, all in one write.
# Released into an empty window, then a kicked message read from the disk
# (the read must not take the messages still reserved).
@example(steps=[("put", "a", 0)] * 3 + [("reserve", "a", 0)] * 3 + [
    ("bury", "a", 2), ("release", "a", 1), ("kick", "a", 1),
    ("reserve", "b", 0), ("reserve", "b", 0), ("reserve", "b", 0)])
@example(steps=[("put", "a", 0), ("reserve", "a", 0), ("release", "a", 0), ("reserve", "a", 0),
                ("bury", "a", 0), ("kick", "a", 0), ("reserve", "a", 0), ("restart", "a", 0),
                ("reserve", "b", 0)])
def test_on_the_sqlite_store_every_message_is_in_exactly_one_place_across_restarts(
    steps: list[tuple[str, str, int]],
) -> None:
    # A window of 4 messages: most are read back from the disk.
    with tempfile.TemporaryDirectory() as directory, \
            mock.patch.multiple(sqlite, WINDOW_MESSAGES=4, WINDOW_BYTES=64, WINDOW_REFILL_BELOW=2):
        check(steps, Path(directory) / "q.db")


def started(clock: task.Clock, database: Optional[Path]) -> Broker:
    store = None if database is None else sqlite_store(database)(clock)
    broker = Broker(clock, Limits(max_deliveries=MAX_DELIVERIES), store)
    broker.startService()
    return broker


def check(steps: list[tuple[str, str, int]], database: Optional[Path]) -> None:
    clock = task.Clock()
    broker = started(clock, database)
    owners = {"a": object(), "b": object()}
    model = Model()
    put = 0
    for action, owner, number in steps:
        held = list(model.reserved[owner])
        if action == "put":
            put += 1
            message = b"m%d" % put
            broker.put(QUEUE, message)
            model.to_back(message)
            model.deliveries[message] = 0
        elif action == "get":
            expected = model.hand_out()
            assert broker.take(QUEUE) == expected
            if expected is not None:
                model.done.append(expected)
        elif action == "reserve":
            expected = model.hand_out()
            entry = broker.reserve_now(QUEUE, LEASE, owners[owner])
            if expected is None:
                assert entry is None
            else:
                assert isinstance(entry, Entry)
                assert (entry.message, entry.deliveries) == (expected, model.deliveries[expected])
                model.reserved[owner][expected] = entry.message_id
                model.leases.append((owner, expected))
        elif action in ("ack", "release", "bury") and held:
            message = held[number % len(held)]
            message_id = model.reserved[owner][message]
            getattr(broker, action)(QUEUE, message_id, owners[owner])
            model.end(owner, message)
            if action == "ack":
                model.done.append(message)
            elif action == "release":
                model.come_back(message)
            else:
                model.buried.append(message)
            # Not the other owner's to touch.
            other = "b" if owner == "a" else "a"
            try:
                broker.ack(QUEUE, message_id, owners[other])
            except RequestError:
                pass
            else:
                raise AssertionError("acked another connection's reservation")
        elif action == "kick":
            kicked = model.buried[:max(number, 1)]
            del model.buried[:len(kicked)]
            for message in kicked:
                model.deliveries[message] = 0
                model.to_back(message)
            assert broker.kick(QUEUE, max(number, 1)) == len(kicked)
            clock.advance(0)  # (a kicked message's body is read from the disk)
        elif action == "expire":
            clock.advance(LEASE)
            for lease_owner, message in list(model.leases):
                model.end(lease_owner, message)
                model.come_back(message)
        elif action == "close":
            broker.release_all(owners[owner])
            returning = list(model.reserved[owner])
            for message in returning:
                model.end(owner, message)
            # Oldest first at the front: the oldest ends up first.
            for message in reversed(returning):
                model.come_back(message)
            # (Buried ones among them keep their order of return.)
        elif action == "restart":
            crashed(clock, broker)
            clock = task.Clock()
            broker = started(clock, database)
            model.restart()
        assert broker.num_messages == len(model.ready)
        assert broker.num_reserved == sum(map(len, model.reserved.values()))
        assert broker.num_buried == len(model.buried)
    # What is ready comes out in the model's order; nothing is anywhere else.
    for owner in owners.values():
        broker.release_all(owner)
    for owner_name in ("a", "b"):
        returning = list(model.reserved[owner_name])
        for message in returning:
            model.end(owner_name, message)
        for message in reversed(returning):
            model.come_back(message)
    clock.advance(0)
    drained = []
    while (message := broker.take(QUEUE)) is not None:
        drained.append(message)
        clock.advance(0)
    expected = []
    while (message := model.hand_out()) is not None:
        expected.append(message)
    assert drained == expected
    assert sorted(drained + model.done + model.buried) == sorted(model.deliveries)
    assert broker.num_messages == broker.num_reserved == 0 and broker.num_buried == len(model.buried)
    if database is not None:
        crashed(clock, broker)
