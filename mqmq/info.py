"""The ``Info`` report: what the server holds, as JSON the original's clients read."""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from mqmq.errors import BadResponse


def _replace_each_byte(error: UnicodeError) -> tuple[str, int]:
    # Go's encoding/json replaces every invalid byte with U+FFFD; Python's
    # "replace" handler would fold some runs of invalid bytes into one.
    assert isinstance(error, UnicodeDecodeError)
    return "\ufffd" * (error.end - error.start), error.end


codecs.register_error("mqmq-replace-each-byte", _replace_each_byte)

# Go escapes these in strings by default (HTML safety, JavaScript line ends),
# and writes each invalid UTF-8 byte as the six characters \ufffd.  Invalid
# bytes arrive here as surrogateescape's lone surrogates U+DC80..U+DCFF, which
# keeps them apart from a genuine U+FFFD in a name (Go writes that one raw).
#
# The original's Go (before 1.22) writes backspace and form feed as \u0008
# and \u000c where Python writes \b and \f: they are swapped for surrogates
# no decoder makes (U+DC08, U+DC0C) before encoding, and back after.
_HIDE_SHORT_ESCAPES = str.maketrans({"\b": "\udc08", "\f": "\udc0c"})
_GO_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029",
     "\udc08": "\\u0008", "\udc0c": "\\u000c"}
    | {chr(0xDC00 + byte): "\\ufffd" for byte in range(0x80, 0x100)}
)


def queue_name_text(name: bytes) -> str:
    """A queue name as text, each invalid UTF-8 byte replaced by U+FFFD."""
    return name.decode("utf-8", "mqmq-replace-each-byte")


def _go_json_string(name: bytes) -> str:
    text = name.decode("utf-8", "surrogateescape").translate(_HIDE_SHORT_ESCAPES)
    return json.dumps(text, ensure_ascii=False).translate(_GO_ESCAPES)


@dataclass(frozen=True)
class ServerInfo:
    """A snapshot of the server: connections, queues and messages."""

    num_connections: int
    num_queues: int
    num_messages: int
    #: Messages waiting in each queue, by name.
    queues: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: bytes) -> ServerInfo:
        """Decode an ``Info`` reply, ignoring keys this version does not know.

        :raises BadResponse: when the JSON is not an ``Info`` object.
        """
        try:
            document: Any = json.loads(raw)
            queues = {
                str(name): int(entry["NumMessages"])
                for name, entry in (document.get("Queues") or {}).items()
            }
            return cls(
                num_connections=int(document["NumConnections"]),
                num_queues=int(document["NumQueues"]),
                num_messages=int(document["NumMessages"]),
                queues=queues,
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
        if self.queues:
            lines.append("Queues:")
            lines.extend(f"        {name}: {count}" for name, count in self.queues.items())
        return "\n".join(lines) + "\n"


def queue_key(name: bytes) -> str:
    """The start of a queue's entry in ``Info`` JSON, up to its message count."""
    return f'{_go_json_string(name)}:{{"NumMessages":'


def encode_info_entries(
    num_connections: int, num_messages: int, entries: Sequence[tuple[str, int]]
) -> bytes:
    """Encode an ``Info`` reply from (:func:`queue_key`, count) pairs in name order."""
    queues = ",".join([f"{key}{count}}}" for key, count in entries])
    return (
        f'{{"NumConnections":{num_connections},"NumQueues":{len(entries)},'
        f'"NumMessages":{num_messages},"Queues":{{{queues}}}}}'
    ).encode("utf-8")


def encode_info(num_connections: int, num_messages: int, queues: Mapping[bytes, int]) -> bytes:
    """Encode an ``Info`` reply from raw queue names and their message counts.

    Keys come in the original's order; queue names are sorted by their bytes,
    as Go sorts map keys, and names that are not valid UTF-8 are made valid.
    Two names differing only in invalid bytes both appear, as in Go.
    """
    return encode_info_entries(
        num_connections, num_messages,
        [(queue_key(name), count) for name, count in sorted(queues.items())],
    )
