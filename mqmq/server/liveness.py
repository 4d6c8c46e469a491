"""Asking the kernel whether a TCP peer is still there, without reading.

While the server has stopped reading from a connection (backpressure), a
FIN or RST from the peer sits unread behind the requests it sent.  Linux's
``TCP_INFO`` reports the socket's state regardless: ``CLOSE_WAIT`` once the
peer has closed its side, ``CLOSE`` after a reset.
"""

from __future__ import annotations

import socket
from typing import Any

_TCP_ESTABLISHED = 1


def peer_has_gone(transport: Any) -> bool:
    """True when the peer of a TCP transport has closed or reset the connection.

    False when it is still connected, and when the transport is not a TCP
    socket on a system with ``TCP_INFO`` (then nothing can be known unread).
    """
    tcp_info = getattr(socket, "TCP_INFO", None)
    get_handle = getattr(transport, "getHandle", None)
    if tcp_info is None or get_handle is None:
        return False
    try:
        handle = get_handle()
        if handle.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        state = handle.getsockopt(socket.IPPROTO_TCP, tcp_info, 1)[0]
    except (OSError, AttributeError):
        return False
    return bool(state != _TCP_ESTABLISHED)
