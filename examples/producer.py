"""Put ten messages on MyQueue: python examples/producer.py [HOST:PORT]"""

import sys
from typing import Any, Generator

from twisted.internet import defer, task

from mqmq import connect

ADDRESS = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:47774"


@defer.inlineCallbacks
def main(reactor: Any) -> Generator[defer.Deferred[Any], Any, None]:
    client = yield connect(reactor, ADDRESS)
    for i in range(10):
        yield client.put("MyQueue", f"Message {i}".encode())
    yield client.disconnect()


task.react(main)
