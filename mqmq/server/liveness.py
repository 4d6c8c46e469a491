"""Asking the kernel whether a TCP peer is still there, without reading.

While the server has stopped reading from a connection (backpressure), a
FIN or RST from the peer sits unread behind the requests it sent.  Linux's
``TCP_INFO`` reports the socket's state regardless: ``CLOSE_WAIT`` once the
peer has closed its side, ``CLOSE`` after a reset.
"""

from __future__ import annotations

import socket
from typing import Any, Optional

_TCP_ESTABLISHED = 1


def peer_has_gone(transport: Any) -> bool:
    """True when the peer of a TCP transport has closed or reset the connection.

    False when it is still connected, and when the transport is not a TCP
    socket on a system with ``TCP_INFO`` (then nothing can be known unread).
    """
    tcp_info = getattr(socket, "TCP_INFO", None)
    handle = _socket_under(transport)
    if tcp_info is None or handle is None or handle.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        state = handle.getsockopt(socket.IPPROTO_TCP, tcp_info, 1)[0]
    except OSError:
        return False
    return bool(state != _TCP_ESTABLISHED)


def _socket_under(transport: Any) -> Optional[socket.socket]:
    """The socket a transport writes to, through any wrapping protocol's
    transport (TLS is a protocol over the TCP transport; its handle is the
    OpenSSL connection, not the socket)."""
    for _ in range(8):  # (wrappers do not nest deeper)
        get_handle = getattr(transport, "getHandle", None)
        if get_handle is not None:
            try:
                handle = get_handle()
            except Exception:
                handle = None
            if isinstance(handle, socket.socket):
                return handle
        transport = getattr(transport, "transport", None)
        if transport is None:
            return None
    return None
