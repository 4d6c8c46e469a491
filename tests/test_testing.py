"""mqmq.testing.MemoryServer, used as a user testing their own code would."""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from mqmq.client import MQClient, connect_endpoint
from mqmq.errors import ConnectionClosed, GetTimeout, ReplyTimeout, ServerError
from mqmq.wire.info import ServerInfo
from mqmq.broker.limits import Limits
from mqmq.testing import MemoryServer
from support import failure, success

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


def test_the_docstring_example() -> None:
    server = MemoryServer()
    client = server.client()
    done = client.put("jobs", b"one")
    server.flush()
    assert success(done) is None
    assert server.broker.num_messages == 1


def test_client_is_connected_at_once() -> None:
    server = MemoryServer()
    client = server.client()
    assert isinstance(client, MQClient)
    assert server.broker.num_connections == 1
    server.client()
    assert server.broker.num_connections == 2


def test_nothing_moves_until_flush() -> None:
    server = MemoryServer()
    client = server.client()
    done = client.put("jobs", b"one")
    assert not done.called
    assert server.broker.num_messages == 0
    server.flush()
    assert done.called


def test_put_then_get() -> None:
    server = MemoryServer()
    client = server.client()
    client.put("jobs", b"one")
    client.put("jobs", b"two")
    first = client.get("jobs", 1)
    second = client.get("jobs", 1)
    server.flush()
    assert success(first) == b"one"
    assert success(second) == b"two"
    assert server.broker.num_messages == 0


def test_producer_and_consumer() -> None:
    server = MemoryServer()
    producer, consumer = server.client(), server.client()
    gets = [consumer.get("work", 30) for _ in range(3)]
    server.flush()
    assert not any(got.called for got in gets)
    for i in range(3):
        producer.put("work", b"job %d" % i)
    server.flush()
    assert [success(got) for got in gets] == [b"job 0", b"job 1", b"job 2"]


def test_get_times_out_when_the_clock_advances() -> None:
    server = MemoryServer()
    client = server.client()
    got = client.get("empty", 5)
    server.flush()
    server.advance(4.999)
    assert not got.called
    server.advance(0.001)
    failure(got, GetTimeout)


def test_a_message_in_time_beats_the_timeout() -> None:
    server = MemoryServer()
    consumer, producer = server.client(), server.client()
    got = consumer.get("q", 5)
    server.flush()
    server.advance(4)
    producer.put("q", b"just in time")
    server.flush()
    assert success(got) == b"just in time"
    server.advance(10)
    assert server.broker.num_messages == 0


def test_a_given_clock_drives_the_timeouts() -> None:
    clock = Clock()
    server = MemoryServer(clock)
    assert server.clock is clock
    client = server.client()
    got = client.get("q", 1)
    server.flush()
    clock.advance(1)
    server.flush()
    failure(got, GetTimeout)


def test_flush_delivers_requests_queued_behind_a_get_that_was_answered() -> None:
    server = MemoryServer()
    consumer, producer = server.client(), server.client()
    got = consumer.get("q", 30)
    asked = consumer.info()
    server.flush()
    assert not asked.called
    producer.put("q", b"m")
    server.flush()
    assert success(got) == b"m"
    assert success(asked).num_messages == 0


def test_info() -> None:
    server = MemoryServer()
    first, second = server.client(), server.client()
    first.put("queue1", b"a")
    first.put("queue1", b"b")
    second.put("queue2", b"c")
    server.flush()
    asked = first.info()
    server.flush()
    assert success(asked) == ServerInfo(
        num_connections=2, num_queues=2, num_messages=3, queues={"queue1": 2, "queue2": 1}
    )


def test_info_of_the_broker_matches_the_client() -> None:
    server = MemoryServer()
    client = server.client()
    client.put("q", b"x")
    asked = client.info()
    server.flush()
    assert success(asked) == server.broker.info()


def test_disconnect() -> None:
    server = MemoryServer()
    client = server.client()
    put = client.put("q", b"kept")
    disconnected = client.disconnect()
    assert not disconnected.called
    server.flush()
    assert success(put) is None
    assert success(disconnected) is None
    assert server.broker.num_connections == 0
    assert server.broker.num_messages == 1
    failure(client.put("q", b"too late"), ConnectionClosed)


def test_flush_after_a_disconnect_keeps_serving_the_others() -> None:
    server = MemoryServer()
    leaving, staying = server.client(), server.client()
    leaving.disconnect()
    server.flush()
    staying.put("q", b"m")
    got = staying.get("q", 1)
    server.flush()
    assert success(got) == b"m"


def test_a_departed_waiter_does_not_take_the_message() -> None:
    server = MemoryServer()
    leaving, producer, consumer = server.client(), server.client(), server.client()
    abandoned = leaving.get("q", 30)
    server.flush()
    # The consumer goes away abruptly, without Quit.
    assert leaving.transport is not None
    leaving.transport.loseConnection()
    server.flush()
    failure(abandoned, ConnectionClosed)
    producer.put("q", b"for whoever stays")
    server.flush()
    assert server.broker.num_messages == 1
    got = consumer.get("q", 1)
    server.flush()
    assert success(got) == b"for whoever stays"


def test_works_with_inline_callbacks_code() -> None:
    """User code written with inlineCallbacks runs to completion under flush."""
    server = MemoryServer()

    @inlineCallbacks
    def relay(client: MQClient) -> Any:
        message = yield client.get("in", 10)
        yield client.put("out", message.upper())
        info = yield client.info()
        return info.queues

    worker, feeder = server.client(), server.client()
    finished = relay(worker)
    server.flush()
    assert not finished.called
    feeder.put("in", b"hello")
    server.flush()
    assert success(finished) == {"in": 0, "out": 1}
    got = feeder.get("out", 1)
    server.flush()
    assert success(got) == b"HELLO"


# -- advance ---------------------------------------------------------------------


def test_advance_delivers_requests_before_time_passes() -> None:
    """The README's example: no flush between the request and advance()."""
    server = MemoryServer()
    client = server.client()
    result = client.get("empty", timeout=5)
    server.advance(5)
    failure(result, GetTimeout)


def test_advance_delivers_what_time_made_happen() -> None:
    server = MemoryServer()
    consumer = server.client()
    got = consumer.get("q", 2)
    behind = consumer.put("q", b"after the timeout")
    server.advance(2)
    failure(got, GetTimeout)
    assert success(behind) is None


# -- the client's reply timeout in memory ------------------------------------------


def test_clients_time_their_replies_with_the_servers_clock() -> None:
    server = MemoryServer()
    client = server.client()
    assert client.clock is server.clock
    stuck = client.put("q", b"never delivered")
    server.clock.advance(60)  # no flush: the server never hears of it
    failure(stuck, ReplyTimeout)


def test_a_long_get_is_not_cut_by_the_reply_timeout() -> None:
    server = MemoryServer()
    consumer, producer = server.client(reply_timeout=1), server.client()
    got = consumer.get("q", 600)
    server.advance(599)
    producer.put("q", b"late but in time")
    server.flush()
    assert success(got) == b"late but in time"


# -- limits ------------------------------------------------------------------------


def test_limits_apply_to_the_memory_server() -> None:
    server = MemoryServer(limits=Limits(max_queues=1, max_message_bytes=4))
    assert server.broker.limits.max_queues == 1
    client = server.client()
    first = client.put("a", b"kept")
    too_large = client.put("a", b"too large")
    second_queue = client.put("b", b"m")
    server.flush()
    assert success(first) is None
    assert failure(too_large, ServerError).error_type == "REQUEST_MESSAGE_TOO_LARGE"
    assert failure(second_queue, ServerError).error_type == "SERVER_TOO_MANY_QUEUES"
    assert server.broker.num_messages == 1


def test_a_connection_over_max_connections_is_closed() -> None:
    server = MemoryServer(limits=Limits(max_connections=1))
    first, second = server.client(), server.client()
    refused = second.put("q", b"m")
    accepted = first.put("q", b"m")
    server.flush()
    failure(refused, ConnectionClosed)
    assert success(second.when_closed()) is None
    assert success(accepted) is None
    assert server.broker.num_connections == 1


# -- the endpoint ----------------------------------------------------------------


def test_the_endpoint_is_a_client_endpoint() -> None:
    assert verifyObject(IStreamClientEndpoint, MemoryServer().endpoint())


def test_connect_endpoint_through_memory() -> None:
    server = MemoryServer()
    connecting = connect_endpoint(server.endpoint(), clock=server.clock)
    client = success(connecting)
    assert server.broker.num_connections == 1
    done = client.put("jobs", b"one")
    got = client.get("jobs", 1)
    server.flush()
    assert success(done) is None
    assert success(got) == b"one"


def test_production_code_connecting_through_an_endpoint() -> None:
    """Code given an endpoint and a clock, as it would be given in production."""

    @inlineCallbacks
    def forward(endpoint: IStreamClientEndpoint, clock: IReactorTime) -> Any:
        client = yield connect_endpoint(endpoint, clock=clock)
        try:
            message = yield client.get("in", timeout=30)
        except GetTimeout:
            message = b"nothing"
        yield client.put("out", message)
        yield client.disconnect()

    server = MemoryServer()
    nothing = forward(server.endpoint(), server.clock)
    server.advance(30)
    assert success(nothing) is None

    feeder = server.client()
    relayed = forward(server.endpoint(), server.clock)
    feeder.put("in", b"something")
    server.flush()
    assert success(relayed) is None
    got = [feeder.get("out", 1), feeder.get("out", 1)]
    server.flush()
    assert [success(message) for message in got] == [b"nothing", b"something"]
    assert server.broker.num_connections == 1


def test_the_endpoint_connects_any_protocol() -> None:
    received: list[bytes] = []

    class Raw(Protocol):
        def dataReceived(self, data: bytes) -> None:
            received.append(data)

    server = MemoryServer()
    connecting: Deferred[Any] = server.endpoint().connect(Factory.forProtocol(Raw))
    raw = success(connecting)
    assert isinstance(raw, Raw)
    raw.transport.write(b"\x00\x00\x00\x08\x00\x00\x00\x04Info")  # type: ignore[union-attr]
    server.flush()
    assert b"NumConnections" in b"".join(received)


def test_the_endpoint_obeys_max_connections() -> None:
    server = MemoryServer(limits=Limits(max_connections=1))
    server.client()
    client = success(connect_endpoint(server.endpoint(), clock=server.clock))
    server.flush()
    assert success(client.when_closed()) is None
    assert server.broker.num_connections == 1
