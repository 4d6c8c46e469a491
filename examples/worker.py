"""Handle ten messages of MyQueue, each acknowledged once handled:
python examples/worker.py [HOST:PORT]"""

import sys
from typing import Any

from twisted.internet import defer, task

from mqmq import connect
from mqmq.client import Delivery
from mqmq.consumer import consume

ADDRESS = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:47774"


async def main(reactor: Any) -> None:
    client = await connect(reactor, ADDRESS)
    ten_done: defer.Deferred[None] = defer.Deferred()
    handled = []

    async def handle(delivery: Delivery) -> None:
        # Raising here would put the message back for another try.
        print(delivery.message.decode())
        handled.append(delivery)
        if len(handled) == 10:
            ten_done.callback(None)

    worker = consume(client, "MyQueue", handle, lease=60)
    await ten_done
    await worker.stop()  # once the tenth is acknowledged
    await client.disconnect()


task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
