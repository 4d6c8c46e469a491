"""The Info report: Go-compatible JSON out, tolerant JSON in, and its text layout."""

from __future__ import annotations

import json
from typing import Any, Optional

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from mqmq.errors import BadResponse
from mqmq.wire.info import ServerInfo, encode_info, queue_name_text


def _decode_go_rune(data: bytes, start: int) -> Optional[int]:
    """Length of the valid UTF-8 sequence at ``start`` (as Go's utf8.DecodeRune), or None."""
    for size in (1, 2, 3, 4):
        try:
            if len(data[start : start + size].decode("utf-8")) == 1:
                return size
        except UnicodeDecodeError:
            continue
    return None


def go_json_string(name: bytes) -> bytes:
    """A reference model of Go's encoding/json string encoder (HTML escaping on),
    as the original was built: before Go 1.22, backspace and form feed are
    written \\u0008 and \\u000c (checked against the original server)."""
    out = bytearray(b'"')
    short = {b'"'[0]: b'\\"', b"\\"[0]: b"\\\\", 0x0A: b"\\n", 0x0D: b"\\r", 0x09: b"\\t"}
    index = 0
    while index < len(name):
        byte = name[index]
        if byte < 0x80:
            if byte in short:
                out += short[byte]
            elif byte < 0x20 or byte in b"<>&":
                out += b"\\u00%02x" % byte
            else:
                out.append(byte)
            index += 1
            continue
        size = _decode_go_rune(name, index)
        if size is None:
            out += b"\\ufffd"
            index += 1
            continue
        rune = name[index : index + size]
        if rune == "\u2028".encode():
            out += b"\\u2028"
        elif rune == "\u2029".encode():
            out += b"\\u2029"
        else:
            out += rune
        index += size
    out += b'"'
    return bytes(out)


def go_info(num_connections: int, num_messages: int, queues: dict[bytes, int]) -> bytes:
    """What the original server sends for Info, built from the reference model."""
    entries = b",".join(
        go_json_string(name) + b':{"NumMessages":%d}' % count
        for name, count in sorted(queues.items())
    )
    return (
        b'{"NumConnections":%d,"NumQueues":%d,"NumMessages":%d,"Queues":{%s}}'
        % (num_connections, len(queues), num_messages, entries)
    )


# encode_info: exact bytes


def test_spec_example() -> None:
    assert encode_info(1, 10, {b"MyQueue": 10}) == (
        b'{"NumConnections":1,"NumQueues":1,"NumMessages":10,'
        b'"Queues":{"MyQueue":{"NumMessages":10}}}'
    )


def test_no_queues() -> None:
    assert encode_info(0, 0, {}) == (
        b'{"NumConnections":0,"NumQueues":0,"NumMessages":0,"Queues":{}}'
    )


def test_queue_names_sorted_by_bytes() -> None:
    queues = {b"b": 2, b"a": 1, b"B": 3, b"": 0, b"\xff": 4, b"ab": 5, "\u00e9".encode(): 6}
    encoded = encode_info(3, 21, queues)
    assert encoded == (
        b'{"NumConnections":3,"NumQueues":7,"NumMessages":21,"Queues":{'
        b'"":{"NumMessages":0},'
        b'"B":{"NumMessages":3},'
        b'"a":{"NumMessages":1},'
        b'"ab":{"NumMessages":5},'
        b'"b":{"NumMessages":2},'
        b'"\xc3\xa9":{"NumMessages":6},'
        b'"\\ufffd":{"NumMessages":4}}}'
    )


def test_key_order() -> None:
    document = json.loads(encode_info(2, 5, {b"q": 5}))
    assert list(document) == ["NumConnections", "NumQueues", "NumMessages", "Queues"]


def test_html_characters_escaped_as_go_does() -> None:
    assert encode_info(1, 1, {b"<a&b>": 1}) == (
        b'{"NumConnections":1,"NumQueues":1,"NumMessages":1,'
        b'"Queues":{"\\u003ca\\u0026b\\u003e":{"NumMessages":1}}}'
    )


@pytest.mark.parametrize(
    ("name", "json_string"),
    [
        (b'"', b'"\\""'),
        (b"\\", b'"\\\\"'),
        (b"\n\r\t", b'"\\n\\r\\t"'),
        (b"\x00\x01\x1f", b'"\\u0000\\u0001\\u001f"'),
        (b"\x7f", b'"\x7f"'),
        (b"/", b'"/"'),
        ("\u2028\u2029".encode(), b'"\\u2028\\u2029"'),
        ("caf\u00e9 \u65e5\u672c \U0001f600".encode(), '"caf\u00e9 \u65e5\u672c \U0001f600"'.encode()),
        # A valid U+FFFD in a name is written as itself, as Go does.
        ("\ufffd".encode(), '"\ufffd"'.encode()),
    ],
)
def test_string_escaping(name: bytes, json_string: bytes) -> None:
    assert encode_info(1, 0, {name: 0}) == (
        b'{"NumConnections":1,"NumQueues":1,"NumMessages":0,"Queues":{'
        + json_string
        + b':{"NumMessages":0}}}'
    )


@pytest.mark.parametrize(
    ("name", "decoded"),
    [
        (b"\xff\xfe", "\ufffd\ufffd"),
        (b"\xe2\x82", "\ufffd\ufffd"),
        (b"\xe2\x82x", "\ufffd\ufffdx"),
        (b"\xed\xa0\x80", "\ufffd\ufffd\ufffd"),
        (b"\xc0\xaf", "\ufffd\ufffd"),
        (b"\xf4\x90\x80\x80", "\ufffd\ufffd\ufffd\ufffd"),
        (b"\xf0\x9f\x98", "\ufffd\ufffd\ufffd"),
        (b"a\x80b", "a\ufffdb"),
    ],
)
def test_invalid_utf8_one_replacement_per_byte(name: bytes, decoded: str) -> None:
    assert queue_name_text(name) == decoded
    encoded = encode_info(1, 0, {name: 0})
    assert list(json.loads(encoded)["Queues"]) == [decoded]
    # Go writes the escape \ufffd for each invalid byte, never the raw bytes.
    assert encoded.count(b"\\ufffd") == decoded.count("\ufffd")
    assert "\ufffd".encode() not in encoded


def test_names_differing_in_invalid_bytes_both_listed() -> None:
    encoded = encode_info(1, 3, {b"\xff": 1, b"\xfe": 2})
    assert encoded == (
        b'{"NumConnections":1,"NumQueues":2,"NumMessages":3,"Queues":{'
        b'"\\ufffd":{"NumMessages":2},"\\ufffd":{"NumMessages":1}}}'
    )


@pytest.mark.parametrize(
    "name",
    [b"\xff\xfe", b"\xe2\x82", b"\xed\xa0\x80", b"<&>", "\u2028".encode(), b"\x08\x0c", b"ok"],
)
def test_matches_go_reference_model(name: bytes) -> None:
    assert encode_info(4, 7, {name: 7, b"other": 0}) == go_info(4, 7, {name: 7, b"other": 0})


queue_maps = st.dictionaries(
    st.binary(max_size=24), st.integers(min_value=0, max_value=2**40), max_size=6
)


@given(queue_maps, st.integers(min_value=0, max_value=10_000))
@example({b"\xff\xfe": 1, b"\xe2\x82": 2, b"\xed\xa0\x80": 3}, 1)
def test_encode_info_matches_go(queues: dict[bytes, int], connections: int) -> None:
    total = sum(queues.values())
    assert encode_info(connections, total, queues) == go_info(connections, total, queues)


@given(queue_maps, st.integers(min_value=0, max_value=10_000))
def test_encode_info_is_always_valid_json(queues: dict[bytes, int], connections: int) -> None:
    total = sum(queues.values())
    encoded = encode_info(connections, total, queues)
    encoded.decode("utf-8")  # strict: the reply is valid UTF-8
    document: dict[str, Any] = json.loads(encoded)
    assert document["NumConnections"] == connections
    assert document["NumQueues"] == len(queues)
    assert document["NumMessages"] == total
    # Names that collide once made valid still appear once each in the raw JSON.
    assert encoded.count(b'{"NumMessages":') == len(queues)
    expected = {queue_name_text(name): {"NumMessages": count} for name, count in sorted(queues.items())}
    assert document["Queues"] == expected
    info = ServerInfo.from_json(encoded)
    assert info.num_connections == connections
    assert info.num_queues == len(queues)
    assert info.num_messages == total


@given(st.text(max_size=20))
def test_valid_names_round_trip(name: str) -> None:
    info = ServerInfo.from_json(encode_info(1, 2, {name.encode("utf-8", "surrogatepass"): 2}))
    assert dict(info.queues) == {queue_name_text(name.encode("utf-8", "surrogatepass")): 2}


# ServerInfo.from_json


def test_from_json_spec_example() -> None:
    raw = (
        b'{"NumConnections": 1, "NumQueues": 1, "NumMessages": 10,\n'
        b' "Queues": {"MyQueue": {"NumMessages": 10}}}'
    )
    assert ServerInfo.from_json(raw) == ServerInfo(1, 1, 10, {"MyQueue": 10})


def test_from_json_ignores_unknown_keys() -> None:
    raw = (
        b'{"NumConnections":2,"NumQueues":1,"NumMessages":3,'
        b'"Queues":{"q":{"NumMessages":3,"Oldest":17}},"Uptime":12.5,"Extra":[1,2]}'
    )
    assert ServerInfo.from_json(raw) == ServerInfo(2, 1, 3, {"q": 3})


def test_from_json_keeps_queue_order() -> None:
    raw = encode_info(1, 3, {b"b": 1, b"a": 2, b"c": 0})
    assert list(ServerInfo.from_json(raw).queues.items()) == [("a", 2), ("b", 1), ("c", 0)]


def test_from_json_escapes() -> None:
    raw = encode_info(1, 1, {b"<\xff>": 1})
    assert dict(ServerInfo.from_json(raw).queues) == {"<\ufffd>": 1}


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"{",
        b"[]",
        b"null",
        b"42",
        b'"text"',
        b"\xff\xfe",
        b"{}",
        b'{"NumQueues":0,"NumMessages":0,"Queues":{}}',
        b'{"NumConnections":1,"NumMessages":0,"Queues":{}}',
        b'{"NumConnections":1,"NumQueues":0,"Queues":{}}',
        b'{"NumConnections":null,"NumQueues":0,"NumMessages":0,"Queues":{}}',
        b'{"NumConnections":"x","NumQueues":0,"NumMessages":0,"Queues":{}}',
        b'{"NumConnections":[],"NumQueues":0,"NumMessages":0,"Queues":{}}',
        b'{"NumConnections":1,"NumQueues":1,"NumMessages":0,"Queues":[1]}',
        b'{"NumConnections":1,"NumQueues":1,"NumMessages":0,"Queues":{"q":{}}}',
        b'{"NumConnections":1,"NumQueues":1,"NumMessages":0,"Queues":{"q":3}}',
        b'{"NumConnections":1,"NumQueues":1,"NumMessages":0,"Queues":{"q":{"NumMessages":"x"}}}',
        b'{"NumConnections":1,"NumQueues":0,"NumMessages":0,"Queues":"q"}',
        b'{"NumConnections":NaN,"NumQueues":0,"NumMessages":0,"Queues":{}}',
        b'{"NumConnections":1e400,"NumQueues":0,"NumMessages":0,"Queues":{}}',
        b'{"NumConnections":-Infinity,"NumQueues":0,"NumMessages":0,"Queues":{}}',
        b'{"NumConnections":1' + b"0" * 10_000 + b',"NumQueues":0,"NumMessages":0,"Queues":{}}',
        b'{"NumConnections":1,"NumQueues":0,"NumMessages":0,"Queues":{},"X":'
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}",
    ],
)
def test_from_json_malformed_raises_bad_response(raw: bytes) -> None:
    with pytest.raises(BadResponse):
        ServerInfo.from_json(raw)


@pytest.mark.parametrize("raw", ["é}", '{"NumConnections":1,"Queues":{"q":é}}', "[1,\u2603"])
def test_from_json_going_wrong_at_a_non_ascii_character_says_where(raw: str) -> None:
    with pytest.raises(BadResponse, match="^malformed Info JSON: .*char") as caught:
        ServerInfo.from_json(raw.encode())
    assert "char" in str(caught.value.__cause__)


@given(st.binary(max_size=80))
@example(b'{"NumConnections":1,"NumQueues":0,"NumMessages":0}')
def test_from_json_arbitrary_bytes(raw: bytes) -> None:
    try:
        info = ServerInfo.from_json(raw)
    except BadResponse:
        return
    assert isinstance(info, ServerInfo)


# format_text


def test_format_text_spec_example() -> None:
    info = ServerInfo(3, 2, 16, {"queue1": 10, "queue2": 6})
    assert info.format_text() == (
        "Number of connections: 3\n"
        "Number of queues: 2\n"
        "Number of messages: 16\n"
        "Queues:\n"
        "        queue1: 10\n"
        "        queue2: 6\n"
    )


def test_format_text_without_queues() -> None:
    assert ServerInfo(1, 0, 0, {}).format_text() == (
        "Number of connections: 1\n"
        "Number of queues: 0\n"
        "Number of messages: 0\n"
    )
    assert ServerInfo(1, 0, 0).format_text() == ServerInfo(1, 0, 0, {}).format_text()


def test_format_text_empty_and_odd_names() -> None:
    info = ServerInfo(1, 3, 4, {"": 0, "a b": 4, "\ufffd": 0})
    assert info.format_text().splitlines()[3:] == [
        "Queues:",
        "        : 0",
        "        a b: 4",
        "        \ufffd: 0",
    ]


def test_format_text_from_server_json() -> None:
    raw = encode_info(3, 16, {b"queue2": 6, b"queue1": 10})
    assert ServerInfo.from_json(raw).format_text() == (
        "Number of connections: 3\n"
        "Number of queues: 2\n"
        "Number of messages: 16\n"
        "Queues:\n"
        "        queue1: 10\n"
        "        queue2: 6\n"
    )


def test_control_characters_are_escaped_byte_for_byte_as_the_original_server_does() -> None:
    # Bytes the original Go server sent for this queue name (interop run).
    name = b"ctl\x00\x01\x08\t\n\x0c\r\x1b\x1f"
    assert encode_info(0, 0, {name: 0}) == (
        b'{"NumConnections":0,"NumQueues":1,"NumMessages":0,"Queues":'
        b'{"ctl\\u0000\\u0001\\u0008\\t\\n\\u000c\\r\\u001b\\u001f":{"NumMessages":0}}}'
    )
