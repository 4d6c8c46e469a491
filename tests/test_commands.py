"""Parsing client frames into commands, and Get timeouts as Go's strconv.Atoi."""

from __future__ import annotations

import time
from typing import Optional, Sequence

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from mqmq import errors
from mqmq.wire.commands import (
    MAX_TIMEOUT_MS,
    MIN_TIMEOUT_MS,
    Ack,
    Bury,
    Command,
    Get,
    Info,
    Kick,
    Put,
    Quit,
    Release,
    Reserve,
    Touch,
    parse_request,
    parse_timeout,
)
from mqmq.errors import RequestError

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def _error_type(values: Sequence[bytes]) -> str:
    with pytest.raises(RequestError) as caught:
        parse_request(values)
    return caught.value.error_type


def _timeout_error(raw: bytes) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse_timeout(raw)
    return caught.value


# Commands


def test_constants() -> None:
    assert MAX_TIMEOUT_MS == 3_600_000
    assert MIN_TIMEOUT_MS == 1
    assert errors.UNKNOWN_COMMAND == "REQUEST_UNKNOWN_COMMAND"
    assert errors.BAD_PARAMS == "REQUEST_BAD_PARAMS"
    assert errors.BAD_QUEUE_NAME == "REQUEST_BAD_QUEUE_NAME"
    assert errors.BAD_TIMEOUT == "REQUEST_BAD_TIMEOUT"


@pytest.mark.parametrize(
    ("values", "command"),
    [
        ([b"Put", b"q", b"hello"], Put(b"q", b"hello")),
        ([b"Put", b"", b""], Put(b"", b"")),
        ([b"Put", b"\xff\x00", b"\x00\x01"], Put(b"\xff\x00", b"\x00\x01")),
        ([b"Get", b"q", b"250"], Get(b"q", 250)),
        ([b"Get", b"q"], Get(b"q", 1)),
        ([b"Get", b""], Get(b"", 1)),
        ([b"Get", b"q", b"3600000"], Get(b"q", 3_600_000)),
        ([b"Info"], Info()),
        ([b"Quit"], Quit()),
    ],
)
def test_parse_request(values: list[bytes], command: Command) -> None:
    assert parse_request(values) == command


@pytest.mark.parametrize(
    ("values", "command"),
    [
        ([b"Put", b"q", b"m", b"extra", b""], Put(b"q", b"m")),
        ([b"Get", b"q", b"5", b"extra"], Get(b"q", 5)),
        ([b"Info", b"extra"], Info()),
        ([b"Quit", b"extra", b"more"], Quit()),
    ],
)
def test_extra_values_ignored(values: list[bytes], command: Command) -> None:
    assert parse_request(values) == command


def test_get_without_timeout_waits_one_millisecond() -> None:
    command = parse_request([b"Get", b"q"])
    assert isinstance(command, Get)
    assert command.timeout_ms == 1


def test_get_extra_value_after_bad_timeout_still_refused() -> None:
    assert _error_type([b"Get", b"q", b"soon", b"5"]) == errors.BAD_TIMEOUT


@pytest.mark.parametrize(
    "values",
    [[b"Put"], [b"Put", b"q"], [b"Get"]],
)
def test_bad_params(values: list[bytes]) -> None:
    assert _error_type(values) == errors.BAD_PARAMS


@pytest.mark.parametrize("command", [b"Put", b"Get"])
def test_queue_name_of_1024_bytes_accepted(command: bytes) -> None:
    name = b"n" * 1024
    parsed = parse_request([command, name, b"10"])
    assert isinstance(parsed, (Put, Get))
    assert parsed.queue == name


@pytest.mark.parametrize(
    "values",
    [
        [b"Put", b"n" * 1025, b"m"],
        [b"Get", b"n" * 1025],
        [b"Get", b"n" * 1025, b"10"],
        [b"Put", b"\xff" * 4096, b""],
    ],
)
def test_bad_queue_name(values: list[bytes]) -> None:
    assert _error_type(values) == errors.BAD_QUEUE_NAME


@pytest.mark.parametrize(
    "values",
    [
        [b"Get", b"q", b"3600001"],
        [b"Get", b"q", b"soon"],
        [b"Get", b"q", b""],
        [b"Get", b"q", b"1.5"],
    ],
)
def test_bad_timeout(values: list[bytes]) -> None:
    assert _error_type(values) == errors.BAD_TIMEOUT


@pytest.mark.parametrize(
    "values",
    [
        [],
        [b""],
        [b"put", b"q", b"m"],
        [b"PUT", b"q", b"m"],
        [b"get", b"q"],
        [b"GET", b"q"],
        [b"info"],
        [b"INFO"],
        [b"quit"],
        [b"Info "],
        [b" Info"],
        [b"Info\x00"],
        [b"Puts", b"q", b"m"],
        [b"Delete", b"q"],
        [b"\xff\xfe"],
    ],
)
def test_unknown_command(values: list[bytes]) -> None:
    assert _error_type(values) == errors.UNKNOWN_COMMAND


def test_request_error_carries_type_and_message() -> None:
    with pytest.raises(RequestError) as caught:
        parse_request([b"Put", b"q"])
    assert caught.value.error_type == "REQUEST_BAD_PARAMS"
    assert "REQUEST_BAD_PARAMS" in str(caught.value)
    assert isinstance(caught.value, errors.MQError)


@given(st.lists(st.binary(max_size=12), max_size=5))
@example([])
@example([b"Get", b"q", b"-"])
@example([b"Kick", b"q"])
@example([b"Ack", b"q", b"\xff"])
def test_parse_request_never_fails_otherwise(values: list[bytes]) -> None:
    try:
        command = parse_request(values)
    except RequestError as error:
        assert error.error_type in {
            errors.UNKNOWN_COMMAND,
            errors.BAD_PARAMS,
            errors.BAD_QUEUE_NAME,
            errors.BAD_TIMEOUT,
            errors.BAD_LEASE,
            errors.UNKNOWN_ID,
        }
        return
    assert isinstance(command, (Put, Get, Info, Quit, Reserve, Ack, Release, Touch, Bury, Kick))
    assert values[0] in {b"Put", b"Get", b"Info", b"Quit",
                         b"Reserve", b"Ack", b"Release", b"Touch", b"Bury", b"Kick"}


# Timeouts, as Go's strconv.Atoi


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"5", 5),
        (b"+5", 5),
        (b"-5", 1),
        (b"0", 1),
        (b"+0", 1),
        (b"-0", 1),
        (b"1", 1),
        (b"2", 2),
        (b"3599999", 3_599_999),
        (b"3600000", 3_600_000),
        (b"+3600000", 3_600_000),
        (b"000000000000000000000000005", 5),
        (b"-000000000000000000000000005", 1),
        (b"0000000000000000000000003600000", 3_600_000),
        (b"-9223372036854775808", 1),
        (b"-9223372036854775807", 1),
        (b"-" + b"0" * 10_000 + b"9223372036854775808", 1),
        (b"0" * 10_000 + b"7", 7),
    ],
)
def test_timeout_accepted(raw: bytes, expected: int) -> None:
    assert parse_timeout(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"3600001",
        b"+3600001",
        b"99999999",
        b"9223372036854775807",
        b"9223372036854775808",
        b"-9223372036854775809",
        b"18446744073709551616",
        b"-18446744073709551617",
        b"",
        b"+",
        b"-",
        b"+-5",
        b"-+5",
        b"--5",
        b"++5",
        b" 5",
        b"5 ",
        b"\t5",
        b"5\n",
        b"\n5",
        b"5_0",
        b"5.0",
        b"5e3",
        b"0x10",
        b"0b1",
        b"0o7",
        b"1,000",
        "\u0663".encode(),  # ARABIC-INDIC DIGIT THREE
        "\uff15".encode(),  # FULLWIDTH DIGIT FIVE
        "\u0663".encode("utf-16-be"),
        b"\xb3",  # SUPERSCRIPT THREE in Latin-1
        b"5\x00",
        b"\x005",
        b"five",
        b"NaN",
        b"inf",
    ],
)
def test_timeout_refused(raw: bytes) -> None:
    assert _timeout_error(raw).error_type == errors.BAD_TIMEOUT


@pytest.mark.parametrize(
    "raw",
    [
        b"1" * 10_000,
        b"-" + b"1" * 10_000,
        b"+" + b"9" * 10_000,
        b"1" * 10_000 + b"x",
        b"0" * 5_000 + b"1" * 5_000,
    ],
)
def test_huge_timeout_refused_quickly(raw: bytes) -> None:
    started = time.perf_counter()
    assert _timeout_error(raw).error_type == errors.BAD_TIMEOUT
    assert time.perf_counter() - started < 0.1


def test_huge_timeout_through_parse_request() -> None:
    assert _error_type([b"Get", b"q", b"7" * 10_000]) == errors.BAD_TIMEOUT


def reference_timeout(raw: bytes) -> Optional[int]:
    """What the original makes of a timeout: milliseconds, or None if refused."""
    sign = 1
    digits = raw
    if digits[:1] in (b"+", b"-"):
        sign = -1 if digits[:1] == b"-" else 1
        digits = digits[1:]
    if not digits or any(byte not in b"0123456789" for byte in digits):
        return None
    magnitude = 0
    for byte in digits:
        magnitude = magnitude * 10 + (byte - ord("0"))
    value = sign * magnitude
    if not INT64_MIN <= value <= INT64_MAX:
        return None
    if value > MAX_TIMEOUT_MS:
        return None
    return max(value, 1)


def _parse_or_none(raw: bytes) -> Optional[int]:
    try:
        result = parse_timeout(raw)
    except RequestError as error:
        assert error.error_type == errors.BAD_TIMEOUT
        return None
    assert type(result) is int
    assert MIN_TIMEOUT_MS <= result <= MAX_TIMEOUT_MS
    return result


number_like = st.builds(
    lambda sign, zeros, digits, suffix: sign + b"0" * zeros + digits + suffix,
    st.sampled_from([b"", b"+", b"-", b"--", b"+-", b" "]),
    st.integers(min_value=0, max_value=30),
    st.one_of(
        st.integers(min_value=0, max_value=2**70).map(lambda n: str(n).encode()),
        st.integers(min_value=2**63 - 3, max_value=2**63 + 3).map(lambda n: str(n).encode()),
        st.integers(min_value=3_599_990, max_value=3_600_010).map(lambda n: str(n).encode()),
        st.text(alphabet="0123456789", max_size=40).map(str.encode),
    ),
    st.sampled_from([b"", b"", b"", b" ", b"\n", b"_0", b".0", b"x"]),
)


@given(st.one_of(st.binary(max_size=30), number_like))
@example(b"9223372036854775807")
@example(b"9223372036854775808")
@example(b"-9223372036854775808")
@example(b"-9223372036854775809")
@example(b"3600000")
@example(b"3600001")
def test_timeout_matches_reference(raw: bytes) -> None:
    assert _parse_or_none(raw) == reference_timeout(raw)


@given(st.binary())
def test_timeout_on_arbitrary_bytes(raw: bytes) -> None:
    # Either a timeout in range or REQUEST_BAD_TIMEOUT; never anything else.
    _parse_or_none(raw)
