"""Parsing the requests of acknowledged delivery: Reserve, Ack, Release,
Touch, Bury and Kick, as the contract (docs/protocol.md) says."""

from __future__ import annotations

from typing import Sequence

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mqmq import errors
from mqmq.errors import RequestError
from mqmq.wire.codec import MAX_QUEUE_NAME_LENGTH
from mqmq.wire.commands import (
    DEFAULT_LEASE_MS,
    MAX_ID_LENGTH,
    MAX_LEASE_MS,
    Ack,
    Bury,
    Command,
    Kick,
    Release,
    Reserve,
    Touch,
    parse_lease,
    parse_request,
    parse_usual_ack,
    parse_usual_reserve,
)
from mqmq.wire.codec import decode_payload, encode_frame


def error_type(values: Sequence[bytes]) -> str:
    with pytest.raises(RequestError) as caught:
        parse_request(values)
    return caught.value.error_type


def test_the_contract_s_numbers() -> None:
    assert DEFAULT_LEASE_MS == 30_000
    assert MAX_LEASE_MS == 43_200_000  # 12 h
    assert MAX_ID_LENGTH == 64
    assert errors.BAD_LEASE == "REQUEST_BAD_LEASE"
    assert errors.UNKNOWN_ID == "REQUEST_UNKNOWN_ID"


@pytest.mark.parametrize(
    ("values", "command"),
    [
        ([b"Reserve", b"q"], Reserve(b"q", 1, 30_000)),  # a missing timeout means 1 ms
        ([b"Reserve", b"q", b"250"], Reserve(b"q", 250, 30_000)),
        ([b"Reserve", b"q", b"0", b"5000"], Reserve(b"q", 1, 5_000)),  # below 1 ms: 1, as Get
        ([b"Reserve", b"q", b"-7", b"+1"], Reserve(b"q", 1, 1)),
        ([b"Reserve", b"q", b"10", b"43200000"], Reserve(b"q", 10, MAX_LEASE_MS)),
        ([b"Reserve", b"q", b"10", b"60000", b"extra"], Reserve(b"q", 10, 60_000)),
        ([b"Ack", b"q", b"17"], Ack(b"q", b"17")),
        ([b"Ack", b"", b"id-x"], Ack(b"", b"id-x")),
        ([b"Release", b"q", b"17"], Release(b"q", b"17", 0)),  # an absent delay means 0
        ([b"Release", b"q", b"17", b"0"], Release(b"q", b"17", 0)),
        ([b"Release", b"q", b"17", b"43200000"], Release(b"q", b"17", MAX_LEASE_MS)),
        ([b"Touch", b"q", b"17"], Touch(b"q", b"17", 30_000)),  # an absent lease means 30 s
        ([b"Touch", b"q", b"17", b"1"], Touch(b"q", b"17", 1)),
        ([b"Bury", b"q", b"17"], Bury(b"q", b"17")),
        ([b"Kick", b"q"], Kick(b"q", 1)),  # an absent count means 1
        ([b"Kick", b"q", b"5"], Kick(b"q", 5)),
        ([b"Kick", b"q", b"0"], Kick(b"q", 1)),  # below 1 means 1
        ([b"Kick", b"q", b"-3"], Kick(b"q", 1)),
        ([b"Kick", b"q", b"9223372036854775807"], Kick(b"q", 2**63 - 1)),
    ],
)
def test_requests(values: list[bytes], command: Command) -> None:
    assert parse_request(values) == command


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ([b"Reserve"], errors.BAD_PARAMS),
        ([b"Kick"], errors.BAD_PARAMS),
        ([b"Ack", b"q"], errors.BAD_PARAMS),
        ([b"Release", b"q"], errors.BAD_PARAMS),
        ([b"Touch", b"q"], errors.BAD_PARAMS),
        ([b"Bury", b"q"], errors.BAD_PARAMS),
        ([b"Reserve", b"q" * (MAX_QUEUE_NAME_LENGTH + 1)], errors.BAD_QUEUE_NAME),
        ([b"Ack", b"q" * (MAX_QUEUE_NAME_LENGTH + 1), b"1"], errors.BAD_QUEUE_NAME),
        ([b"Kick", b"q" * (MAX_QUEUE_NAME_LENGTH + 1)], errors.BAD_QUEUE_NAME),
        ([b"Reserve", b"q", b"soon"], errors.BAD_TIMEOUT),
        ([b"Reserve", b"q", b"3600001"], errors.BAD_TIMEOUT),
        ([b"Reserve", b"q", b"10", b"0"], errors.BAD_LEASE),
        ([b"Reserve", b"q", b"10", b"-1"], errors.BAD_LEASE),
        ([b"Reserve", b"q", b"10", b"43200001"], errors.BAD_LEASE),
        ([b"Reserve", b"q", b"10", b"1.5"], errors.BAD_LEASE),
        ([b"Reserve", b"q", b"10", b""], errors.BAD_LEASE),
        ([b"Reserve", b"q", b"10", b"99999999999999999999"], errors.BAD_LEASE),
        ([b"Touch", b"q", b"1", b"0"], errors.BAD_LEASE),
        ([b"Release", b"q", b"1", b"-1"], errors.BAD_LEASE),
        ([b"Release", b"q", b"1", b"43200001"], errors.BAD_LEASE),
        ([b"Release", b"q", b"1", b"later"], errors.BAD_LEASE),
        ([b"Kick", b"q", b"many"], errors.BAD_PARAMS),
        ([b"Kick", b"q", b"99999999999999999999"], errors.BAD_PARAMS),
        # No id this long, or not ASCII, is ever held: it is unknown.
        ([b"Ack", b"q", b"1" * (MAX_ID_LENGTH + 1)], errors.UNKNOWN_ID),
        ([b"Bury", b"q", b"\xff"], errors.UNKNOWN_ID),
        # The case of a command matters, as for the original's.
        ([b"reserve", b"q"], errors.UNKNOWN_COMMAND),
        ([b"ACK", b"q", b"1"], errors.UNKNOWN_COMMAND),
    ],
)
def test_bad_requests(values: list[bytes], error: str) -> None:
    assert error_type(values) == error


@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_a_lease_is_a_number_of_ms_from_1_to_12_hours(value: int) -> None:
    raw = str(value).encode()
    if 1 <= value <= MAX_LEASE_MS:
        assert parse_lease(raw) == value
    else:
        with pytest.raises(RequestError) as caught:
            parse_lease(raw)
        assert caught.value.error_type == errors.BAD_LEASE


# The usual Reserve and Ack, parsed without parse_request: whenever those
# answer, parse_request says the same; and they answer for the usual shapes.

numbers = st.one_of(
    st.integers(0, 10**21).map(lambda n: b"%d" % n),
    st.sampled_from([b"", b"0", b"00", b"007", b"+5", b"-1", b" 1", b"1 ", b"\xc2\xb2", b"3600000",
                     b"3600001", b"43200000", b"43200001", b"99999999", b"18446744073709551616"]),
    st.binary(max_size=4),
)
queues = st.one_of(st.binary(max_size=8), st.sampled_from([b"q" * MAX_QUEUE_NAME_LENGTH,
                                                           b"q" * (MAX_QUEUE_NAME_LENGTH + 1)]))


@settings(max_examples=300)
@given(command=st.sampled_from([b"Ack", b"Reserve", b"Release", b"Acks", b"Reserv"]), queue=queues,
       rest=st.lists(numbers, max_size=3), cut=st.integers(0, 8))
@example(command=b"Ack", queue=b"q", rest=[b"007"], cut=0)
@example(command=b"Reserve", queue=b"q", rest=[b"3600001"], cut=0)
@example(command=b"Reserve", queue=b"q", rest=[b"5", b"43200001"], cut=0)
@example(command=b"Reserve", queue=b"q" * (MAX_QUEUE_NAME_LENGTH + 1), rest=[b"5"], cut=0)
def test_the_usual_reserve_and_ack_parse_as_parse_request_does(
    command: bytes, queue: bytes, rest: list[bytes], cut: int,
) -> None:
    payload = encode_frame([command, queue, *rest])[4:]
    for candidate in (payload, payload[:len(payload) - cut]):
        try:
            values = decode_payload(candidate)
            expected: object = parse_request(values)
        except (RequestError, errors.MalformedFrame) as error:
            expected = type(error)
        acked, reserve = parse_usual_ack(candidate), parse_usual_reserve(candidate)
        if acked is not None:
            assert expected == Ack(acked[0], b"%d" % acked[1])
        if reserve is not None:
            assert expected == reserve


def test_the_usual_shapes_take_the_short_way() -> None:
    assert parse_usual_ack(encode_frame([b"Ack", b"q", b"12345"])[4:]) == (b"q", 12345)
    assert parse_usual_reserve(encode_frame([b"Reserve", b"q", b"0"])[4:]) == Reserve(b"q", 1, DEFAULT_LEASE_MS)
    assert parse_usual_reserve(encode_frame([b"Reserve", b"", b"250", b"60000"])[4:]) == Reserve(b"", 250, 60000)
