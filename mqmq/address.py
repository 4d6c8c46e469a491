"""``HOST:PORT`` addresses, as the original's ``-addr`` flag takes them."""

from __future__ import annotations

from typing import NamedTuple

from twisted.internet.endpoints import quoteStringArgument

#: Where the server listens, and the client connects, unless told otherwise.
DEFAULT_ADDRESS = "127.0.0.1:47774"


class Address(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def server_endpoint(self) -> str:
        """A Twisted server endpoint description listening on this address."""
        description = f"tcp:port={self.port}"
        if self.host:
            description += f":interface={quoteStringArgument(self.host)}"
        return description


def parse_address(text: str) -> Address:
    """Split ``HOST:PORT`` (``[IPv6]:PORT`` for IPv6) as Go's ``net.SplitHostPort``.

    An empty host means every interface when listening.

    :raises ValueError: with a message saying what is wrong.
    """
    host, colon, port_text = text.rpartition(":")
    if not colon:
        raise ValueError(f"address {text!r}: missing port (want HOST:PORT)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"address {text!r}: too many colons (write IPv6 as [HOST]:PORT)")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"address {text!r}: port must be a number from 0 to 65535")
    return Address(host, int(port_text))
