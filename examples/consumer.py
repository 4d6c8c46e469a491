"""Take up to ten messages from MyQueue: python examples/consumer.py [HOST:PORT]"""

import sys
from typing import Any

from twisted.internet import defer, task

from mqmq import GetTimeout, connect

ADDRESS = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:47774"


async def main(reactor: Any) -> None:
    client = await connect(reactor, ADDRESS, reply_timeout=10)
    for _ in range(10):
        try:
            message = await client.get("MyQueue", timeout=5.0)
        except GetTimeout:
            print("no message within 5 s")
            break
        print(message.decode())
    await client.disconnect()


task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
