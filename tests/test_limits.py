"""The server's limits on the wire: ``StringTransport``, ``task.Clock`` and ``Limits``.

Every refusal is a clear error frame (or, where the protocol says so, a
close) and a log line; nothing is stored by a refused request, and other
connections and stored messages are untouched.
"""

from __future__ import annotations

import struct
from typing import Any, Sequence

import pytest
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python import usage

from mqmq.server import tap
from mqmq.wire.codec import MAX_FRAME_LENGTH, encode_frame, max_frame_length
from mqmq.broker.limits import Limits
from wire import Server

# Every test here runs on the memory store and on the SQLite store.
pytestmark = pytest.mark.usefixtures("both_stores")


OK_BYTES = b"\x00\x00\x00\x06\x00\x00\x00\x02OK"
TOO_LARGE = [b"Error", b"REQUEST_MESSAGE_TOO_LARGE"]
STORAGE_FULL = [b"Error", b"SERVER_STORAGE_FULL"]
TOO_MANY_QUEUES = [b"Error", b"SERVER_TOO_MANY_QUEUES"]
MiB = 1024 * 1024


def logged(events: Sequence[dict[str, Any]], *needles: str) -> list[str]:
    """The formatted log lines that contain every needle."""
    lines = [formatEvent(event) for event in events]
    return [line for line in lines if all(needle in line for needle in needles)]


# -- max_message_bytes ---------------------------------------------------------------


def test_put_over_max_message_bytes_is_refused_and_connection_stays_open() -> None:
    server = Server(Limits(max_message_bytes=10))
    other = server.connect()
    other.send([b"Put", b"kept", b"stored"])
    conn = server.connect()
    with capturedLogs() as events:
        conn.send([b"Put", b"big", b"x" * 11])
    assert conn.raw() == (
        b"\x00\x00\x00\x26\x00\x00\x00\x05Error\x00\x00\x00\x19REQUEST_MESSAGE_TOO_LARGE"
    )
    assert not conn.closed
    assert logged(events, "refused", "REQUEST_MESSAGE_TOO_LARGE")
    # Nothing stored, not even the queue it named.
    assert server.broker.num_messages == 1
    assert server.broker.num_bytes == len(b"stored")
    assert dict(server.broker.queue_sizes()) == {b"kept": 1}
    # A message of exactly the limit is accepted, and the next request answered.
    conn.send([b"Put", b"big", b"x" * 10], [b"Get", b"big"], [b"Get", b"kept"])
    assert conn.replies() == [[b"OK"], [b"OK", b"x" * 10], [b"OK", b"stored"]]
    assert other.replies() == [[b"OK"]]
    assert not other.closed


def test_too_large_put_before_a_waiter_does_not_wake_it() -> None:
    server = Server(Limits(max_message_bytes=4))
    waiting = server.connect()
    waiting.send([b"Get", b"q", b"1000"])
    producer = server.connect()
    producer.send([b"Put", b"q", b"12345"], [b"Put", b"q", b"1234"])
    assert producer.replies() == [TOO_LARGE, [b"OK"]]
    assert waiting.replies() == [[b"OK", b"1234"]]


def test_max_frame_bytes_follows_max_message_bytes() -> None:
    limits = Limits(max_message_bytes=100)
    assert limits.max_frame_bytes == 4 + 3 + 4 + 1024 + 4 + 100
    assert Limits().max_frame_bytes == MAX_FRAME_LENGTH == 33_555_471
    assert max_frame_length(32 * MiB) == MAX_FRAME_LENGTH


def test_frame_of_exactly_max_frame_bytes_is_parsed() -> None:
    server = Server(Limits(max_message_bytes=100))
    conn = server.connect()
    name = b"n" * 1024
    data = encode_frame([b"Put", name, b"m" * 100])
    assert struct.unpack(">I", data[:4]) == (server.broker.limits.max_frame_bytes,)
    conn.send_raw(data)
    assert conn.replies() == [[b"OK"]]
    assert server.queue_contents() == {name: [b"m" * 100]}


def test_frame_one_byte_over_max_frame_bytes_is_skipped() -> None:
    server = Server(Limits(max_message_bytes=100))
    conn = server.connect()
    name = b"n" * 1024
    data = encode_frame([b"Put", name, b"m" * 101])
    assert struct.unpack(">I", data[:4]) == (server.broker.limits.max_frame_bytes + 1,)
    conn.send_raw(data + encode_frame([b"Info"]))
    replies = conn.replies()
    assert replies[0] == TOO_LARGE
    assert replies[1][0] == b"OK" and b'"NumQueues":0' in replies[1][1]
    assert len(replies) == 2
    assert not conn.closed


SKIPPED = encode_frame([b"Put", b"q", bytes(range(256)) * 20])  # 5,134-byte payload
STREAM = (
    encode_frame([b"Put", b"q", b"before"])
    + SKIPPED
    + encode_frame([b"Put", b"q", b"after"])
    + encode_frame([b"Get", b"q"])
    + encode_frame([b"Get", b"q"])
)
SKIP_START = len(encode_frame([b"Put", b"q", b"before"]))
SKIP_END = SKIP_START + len(SKIPPED)


@pytest.mark.parametrize(
    "cuts",
    [
        [],
        [SKIP_START + 2],  # the oversized header split in two
        [SKIP_START + 4],  # header, then the body with the rest
        [SKIP_START + 1, SKIP_START + 3, SKIP_START + 100, SKIP_END - 1],
        [SKIP_END],  # the body ends exactly at a chunk's end
        [SKIP_END + 3],  # the next frame's header split
        list(range(SKIP_START - 5, SKIP_END + 40, 397)),
        list(range(1, len(STREAM), 64)),
    ],
    ids=["one-chunk", "header-split", "header-alone", "ragged", "ends-on-boundary",
         "next-header-split", "every-397", "every-64"],
)
def test_frame_above_max_frame_bytes_is_skipped_without_buffering(cuts: list[int]) -> None:
    server = Server(Limits(max_message_bytes=1000))
    assert server.broker.limits.max_frame_bytes < len(SKIPPED) - 4 < MAX_FRAME_LENGTH
    other = server.connect()
    other.send([b"Put", b"other", b"untouched"])
    conn = server.connect()
    points = [0, *cuts, len(STREAM)]
    with capturedLogs() as events:
        for start, end in zip(points, points[1:]):
            conn.send_raw(STREAM[start:end])
            # The skipped frame's bytes are never held.
            assert conn.protocol.buffered_bytes < 64
    assert conn.replies() == [
        [b"OK"], TOO_LARGE, [b"OK"], [b"OK", b"before"], [b"OK", b"after"],
    ]
    assert not conn.closed
    assert len(logged(events, "REQUEST_MESSAGE_TOO_LARGE")) == 1
    assert server.queue_contents() == {b"other": [b"untouched"], b"q": []}
    # Later segments are parsed as usual.
    conn.send([b"Put", b"q", b"again"], [b"Get", b"q"])
    assert conn.replies() == [[b"OK"], [b"OK", b"again"]]


def test_largest_legal_frame_is_skipped_in_one_mib_segments_when_over_the_limit() -> None:
    server = Server(Limits(max_message_bytes=MiB))
    conn = server.connect()
    conn.send_raw(struct.pack(">I", MAX_FRAME_LENGTH))
    segment = bytes(MiB)
    remaining = MAX_FRAME_LENGTH
    while remaining:
        size = min(remaining, len(segment))
        conn.send_raw(segment[:size])
        remaining -= size
        assert conn.protocol.buffered_bytes == 0
        if remaining:
            assert conn.raw() == b""
    conn.send([b"Info"])
    replies = conn.replies()
    assert replies[0] == TOO_LARGE
    assert replies[1][0] == b"OK"
    assert len(replies) == 2
    assert not conn.closed


def test_frame_above_the_protocol_limit_closes_without_reply_even_with_small_limits() -> None:
    server = Server(Limits(max_message_bytes=100))
    other = server.connect()
    other.send([b"Put", b"q", b"kept"])
    conn = server.connect()
    with capturedLogs() as events:
        conn.send_raw(encode_frame([b"Info"]) + struct.pack(">I", MAX_FRAME_LENGTH + 1) + b"xx")
    replies = conn.replies()
    assert len(replies) == 1 and replies[0][0] == b"OK"
    assert conn.closed
    assert logged(events, "closing", str(MAX_FRAME_LENGTH + 1))
    conn.send([b"Info"])
    assert conn.raw() == b""
    assert server.queue_contents() == {b"q": [b"kept"]}
    other.send([b"Get", b"q"])
    assert other.replies() == [[b"OK"], [b"OK", b"kept"]]


def test_max_message_bytes_above_32_mib_raises_the_frame_limit() -> None:
    server = Server(Limits(max_message_bytes=64 * MiB))
    conn = server.connect()
    # A header the default server would close on only announces a long frame here.
    conn.send_raw(struct.pack(">I", MAX_FRAME_LENGTH + 1000) + b"\x00\x00\x00\x03Put")
    assert conn.raw() == b""
    assert not conn.closed


# -- max_connections ---------------------------------------------------------------


def test_connections_beyond_max_connections_are_refused_and_logged() -> None:
    server = Server(Limits(max_connections=2))
    first = server.connect()
    second = server.connect()
    with capturedLogs() as events:
        assert server.build() is None
        assert server.build() is None
    warnings = [e for e in events if e["log_level"] == LogLevel.warn]
    assert len(warnings) == 2
    assert "refused a connection" in formatEvent(warnings[0])
    assert "the limit is 2" in formatEvent(warnings[0])
    assert server.broker.num_connections == 2
    # The open connections go on working.
    first.send([b"Put", b"q", b"m"])
    second.send([b"Get", b"q"])
    assert first.replies() == [[b"OK"]]
    assert second.replies() == [[b"OK", b"m"]]
    # A closed connection frees its slot, for one more only.
    first.close()
    third = server.connect()
    assert server.build() is None
    third.send([b"Info"])
    assert b'"NumConnections":2' in third.replies()[0][1]


def test_a_server_closed_connection_frees_its_slot_once_lost() -> None:
    server = Server(Limits(max_connections=1))
    conn = server.connect()
    conn.send([b"Quit"])
    assert conn.closed
    # Closing, not yet closed: the slot is still taken.
    assert server.build() is None
    conn.protocol.connectionLost()
    assert server.build() is not None


def test_max_connections_zero_means_no_limit() -> None:
    server = Server(Limits(max_connections=0))
    connections = [server.connect() for _ in range(300)]
    assert server.broker.num_connections == 300
    connections[-1].send([b"Info"])
    assert b'"NumConnections":300' in connections[-1].replies()[0][1]


# -- max_queued_messages / max_queued_bytes -------------------------------------------


def test_put_beyond_max_queued_messages_is_refused_and_nothing_stored() -> None:
    server = Server(Limits(max_queued_messages=2))
    conn = server.connect()
    other = server.connect()
    conn.send([b"Put", b"a", b"1"], [b"Put", b"b", b"2"])
    assert conn.replies() == [[b"OK"], [b"OK"]]
    with capturedLogs() as events:
        conn.send([b"Put", b"a", b"3"], [b"Put", b"new", b"4"])
    assert conn.raw() == 2 * (
        b"\x00\x00\x00\x20\x00\x00\x00\x05Error\x00\x00\x00\x13SERVER_STORAGE_FULL"
    )
    assert len(logged(events, "refused", "SERVER_STORAGE_FULL")) == 2
    assert not conn.closed
    assert server.broker.num_messages == 2
    # The refused Put named a new queue: it was not created either.
    assert server.queue_contents() == {b"a": [b"1"], b"b": [b"2"]}
    # Another connection is refused too, until a Get makes room.
    other.send([b"Put", b"b", b"x"], [b"Get", b"a"], [b"Put", b"b", b"x"])
    assert other.replies() == [STORAGE_FULL, [b"OK", b"1"], [b"OK"]]
    conn.send([b"Put", b"a", b"5"])
    assert conn.replies() == [STORAGE_FULL]
    assert server.queue_contents() == {b"a": [], b"b": [b"2", b"x"]}


def test_put_beyond_max_queued_bytes_is_refused() -> None:
    server = Server(Limits(max_queued_bytes=10, max_queued_messages=0))
    conn = server.connect()
    conn.send([b"Put", b"q", b"123456"], [b"Put", b"q", b"12345"], [b"Put", b"q", b"1234"])
    assert conn.replies() == [[b"OK"], STORAGE_FULL, [b"OK"]]
    assert server.broker.num_bytes == 10
    # Empty messages take no bytes: still room for them at exactly the limit.
    conn.send([b"Put", b"q", b""], [b"Put", b"q", b"x"])
    assert conn.replies() == [[b"OK"], STORAGE_FULL]
    assert server.queue_contents() == {b"q": [b"123456", b"1234", b""]}
    conn.send([b"Get", b"q"], [b"Put", b"r", b"abcdef"])
    assert conn.replies() == [[b"OK", b"123456"], [b"OK"]]
    assert server.broker.num_bytes == 10


@pytest.mark.not_redis("every Put is stored in Redis before a take hands it over, so the storage limits apply to it")
def test_put_handed_straight_to_a_waiter_is_not_refused_when_storage_is_full() -> None:
    server = Server(Limits(max_queued_messages=1, max_queued_bytes=5))
    producer = server.connect()
    producer.send([b"Put", b"full", b"12345"])
    consumer = server.connect()
    consumer.send([b"Get", b"w", b"1000"])
    producer.send([b"Put", b"w", b"a much longer message"], [b"Put", b"w", b"stored?"])
    assert producer.replies() == [[b"OK"], [b"OK"], STORAGE_FULL]
    assert consumer.replies() == [[b"OK", b"a much longer message"]]
    assert server.queue_contents() == {b"full": [b"12345"], b"w": []}


def test_storage_limits_zero_mean_no_limit() -> None:
    server = Server(Limits(max_queued_messages=0, max_queued_bytes=0))
    conn = server.connect()
    conn.send(*([b"Put", b"q", b"x" * 1000] for _ in range(2000)))
    assert conn.replies() == [[b"OK"]] * 2000
    assert server.broker.num_messages == 2000


# -- max_queues --------------------------------------------------------------------


def test_put_or_get_naming_a_queue_beyond_max_queues_is_refused_when_none_is_idle() -> None:
    server = Server(Limits(max_queues=2))
    conn = server.connect()
    other = server.connect()
    waiter = server.connect()
    # "a" holds a message and "b" a waiting Get: neither may be forgotten.
    conn.send([b"Put", b"a", b"1"])
    waiter.send([b"Get", b"b", b"60000"])
    assert conn.replies() == [[b"OK"]]
    with capturedLogs() as events:
        conn.send([b"Put", b"c", b"x"], [b"Get", b"c", b"1000"], [b"Get", b"d"])
    assert conn.raw() == 3 * (
        b"\x00\x00\x00\x23\x00\x00\x00\x05Error\x00\x00\x00\x16SERVER_TOO_MANY_QUEUES"
    )
    assert len(logged(events, "refused", "SERVER_TOO_MANY_QUEUES")) == 3
    assert not conn.closed
    # The refused Get did not wait: only the waiter's timer is left.
    assert len(server.clock.getDelayedCalls()) == 1
    assert server.queue_contents() == {b"a": [b"1"], b"b": []}
    # Existing queues still work, from any connection.
    other.send([b"Put", b"b", b"2"], [b"Get", b"a"], [b"Put", b"e", b"3"], [b"Info"])
    replies = other.replies()
    assert waiter.replies() == [[b"OK", b"2"]]
    # Both are empty now; "b", emptied first, is forgotten to make room for "e".
    assert replies[:3] == [[b"OK"], [b"OK", b"1"], [b"OK"]]
    assert b'"Queues":{"a":{"NumMessages":0},"e":{"NumMessages":1}}' in replies[3][1]


@pytest.mark.not_redis("counts the broker's turns: a Redis store answers a Get a turn later, after its take")
def test_mistyped_queue_names_do_not_use_up_max_queues() -> None:
    # A Get on a mistyped name creates a queue; once it is empty and nobody
    # waits on it, it makes room for a new queue instead of taking a slot for good.
    server = Server(Limits(max_queues=2))
    conn = server.connect()
    conn.send([b"Get", b"typo-1", b"1"], [b"Get", b"typo-2", b"1"])
    server.clock.advance(0.001)
    server.clock.advance(0.001)
    assert conn.replies() == [[b"Timeout"], [b"Timeout"]]
    conn.send([b"Put", b"jobs", b"x"], [b"Put", b"mail", b"y"], [b"Info"])
    replies = conn.replies()
    assert replies[:2] == [[b"OK"], [b"OK"]]
    assert replies[2][1].endswith(
        b'"Queues":{"jobs":{"NumMessages":1},"mail":{"NumMessages":1}}}'
    )


@pytest.mark.not_redis("takes messages with broker.take, which a Redis store answers later")
def test_idle_queues_are_forgotten_least_recently_used_first() -> None:
    server = Server(Limits(max_queues=3))
    broker = server.broker
    for name in (b"a", b"b", b"c"):
        broker.put(name, b"m")
    # Emptied in the order b, c, a: b is the least recently used.
    for name in (b"b", b"c", b"a"):
        assert broker.take(name) == b"m"
    # Info lists empty queues until they are forgotten, as the original does.
    assert broker.info().queues == {"a": 0, "b": 0, "c": 0}
    broker.put(b"d", b"m")
    assert broker.info().queues == {"a": 0, "c": 0, "d": 1}
    # Using an idle queue again makes it the most recently used.
    assert broker.take(b"c") is None
    broker.put(b"e", b"m")
    assert broker.info().queues == {"c": 0, "d": 1, "e": 1}
    # A queue with a waiter is never forgotten.
    waiting = broker.wait(b"c", 10)
    with pytest.raises(Exception, match="SERVER_TOO_MANY_QUEUES"):
        broker.put(b"f", b"m")
    assert broker.info().queues == {"c": 0, "d": 1, "e": 1}
    broker.put(b"c", b"for the waiter")
    assert waiting.result == b"for the waiter"  # type: ignore[attr-defined]


@pytest.mark.not_redis("takes messages with broker.take, which a Redis store answers later")
def test_a_message_put_back_comes_back_even_if_its_queue_was_forgotten() -> None:
    server = Server(Limits(max_queues=1))
    broker = server.broker
    broker.put(b"a", b"m")
    assert broker.take(b"a") == b"m"
    broker.put(b"b", b"n")  # forgets the empty "a"
    broker.put_back(b"a", b"m")  # a consumer's connection broke: it returns
    assert server.queue_contents() == {b"a": [b"m"], b"b": [b"n"]}


# -- idle_timeout ------------------------------------------------------------------


def test_idle_timeout_is_off_by_default() -> None:
    server = Server()
    conn = server.connect()
    assert server.clock.getDelayedCalls() == []
    server.clock.advance(10**7)
    assert not conn.closed
    conn.send([b"Info"])
    assert len(conn.replies()) == 1


def test_idle_connection_is_closed_after_exactly_the_timeout() -> None:
    server = Server(Limits(idle_timeout=5))
    conn = server.connect()
    busy = server.connect()
    with capturedLogs() as events:
        server.clock.advance(5 - 2.0**-10)
        assert not conn.closed
        busy.send([b"Info"])
        server.clock.advance(2.0**-10)
    assert conn.closed
    assert conn.raw() == b""
    assert logged(events, "closing", "idle")
    assert not busy.closed
    conn.protocol.connectionLost()
    assert server.broker.num_connections == 1


def test_idle_timeout_is_reset_by_traffic() -> None:
    server = Server(Limits(idle_timeout=5))
    conn = server.connect()
    server.clock.advance(4)
    conn.send([b"Info"])
    server.clock.advance(4)
    # Even a part of a frame is traffic.
    conn.send_raw(b"\x00\x00")
    server.clock.advance(4.9)
    assert not conn.closed
    server.clock.advance(0.1)
    assert conn.closed
    assert len(conn.replies()) == 1


def test_idle_timeout_does_not_fire_while_a_get_waits() -> None:
    server = Server(Limits(idle_timeout=5))
    conn = server.connect()
    conn.send([b"Get", b"q", b"60000"])
    server.clock.advance(30)
    assert not conn.closed
    server.clock.advance(30 - 2.0**-10)
    assert not conn.closed
    server.clock.advance(2.0**-10)
    assert conn.replies() == [[b"Timeout"]]
    assert not conn.closed
    # Idle again from the answer on.
    server.clock.advance(5 - 2.0**-10)
    assert not conn.closed
    server.clock.advance(2.0**-10)
    assert conn.closed


def test_idle_timeout_restarts_when_a_waiting_get_is_answered() -> None:
    server = Server(Limits(idle_timeout=5))
    conn = server.connect()
    producer = server.connect()
    conn.send([b"Get", b"q", b"60000"])
    for _ in range(4):
        server.clock.advance(4)
        producer.send([b"Info"])
    producer.send([b"Put", b"q", b"wake"])
    assert conn.replies() == [[b"OK", b"wake"]]
    server.clock.advance(4.9)
    assert not conn.closed
    producer.send([b"Info"])
    server.clock.advance(0.1)
    assert conn.closed
    assert not producer.closed


def test_closed_connection_leaves_no_idle_timer() -> None:
    server = Server(Limits(idle_timeout=5))
    conn = server.connect()
    assert len(server.clock.getDelayedCalls()) == 1
    conn.close()
    assert server.clock.getDelayedCalls() == []


# -- option parsing ----------------------------------------------------------------


def parse(*args: str) -> Limits:
    options = tap.Options()
    options.parseOptions(list(args))
    limits: Limits = options["limits"]
    return limits


def test_options_default_to_the_default_limits() -> None:
    assert parse() == Limits()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--max-message-bytes", "32MiB"], {"max_message_bytes": 32 * MiB}),
        (["--max-message-bytes", "1048576"], {"max_message_bytes": MiB}),
        (["--max-message-bytes", "512KiB"], {"max_message_bytes": 512 * 1024}),
        (["--max-queued-bytes", "1GiB"], {"max_queued_bytes": 1024**3}),
        (["--max-queued-bytes", "2GB"], {"max_queued_bytes": 2 * 10**9}),
        (["--max-queued-bytes", "10kb"], {"max_queued_bytes": 10_000}),
        (["--max-queued-bytes", "0"], {"max_queued_bytes": 0}),
        (["--max-pending-bytes", "64KiB"], {"max_pending_bytes": 64 * 1024}),
        (["--max-pending-bytes", "100B"], {"max_pending_bytes": 100}),
        (["--max-connections", "0"], {"max_connections": 0}),
        (["--max-connections", "25"], {"max_connections": 25}),
        (["--max-queued-messages", "1000"], {"max_queued_messages": 1000}),
        (["--max-queues", "0"], {"max_queues": 0}),
        (["--idle-timeout", "2.5"], {"idle_timeout": 2.5}),
        (["--idle-timeout", "0"], {"idle_timeout": 0.0}),
        (["--max-queues=7", "--max-queued-messages=8", "--max-message-bytes=1MiB"],
         {"max_queues": 7, "max_queued_messages": 8, "max_message_bytes": MiB}),
    ],
)
def test_options_make_limits(args: list[str], expected: dict[str, Any]) -> None:
    limits = parse(*args)
    assert limits == Limits(**expected)
    for name, value in expected.items():
        assert type(getattr(limits, name)) is type(value)


@pytest.mark.parametrize(
    "option", ["--max-message-bytes", "--max-queued-bytes", "--max-pending-bytes"]
)
@pytest.mark.parametrize("value", ["-1", "abc", "5XB", "1.5MiB", "", "MiB", "1 0", "0x10"])
def test_bad_sizes_are_usage_errors(option: str, value: str) -> None:
    with pytest.raises(usage.UsageError):
        parse(option, value)


@pytest.mark.parametrize("option", ["--max-connections", "--max-queued-messages", "--max-queues"])
@pytest.mark.parametrize("value", ["-1", "abc", "1k", "1.0", ""])
def test_bad_counts_are_usage_errors(option: str, value: str) -> None:
    with pytest.raises(usage.UsageError):
        parse(option, value)


@pytest.mark.parametrize("value", ["-1", "abc", "nan", "inf", "", "5s"])
def test_bad_idle_timeouts_are_usage_errors(value: str) -> None:
    with pytest.raises(usage.UsageError):
        parse("--idle-timeout", value)


def test_a_message_limit_a_frame_length_cannot_carry_is_a_usage_error() -> None:
    with pytest.raises(usage.UsageError):
        parse("--max-message-bytes", "4GiB")
    assert parse("--max-message-bytes", "3GiB").max_message_bytes == 3 * 1024**3
