"""RESP2, Redis's wire format: commands encoded as arrays of bulk strings, replies parsed incrementally."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

#: What a command's arguments may be: bytes as they are, text as UTF-8,
#: integers in decimal, floats as ``repr`` writes them.
Arg = Union[bytes, str, int, float]


class RedisError(Exception):
    """An error reply from Redis (e.g. ``NOSCRIPT ...``, ``OOM ...``); ``str()`` is Redis's text."""


class ProtocolError(Exception):
    """Bytes that are not RESP2: the connection cannot be trusted any more."""


def encode(args: Sequence[Arg]) -> bytes:
    """One command, as Redis reads it: an array of bulk strings."""
    parts = [b"*%d" % len(args)]
    _add_bulk_strings(parts, args)
    return b"\r\n".join(parts)


def bulk_strings(args: Sequence[Arg]) -> bytes:
    """``args`` as consecutive bulk strings: the body of a command's array."""
    parts: list[bytes] = []
    _add_bulk_strings(parts, args)
    return b"\r\n".join(parts)


# Bulk-string headers of short arguments, made once: this is the hot path.
_HEADERS = [b"$%d" % size for size in range(256)]


def _add_bulk_strings(parts: list[bytes], args: Sequence[Arg]) -> None:
    # Pieces joined with CRLF; the empty piece at the end gives the last CRLF.
    append = parts.append
    headers = _HEADERS
    for arg in args:
        if type(arg) is bytes:
            value: bytes = arg  # type: ignore[assignment]
        elif type(arg) is str:
            value = arg.encode()  # type: ignore[union-attr]
        elif type(arg) is int:
            value = b"%d" % arg  # type: ignore[str-format]
        elif type(arg) is float:
            value = repr(arg).encode()
        elif isinstance(arg, (bytearray, memoryview)):
            value = bytes(arg)
        elif isinstance(arg, int):  # bool, IntEnum
            value = b"%d" % arg
        else:
            raise TypeError(f"a Redis argument must be bytes, str, int or float, not {type(arg).__name__}")
        size = len(value)
        append(headers[size] if size < 256 else b"$%d" % size)
        append(value)
    append(b"")


class Parser:
    """Replies from a stream of bytes, in order, however the stream is cut.

    A reply is ``bytes`` (bulk and simple strings), ``int``, ``None`` (nil bulk
    string or nil array), a ``list`` of replies, or a :class:`RedisError`
    instance (error replies are values here: an array may hold one).
    """

    #: Longest line (a simple string, an error, a length) waited for without
    #: its CRLF; beyond it the peer is not speaking RESP.
    MAX_LINE = 65536

    def __init__(self) -> None:
        # What is left of an incomplete reply, as chunks joined only once
        # there are enough of them: a long bulk string arriving in many reads
        # is copied once, not once per read.
        self._chunks: list[bytes] = []
        self._have = 0
        self._need = 0
        # The innermost array being filled, how many items it still needs,
        # and the arrays around it (outermost first).
        self._items: Optional[list[Any]] = None
        self._remaining = 0
        self._stack: list[tuple[list[Any], int]] = []

    def feed(self, data: bytes) -> list[Any]:
        """The replies ``data`` completes (none, one or many).

        :raises ProtocolError: ``data`` is not RESP2.
        """
        if self._chunks:
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            data = b"".join(self._chunks)
            self._chunks = []
        replies: list[Any] = []
        items = self._items
        remaining = self._remaining
        stack = self._stack
        find = data.find
        end = len(data)
        pos = 0
        need = 0
        try:
            while pos < end:
                eol = find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > self.MAX_LINE:
                        raise ProtocolError(f"no CRLF in the {end - pos} bytes of a line")
                    need = end - pos + 1
                    break
                kind = data[pos]
                if kind == 36:  # $ bulk string
                    size = int(data[pos + 1 : eol])
                    if size >= 0:
                        stop = eol + 2 + size
                        if stop + 2 > end:
                            need = stop + 2 - pos
                            break
                        if data[stop : stop + 2] != b"\r\n":
                            raise ProtocolError("a bulk string does not end with CRLF")
                        value: Any = data[eol + 2 : stop]
                        pos = stop + 2
                    else:
                        value = None
                        pos = eol + 2
                elif kind == 58:  # : integer
                    value = int(data[pos + 1 : eol])
                    pos = eol + 2
                elif kind == 42:  # * array
                    size = int(data[pos + 1 : eol])
                    pos = eol + 2
                    if size > 0:
                        if items is not None:
                            stack.append((items, remaining))
                        items = []
                        remaining = size
                        continue
                    value = [] if size == 0 else None
                elif kind == 43:  # + simple string
                    value = data[pos + 1 : eol]
                    pos = eol + 2
                elif kind == 45:  # - error
                    value = RedisError(data[pos + 1 : eol].decode("utf-8", "replace"))
                    pos = eol + 2
                else:
                    raise ProtocolError(f"a reply cannot start with {data[pos:pos + 1]!r}")
                if items is None:
                    replies.append(value)
                    continue
                items.append(value)
                remaining -= 1
                while not remaining:  # the array is complete: a value of the one around it
                    value = items
                    if stack:
                        items, remaining = stack.pop()
                        items.append(value)
                        remaining -= 1
                    else:
                        items = None
                        replies.append(value)
                        break
        except ValueError:
            raise ProtocolError(f"not a number: {data[pos + 1:eol][:40]!r}") from None
        self._items = items
        self._remaining = remaining
        if pos < end:
            self._chunks = [data[pos:]]
            self._have = end - pos
            self._need = need
        return replies
