"""``twistd mqmq``: options and the service they make."""

from __future__ import annotations

from typing import Any, Optional

from twisted.python import usage

from mqmq.address import DEFAULT_ADDRESS, parse_address
from mqmq.service import MQService


class Options(usage.Options):
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
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """Also listen on a Twisted server endpoint, such as
        tcp6:47774:interface=\\:\\:1, unix:/run/mqmq.sock or ssl:... ;
        may be repeated."""
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


def makeService(options: Options, reactor: Optional[Any] = None) -> MQService:
    """The server: a broker listening on every endpoint the options name."""
    if reactor is None:
        from twisted.internet import reactor
    return MQService(reactor, options["endpoints"])
