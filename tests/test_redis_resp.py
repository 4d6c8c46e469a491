"""RESP2: the parser, however the bytes are cut, and the command encoder.
The expected bytes are written out by hand or by :func:`wire`, an encoder of
the tests' own, not by mqmq.redis.resp."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given, strategies as st

from mqmq.redis.resp import Parser, ProtocolError, RedisError, encode


def wire(value: Any) -> bytes:
    """A reply as Redis writes it: bytes → bulk, ('+', text) → simple, ('-', text) → error."""
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, bytes):
        return b"$" + str(len(value)).encode() + b"\r\n" + value + b"\r\n"
    if isinstance(value, int):
        return b":" + str(value).encode() + b"\r\n"
    if isinstance(value, tuple):
        return value[0].encode() + value[1].encode() + b"\r\n"
    return b"*" + str(len(value)).encode() + b"\r\n" + b"".join(wire(item) for item in value)


def expected(value: Any) -> Any:
    """What the parser gives for a :func:`wire` value (errors as ('-', text))."""
    if isinstance(value, tuple):
        return value[1].encode() if value[0] == "+" else value
    if isinstance(value, list):
        return [expected(item) for item in value]
    return value


def comparable(reply: Any) -> Any:
    """A parsed reply with errors as ('-', text), so that it compares."""
    if isinstance(reply, RedisError):
        return ("-", str(reply))
    if isinstance(reply, list):
        return [comparable(item) for item in reply]
    return reply


def parse_in_pieces(data: bytes, cuts: list[int]) -> list[Any]:
    parser = Parser()
    replies: list[Any] = []
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        replies.extend(parser.feed(data[start:cut]))
        start = cut
    return [comparable(reply) for reply in replies]


EVERY_KIND = [
    ("+", "OK"),
    ("-", "NOSCRIPT No matching script. Please use EVAL."),
    0,
    -42,
    12345678901234567890,
    b"hello",
    b"",
    b"with\r\nCRLF inside",
    None,
    [],
    [b"a", 1, None, [b"nested", [2, ("+", "deep")]], ("-", "ERR in an array")],
]


@pytest.mark.parametrize("value", EVERY_KIND, ids=repr)
def test_each_kind_of_reply_whole(value: Any) -> None:
    assert [comparable(reply) for reply in Parser().feed(wire(value))] == [expected(value)]


def test_nil_array() -> None:
    assert Parser().feed(b"*-1\r\n") == [None]


def test_an_error_reply_is_a_redis_error_with_redis_text() -> None:
    (reply,) = Parser().feed(b"-OOM command not allowed\r\n")
    assert isinstance(reply, RedisError)
    assert str(reply) == "OOM command not allowed"


def test_every_kind_split_at_every_byte() -> None:
    stream = b"".join(wire(value) for value in EVERY_KIND)
    want = [expected(value) for value in EVERY_KIND]
    for cut in range(len(stream) + 1):
        assert parse_in_pieces(stream, [cut]) == want, cut
    # One byte at a time.
    assert parse_in_pieces(stream, list(range(len(stream)))) == want


def test_nothing_comes_before_a_reply_is_complete() -> None:
    parser = Parser()
    assert parser.feed(b"*2\r\n$3\r\nabc\r\n") == []
    assert parser.feed(b":7") == []
    assert parser.feed(b"\r\n:8\r\n") == [[b"abc", 7], 8]


scalars = st.one_of(
    st.binary(max_size=40),
    st.none(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.tuples(st.sampled_from(["+", "-"]), st.text(alphabet="abcXYZ 019:_-", max_size=20)),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5), max_leaves=25)


@given(st.lists(values, min_size=1, max_size=6), st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
def test_any_replies_cut_anywhere(replies: list[Any], cuts: list[int]) -> None:
    stream = b"".join(wire(value) for value in replies)
    assert parse_in_pieces(stream, [cut % (len(stream) + 1) for cut in cuts]) == [
        expected(value) for value in replies]


def test_a_long_bulk_string_in_many_reads_is_joined_once() -> None:
    # Joined again on each read, 4 MiB in 1 KiB reads would copy gigabytes.
    body = bytes(range(256)) * 16384
    data = wire(body)
    parser = Parser()
    started = time.perf_counter()
    replies: list[Any] = []
    for start in range(0, len(data), 1024):
        replies.extend(parser.feed(data[start:start + 1024]))
    assert replies == [body]
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize("data", [
    b"!3\r\nabc\r\n",          # a type RESP2 does not have
    b"$3\r\nabcd\r\n",         # a bulk string longer than it said
    b"$x\r\nabc\r\n",          # a length that is not a number
    b":12a\r\n",               # an integer that is not one
    b"*2\r\n:1\r\n%0\r\n",     # an unknown type inside an array
])
def test_what_is_not_resp2_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        Parser().feed(data)


def test_a_line_without_end_is_a_protocol_error() -> None:
    parser = Parser()
    assert parser.feed(b"+" + b"x" * (Parser.MAX_LINE - 1)) == []
    with pytest.raises(ProtocolError):
        parser.feed(b"x")


def test_encode_writes_an_array_of_bulk_strings() -> None:
    assert encode((b"SET", b"key", b"")) == b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$0\r\n\r\n"


def test_encode_converts_text_numbers_and_byte_buffers() -> None:
    assert encode(("GET", "clé", 12, -3, 1.5, True, bytearray(b"ba"), memoryview(b"mv"))) == (
        b"*8\r\n$3\r\nGET\r\n$4\r\ncl\xc3\xa9\r\n$2\r\n12\r\n$2\r\n-3\r\n$3\r\n1.5\r\n"
        b"$1\r\n1\r\n$2\r\nba\r\n$2\r\nmv\r\n")


def test_encode_refuses_other_types() -> None:
    with pytest.raises(TypeError, match="not NoneType"):
        encode((b"SET", None))  # type: ignore[arg-type]


@given(st.lists(st.binary(max_size=30), min_size=1, max_size=8))
def test_an_encoded_command_parses_back_as_its_arguments(args: list[bytes]) -> None:
    assert Parser().feed(encode(args)) == [args]
