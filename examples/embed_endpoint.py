"""An mqmq server put on an endpoint by hand: python examples/embed_endpoint.py [ENDPOINT]

ENDPOINT is a Twisted endpoint description; tcp:47774:interface=127.0.0.1
if not given.  Serves until interrupted (Ctrl-C).
"""

import sys

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort

from mqmq import Broker, MQServerFactory

LISTEN = sys.argv[1] if len(sys.argv) > 1 else "tcp:47774:interface=127.0.0.1"


def listening(port: IListeningPort) -> None:
    print(f"serving on {port.getHost()}", flush=True)


broker = Broker(reactor)
serverFromString(reactor, LISTEN).listen(MQServerFactory(broker)).addCallback(listening)
reactor.run()
