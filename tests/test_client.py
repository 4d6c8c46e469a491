"""The client protocol, byte for byte, and against the real server in memory."""

from __future__ import annotations

import json
import math
from struct import pack
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from mqmq.client import DEFAULT_REPLY_TIMEOUT, MQClient, connect, connect_endpoint
from mqmq.wire.codec import encode_frame
from mqmq.errors import (
    BadResponse,
    ConnectionClosed,
    GetTimeout,
    InvalidArgument,
    MQError,
    ReplyTimeout,
    ServerError,
)
from mqmq.wire.info import ServerInfo
from mqmq.testing import MemoryServer
from support import failure, success

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


# -- helpers -----------------------------------------------------------------


def frame(*values: bytes) -> bytes:
    """A frame built by hand, independently of mqmq.wire.codec."""
    payload = b"".join(pack(">I", len(value)) + value for value in values)
    return pack(">I", len(payload)) + payload


def connected() -> tuple[MQClient, StringTransport]:
    client = MQClient(clock=Clock())
    transport = StringTransport()
    client.makeConnection(transport)
    return client, transport


def timed(reply_timeout: float | None = 10) -> tuple[MQClient, StringTransport, Clock]:
    """A connected client whose reply timeout runs on a clock of the test's."""
    clock = Clock()
    client = MQClient(reply_timeout=reply_timeout, clock=clock)
    transport = StringTransport()
    client.makeConnection(transport)
    return client, transport, clock


def send(client: MQClient, request_kind: str) -> Deferred[Any]:
    """Start a ``put``, ``get`` or ``info`` request."""
    if request_kind == "put":
        return client.put("q", b"m")
    if request_kind == "get":
        return client.get("q", 1)
    assert request_kind == "info"
    return client.info()


def lose(client: MQClient) -> None:
    client.connectionLost(Failure(ConnectionDone("closed")))


# -- request bytes -----------------------------------------------------------


def test_put_bytes_on_the_wire() -> None:
    client, transport = connected()
    client.put("q", b"hello")
    assert transport.value() == (
        b"\x00\x00\x00\x15"
        b"\x00\x00\x00\x03Put"
        b"\x00\x00\x00\x01q"
        b"\x00\x00\x00\x05hello"
    )


def test_put_sends_a_str_name_as_utf8_and_bytes_names_unchanged() -> None:
    client, transport = connected()
    client.put("café", b"\x00\xff")
    client.put(b"\xff\xfe", b"")
    client.put("", b"")
    assert transport.value() == (
        frame(b"Put", "café".encode("utf-8"), b"\x00\xff")
        + frame(b"Put", b"\xff\xfe", b"")
        + b"\x00\x00\x00\x0f\x00\x00\x00\x03Put\x00\x00\x00\x00\x00\x00\x00\x00"
    )


def test_get_bytes_on_the_wire() -> None:
    client, transport = connected()
    client.get("jobs", 1.5)
    assert transport.value() == (
        b"\x00\x00\x00\x17"
        b"\x00\x00\x00\x03Get"
        b"\x00\x00\x00\x04jobs"
        b"\x00\x00\x00\x041500"
    )


@pytest.mark.parametrize(
    "timeout, sent",
    [
        (1.5, b"1500"),
        (0.0009, b"0"),
        (0, b"0"),
        (0.001, b"1"),
        (1.005, b"1005"),
        (2, b"2000"),
        (59.999, b"59999"),
        (-1, b"0"),
        (-0.5, b"0"),
        (-1e12, b"0"),
        (-math.inf, b"0"),
        (3600, b"3600000"),
        (3600.0, b"3600000"),
    ],
)
def test_get_sends_the_timeout_in_whole_milliseconds(timeout: float, sent: bytes) -> None:
    client, transport = connected()
    client.get("q", timeout)
    assert transport.value() == frame(b"Get", b"q", sent)


@pytest.mark.parametrize("timeout", [3600.001, 3601, 1e12, math.inf, math.nan])
def test_get_refuses_a_timeout_above_one_hour_before_sending(timeout: float) -> None:
    client, transport = connected()
    error = failure(client.get("q", timeout), InvalidArgument)
    assert isinstance(error, ValueError)
    assert transport.value() == b""


def test_info_bytes_on_the_wire() -> None:
    client, transport = connected()
    client.info()
    assert transport.value() == b"\x00\x00\x00\x08\x00\x00\x00\x04Info"


def test_disconnect_sends_quit_then_closes() -> None:
    client, transport = connected()
    client.disconnect()
    assert transport.value() == b"\x00\x00\x00\x08\x00\x00\x00\x04Quit"
    assert transport.disconnecting


LONG_NAMES = ["x" * 1025, b"x" * 1025, "é" * 513, b"\xff" * 2000]


@pytest.mark.parametrize("name", LONG_NAMES, ids=["str", "bytes", "str-multibyte", "bytes-2000"])
def test_put_refuses_a_queue_name_over_1024_bytes_before_sending(name: str | bytes) -> None:
    client, transport = connected()
    failure(client.put(name, b"m"), InvalidArgument)
    assert transport.value() == b""


@pytest.mark.parametrize("name", LONG_NAMES, ids=["str", "bytes", "str-multibyte", "bytes-2000"])
def test_get_refuses_a_queue_name_over_1024_bytes_before_sending(name: str | bytes) -> None:
    client, transport = connected()
    failure(client.get(name, 1), InvalidArgument)
    assert transport.value() == b""


@pytest.mark.parametrize("name", ["x" * 1024, b"x" * 1024, "é" * 512])
def test_a_queue_name_of_1024_bytes_is_sent(name: str | bytes) -> None:
    client, transport = connected()
    client.put(name, b"m")
    client.get(name, 1)
    raw = name.encode("utf-8") if isinstance(name, str) else name
    assert transport.value() == frame(b"Put", raw, b"m") + frame(b"Get", raw, b"1000")


def test_a_refused_request_does_not_take_a_reply() -> None:
    client, transport = connected()
    refused = client.get("x" * 1025, 1)
    sent = client.get("q", 1)
    client.dataReceived(frame(b"OK", b"for the second"))
    failure(refused, InvalidArgument)
    assert success(sent) == b"for the second"


# -- replies -----------------------------------------------------------------


def test_put_fires_with_none_on_ok() -> None:
    client, _ = connected()
    done = client.put("q", b"m")
    assert not done.called
    client.dataReceived(frame(b"OK"))
    assert success(done) is None


def test_put_ignores_values_after_ok() -> None:
    client, _ = connected()
    done = client.put("q", b"m")
    client.dataReceived(frame(b"OK", b"extra"))
    assert success(done) is None


@pytest.mark.parametrize("message", [b"hello", b"", b"\x00\xff\x00" * 100])
def test_get_fires_with_the_message(message: bytes) -> None:
    client, _ = connected()
    got = client.get("q", 1)
    assert not got.called
    client.dataReceived(frame(b"OK", message))
    result = success(got)
    assert result == message
    assert type(result) is bytes


def test_get_timeout_reply_is_a_get_timeout() -> None:
    client, _ = connected()
    got = client.get("q", 1)
    client.dataReceived(frame(b"Timeout"))
    error = failure(got, GetTimeout)
    assert not isinstance(error, (ServerError, BadResponse, ConnectionClosed))


@pytest.mark.parametrize("request_kind", ["put", "get", "info"])
@pytest.mark.parametrize(
    "error_type", [b"REQUEST_BAD_TIMEOUT", b"REQUEST_BAD_QUEUE_NAME", b"REQUEST_BAD_PARAMS"]
)
def test_error_reply_is_a_server_error_with_its_type(request_kind: str, error_type: bytes) -> None:
    client, _ = connected()
    pending = send(client, request_kind)
    client.dataReceived(frame(b"Error", error_type))
    error = failure(pending, ServerError)
    assert error.error_type == error_type.decode("ascii")
    assert error_type.decode("ascii") in str(error)


BAD_REPLIES = {
    "put": [[b"Weird"], [], [b"Error"], [b"Timeout"], [b"ok"], [b""]],
    "get": [[b"OK"], [b"Weird"], [b"Weird", b"m"], [], [b"Error"], [b"ok", b"m"]],
    "info": [[b"OK"], [b"Weird"], [], [b"Error"], [b"Timeout"], [b"OK", b"not json"],
             [b"OK", b"[1, 2]"], [b"OK", b'{"NumQueues": 1}'], [b"OK", b"\xff"]],
}


@pytest.mark.parametrize(
    "request_kind, reply",
    [(kind, reply) for kind, replies in BAD_REPLIES.items() for reply in replies],
)
def test_any_other_reply_shape_is_a_bad_response(request_kind: str, reply: list[bytes]) -> None:
    client, transport = connected()
    pending = send(client, request_kind)
    following = client.put("q", b"next")
    client.dataReceived(frame(*reply))
    failure(pending, BadResponse)
    # The stream of replies is still in step: the next reply is the next request's.
    assert not following.called
    client.dataReceived(frame(b"OK"))
    assert success(following) is None
    assert not transport.disconnecting


def test_info_parses_into_server_info() -> None:
    client, _ = connected()
    asked = client.info()
    document = {
        "NumConnections": 3,
        "NumQueues": 2,
        "NumMessages": 16,
        "Queues": {"queue1": {"NumMessages": 10}, "queue2": {"NumMessages": 6}},
        "SomethingNew": {"ignored": True},
    }
    client.dataReceived(frame(b"OK", json.dumps(document).encode()))
    info = success(asked)
    assert info == ServerInfo(
        num_connections=3,
        num_messages=16,
        num_queues=2,
        queues={"queue1": 10, "queue2": 6},
    )
    assert list(info.queues) == ["queue1", "queue2"]


def test_info_with_no_queues() -> None:
    client, _ = connected()
    asked = client.info()
    client.dataReceived(
        frame(b"OK", b'{"NumConnections":1,"NumQueues":0,"NumMessages":0,"Queues":{}}')
    )
    assert success(asked) == ServerInfo(1, 0, 0, {})


# -- pipelining ---------------------------------------------------------------


def test_many_requests_are_written_before_any_reply() -> None:
    client, transport = connected()
    pending: list[Deferred[Any]] = [client.put("q", b"m%d" % i) for i in range(100)]
    pending += [client.get("q", 1) for _ in range(100)]
    pending.append(client.info())
    expected = b"".join(frame(b"Put", b"q", b"m%d" % i) for i in range(100))
    expected += frame(b"Get", b"q", b"1000") * 100 + frame(b"Info")
    assert transport.value() == expected
    assert not any(request.called for request in pending)


def test_replies_are_matched_to_requests_in_order() -> None:
    client, _ = connected()
    put = client.put("q", b"m")
    gets = [client.get("q", 1) for _ in range(5)]
    asked = client.info()
    last = client.put("q", b"m")
    replies = frame(b"OK")
    replies += b"".join(frame(b"OK", b"message %d" % i) for i in range(5))
    replies += frame(b"OK", b'{"NumConnections":1,"NumQueues":1,"NumMessages":7,"Queues":{"q":{"NumMessages":7}}}')
    replies += frame(b"Error", b"REQUEST_BAD_PARAMS")
    client.dataReceived(replies)
    assert success(put) is None
    assert [success(got) for got in gets] == [b"message %d" % i for i in range(5)]
    assert success(asked).num_messages == 7
    assert failure(last, ServerError).error_type == "REQUEST_BAD_PARAMS"


def test_replies_split_into_single_bytes_still_match() -> None:
    client, _ = connected()
    first = client.get("q", 1)
    timed_out = client.get("q", 1)
    third = client.get("q", 1)
    data = frame(b"OK", b"one") + frame(b"Timeout") + frame(b"OK", b"three")
    for i in range(len(data) - 1):
        client.dataReceived(data[i : i + 1])
    assert success(first) == b"one"
    failure(timed_out, GetTimeout)
    assert not third.called
    client.dataReceived(data[-1:])
    assert success(third) == b"three"


def test_a_reply_with_nothing_in_flight_closes_the_connection() -> None:
    client, transport = connected()
    client.dataReceived(frame(b"OK"))
    assert transport.disconnecting


def test_a_reply_announcing_too_many_bytes_fails_pending_and_closes() -> None:
    client, transport = connected()
    got = client.get("q", 1)
    client.dataReceived(pack(">I", 0xFFFFFFFF))
    failure(got, BadResponse)
    assert transport.disconnecting


# -- connection closed ----------------------------------------------------------


def test_connection_lost_fails_every_pending_request() -> None:
    client, _ = connected()
    answered = client.put("q", b"m")
    pending: list[Deferred[Any]] = [client.put("q", b"m"), client.get("q", 1), client.info()]
    client.dataReceived(frame(b"OK"))
    lose(client)
    assert success(answered) is None
    for request in pending:
        error = failure(request, ConnectionClosed)
        assert isinstance(error, MQError)


@pytest.mark.parametrize("request_kind", ["put", "get", "info"])
def test_requests_after_the_connection_closed_fail_at_once(request_kind: str) -> None:
    client, transport = connected()
    lose(client)
    failure(send(client, request_kind), ConnectionClosed)
    assert transport.value() == b""


def test_requests_after_disconnect_fail_at_once() -> None:
    client, transport = connected()
    pending = client.get("q", 1)
    client.disconnect()
    written = transport.value()
    failure(client.put("q", b"m"), ConnectionClosed)
    assert transport.value() == written
    assert not pending.called


def test_disconnect_waits_for_pending_replies() -> None:
    client, transport = connected()
    first = client.get("q", 5)
    second = client.put("q", b"m")
    transport.clear()
    disconnected = client.disconnect()
    assert transport.value() == frame(b"Quit")
    assert not transport.disconnecting
    assert not disconnected.called

    client.dataReceived(frame(b"OK", b"message"))
    assert success(first) == b"message"
    assert not transport.disconnecting

    client.dataReceived(frame(b"OK"))
    assert success(second) is None
    assert transport.disconnecting
    assert not disconnected.called

    lose(client)
    assert success(disconnected) is None


def test_disconnect_fires_when_the_connection_is_lost() -> None:
    client, transport = connected()
    disconnected = client.disconnect()
    assert transport.disconnecting
    assert not disconnected.called
    lose(client)
    assert success(disconnected) is None


def test_disconnect_twice_sends_quit_once() -> None:
    client, transport = connected()
    first = client.disconnect()
    second = client.disconnect()
    assert transport.value() == frame(b"Quit")
    lose(client)
    assert success(first) is None
    assert success(second) is None


def test_disconnect_after_the_connection_closed_fires_at_once() -> None:
    client, transport = connected()
    lose(client)
    assert success(client.disconnect()) is None
    assert transport.value() == b""


def test_server_closing_during_disconnect_fails_the_pending_request() -> None:
    client, _ = connected()
    pending = client.get("q", 5)
    disconnected = client.disconnect()
    lose(client)
    failure(pending, ConnectionClosed)
    assert success(disconnected) is None


# -- against the real server, in memory --------------------------------------------


def test_memory_put_then_get() -> None:
    server = MemoryServer()
    client = server.client()
    put = client.put("jobs", b"one")
    got = client.get("jobs", 1)
    server.flush()
    assert success(put) is None
    assert success(got) == b"one"


def test_memory_fifo_across_clients() -> None:
    server = MemoryServer()
    producer, consumer = server.client(), server.client()
    for i in range(5):
        producer.put(b"\xffbinary", b"%d" % i)
    server.flush()
    gets = [consumer.get(b"\xffbinary", 1) for _ in range(5)]
    server.flush()
    assert [success(got) for got in gets] == [b"0", b"1", b"2", b"3", b"4"]


def test_memory_get_times_out() -> None:
    server = MemoryServer()
    client = server.client()
    got = client.get("empty", 2)
    server.flush()
    server.advance(1.999)
    assert not got.called
    server.advance(0.001)
    failure(got, GetTimeout)


def test_memory_blocking_get_woken_by_another_client() -> None:
    server = MemoryServer()
    consumer, producer = server.client(), server.client()
    got = consumer.get("q", 10)
    server.flush()
    assert not got.called
    producer.put("q", b"wake up")
    server.flush()
    assert success(got) == b"wake up"
    assert server.broker.num_messages == 0


def test_memory_a_waiting_get_holds_up_requests_behind_it() -> None:
    server = MemoryServer()
    client = server.client()
    got = client.get("q", 10)
    put = client.put("q", b"behind")
    server.flush()
    assert not got.called
    assert not put.called
    server.advance(10)
    failure(got, GetTimeout)
    assert success(put) is None
    assert server.broker.num_messages == 1


def test_memory_info() -> None:
    server = MemoryServer()
    first, second = server.client(), server.client()
    first.put("a", b"1")
    first.put("a", b"2")
    waited = second.get("b", 0)
    server.flush()
    server.advance(0.001)
    failure(waited, GetTimeout)
    asked = second.info()
    server.flush()
    assert success(asked) == ServerInfo(
        num_connections=2, num_queues=2, num_messages=2, queues={"a": 2, "b": 0}
    )


def test_memory_disconnect() -> None:
    server = MemoryServer()
    client, other = server.client(), server.client()
    put = client.put("q", b"kept")
    disconnected = client.disconnect()
    server.flush()
    assert success(put) is None
    assert success(disconnected) is None
    assert server.broker.num_connections == 1
    failure(client.get("q", 1), ConnectionClosed)
    got = other.get("q", 1)
    server.flush()
    assert success(got) == b"kept"


def test_memory_disconnect_waits_for_a_blocking_get() -> None:
    server = MemoryServer()
    consumer, producer = server.client(), server.client()
    got = consumer.get("q", 10)
    disconnected = consumer.disconnect()
    server.flush()
    assert not disconnected.called
    producer.put("q", b"last one")
    server.flush()
    assert success(got) == b"last one"
    assert success(disconnected) is None
    assert server.broker.num_connections == 1


def test_memory_server_closing_fails_pending_requests() -> None:
    server = MemoryServer()
    client = server.client()
    got = client.get("q", 10)
    server.flush()
    server.factory.close_connections()
    server.flush()
    failure(got, ConnectionClosed)
    assert success(client.when_closed()) is None


def test_memory_message_of_any_bytes() -> None:
    server = MemoryServer()
    client = server.client()
    message = bytes(range(256)) * 1000
    client.put("q", message)
    got = client.get("q", 1)
    server.flush()
    assert success(got) == message


def test_a_reply_longer_than_the_client_accepts_fails_the_connection() -> None:
    client = MQClient(max_message_bytes=16)
    transport = StringTransport()
    client.makeConnection(transport)
    get = client.get("q")
    reply = encode_frame([b"OK", b"x" * 2000])
    client.dataReceived(reply[:8])
    failure(get, BadResponse)
    assert transport.disconnecting


def test_a_client_for_larger_messages_takes_them() -> None:
    client = MQClient(max_message_bytes=64 * 1024 * 1024)
    client.makeConnection(StringTransport())
    get = client.get("q")
    message = b"y" * (40 * 1024 * 1024)
    client.dataReceived(encode_frame([b"OK", message]))
    assert success(get) == message


# -- reply timeout -------------------------------------------------------------


def test_no_reply_within_the_reply_timeout_fails_every_request_and_closes() -> None:
    client, transport, clock = timed(10)
    pending: list[Deferred[Any]] = [client.put("q", b"m"), client.info(), client.get("q", 0)]
    clock.advance(9.999)
    assert not any(request.called for request in pending)
    assert not transport.disconnecting
    clock.advance(0.001)
    for request in pending:
        error = failure(request, ReplyTimeout)
        assert isinstance(error, MQError)
        assert "10 s" in str(error)
    assert transport.disconnected  # aborted: a hung server may not read our bytes
    assert clock.getDelayedCalls() == []


def test_after_a_reply_timeout_requests_fail_at_once() -> None:
    client, transport, clock = timed(10)
    later: list[Deferred[Any]] = []
    client.put("q", b"m").addErrback(lambda _: later.append(client.put("q", b"again")))
    clock.advance(10)
    written = transport.value()
    failure(later[0], ConnectionClosed)
    failure(client.info(), ConnectionClosed)
    assert transport.value() == written
    lose(client)
    assert clock.getDelayedCalls() == []


def test_each_reply_gives_the_next_request_its_full_time() -> None:
    client, _, clock = timed(10)
    first, second = client.put("q", b"1"), client.put("q", b"2")
    clock.advance(9)
    client.dataReceived(frame(b"OK"))
    assert success(first) is None
    clock.advance(9.999)
    assert not second.called
    clock.advance(0.001)
    failure(second, ReplyTimeout)


def test_part_of_a_long_reply_restarts_the_timeout() -> None:
    client, _, clock = timed(10)
    asked = client.info()
    reply = frame(b"OK", b'{"NumConnections":1,"NumQueues":0,"NumMessages":0,"Queues":{}}')
    for start in range(0, len(reply) - 1, 8):
        clock.advance(9)
        client.dataReceived(reply[start : min(start + 8, len(reply) - 1)])
    clock.advance(9.999)
    assert not asked.called
    client.dataReceived(reply[-1:])
    assert success(asked).num_connections == 1


def test_a_get_whose_reply_has_begun_waits_no_more() -> None:
    client, _, clock = timed(10)
    got = client.get("q", 60)
    clock.advance(5)
    client.dataReceived(frame(b"OK", b"message")[:6])
    clock.advance(9.999)
    assert not got.called
    clock.advance(0.001)
    failure(got, ReplyTimeout)


def test_no_timer_while_nothing_is_in_flight() -> None:
    client, transport, clock = timed(10)
    assert clock.getDelayedCalls() == []
    done = client.put("q", b"m")
    assert len(clock.getDelayedCalls()) == 1
    client.dataReceived(frame(b"OK"))
    assert success(done) is None
    assert clock.getDelayedCalls() == []
    clock.advance(1000)
    assert not transport.disconnecting
    later = client.put("q", b"m")
    clock.advance(10)
    failure(later, ReplyTimeout)


def test_a_waiting_get_extends_the_reply_timeout_by_its_own() -> None:
    client, transport, clock = timed(10)
    got = client.get("q", 60)
    clock.advance(69.999)
    assert not got.called
    assert not transport.disconnecting
    client.dataReceived(frame(b"Timeout"))
    failure(got, GetTimeout)

    cut = client.get("q", 60)
    clock.advance(70)
    failure(cut, ReplyTimeout)


def test_a_get_behind_others_has_its_wait_counted_once_it_is_at_the_head() -> None:
    client, _, clock = timed(10)
    put = client.put("q", b"m")
    got = client.get("other", 60)
    behind = client.put("q", b"m")
    # The Put at the head has the reply timeout alone.
    clock.advance(9)
    client.dataReceived(frame(b"OK"))
    assert success(put) is None
    # Now the Get is at the head: 60 s of waiting, then 10 s for its reply.
    clock.advance(69.999)
    assert not got.called
    client.dataReceived(frame(b"Timeout"))
    failure(got, GetTimeout)
    clock.advance(10)
    failure(behind, ReplyTimeout)


def test_a_get_with_no_timeout_has_the_servers_millisecond() -> None:
    client, _, clock = timed(10)
    got = client.get("q", 0)
    clock.advance(10.0009)
    assert not got.called
    clock.advance(0.0001)
    failure(got, ReplyTimeout)


def test_connection_lost_stops_the_reply_timer() -> None:
    client, _, clock = timed(10)
    pending = client.get("q", 5)
    lose(client)
    failure(pending, ConnectionClosed)
    assert clock.getDelayedCalls() == []


def test_a_failed_connection_stops_the_reply_timer() -> None:
    client, transport, clock = timed(10)
    got = client.get("q", 1)
    client.dataReceived(pack(">I", 0xFFFFFFFF))
    failure(got, BadResponse)
    assert clock.getDelayedCalls() == []


def test_disconnect_with_requests_in_flight_keeps_the_reply_timeout() -> None:
    client, transport, clock = timed(10)
    pending = client.put("q", b"m")
    disconnected = client.disconnect()
    clock.advance(10)
    failure(pending, ReplyTimeout)
    assert transport.disconnected
    lose(client)
    assert success(disconnected) is None


def test_reply_timeout_none_waits_forever() -> None:
    client, _, clock = timed(None)
    pending = client.put("q", b"m")
    assert clock.getDelayedCalls() == []
    clock.advance(10**9)
    assert not pending.called
    client.dataReceived(frame(b"OK"))
    assert success(pending) is None


def test_the_default_reply_timeout() -> None:
    client, _ = connected()
    assert client.reply_timeout == DEFAULT_REPLY_TIMEOUT == 60
    assert client.clock is not None
    pending = client.info()
    client.clock.advance(59.999)  # type: ignore[attr-defined]
    assert not pending.called
    client.clock.advance(0.001)  # type: ignore[attr-defined]
    failure(pending, ReplyTimeout)


@pytest.mark.parametrize("reply_timeout", [0, -1, math.nan, math.inf])
def test_a_reply_timeout_that_is_not_a_positive_number_is_refused(reply_timeout: float) -> None:
    with pytest.raises(ValueError):
        MQClient(reply_timeout=reply_timeout)


def test_connect_times_replies_with_its_reactor() -> None:
    reactor = MemoryReactorClock()
    connecting = connect(reactor, "127.0.0.1:47774", reply_timeout=5)
    host, port, factory, _, _ = reactor.tcpClients[0]
    assert (host, port) == ("127.0.0.1", 47774)
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    client = success(connecting)
    assert client.clock is reactor
    pending = client.put("q", b"m")
    reactor.advance(5)
    failure(pending, ReplyTimeout)


def test_connect_endpoint_takes_a_reply_timeout_and_a_clock() -> None:
    server = MemoryServer()
    connecting = connect_endpoint(server.endpoint(), reply_timeout=3, clock=server.clock)
    client = success(connecting)
    assert client.clock is server.clock
    assert client.reply_timeout == 3
    pending = client.info()
    server.clock.advance(3)  # the server never got the request: nothing was flushed
    failure(pending, ReplyTimeout)
