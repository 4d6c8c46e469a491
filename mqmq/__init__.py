"""mqmq: a small, fast message queue for Twisted, wire-compatible with the Go mqmq."""

__version__ = "0.1.0"

from mqmq.address import DEFAULT_ADDRESS
from mqmq.broker.broker import Broker
from mqmq.client import MQClient, connect, connect_endpoint
from mqmq.errors import (
    BadResponse,
    ConnectionClosed,
    GetTimeout,
    InvalidArgument,
    MQError,
    NotConnected,
    ReplyTimeout,
    ReservationLost,
    ServerError,
)
from mqmq.reconnecting import ReconnectingClient, reconnecting_client
from mqmq.wire.info import ServerInfo
from mqmq.server.protocol import MQServerFactory, MQServerProtocol
from mqmq.server.service import MQService

__all__ = [
    "DEFAULT_ADDRESS",
    "BadResponse",
    "Broker",
    "ConnectionClosed",
    "GetTimeout",
    "InvalidArgument",
    "MQClient",
    "MQError",
    "MQServerFactory",
    "MQServerProtocol",
    "MQService",
    "NotConnected",
    "ReconnectingClient",
    "ReplyTimeout",
    "ReservationLost",
    "ServerError",
    "ServerInfo",
    "connect",
    "connect_endpoint",
    "reconnecting_client",
]
