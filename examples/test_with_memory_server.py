"""Tests that need no network: python -m pytest examples/test_with_memory_server.py"""

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.trial.unittest import SynchronousTestCase

from mqmq import GetTimeout, ServerError, connect_endpoint
from mqmq.broker.limits import Limits
from mqmq.testing import MemoryServer


async def submit(endpoint: IStreamClientEndpoint, reactor: IReactorTime, jobs: list[bytes]) -> int:
    """The code under test: it connects through an endpoint, as in production."""
    client = await connect_endpoint(endpoint, clock=reactor)
    submitted = 0
    try:
        for job in jobs:
            await client.put("jobs", job)
            submitted += 1
    except ServerError:
        pass
    await client.disconnect()
    return submitted


class SubmitTests(SynchronousTestCase):
    def test_puts_every_job(self) -> None:
        server = MemoryServer()
        done = defer.ensureDeferred(submit(server.endpoint(), server.clock, [b"one", b"two"]))
        server.flush()                    # move the bytes both ways
        self.assertEqual(self.successResultOf(done), 2)
        self.assertEqual(server.broker.num_messages, 2)

    def test_stops_when_the_server_is_full(self) -> None:
        server = MemoryServer(limits=Limits(max_queued_messages=1))
        done = defer.ensureDeferred(submit(server.endpoint(), server.clock, [b"one", b"two"]))
        server.flush()
        self.assertEqual(self.successResultOf(done), 1)

    def test_get_times_out(self) -> None:
        server = MemoryServer()
        client = server.client()
        result = client.get("empty", timeout=5)
        server.advance(5)                 # five seconds pass, instantly
        self.failureResultOf(result, GetTimeout)
