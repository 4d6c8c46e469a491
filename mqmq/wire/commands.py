"""Requests of the mqmq protocol: parsing client frames into typed commands.

Pure: values in, a command (or a :class:`~mqmq.errors.RequestError`) out.
"""

from __future__ import annotations

import re
from struct import Struct
from typing import NamedTuple, Optional, Sequence, Union

from mqmq import errors
from mqmq.wire.codec import MAX_QUEUE_NAME_LENGTH

PUT = b"Put"
GET = b"Get"
INFO = b"Info"
QUIT = b"Quit"
# Acknowledged delivery (our extension).
RESERVE = b"Reserve"
ACK = b"Ack"
RELEASE = b"Release"
TOUCH = b"Touch"
BURY = b"Bury"
KICK = b"Kick"

OK = b"OK"
ERROR = b"Error"
TIMEOUT = b"Timeout"

#: Longest ``Get`` timeout, in milliseconds (one hour).
MAX_TIMEOUT_MS = 3_600_000
#: Timeout of a ``Get`` sent without one, and the floor of any timeout.
MIN_TIMEOUT_MS = 1
#: Lease of a ``Reserve`` or ``Touch`` sent without one.
DEFAULT_LEASE_MS = 30_000
#: Longest lease, and longest ``Release`` delay (12 hours).
MAX_LEASE_MS = 43_200_000
#: Longest message id a client may send (ids are ASCII tokens).
MAX_ID_LENGTH = 64

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


class Reserve(NamedTuple):
    queue: bytes
    timeout_ms: int
    lease_ms: int


class Ack(NamedTuple):
    queue: bytes
    message_id: bytes


class Release(NamedTuple):
    queue: bytes
    message_id: bytes
    delay_ms: int


class Touch(NamedTuple):
    queue: bytes
    message_id: bytes
    lease_ms: int


class Bury(NamedTuple):
    queue: bytes
    message_id: bytes


class Kick(NamedTuple):
    queue: bytes
    #: How many buried messages to bring back, at most.
    most: int


Command = Union[Put, Get, Info, Quit, Reserve, Ack, Release, Touch, Bury, Kick]


def _atoi(raw: bytes) -> Optional[int]:
    """Go's ``strconv.Atoi``: the value of a sign and ASCII digits that fit in
    int64, or None."""
    if not _ATOI.match(raw):
        return None
    negative = raw[:1] == b"-"
    digits = raw.lstrip(b"+-").lstrip(b"0")
    # Counting digits first keeps int() away from huge inputs.
    if len(digits) > 19:
        return None
    value = int(digits) if digits else 0
    if value > _INT64_MAX + negative:
        return None
    return -value if negative else value


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
    parsed = _atoi(raw)
    if parsed is None:
        raise errors.RequestError(errors.BAD_TIMEOUT, "timeout out of range")
    value = parsed
    if value > MAX_TIMEOUT_MS:
        raise errors.RequestError(errors.BAD_TIMEOUT, "timeout above one hour")
    return max(value, MIN_TIMEOUT_MS)


def parse_lease(raw: bytes, least: int = 1) -> int:
    """A lease (or, with ``least=0``, a ``Release`` delay) in milliseconds:
    parsed like a timeout, and from ``least`` to :data:`MAX_LEASE_MS`.

    :raises RequestError: ``REQUEST_BAD_LEASE``.
    """
    value = _atoi(raw)
    if value is None or not least <= value <= MAX_LEASE_MS:
        raise errors.RequestError(
            errors.BAD_LEASE, f"{raw[:32]!r} is not a number of ms from {least} to {MAX_LEASE_MS}"
        )
    return value


def parse_count(raw: bytes) -> int:
    """A ``Kick`` count: parsed like a timeout, below 1 meaning 1.

    :raises RequestError: ``REQUEST_BAD_PARAMS``.
    """
    value = _atoi(raw)
    if value is None:
        raise errors.RequestError(errors.BAD_PARAMS, f"count {raw[:32]!r} is not an integer")
    return max(value, 1)


def _check_id(message_id: bytes) -> bytes:
    # Ids are ASCII tokens of at most MAX_ID_LENGTH bytes: no other can be held.
    if len(message_id) > MAX_ID_LENGTH or not message_id.isascii():
        raise errors.RequestError(errors.UNKNOWN_ID, "no such id is held reserved")
    return message_id


def _parse_acknowledgement(command: bytes, values: Sequence[bytes]) -> Command:
    """Reserve, Ack, Release, Touch, Bury or Kick (values[0] is one of them)."""
    if command == RESERVE:
        if len(values) < 2:
            raise errors.RequestError(errors.BAD_PARAMS, "Reserve needs a queue")
        queue = _check_queue_name(values[1])
        timeout = parse_timeout(values[2]) if len(values) > 2 else MIN_TIMEOUT_MS
        lease = parse_lease(values[3]) if len(values) > 3 else DEFAULT_LEASE_MS
        return Reserve(queue, timeout, lease)
    if command == KICK:
        if len(values) < 2:
            raise errors.RequestError(errors.BAD_PARAMS, "Kick needs a queue")
        queue = _check_queue_name(values[1])
        return Kick(queue, parse_count(values[2]) if len(values) > 2 else 1)
    if len(values) < 3:
        raise errors.RequestError(errors.BAD_PARAMS, f"{command.decode()} needs a queue and an id")
    queue = _check_queue_name(values[1])
    message_id = _check_id(values[2])
    if command == ACK:
        return Ack(queue, message_id)
    if command == RELEASE:
        return Release(queue, message_id, parse_lease(values[3], least=0) if len(values) > 3 else 0)
    if command == TOUCH:
        return Touch(queue, message_id, parse_lease(values[3]) if len(values) > 3 else DEFAULT_LEASE_MS)
    return Bury(queue, message_id)


_ACKNOWLEDGEMENT_COMMANDS = frozenset((RESERVE, ACK, RELEASE, TOUCH, BURY, KICK))


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
    if command in _ACKNOWLEDGEMENT_COMMANDS:
        return _parse_acknowledgement(command, values)
    raise errors.RequestError(errors.UNKNOWN_COMMAND, f"unknown command {command[:64]!r}")


# The two requests of a consumer that acks, in their usual shape, parsed
# without building the list of values and the command (one in two requests
# of such a consumer is a Reserve, the other an Ack).  Any other shape gives
# None, and parse_request then says what the request is, or what is wrong
# with it: these never decide differently.

_UINT32 = Struct(">I")
_ACK_HEAD = b"\x00\x00\x00\x03Ack"
_RESERVE_HEAD = b"\x00\x00\x00\x07Reserve"


def parse_usual_ack(payload: bytes) -> Optional[tuple[bytes, int]]:
    """``Ack``, queue, decimal id (as the server gives ids): (queue, id), or None."""
    if payload[:7] != _ACK_HEAD or len(payload) < 15:
        return None
    (queue_length,) = _UINT32.unpack_from(payload, 7)
    id_at = 11 + queue_length
    if queue_length > MAX_QUEUE_NAME_LENGTH or id_at + 4 > len(payload):
        return None
    (id_length,) = _UINT32.unpack_from(payload, id_at)
    raw = payload[id_at + 4:]
    if len(raw) != id_length or not 0 < id_length <= 20 or not raw.isdigit() or (raw[0] == 48 and id_length > 1):
        return None
    return payload[11:id_at], int(raw)


def parse_usual_reserve(payload: bytes) -> Optional[Reserve]:
    """``Reserve``, queue, timeout-ms and maybe lease-ms, each plain digits
    within their bounds: the command, or None."""
    if payload[:11] != _RESERVE_HEAD or len(payload) < 19:
        return None
    (queue_length,) = _UINT32.unpack_from(payload, 11)
    at = 15 + queue_length
    end = len(payload)
    if queue_length > MAX_QUEUE_NAME_LENGTH or at + 4 > end:
        return None
    (length,) = _UINT32.unpack_from(payload, at)
    raw = payload[at + 4:at + 4 + length]
    at += 4 + length
    if len(raw) != length or not 0 < length < 8 or not raw.isdigit() or int(raw) > MAX_TIMEOUT_MS:
        return None
    timeout = int(raw) or MIN_TIMEOUT_MS
    if at == end:
        return Reserve(payload[15:15 + queue_length], timeout, DEFAULT_LEASE_MS)
    if at + 4 > end:
        return None
    (length,) = _UINT32.unpack_from(payload, at)
    raw = payload[at + 4:]
    if len(raw) != length or not 0 < length < 9 or not raw.isdigit() or not 1 <= int(raw) <= MAX_LEASE_MS:
        return None
    return Reserve(payload[15:15 + queue_length], timeout, int(raw))
