"""``HOST:PORT`` addresses, as the original's ``-addr`` flag takes them."""

from __future__ import annotations

import socket
from typing import Any, NamedTuple

from twisted.internet.address import UNIXAddress
from twisted.internet.endpoints import quoteStringArgument

#: Where the server listens, and the client connects, unless told otherwise.
DEFAULT_ADDRESS = "127.0.0.1:47774"
#: Connections the kernel may queue before the server accepts them (it caps
#: this at net.core.somaxconn), as Go's listeners ask.
LISTEN_BACKLOG = 4096


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
        return True
    except OSError:
        return False


class Address(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def server_endpoint(self) -> str:
        """A Twisted server endpoint description listening on this address.

        An empty host listens on every interface, IPv6 and IPv4 both where
        the system has IPv6 (a dual-stack socket), as Go does.
        """
        host = self.host or ("::" if _ipv6_available() else "0.0.0.0")
        return f"tcp:port={self.port}:interface={quoteStringArgument(host)}:backlog={LISTEN_BACKLOG}"


def describe(address: Any) -> str:
    """A Twisted address as people write it: ``HOST:PORT``, ``[V6]:PORT``, ``unix:PATH``."""
    if isinstance(address, UNIXAddress):
        name = address.name
        return "unix:" + (name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name))
    host = getattr(address, "host", None)
    if host is None:
        return str(address)
    return str(Address(host, address.port))


def parse_address(text: str) -> Address:
    """Split ``HOST:PORT`` (``[IPv6]:PORT`` for IPv6) as Go's ``net.SplitHostPort``.

    An empty host means every interface when listening; an empty address,
    :data:`DEFAULT_ADDRESS` (the command line refuses an empty ``--addr``
    before it gets here: a script that lost its variable should not reach
    the default server).

    :raises ValueError: with a message saying what is wrong.
    """
    text = text or DEFAULT_ADDRESS
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
