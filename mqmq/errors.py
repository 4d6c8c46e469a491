"""Exceptions raised by mqmq, and the error types that travel on the wire."""

from __future__ import annotations

# Error types the server sends after ``Error``, as the original defines them.
UNKNOWN_COMMAND = "REQUEST_UNKNOWN_COMMAND"
BAD_PARAMS = "REQUEST_BAD_PARAMS"
BAD_QUEUE_NAME = "REQUEST_BAD_QUEUE_NAME"
BAD_TIMEOUT = "REQUEST_BAD_TIMEOUT"

# Error types of ours, for limits the original does not have.  Clients of the
# original show any error type as text, so these stay compatible.
MESSAGE_TOO_LARGE = "REQUEST_MESSAGE_TOO_LARGE"
TOO_MANY_QUEUES = "SERVER_TOO_MANY_QUEUES"
STORAGE_FULL = "SERVER_STORAGE_FULL"
INFO_TOO_LARGE = "SERVER_INFO_TOO_LARGE"
#: A durable store could not write (disk full, I/O error): nothing new is taken.
STORAGE_ERROR = "SERVER_STORAGE_ERROR"

# Error types of acknowledged delivery (our extension; see docs/protocol.md).
#: A lease or a delay outside what the server takes (or not a number).
BAD_LEASE = "REQUEST_BAD_LEASE"
#: An id this connection does not hold reserved on that queue.
UNKNOWN_ID = "REQUEST_UNKNOWN_ID"


class MQError(Exception):
    """Base class of every mqmq error."""


class MalformedFrame(MQError):
    """A frame whose values do not add up to its length."""


class RequestError(MQError):
    """A request the server refuses; ``error_type`` is what goes on the wire."""

    def __init__(self, error_type: str, detail: str = "") -> None:
        super().__init__(f"{error_type}: {detail}" if detail else error_type)
        self.error_type = error_type
        self.detail = detail


class GetTimeout(MQError):
    """No message arrived on the queue before the ``Get`` timed out.

    Not a failure of the server or the connection: the queue was empty.
    """


class ConsumerGone(MQError):
    """A waiting ``get``'s consumer went away before a message came for it."""


class ServerError(MQError):
    """The server answered ``Error``; ``error_type`` is the type it sent."""

    def __init__(self, error_type: str) -> None:
        super().__init__(f"server error: {error_type}")
        self.error_type = error_type


class BadResponse(MQError):
    """The server's reply does not have a shape the request allows."""


class ConnectionClosed(MQError):
    """The connection closed before the server answered the request."""


class ReservationLost(ConnectionClosed):
    """``Ack``, ``Release``, ``Touch`` or ``Bury`` of a message reserved on a
    connection that has closed (or is closing): reservations belong to their
    connection, and the server puts a departed connection's back at the front
    of their queues, to be handed out again.  Nothing was sent."""


class NotConnected(MQError):
    """A :class:`~mqmq.reconnecting.ReconnectingClient` had no connection to
    send the request on: none came within the caller's ``connect_timeout``,
    or the client was stopped.  Nothing was sent."""


class AcknowledgedDeliveryUnsupported(MQError):
    """The server does not serve ``Reserve`` and its kin (the original Go
    server, or a store that does not keep reservations): it answered
    ``REQUEST_UNKNOWN_COMMAND`` and closed the connection."""


class InvalidArgument(MQError, ValueError):
    """The client refused to send a request the server would reject."""


class ReplyTimeout(MQError):
    """The server sent no reply within the client's reply timeout.

    Every request in flight on that connection fails with it, and the
    connection is closed: the server is taken to have hung.
    """


class StoreError(MQError):
    """A store that cannot be opened: missing, damaged, or from a newer version."""
