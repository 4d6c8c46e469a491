"""The ``Info`` report: what the server holds, as JSON the original's clients read."""

from __future__ import annotations

import codecs
import json
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping

from mqmq.errors import BadResponse

# PyPy 7.3's fast JSON decoder, which json.loads takes when given no options,
# names a non-ASCII character where the JSON goes wrong by its first UTF-8
# byte alone: a broken string, whose formatting raises SystemError.  Its
# Python decoder names it whole, and takes 0.36-0.43 s for a 3.7 MB Info
# (100,000 queues) where the fast one takes 0.18-0.31 s.
_JSON_OPTIONS: dict[str, Any] = {"cls": json.JSONDecoder} if sys.implementation.name == "pypy" else {}


def _replace_each_byte(error: UnicodeError) -> tuple[str, int]:
    # Go's encoding/json replaces every invalid byte with U+FFFD; Python's
    # "replace" handler would fold some runs of invalid bytes into one.
    assert isinstance(error, UnicodeDecodeError)
    return "\ufffd" * (error.end - error.start), error.end


codecs.register_error("mqmq-replace-each-byte", _replace_each_byte)

# Go escapes some characters in strings where Python's json does not (HTML
# safety, JavaScript line ends), writes each invalid UTF-8 byte as the six
# characters \ufffd (but a genuine U+FFFD raw), and (before Go 1.22, as the
# original was built) backspace and form feed as \u0008 and \u000c where
# Python writes \b and \f.  Invalid bytes are decoded to surrogateescape's
# lone surrogates U+DC80..U+DCFF, backspace and form feed swapped for two
# other lone surrogates; json.dumps passes them through, and each is then
# replaced with Go's escape by str.replace or one regular expression, all in
# C.  (A str.translate table did the same four to twenty times slower, which
# stalled the reactor while a large Info was built.)
_BACKSPACE = "\udc08"
_FORM_FEED = "\udc0c"
_INVALID_BYTES = re.compile("[\udc80-\udcff]")
_GO_ESCAPES = [
    ("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
    ("\u2028", "\\u2028"), ("\u2029", "\\u2029"),
    (_BACKSPACE, "\\u0008"), (_FORM_FEED, "\\u000c"),
]


def queue_name_text(name: bytes) -> str:
    """A queue name as text, each invalid UTF-8 byte replaced by U+FFFD."""
    return name.decode("utf-8", "mqmq-replace-each-byte")


def _go_json_string(name: bytes) -> str:
    text = name.decode("utf-8", "surrogateescape")
    if "\b" in text:
        text = text.replace("\b", _BACKSPACE)
    if "\f" in text:
        text = text.replace("\f", _FORM_FEED)
    encoded = json.dumps(text, ensure_ascii=False)
    for character, escape in _GO_ESCAPES:
        if character in encoded:
            encoded = encoded.replace(character, escape)
    return _INVALID_BYTES.sub(r"\\ufffd", encoded)


@dataclass(frozen=True)
class ServerInfo:
    """A snapshot of the server: connections, queues and messages."""

    num_connections: int
    num_queues: int
    num_messages: int
    #: Messages waiting in each queue, by name.
    queues: Mapping[str, int] = field(default_factory=dict)
    #: Acknowledged delivery (an extended Info; 0 and empty otherwise):
    #: messages reserved and buried, in all and by queue.
    num_reserved: int = 0
    num_buried: int = 0
    reserved: Mapping[str, int] = field(default_factory=dict)
    buried: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: bytes) -> ServerInfo:
        """Decode an ``Info`` reply, ignoring keys this version does not know.

        :raises BadResponse: when the JSON is not an ``Info`` object.
        """
        try:
            document: Any = json.loads(raw, **_JSON_OPTIONS)
            entries = (document.get("Queues") or {}).items()
            queues = {str(name): int(entry["NumMessages"]) for name, entry in entries}
            return cls(
                num_connections=int(document["NumConnections"]),
                num_queues=int(document["NumQueues"]),
                num_messages=int(document["NumMessages"]),
                queues=queues,
                num_reserved=int(document.get("NumReserved", 0)),
                num_buried=int(document.get("NumBuried", 0)),
                reserved={str(name): int(entry["NumReserved"]) for name, entry in entries
                          if "NumReserved" in entry},
                buried={str(name): int(entry["NumBuried"]) for name, entry in entries
                        if "NumBuried" in entry},
            )
        # OverflowError: a number like 1e400; RecursionError: absurdly deep nesting.
        except (
            ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError
        ) as error:
            raise BadResponse(f"malformed Info JSON: {error}") from error

    def format_text(self) -> str:
        """The report ``mqmq info`` prints, laid out as the original's."""
        lines = [
            f"Number of connections: {self.num_connections}",
            f"Number of queues: {self.num_queues}",
            f"Number of messages: {self.num_messages}",
        ]
        extended = bool(self.reserved or self.buried or self.num_reserved or self.num_buried)
        if extended:
            # Only from a server whose Info is extended: else the original's layout.
            lines.append(f"Number of reserved messages: {self.num_reserved}")
            lines.append(f"Number of buried messages: {self.num_buried}")
        if self.queues:
            lines.append("Queues:")
            for name, count in self.queues.items():
                held = (f" (reserved {self.reserved.get(name, 0)}, buried {self.buried.get(name, 0)})"
                        if extended else "")
                lines.append(f"        {name}: {count}{held}")
        return "\n".join(lines) + "\n"


# Bytes Go's encoder writes as they are: printable ASCII but for the quote,
# the backslash and the HTML characters it escapes.  Most queue names are
# made of these alone, and then need no decoding, escaping or caching.
_NEEDS_ESCAPING = re.compile(rb'[^\x20\x21\x23-\x25\x27-\x3b\x3d\x3f-\x5b\x5d-\x7e]')
_KEY_END = b'":{"NumMessages":'


def queue_key(name: bytes) -> bytes:
    """The start of a queue's entry in ``Info`` JSON, up to its message count."""
    if _NEEDS_ESCAPING.search(name) is None:
        return b'"' + name + _KEY_END
    return _go_json_string(name).encode("utf-8") + _KEY_END[1:]


#: Bytes of an ``Info`` entry besides its name's JSON string and its count:
#: ``:{"NumMessages":``, ``}`` and the comma before the next entry.
ENTRY_OVERHEAD = len(_KEY_END) - 1 + 1 + 1


def encode_info_header(num_connections: int, num_queues: int, num_messages: int) -> bytes:
    """The ``Info`` JSON up to the first queue's entry."""
    return b'{"NumConnections":%d,"NumQueues":%d,"NumMessages":%d,"Queues":{' % (
        num_connections, num_queues, num_messages,
    )


#: What closes the ``Info`` JSON after the last entry.
INFO_END = b"}}"


def encode_info_entry(name: bytes, count: int) -> bytes:
    """One queue's entry in ``Info`` JSON, without the comma between entries."""
    return queue_key(name) + b"%d}" % count


def encode_extended_entry(name: bytes, count: int, reserved: int, buried: int) -> bytes:
    """A queue's entry in the extended ``Info`` (once acknowledged delivery
    was used): ``NumReserved`` and ``NumBuried`` after ``NumMessages``."""
    return queue_key(name) + b'%d,"NumReserved":%d,"NumBuried":%d}' % (count, reserved, buried)


def encode_extended_end(reserved: int, buried: int) -> bytes:
    """What closes the extended ``Info`` JSON: the totals after ``Queues``."""
    return b'},"NumReserved":%d,"NumBuried":%d}' % (reserved, buried)


def encode_info(num_connections: int, num_messages: int, queues: Mapping[bytes, int]) -> bytes:
    """Encode an ``Info`` reply from raw queue names and their message counts.

    Keys come in the original's order; queue names are sorted by their bytes,
    as Go sorts map keys, and names that are not valid UTF-8 are made valid.
    Two names differing only in invalid bytes both appear, as in Go.
    """
    entries = b",".join([encode_info_entry(name, count) for name, count in sorted(queues.items())])
    return encode_info_header(num_connections, len(queues), num_messages) + entries + INFO_END
