"""The server's limits: what one connection, or all of them, may make it hold."""

from __future__ import annotations

from dataclasses import dataclass

from mqmq.wire.codec import MAX_FRAME_LENGTH, MAX_MESSAGE_LENGTH, max_frame_length

#: Largest ``Info`` JSON body that fits in the protocol's largest frame, after
#: the reply's ``OK`` and the two value lengths.
MAX_INFO_BYTES = MAX_FRAME_LENGTH - 4 - 2 - 4


@dataclass(frozen=True)
class Limits:
    """Bounds that keep a server alive and its memory in check.

    Every default is safe for a shared server; ``0`` turns a limit off where
    its description says so.
    """

    #: Largest message a ``Put`` may carry, in bytes (the original's 32 MiB).
    max_message_bytes: int = MAX_MESSAGE_LENGTH
    #: Most open client connections; one more is closed at once.
    max_connections: int = 10_000
    #: Most bytes of messages held across all queues (0: no limit).
    max_queued_bytes: int = 1024 * 1024 * 1024
    #: Most messages held across all queues (0: no limit).
    max_queued_messages: int = 10_000_000
    #: Most queues (0: no limit); a request naming one more is refused.
    max_queues: int = 100_000
    #: Seconds a connection may stay silent, with no ``Get`` waiting, before
    #: it is closed (0: never, as the original).
    idle_timeout: float = 0.0
    #: Bytes of requests a connection may have buffered, unanswered (behind a
    #: waiting ``Get``), before the server stops reading from it.
    max_pending_bytes: int = 1024 * 1024
    #: Largest ``Info`` reply body, in bytes; a larger one is refused with
    #: ``SERVER_INFO_TOO_LARGE``.  At most :data:`MAX_INFO_BYTES`, the most a
    #: frame can carry (the original's limit too).
    max_info_bytes: int = MAX_INFO_BYTES
    #: A message handed out this many times is buried rather than handed
    #: out once more (``--max-deliveries``; 0: no limit).
    max_deliveries: int = 0

    @property
    def max_frame_bytes(self) -> int:
        """Largest frame: a ``Put`` of a longest name and a largest message."""
        return max_frame_length(self.max_message_bytes)


_SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "KIB": 1024, "MB": 1000**2, "MIB": 1024**2,
               "GB": 1000**3, "GIB": 1024**3, "TB": 1000**4, "TIB": 1024**4}


def parse_size(text: str) -> int:
    """Bytes in a size such as ``1048576``, ``512KiB``, ``32MiB`` or ``1GB``.

    :raises ValueError: for anything else, or a negative size.
    """
    number = text.strip().rstrip("bBiIkKmMgGtT")
    unit = text.strip()[len(number):].upper()
    if unit not in _SIZE_UNITS or not number.isdigit():
        raise ValueError(f"invalid size {text!r} (want e.g. 1048576, 512KiB, 32MiB, 1GiB)")
    return int(number) * _SIZE_UNITS[unit]
