"""``twistd mqmq``: options and the service they make."""

from __future__ import annotations

import math
import resource
import sys
from dataclasses import fields
from typing import Any, Optional

from twisted.python import usage

from mqmq import __version__
from mqmq.address import DEFAULT_ADDRESS, parse_address
from mqmq.codec import max_frame_length
from mqmq.limits import MAX_INFO_BYTES, Limits, parse_size
from mqmq.service import MQService

_DEFAULTS = Limits()
# A frame's length is a uint32, and must have room for Put and a queue name.
_LARGEST_MESSAGE = 2**32 - 1 - max_frame_length(0)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise usage.UsageError(str(error)) from None


def _count(text: str) -> int:
    if not text.isdigit():
        raise usage.UsageError(f"{text!r} is not a whole number")
    return int(text)


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < math.inf:
        raise usage.UsageError(f"{text!r} is not a number of seconds")
    return seconds


_size.coerceDoc = "A size in bytes; KiB, MiB, GiB (and kB, MB, GB) may follow."  # type: ignore[attr-defined]
_count.coerceDoc = ""  # type: ignore[attr-defined]
_seconds.coerceDoc = ""  # type: ignore[attr-defined]


class VersionOption:
    """``--version`` says mqmq's version, not Twisted's."""

    def opt_version(self) -> None:
        """Display the mqmq version and exit."""
        sys.stdout.write(f"mqmq {__version__}\n")
        raise SystemExit(0)


class Options(VersionOption, usage.Options):
    """Options of the mqmq server, for ``twistd mqmq`` and ``mqmq start``."""

    synopsis = "[options]"
    longdesc = (
        "Runs an mqmq message-queue server, wire-compatible with the original "
        "Go mqmq. By default it listens on " + DEFAULT_ADDRESS + "."
    )

    optParameters: list[list[Any]] = [
        ["addr", "a", None,
         f"Listen on HOST:PORT ([HOST]:PORT for IPv6; an empty HOST for every "
         f"interface). [default: {DEFAULT_ADDRESS}, unless --listen is given]"],
        ["max-message-bytes", None, _DEFAULTS.max_message_bytes,
         "Largest message a Put may carry; a larger one is refused with "
         "REQUEST_MESSAGE_TOO_LARGE.", _size],
        ["max-connections", None, _DEFAULTS.max_connections,
         "Most open client connections; a connection beyond is closed at once. "
         "0: no limit.", _count],
        ["max-queued-bytes", None, _DEFAULTS.max_queued_bytes,
         "Most bytes of messages held in all queues; a Put beyond is refused with "
         "SERVER_STORAGE_FULL. 0: no limit.", _size],
        ["max-queued-messages", None, _DEFAULTS.max_queued_messages,
         "Most messages held in all queues; a Put beyond is refused with "
         "SERVER_STORAGE_FULL. 0: no limit.", _count],
        ["max-queues", None, _DEFAULTS.max_queues,
         "Most queues; a Put or Get naming a new queue beyond is refused with "
         "SERVER_TOO_MANY_QUEUES. 0: no limit.", _count],
        ["idle-timeout", None, _DEFAULTS.idle_timeout,
         "Close a connection silent for this many seconds with no Get waiting. "
         "0: never.", _seconds],
        ["max-pending-bytes", None, _DEFAULTS.max_pending_bytes,
         "Bytes of requests buffered behind a waiting Get before the server stops "
         "reading from that connection.", _size],
        ["max-info-bytes", None, _DEFAULTS.max_info_bytes,
         "Largest Info reply; a larger one is refused with SERVER_INFO_TOO_LARGE "
         "(the default is the most one frame can carry).", _size],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """Also listen on a Twisted endpoint (tcp6:, unix:, ssl: ...); repeatable."""
        self["listen"].append(description)

    opt_l = opt_listen

    def postOptions(self) -> None:
        endpoints: list[str] = list(self["listen"])
        if self["addr"] is not None or not endpoints:
            try:
                address = parse_address(self["addr"] or DEFAULT_ADDRESS)
            except ValueError as error:
                raise usage.UsageError(str(error)) from None
            self["address"] = address
            endpoints.insert(0, address.server_endpoint())
        self["endpoints"] = endpoints
        if self["max-info-bytes"] > MAX_INFO_BYTES:
            raise usage.UsageError(f"--max-info-bytes may be {MAX_INFO_BYTES} at most")
        if self["max-message-bytes"] > _LARGEST_MESSAGE:
            raise usage.UsageError(f"--max-message-bytes may be {_LARGEST_MESSAGE} at most")
        self["limits"] = Limits(**{
            field.name: self[field.name.replace("_", "-")] for field in fields(Limits)
        })


def _allow_open_files(count: int) -> None:
    # Each connection is a file descriptor; the usual soft limit of 1024
    # would refuse connections long before --max-connections does.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 64 if count else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        ceiling = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))


def makeService(options: Options, reactor: Optional[Any] = None) -> MQService:
    """The server: a broker listening on every endpoint the options name."""
    if reactor is None:
        from twisted.internet import reactor
    limits: Limits = options["limits"]
    _allow_open_files(limits.max_connections)
    return MQService(reactor, options["endpoints"], limits)
