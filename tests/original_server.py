"""A server that answers as the original Go server does: the four original
commands, and ``Error``, ``REQUEST_UNKNOWN_COMMAND`` (then a closed
connection) to the extension's.  It is this project's server over a store
that keeps no reservations.  Run as a script, it listens on a free loopback
port and prints ``starting server: 127.0.0.1:PORT``, as ``mqmq start`` logs.
"""

from __future__ import annotations

import sys

from twisted.internet import reactor

from mqmq.broker.broker import Broker
from mqmq.server.protocol import MQServerFactory
from mqmq.stores.memory import MemoryStore


class StoreWithoutReservations(MemoryStore):
    acknowledged_delivery = False


def main() -> None:
    broker = Broker(reactor, store=StoreWithoutReservations())
    broker.startService()
    port = reactor.listenTCP(0, MQServerFactory(broker), interface="127.0.0.1")  # type: ignore[attr-defined]
    print(f"starting server: 127.0.0.1:{port.getHost().port}", file=sys.stderr, flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
