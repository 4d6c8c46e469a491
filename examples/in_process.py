"""The broker in-process, with no socket at all: python examples/in_process.py"""

from typing import Any

from twisted.internet import defer, task

from mqmq import Broker, GetTimeout


async def main(reactor: Any) -> None:
    broker = Broker(reactor)
    broker.put(b"jobs", b"resize photo 42")
    message = await broker.get(b"jobs", timeout=5.0)  # a Deferred: fires with bytes,
    print(message.decode())                           # or fails with GetTimeout
    try:
        await broker.get(b"jobs", timeout=0.1)
    except GetTimeout:
        print("no more jobs")
    print(broker.info())


task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
