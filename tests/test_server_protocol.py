"""The server protocol on the wire, without sockets: ``StringTransport`` and ``task.Clock``."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import capturedLogs

from mqmq.wire.codec import MAX_FRAME_LENGTH, decode_frames, encode_frame
from wire import Frame, Server, sqlite_store


OK_BYTES = b"\x00\x00\x00\x06\x00\x00\x00\x02OK"
TIMEOUT_BYTES = b"\x00\x00\x00\x0b\x00\x00\x00\x07Timeout"


def info_of(frame: Frame) -> dict[str, Any]:
    assert frame[0] == b"OK" and len(frame) == 2
    document: dict[str, Any] = json.loads(frame[1])
    return document


@pytest.fixture(params=["memory", "sqlite"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Server:
    """A server on each store: the SQLite one real, its writes run by the clock."""
    if request.param == "memory":
        return Server()
    return Server(store=sqlite_store(tmp_path / "queues.db"), write_before_reading=True)


# Put, Get, Info, Quit


def test_put_replies_ok_exact_bytes(server: Server) -> None:
    conn = server.connect()
    conn.send_raw(
        b"\x00\x00\x00\x14"
        b"\x00\x00\x00\x03Put\x00\x00\x00\x01q\x00\x00\x00\x04body"
    )
    assert conn.raw() == OK_BYTES
    assert server.broker.take(b"q") == b"body"
    assert not conn.closed


def test_get_on_non_empty_queue_replies_ok_and_message(server: Server) -> None:
    conn = server.connect()
    conn.send([b"Put", b"q", b"hello"], [b"Put", b"q", b"\x00bin\xff"])
    assert conn.raw() == OK_BYTES * 2
    conn.send([b"Get", b"q", b"1000"])
    assert conn.raw() == b"\x00\x00\x00\x0f\x00\x00\x00\x02OK\x00\x00\x00\x05hello"
    conn.send([b"Get", b"q", b"1000"])
    assert conn.replies() == [[b"OK", b"\x00bin\xff"]]
    assert server.clock.getDelayedCalls() == []


def test_get_of_empty_message(server: Server) -> None:
    conn = server.connect()
    conn.send([b"Put", b"", b""], [b"Get", b""])
    assert conn.replies() == [[b"OK"], [b"OK", b""]]


def test_get_with_timeout_on_empty_queue_times_out(server: Server) -> None:
    conn = server.connect()
    conn.send([b"Get", b"q", b"250"])
    assert conn.raw() == b""
    server.clock.advance(0.25 - 2.0**-12)
    assert conn.raw() == b""
    server.clock.advance(2.0**-12)
    assert conn.raw() == TIMEOUT_BYTES
    assert not conn.closed
    assert server.clock.getDelayedCalls() == []
    # The timed-out Get is gone: a later Put is stored, and the connection works.
    conn.send([b"Put", b"q", b"m"], [b"Get", b"q", b"10"])
    assert conn.replies() == [[b"OK"], [b"OK", b"m"]]


@pytest.mark.parametrize(
    "frame",
    [[b"Get", b"q"], [b"Get", b"q", b"0"], [b"Get", b"q", b"-5"],
     [b"Get", b"q", b"-9223372036854775808"]],
    ids=["no-timeout", "zero", "negative", "int64-min"],
)
def test_get_without_positive_timeout_waits_one_ms(server: Server, frame: Frame) -> None:
    conn = server.connect()
    conn.send(frame)
    server.clock.advance(0.0009)
    assert conn.raw() == b""
    server.clock.advance(0.0001)
    assert conn.raw() == TIMEOUT_BYTES


def test_get_with_maximum_timeout_is_accepted(server: Server) -> None:
    conn = server.connect()
    conn.send([b"Get", b"q", b"3600000"])
    server.clock.advance(3599.5)
    assert conn.raw() == b""
    server.clock.advance(0.5)
    assert conn.raw() == TIMEOUT_BYTES


def test_extra_values_are_ignored(server: Server) -> None:
    conn = server.connect()
    conn.send(
        [b"Put", b"q", b"m", b"extra"],
        [b"Get", b"q", b"5", b"extra"],
        [b"Info", b"extra"],
    )
    replies = conn.replies()
    assert replies[:2] == [[b"OK"], [b"OK", b"m"]]
    assert info_of(replies[2])["NumQueues"] == 1
    assert len(replies) == 3
    conn.send([b"Quit", b"extra"])
    assert conn.closed
    assert conn.raw() == b""


def test_info_exact_json(server: Server) -> None:
    conn = server.connect()
    conn.send([b"Put", b"MyQueue", b"a"], [b"Put", b"MyQueue", b"b"], [b"Get", b"empty"])
    server.clock.advance(0.001)
    conn.raw()
    conn.send([b"Info"])
    assert conn.replies() == [[
        b"OK",
        b'{"NumConnections":1,"NumQueues":2,"NumMessages":2,'
        b'"Queues":{"MyQueue":{"NumMessages":2},"empty":{"NumMessages":0}}}',
    ]]


def test_info_key_order_and_counts_open_connections(server: Server) -> None:
    first = server.connect()
    second = server.connect()
    third = server.connect()
    first.send([b"Info"])
    (reply,) = first.replies()
    keys = json.loads(reply[1], object_pairs_hook=lambda kv: [k for k, _ in kv])
    assert keys == ["NumConnections", "NumQueues", "NumMessages", "Queues"]
    assert info_of(reply) == {
        "NumConnections": 3, "NumQueues": 0, "NumMessages": 0, "Queues": {},
    }
    second.close()
    third.send([b"Quit"])
    third.protocol.connectionLost()
    first.send([b"Info"])
    assert info_of(first.replies()[0])["NumConnections"] == 1
    fourth = server.connect()
    fourth.send([b"Info"])
    assert info_of(fourth.replies()[0])["NumConnections"] == 2


def test_quit_closes_without_reply_and_ignores_later_frames(server: Server) -> None:
    conn = server.connect()
    conn.send([b"Put", b"q", b"before"], [b"Quit"], [b"Put", b"q", b"after"], [b"Info"])
    assert conn.replies() == [[b"OK"]]
    assert conn.closed
    conn.send([b"Put", b"q", b"later"], [b"Info"])
    assert conn.raw() == b""
    assert server.broker.num_messages == 1
    assert server.broker.take(b"q") == b"before"


def test_commands_are_case_sensitive(server: Server) -> None:
    conn = server.connect()
    conn.send([b"put", b"q", b"m"])
    assert conn.replies() == [[b"Error", b"REQUEST_UNKNOWN_COMMAND"]]
    assert conn.closed
    assert server.broker.num_queues == 0


# Errors that keep the connection open


@pytest.mark.parametrize(
    "frame, error_type",
    [
        ([b"Put"], b"REQUEST_BAD_PARAMS"),
        ([b"Put", b"q"], b"REQUEST_BAD_PARAMS"),
        ([b"Get"], b"REQUEST_BAD_PARAMS"),
        ([b"Put", b"n" * 1025, b"m"], b"REQUEST_BAD_QUEUE_NAME"),
        ([b"Get", b"n" * 1025, b"5"], b"REQUEST_BAD_QUEUE_NAME"),
        ([b"Get", b"n" * 1025], b"REQUEST_BAD_QUEUE_NAME"),
        ([b"Get", b"q", b"abc"], b"REQUEST_BAD_TIMEOUT"),
        ([b"Get", b"q", b"3600001"], b"REQUEST_BAD_TIMEOUT"),
        ([b"Get", b"q", b""], b"REQUEST_BAD_TIMEOUT"),
        ([b"Get", b"q", b" 5"], b"REQUEST_BAD_TIMEOUT"),
        ([b"Get", b"q", b"1_000"], b"REQUEST_BAD_TIMEOUT"),
        ([b"Get", b"q", b"1.5"], b"REQUEST_BAD_TIMEOUT"),
        ([b"Get", b"q", b"+"], b"REQUEST_BAD_TIMEOUT"),
        ([b"Get", b"q", b"9223372036854775808"], b"REQUEST_BAD_TIMEOUT"),
        ([b"Get", b"q", b"-9223372036854775809"], b"REQUEST_BAD_TIMEOUT"),
    ],
)
def test_request_errors_keep_connection_open(
    server: Server, frame: Frame, error_type: bytes
) -> None:
    conn = server.connect()
    conn.send(frame, [b"Put", b"ok", b"m"], [b"Get", b"ok", b"5"])
    assert conn.replies() == [[b"Error", error_type], [b"OK"], [b"OK", b"m"]]
    assert not conn.closed
    # Nothing was queued or waited for by the refused request.
    assert server.clock.getDelayedCalls() == []
    assert server.broker.num_queues == 1
    # Later requests, in a later segment, are answered too.
    conn.send([b"Info"])
    assert info_of(conn.replies()[0])["NumConnections"] == 1


def test_error_reply_exact_bytes(server: Server) -> None:
    conn = server.connect()
    conn.send([b"Put", b"q"])
    assert conn.raw() == (
        b"\x00\x00\x00\x1f\x00\x00\x00\x05Error\x00\x00\x00\x12REQUEST_BAD_PARAMS"
    )


def test_longest_queue_name_is_accepted(server: Server) -> None:
    conn = server.connect()
    name = b"n" * 1024
    conn.send([b"Put", name, b"m"], [b"Get", name, b"1"])
    assert conn.replies() == [[b"OK"], [b"OK", b"m"]]


# Errors that close the connection


@pytest.mark.parametrize(
    "data",
    [encode_frame([b"Bogus", b"q"]), b"\x00\x00\x00\x00", encode_frame([b""])],
    ids=["unknown", "empty-frame", "empty-command"],
)
def test_unknown_command_replies_and_closes(server: Server, data: bytes) -> None:
    conn = server.connect()
    other = server.connect()
    other.send([b"Put", b"q", b"kept"])
    conn.send_raw(encode_frame([b"Put", b"q", b"first"]) + data
                  + encode_frame([b"Put", b"q", b"after"]) + encode_frame([b"Info"]))
    assert conn.replies() == [[b"OK"], [b"Error", b"REQUEST_UNKNOWN_COMMAND"]]
    assert conn.closed
    conn.send([b"Info"])
    assert conn.raw() == b""
    conn.protocol.connectionLost()
    # Everyone else is served as before; nothing queued was lost.
    other.replies()
    other.send([b"Info"], [b"Get", b"q"], [b"Get", b"q"])
    replies = other.replies()
    assert info_of(replies[0]) == {
        "NumConnections": 1, "NumQueues": 1, "NumMessages": 2,
        "Queues": {"q": {"NumMessages": 2}},
    }
    assert replies[1:] == [[b"OK", b"kept"], [b"OK", b"first"]]


# Pipelining and held requests


def test_pipelined_requests_answered_in_order(server: Server) -> None:
    conn = server.connect()
    frames: list[Frame] = []
    for i in range(50):
        frames.append([b"Put", b"q%d" % (i % 3), b"m%d" % i])
    for i in range(50):
        frames.append([b"Get", b"q%d" % (i % 3), b"100"])
    frames.append([b"Get", b"q0", b"bad"])
    frames.append([b"Info"])
    conn.send(*frames)
    replies = conn.replies()
    assert replies[:50] == [[b"OK"]] * 50
    assert replies[50:100] == [[b"OK", b"m%d" % i] for i in range(50)]
    assert replies[100] == [b"Error", b"REQUEST_BAD_TIMEOUT"]
    assert info_of(replies[101])["NumMessages"] == 0
    assert len(replies) == 102


def test_waiting_get_holds_requests_behind_it(server: Server) -> None:
    conn = server.connect()
    producer = server.connect()
    conn.send([b"Get", b"q", b"1000"], [b"Put", b"r", b"x"], [b"Info"])
    assert conn.raw() == b""
    assert server.broker.num_queues == 1  # "r" not created yet: the Put is held
    # More requests arriving while held wait too.
    conn.send([b"Put", b"r", b"y"])
    assert conn.raw() == b""
    producer.send([b"Put", b"q", b"wake"])
    assert producer.replies() == [[b"OK"]]
    # The requests behind it go on from the reactor, at its next turn.
    server.clock.advance(0)
    replies = conn.replies()
    assert replies[:2] == [[b"OK", b"wake"], [b"OK"]]
    info = info_of(replies[2])
    assert info["Queues"] == {"q": {"NumMessages": 0}, "r": {"NumMessages": 1}}
    assert replies[3:] == [[b"OK"]]
    assert server.broker.num_messages == 2
    # The Get was answered: its timer is gone, no Timeout follows.
    server.clock.advance(2)
    assert conn.raw() == b""
    assert server.clock.getDelayedCalls() == []


def test_timeout_then_held_requests_in_order(server: Server) -> None:
    conn = server.connect()
    conn.send(
        [b"Get", b"q", b"100"],
        [b"Put", b"p", b"x"],
        [b"Get", b"q2", b"50"],
        [b"Get", b"p", b"50"],
    )
    assert conn.raw() == b""
    server.clock.advance(0.1 - 2.0**-12)
    assert conn.raw() == b""
    server.clock.advance(2.0**-12)
    server.clock.advance(0)
    # Timeout for the first Get, then OK for the Put; the second Get now waits.
    assert conn.replies() == [[b"Timeout"], [b"OK"]]
    server.clock.advance(0.05)
    server.clock.advance(0)
    assert conn.replies() == [[b"Timeout"], [b"OK", b"x"]]
    assert server.clock.getDelayedCalls() == []


def test_delivery_then_timeout_order(server: Server) -> None:
    conn = server.connect()
    producer = server.connect()
    conn.send([b"Get", b"q", b"100"], [b"Get", b"q", b"100"], [b"Info"])
    producer.send([b"Put", b"q", b"m"])
    server.clock.advance(0)
    assert conn.replies() == [[b"OK", b"m"]]
    server.clock.advance(0.1)
    server.clock.advance(0)
    replies = conn.replies()
    assert replies[0] == [b"Timeout"]
    assert info_of(replies[1])["NumMessages"] == 0
    assert len(replies) == 2


def test_waiters_on_several_connections_served_in_arrival_order(server: Server) -> None:
    consumers = [server.connect() for _ in range(4)]
    for order in (2, 0, 3, 1):
        consumers[order].send([b"Get", b"q", b"1000"])
    producer = server.connect()
    producer.send(*([b"Put", b"q", b"m%d" % i] for i in range(5)))
    assert producer.replies() == [[b"OK"]] * 5
    received = {order: consumers[order].replies() for order in range(4)}
    assert received == {
        2: [[b"OK", b"m0"]], 0: [[b"OK", b"m1"]], 3: [[b"OK", b"m2"]], 1: [[b"OK", b"m3"]],
    }
    assert server.broker.num_messages == 1
    assert server.clock.getDelayedCalls() == []


def test_closed_connection_never_takes_a_message(server: Server) -> None:
    gone = server.connect()
    gone.send([b"Get", b"q", b"1000"])
    later = server.connect()
    later.send([b"Get", b"q", b"1000"])
    gone.close()
    assert server.clock.getDelayedCalls() != []  # only the live waiter's timer
    producer = server.connect()
    producer.send([b"Put", b"q", b"first"], [b"Put", b"q", b"second"])
    assert gone.raw() == b""
    assert later.replies() == [[b"OK", b"first"]]
    later.close()
    assert server.clock.getDelayedCalls() == []
    producer.replies()
    producer.send([b"Info"], [b"Get", b"q"])
    replies = producer.replies()
    assert info_of(replies[0])["Queues"] == {"q": {"NumMessages": 1}}
    assert info_of(replies[0])["NumConnections"] == 1
    assert replies[1] == [b"OK", b"second"]


def test_closed_connection_alone_waiting_leaves_message_queued(server: Server) -> None:
    gone = server.connect()
    gone.send([b"Get", b"q", b"1000"], [b"Put", b"q", b"held"])
    gone.close()
    assert [c for c in server.clock.getDelayedCalls() if "_write_pending" not in repr(c.func)] == []
    producer = server.connect()
    producer.send([b"Put", b"q", b"m"])
    assert server.broker.num_messages == 1
    server.clock.advance(2)
    assert gone.raw() == b""
    producer.send([b"Get", b"q"])
    assert producer.replies() == [[b"OK"], [b"OK", b"m"]]


def test_broker_stop_closes_waiting_connection(server: Server) -> None:
    conn = server.connect()
    server.broker.put(b"kept", b"m")
    conn.send([b"Get", b"q", b"1000"], [b"Info"])
    server.broker.startService()
    server.broker.stopService()
    assert conn.closed
    assert conn.raw() == b""
    assert server.clock.getDelayedCalls() == []
    assert server.broker.take(b"kept") == b"m"


# Framing


SCRIPT: list[Frame] = [
    [b"Put", b"q", b"one"],
    [b"Put", b"q", b""],
    [b"Get", b"q", b"10"],
    [b"Get", b"q"],
    [b"Get", b"q", b"nope"],
    [b"Put", b"\xff" * 5, b"\x00" * 300],
    [b"Info"],
    [b"Get", b"\xff" * 5, b"+7"],
    [b"Put"],
]


def script_replies(chunks: list[bytes]) -> list[Frame]:
    server = Server()
    conn = server.connect()
    for chunk in chunks:
        conn.send_raw(chunk)
    assert not conn.closed
    server.settle()
    return conn.replies()


@pytest.mark.usefixtures("both_stores")
def test_frames_split_at_every_byte_boundary() -> None:
    data = b"".join(encode_frame(f) for f in SCRIPT)
    expected = script_replies([data])
    assert len(expected) == len(SCRIPT)
    assert expected[:3] == [[b"OK"], [b"OK"], [b"OK", b"one"]]
    assert expected[-1] == [b"Error", b"REQUEST_BAD_PARAMS"]
    assert script_replies([data[i : i + 1] for i in range(len(data))]) == expected
    for cut in range(1, len(data)):
        assert script_replies([data[:cut], data[cut:]]) == expected, cut


def test_replies_after_partial_frame_wait_for_rest(server: Server) -> None:
    conn = server.connect()
    data = encode_frame([b"Put", b"q", b"m"])
    conn.send_raw(encode_frame([b"Info"]) + data[:7])
    assert len(conn.replies()) == 1
    conn.send_raw(data[7:] + encode_frame([b"Get", b"q"]))
    assert conn.replies() == [[b"OK"], [b"OK", b"m"]]


def test_oversized_frame_header_closes_without_reply(server: Server) -> None:
    conn = server.connect()
    assert MAX_FRAME_LENGTH == 33_555_471
    conn.send([b"Put", b"q", b"before"])
    conn.send_raw(struct.pack(">I", 33_555_472) + b"\x00\x00\x00\x03Put")
    assert conn.replies() == [[b"OK"]]
    assert conn.closed
    conn.send([b"Info"])
    assert conn.raw() == b""
    assert server.broker.num_messages == 1


def test_largest_frame_is_accepted(server: Server) -> None:
    conn = server.connect()
    name = b"n" * 1024
    message = b"\xab" * (32 * 1024 * 1024)
    data = encode_frame([b"Put", name, message])
    assert struct.unpack(">I", data[:4]) == (33_555_471,)
    for offset in range(0, len(data), 1 << 20):
        conn.send_raw(data[offset : offset + (1 << 20)])
    assert conn.raw() == OK_BYTES
    assert not conn.closed
    assert server.broker.num_bytes == len(message)
    conn.send([b"Get", name])
    reply = conn.raw()
    assert reply[:14] == struct.pack(">II", 4 + 2 + 4 + len(message), 2) + b"OK" + struct.pack(
        ">I", len(message)
    )
    assert len(reply) == 14 + len(message)
    assert reply[14:] == message


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x00\x00\x05Put",  # value runs past the frame end
        b"\x00\x00\x00\x03Put\x00\x00",  # too few bytes for a value length
        b"\x00\x00\x00\x03Put\x00\x00\x00\x01q\xff\xff\xff\xffm",
    ],
)
def test_malformed_frame_closes_without_reply(server: Server, payload: bytes) -> None:
    conn = server.connect()
    other = server.connect()
    conn.send_raw(struct.pack(">I", len(payload)) + payload + encode_frame([b"Info"]))
    assert conn.raw() == b""
    assert conn.closed
    assert server.broker.num_queues == 0
    other.send([b"Put", b"q", b"m"], [b"Get", b"q"])
    assert other.replies() == [[b"OK"], [b"OK", b"m"]]


# Hostile input

valid_frames = st.one_of(
    st.builds(lambda q, m: encode_frame([b"Put", q, m]),
              st.sampled_from([b"q", b"", b"r"]), st.binary(max_size=8)),
    st.builds(lambda q, t: encode_frame([b"Get", q, t]),
              st.sampled_from([b"q", b"", b"r"]),
              st.sampled_from([b"1", b"5", b"0", b"-1", b"x", b"3600001"])),
    st.builds(lambda q: encode_frame([b"Get", q]), st.sampled_from([b"q", b"r"])),
    st.just(encode_frame([b"Info"])),
    st.just(encode_frame([b"Quit"])),
    st.lists(st.binary(max_size=6), max_size=4).map(encode_frame),
)
hostile_streams = st.lists(st.one_of(valid_frames, st.binary(max_size=24)), max_size=12).map(
    b"".join
)


# On the SQLite store: test_hostile_input's test_hostile_clients_never_break_the_server_on_the_sqlite_store.
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=hostile_streams, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
       advance=st.sampled_from([0, 0.001, 0.01]))
def test_arbitrary_bytes_never_raise_and_broker_stays_sound(
    data: bytes, cuts: list[int], advance: float
) -> None:
    server = Server()
    hostile = server.connect()
    points = sorted({c for c in cuts if c < len(data)} | {0, len(data)})
    with capturedLogs() as events:
        for start, end in zip(points, points[1:]):
            hostile.send_raw(data[start:end])
            server.clock.advance(advance)
        server.clock.advance(0.01)
        hostile.close()
    assert [e for e in events if "log_failure" in e] == []
    # Every reply the hostile connection got is a whole, well-formed frame.
    frames, rest = decode_frames(hostile.transport.value())
    assert rest == b""
    for frame in frames:
        assert frame[0] in (b"OK", b"Timeout", b"Error"), frame
    assert server.clock.getDelayedCalls() == []

    well = server.connect()
    well.send([b"Info"])
    info = info_of(well.replies()[0])
    assert info["NumConnections"] == 1
    assert info["NumQueues"] == len(info["Queues"]) == server.broker.num_queues
    assert info["NumMessages"] == server.broker.num_messages == sum(
        q["NumMessages"] for q in info["Queues"].values()
    )
    before = server.broker.num_messages
    well.send([b"Put", b"q", b"probe"])
    assert well.replies() == [[b"OK"]]
    assert server.broker.num_messages == before + 1
    # Drain q: the probe comes last, so nothing went to a departed waiter.
    messages: list[bytes] = []
    while True:
        well.send([b"Get", b"q"])
        server.clock.advance(0.001)
        reply = well.replies()
        if reply == [[b"Timeout"]]:
            break
        assert reply[0][0] == b"OK"
        messages.append(reply[0][1])
    assert messages[-1] == b"probe"
    assert server.clock.getDelayedCalls() == []
