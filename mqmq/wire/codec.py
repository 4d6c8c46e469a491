"""The mqmq wire codec: frames of length-prefixed byte values.

Pure functions over bytes; nothing here knows about sockets.  A frame on the
wire is ``uint32 BE length`` followed by that many bytes of *payload*; the
payload is a sequence of ``uint32 BE length`` + bytes values.  The outer
length prefix is handled by :class:`twisted.protocols.basic.Int32StringReceiver`
on the server and client; this module encodes and decodes payloads.
"""

from __future__ import annotations

from struct import Struct
from typing import Iterable, Sequence

from mqmq.errors import MalformedFrame

#: Longest queue name, in bytes.
MAX_QUEUE_NAME_LENGTH = 1024
#: Largest message the original accepts, in bytes.
MAX_MESSAGE_LENGTH = 32 * 1024 * 1024
#: Largest frame payload the server accepts: room for ``Put``, a 1024-byte
#: queue name and a 32 MiB message, each with its 4-byte length.
MAX_FRAME_LENGTH = 4 + 3 + 4 + MAX_QUEUE_NAME_LENGTH + 4 + MAX_MESSAGE_LENGTH

_UINT32 = Struct(">I")
_pack_uint32 = _UINT32.pack
_unpack_uint32_from = _UINT32.unpack_from
PREFIX_LENGTH = _UINT32.size


def max_frame_length(max_message_length: int) -> int:
    """Largest payload for a ``Put`` of a longest name and a message of that size."""
    return 4 + 3 + 4 + MAX_QUEUE_NAME_LENGTH + 4 + max_message_length


def encode_payload(values: Iterable[bytes]) -> bytes:
    """Encode values as a frame payload (without the outer length prefix)."""
    parts: list[bytes] = []
    for value in values:
        parts.append(_pack_uint32(len(value)))
        parts.append(value)
    return b"".join(parts)


def encode_frame(values: Iterable[bytes]) -> bytes:
    """Encode values as a whole frame, outer length prefix included."""
    payload = encode_payload(values)
    return _pack_uint32(len(payload)) + payload


def decode_payload(payload: bytes) -> list[bytes]:
    """Decode a frame payload into its values.

    :raises MalformedFrame: when a value length is cut short or runs past the
        end of the payload.
    """
    values: list[bytes] = []
    end = len(payload)
    offset = 0
    while offset < end:
        if end - offset < PREFIX_LENGTH:
            raise MalformedFrame(
                f"{end - offset} bytes left at offset {offset}, too few for a value length"
            )
        (length,) = _unpack_uint32_from(payload, offset)
        offset += PREFIX_LENGTH
        if length > end - offset:
            raise MalformedFrame(
                f"value of {length} bytes at offset {offset} runs past the frame end ({end})"
            )
        values.append(payload[offset : offset + length])
        offset += length
    return values


def decode_frames(data: bytes) -> tuple[list[list[bytes]], bytes]:
    """Decode every whole frame at the start of ``data``.

    Returns the decoded frames and the bytes left over (an incomplete frame).
    A convenience for tests and tools; the protocols use
    ``Int32StringReceiver`` for the outer framing.
    """
    frames: list[list[bytes]] = []
    offset = 0
    while len(data) - offset >= PREFIX_LENGTH:
        (length,) = _unpack_uint32_from(data, offset)
        start = offset + PREFIX_LENGTH
        if len(data) - start < length:
            break
        frames.append(decode_payload(data[start : start + length]))
        offset = start + length
    return frames, data[offset:]


__all__: Sequence[str] = (
    "MAX_FRAME_LENGTH",
    "MAX_MESSAGE_LENGTH",
    "MAX_QUEUE_NAME_LENGTH",
    "decode_frames",
    "decode_payload",
    "encode_frame",
    "encode_payload",
    "max_frame_length",
)
