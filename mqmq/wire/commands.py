"""Requests of the mqmq protocol: parsing client frames into typed commands.

Pure: values in, a command (or a :class:`~mqmq.errors.RequestError`) out.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Sequence, Union

from mqmq import errors
from mqmq.wire.codec import MAX_QUEUE_NAME_LENGTH

PUT = b"Put"
GET = b"Get"
INFO = b"Info"
QUIT = b"Quit"

OK = b"OK"
ERROR = b"Error"
TIMEOUT = b"Timeout"

#: Longest ``Get`` timeout, in milliseconds (one hour).
MAX_TIMEOUT_MS = 3_600_000
#: Timeout of a ``Get`` sent without one, and the floor of any timeout.
MIN_TIMEOUT_MS = 1

# Go's strconv.Atoi: an optional sign, then one or more ASCII digits.
_ATOI = re.compile(rb"[+-]?[0-9]+\Z")
_INT64_MAX = 2**63 - 1


# Tuples: cheaper to make than dataclasses, and one is made per request.
class Put(NamedTuple):
    queue: bytes
    message: bytes


class Get(NamedTuple):
    queue: bytes
    timeout_ms: int


class Info(NamedTuple):
    pass


class Quit(NamedTuple):
    pass


_INFO = Info()
_QUIT = Quit()


Command = Union[Put, Get, Info, Quit]


def parse_timeout(raw: bytes) -> int:
    """Parse a ``Get`` timeout in milliseconds as the original server does.

    Follows Go's ``strconv.Atoi`` (sign, ASCII digits, fits in int64); a value
    below 1 means 1 ms; above one hour is refused.

    :raises RequestError: ``REQUEST_BAD_TIMEOUT``.
    """
    if raw.isdigit() and len(raw) < 8:
        # The common case, a plain millisecond count, without the regex.
        value = int(raw)
        if value > MAX_TIMEOUT_MS:
            raise errors.RequestError(errors.BAD_TIMEOUT, "timeout above one hour")
        return value or MIN_TIMEOUT_MS
    if not _ATOI.match(raw):
        raise errors.RequestError(errors.BAD_TIMEOUT, "timeout is not an integer")
    negative = raw[:1] == b"-"
    digits = raw.lstrip(b"+-").lstrip(b"0")
    # Counting digits first keeps int() away from huge inputs.
    value = int(digits) if 0 < len(digits) <= 19 else 0
    if len(digits) > 19 or value > _INT64_MAX + negative:
        raise errors.RequestError(errors.BAD_TIMEOUT, "timeout out of range")
    if negative:
        return MIN_TIMEOUT_MS
    if value > MAX_TIMEOUT_MS:
        raise errors.RequestError(errors.BAD_TIMEOUT, "timeout above one hour")
    return max(value, MIN_TIMEOUT_MS)


def _check_queue_name(name: bytes) -> bytes:
    if len(name) > MAX_QUEUE_NAME_LENGTH:
        raise errors.RequestError(
            errors.BAD_QUEUE_NAME,
            f"queue name of {len(name)} bytes, longest is {MAX_QUEUE_NAME_LENGTH}",
        )
    return name


def parse_request(values: Sequence[bytes]) -> Command:
    """Turn the values of a client frame into a command.

    :raises RequestError: with the wire error type the server must answer.
        ``REQUEST_UNKNOWN_COMMAND`` (which also closes the connection) for an
        unknown command or an empty frame.
    """
    if not values:
        raise errors.RequestError(errors.UNKNOWN_COMMAND, "empty frame")
    command = values[0]
    if command == PUT:
        if len(values) < 3:
            raise errors.RequestError(errors.BAD_PARAMS, "Put needs a queue and a message")
        return Put(_check_queue_name(values[1]), values[2])
    if command == GET:
        if len(values) < 2:
            raise errors.RequestError(errors.BAD_PARAMS, "Get needs a queue")
        queue = _check_queue_name(values[1])
        timeout = parse_timeout(values[2]) if len(values) > 2 else MIN_TIMEOUT_MS
        return Get(queue, timeout)
    if command == INFO:
        return _INFO
    if command == QUIT:
        return _QUIT
    raise errors.RequestError(errors.UNKNOWN_COMMAND, f"unknown command {command[:64]!r}")
