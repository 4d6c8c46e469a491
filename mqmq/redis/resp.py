"""RESP2, Redis's wire format: commands encoded as arrays of bulk strings, replies parsed incrementally."""

from __future__ import annotations

from typing import Any, Sequence, Union

#: What a command's arguments may be: bytes as they are, text as UTF-8,
#: integers in decimal, floats as ``repr`` writes them.
Arg = Union[bytes, str, int, float]


class RedisError(Exception):
    """An error reply from Redis (e.g. ``NOSCRIPT ...``, ``OOM ...``); ``str()`` is Redis's text."""


class ProtocolError(Exception):
    """Bytes that are not RESP2: the connection cannot be trusted any more."""


def encode(args: Sequence[Arg]) -> bytes:
    """One command, as Redis reads it: an array of bulk strings."""
    return b"*%d\r\n" % len(args) + bulk_strings(args)


def bulk_strings(args: Sequence[Arg]) -> bytes:
    """``args`` as consecutive bulk strings: the body of a command's array."""
    parts: list[bytes] = []
    append = parts.append
    for arg in args:
        kind = type(arg)
        if kind is bytes:
            value: bytes = arg  # type: ignore[assignment]
        elif kind is str:
            value = arg.encode()  # type: ignore[union-attr]
        elif kind is int:
            value = b"%d" % arg  # type: ignore[str-format]
        elif kind is float:
            value = repr(arg).encode()
        elif isinstance(arg, (bytearray, memoryview)):
            value = bytes(arg)
        elif isinstance(arg, int):  # bool, IntEnum
            value = b"%d" % arg
        else:
            raise TypeError(f"a Redis argument must be bytes, str, int or float, not {kind.__name__}")
        append(b"$%d\r\n" % len(value))
        append(value)
        append(b"\r\n")
    return b"".join(parts)


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
        # Arrays being filled, innermost last: [items, how many still to come].
        self._stack: list[list[Any]] = []

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
                        stack.append([[], size])
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
                while stack:
                    top = stack[-1]
                    top[0].append(value)
                    top[1] -= 1
                    if top[1]:
                        break
                    stack.pop()
                    value = top[0]
                else:
                    replies.append(value)
        except ValueError:
            raise ProtocolError(f"not a number: {data[pos + 1:eol][:40]!r}") from None
        if pos < end:
            self._chunks = [data[pos:]]
            self._have = end - pos
            self._need = need
        return replies
