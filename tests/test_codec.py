"""The wire codec: frames of length-prefixed binary values, byte for byte."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqmq.wire.codec import (
    MAX_FRAME_LENGTH,
    MAX_MESSAGE_LENGTH,
    MAX_QUEUE_NAME_LENGTH,
    decode_frames,
    decode_payload,
    encode_frame,
    encode_payload,
    max_frame_length,
)
from mqmq.errors import MalformedFrame

values_strategy = st.lists(st.binary(max_size=64), max_size=12)
frames_strategy = st.lists(values_strategy, max_size=8)


# Round trips


@given(values_strategy)
def test_payload_round_trip(values: list[bytes]) -> None:
    assert decode_payload(encode_payload(values)) == values


@given(values_strategy)
def test_frame_round_trip(values: list[bytes]) -> None:
    assert decode_frames(encode_frame(values)) == ([values], b"")


@given(frames_strategy)
def test_many_frames_in_one_buffer(frames: list[list[bytes]]) -> None:
    data = b"".join(encode_frame(values) for values in frames)
    assert decode_frames(data) == (frames, b"")


@given(values_strategy)
def test_frame_is_length_prefix_then_payload(values: list[bytes]) -> None:
    payload = encode_payload(values)
    frame = encode_frame(values)
    assert frame == len(payload).to_bytes(4, "big") + payload
    assert len(payload) == sum(4 + len(value) for value in values)


def test_encode_accepts_any_iterable() -> None:
    assert encode_payload(iter([b"a", b"bc"])) == b"\x00\x00\x00\x01a\x00\x00\x00\x02bc"
    assert encode_frame(value for value in [b"Info"]) == b"\x00\x00\x00\x08\x00\x00\x00\x04Info"


# Exact layouts


def test_put_frame_bytes() -> None:
    expected = (
        b"\x00\x00\x00\x15"  # 21 bytes follow
        b"\x00\x00\x00\x03" b"Put"
        b"\x00\x00\x00\x01" b"q"
        b"\x00\x00\x00\x05" b"hello"
    )
    assert encode_frame([b"Put", b"q", b"hello"]) == expected
    assert decode_frames(expected) == ([[b"Put", b"q", b"hello"]], b"")


def test_get_frame_bytes() -> None:
    expected = (
        b"\x00\x00\x00\x18"  # 24 bytes follow
        b"\x00\x00\x00\x03" b"Get"
        b"\x00\x00\x00\x05" b"queue"
        b"\x00\x00\x00\x04" b"1000"
    )
    assert encode_frame([b"Get", b"queue", b"1000"]) == expected


def test_reply_frame_bytes() -> None:
    assert encode_frame([b"OK"]) == b"\x00\x00\x00\x06\x00\x00\x00\x02OK"
    assert encode_frame([b"Error", b"REQUEST_BAD_PARAMS"]) == (
        b"\x00\x00\x00\x1f\x00\x00\x00\x05Error\x00\x00\x00\x12REQUEST_BAD_PARAMS"
    )


def test_empty_frame_is_four_zero_bytes() -> None:
    assert encode_frame([]) == b"\x00\x00\x00\x00"
    assert encode_payload([]) == b""
    assert decode_payload(b"") == []
    assert decode_frames(b"\x00\x00\x00\x00") == ([[]], b"")


def test_empty_values() -> None:
    assert encode_frame([b""]) == b"\x00\x00\x00\x04\x00\x00\x00\x00"
    assert encode_frame([b"", b""]) == b"\x00\x00\x00\x08" + b"\x00" * 8
    assert decode_payload(b"\x00" * 12) == [b"", b"", b""]


def test_binary_values_kept_verbatim() -> None:
    value = bytes(range(256))
    payload = encode_payload([value])
    assert payload == b"\x00\x00\x01\x00" + value
    assert decode_payload(payload) == [value]


def test_large_value_length_big_endian() -> None:
    value = b"x" * 0x010203
    assert encode_payload([value])[:4] == b"\x00\x01\x02\x03"


# Limits


def test_max_frame_length() -> None:
    assert MAX_QUEUE_NAME_LENGTH == 1024
    assert MAX_MESSAGE_LENGTH == 32 * 1024 * 1024
    assert MAX_FRAME_LENGTH == 33_555_471
    assert max_frame_length(MAX_MESSAGE_LENGTH) == MAX_FRAME_LENGTH
    assert max_frame_length(0) == MAX_FRAME_LENGTH - MAX_MESSAGE_LENGTH


def test_largest_put_fits_max_frame_length_exactly() -> None:
    payload = encode_payload(
        [b"Put", b"n" * MAX_QUEUE_NAME_LENGTH, b"m" * MAX_MESSAGE_LENGTH]
    )
    assert len(payload) == MAX_FRAME_LENGTH


# Malformed payloads


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\x00", id="1-byte-length"),
        pytest.param(b"\x00\x00", id="2-byte-length"),
        pytest.param(b"\x00\x00\x00", id="3-byte-length"),
        pytest.param(b"\x00\x00\x00\x01", id="value-missing"),
        pytest.param(b"\x00\x00\x00\x05abcd", id="value-one-short"),
        pytest.param(b"\xff\xff\xff\xffabc", id="huge-length"),
        pytest.param(b"\x00\x00\x00\x01a\x00", id="valid-then-1-byte"),
        pytest.param(b"\x00\x00\x00\x01a\x00\x00", id="valid-then-2-bytes"),
        pytest.param(b"\x00\x00\x00\x01a\x00\x00\x00", id="valid-then-3-bytes"),
        pytest.param(b"\x00\x00\x00\x00\x00\x00\x00\x02a", id="empty-then-short"),
    ],
)
def test_malformed_payload_raises(payload: bytes) -> None:
    with pytest.raises(MalformedFrame):
        decode_payload(payload)


@given(values_strategy, st.integers(min_value=1, max_value=3))
def test_trailing_bytes_too_few_for_a_length(values: list[bytes], extra: int) -> None:
    with pytest.raises(MalformedFrame):
        decode_payload(encode_payload(values) + b"\x00" * extra)


@given(st.lists(st.binary(max_size=32), min_size=1, max_size=8), st.data())
def test_value_past_the_end_raises(values: list[bytes], data: st.DataObject) -> None:
    payload = encode_payload(values)
    # Cutting anywhere except a value boundary leaves a short length or value.
    boundaries = {0}
    offset = 0
    for value in values:
        offset += 4 + len(value)
        boundaries.add(offset)
    cut = data.draw(
        st.integers(min_value=1, max_value=len(payload) - 1).filter(
            lambda index: index not in boundaries
        )
    )
    with pytest.raises(MalformedFrame):
        decode_payload(payload[:cut])


@given(st.binary(max_size=64), st.integers(min_value=1, max_value=2**32 - 1))
def test_overlong_value_length_raises(tail: bytes, excess: int) -> None:
    length = min(len(tail) + excess, 2**32 - 1)
    with pytest.raises(MalformedFrame):
        decode_payload(length.to_bytes(4, "big") + tail)


@given(st.binary(max_size=200))
def test_arbitrary_payload_decodes_or_is_malformed(payload: bytes) -> None:
    try:
        values = decode_payload(payload)
    except MalformedFrame:
        return
    # Whatever decodes re-encodes to exactly the input.
    assert encode_payload(values) == payload


@given(st.lists(st.sampled_from([b"\x00", b"\x01", b"\x02", b"\x03", b"\x04", b"a"]), max_size=40))
def test_length_heavy_payload_decodes_or_is_malformed(parts: list[bytes]) -> None:
    payload = b"".join(parts)
    try:
        values = decode_payload(payload)
    except MalformedFrame:
        return
    assert encode_payload(values) == payload


def test_malformed_frame_in_decode_frames_raises() -> None:
    data = encode_frame([b"OK"]) + b"\x00\x00\x00\x02\x00\x00"
    with pytest.raises(MalformedFrame):
        decode_frames(data)


# Partial input


def test_incomplete_frames_left_over() -> None:
    assert decode_frames(b"") == ([], b"")
    assert decode_frames(b"\x00\x00\x00") == ([], b"\x00\x00\x00")
    assert decode_frames(b"\x00\x00\x00\x06\x00\x00\x00\x02O") == (
        [],
        b"\x00\x00\x00\x06\x00\x00\x00\x02O",
    )
    whole = encode_frame([b"OK"])
    assert decode_frames(whole + whole[:5]) == ([[b"OK"]], whole[:5])


def _feed(chunks: list[bytes]) -> list[list[bytes]]:
    """Decode a stream arriving in chunks, as a receiver would buffer it."""
    frames: list[list[bytes]] = []
    buffer = b""
    for chunk in chunks:
        decoded, buffer = decode_frames(buffer + chunk)
        frames.extend(decoded)
    assert buffer == b""
    return frames


def test_split_at_every_point() -> None:
    frames = [[b"Put", b"q", b"hello"], [], [b""], [b"Get", b"q", b"5"], [b"Info"]]
    data = b"".join(encode_frame(values) for values in frames)
    for cut in range(len(data) + 1):
        assert _feed([data[:cut], data[cut:]]) == frames, cut
    assert _feed([data[index : index + 1] for index in range(len(data))]) == frames


@given(frames_strategy, st.data())
def test_split_anywhere(frames: list[list[bytes]], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(values) for values in frames)
    cuts = sorted(
        data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=10))
    )
    chunks = [stream[start:end] for start, end in zip([0, *cuts], [*cuts, len(stream)])]
    assert _feed(chunks) == frames
