"""The reconnecting client: requests that wait for a connection, requests a
broken connection cut off, reservations tied to their connection, and a
consumer that resumes.  A fake clock and fake connections: no sockets."""

from __future__ import annotations

import math
from struct import pack
from typing import Any, Optional

import pytest
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from mqmq import errors
from mqmq.client import Delivery, MQClient
from mqmq.consumer import consume
from mqmq.reconnecting import DEFAULT_RETRY_POLICY, ReconnectingClient, reconnecting_client
from mqmq.testing import MemoryServer
from support import failure, success

PEER = IPv4Address("TCP", "127.0.0.1", 47774)


def frame(*values: bytes) -> bytes:
    """A frame built by hand, independently of mqmq.wire.codec."""
    payload = b"".join(pack(">I", len(value)) + value for value in values)
    return pack(">I", len(payload)) + payload


def every_second(attempt: int) -> float:
    return 1.0


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Connections over ``StringTransport``s, or refused while :attr:`refusing`."""

    def __init__(self) -> None:
        self.refusing = False
        self.attempts = 0
        self.connections: list[tuple[IProtocol, StringTransport]] = []

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        self.attempts += 1
        if self.refusing:
            return defer.fail(ConnectionRefusedError("refused by the test"))
        protocol = protocolFactory.buildProtocol(PEER)
        assert protocol is not None
        transport = StringTransport(peerAddress=PEER)
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return defer.succeed(protocol)

    def written(self, index: int = -1) -> bytes:
        return self.connections[index][1].value()

    def reply(self, *values: bytes, index: int = -1) -> None:
        self.connections[index][0].dataReceived(frame(*values))

    def drop(self, index: int = -1) -> None:
        protocol, transport = self.connections[index]
        transport.loseConnection()
        protocol.connectionLost(Failure(ConnectionLost("dropped by the test")))


def started(endpoint: IStreamClientEndpoint, clock: Clock, **options: Any) -> ReconnectingClient:
    options.setdefault("retry_policy", every_second)
    client = ReconnectingClient(endpoint, clock=clock, **options)
    client.startService()
    return client


# -- waiting for a connection ----------------------------------------------------


def test_requests_made_before_the_first_connection_go_out_once_it_is_made() -> None:
    endpoint, clock = FakeEndpoint(), Clock()
    endpoint.refusing = True
    client = started(endpoint, clock)
    putting = client.put("q", b"m")
    getting = client.get("q", 1)
    clock.pump([1] * 5)  # five more attempts refused
    assert endpoint.attempts == 6 and not endpoint.connections
    assert not putting.called and not getting.called
    endpoint.refusing = False
    clock.advance(1)
    assert client.connected
    assert endpoint.written() == frame(b"Put", b"q", b"m") + frame(b"Get", b"q", b"1000")
    endpoint.reply(b"OK")
    endpoint.reply(b"OK", b"hello")
    assert success(putting) is None and success(getting) == b"hello"


def test_a_request_made_while_connected_goes_out_at_once() -> None:
    endpoint, clock = FakeEndpoint(), Clock()
    client = started(endpoint, clock)
    assert client.connected
    info = client.info()
    assert endpoint.written() == frame(b"Info")
    endpoint.reply(b"OK", b'{"NumConnections":1,"NumQueues":0,"NumMessages":0,"Queues":{}}')
    assert success(info).num_connections == 1


def test_the_retry_policy_spaces_the_attempts() -> None:
    endpoint, clock = FakeEndpoint(), Clock()
    endpoint.refusing = True
    waits: list[int] = []

    def policy(attempt: int) -> float:
        waits.append(attempt)
        return 2.0 * attempt

    started(endpoint, clock, retry_policy=policy)
    assert endpoint.attempts == 1
    clock.advance(1.9)
    assert endpoint.attempts == 1
    clock.advance(0.1)  # 2 s after the first failure
    assert endpoint.attempts == 2
    clock.advance(3.9)
    assert endpoint.attempts == 2
    clock.advance(0.1)  # 4 s after the second
    assert endpoint.attempts == 3 and waits == [1, 2, 3]
    # A connection made resets the count: the next failure waits 2 s again.
    endpoint.refusing = False
    clock.advance(6)
    assert endpoint.attempts == 4 and len(endpoint.connections) == 1
    endpoint.refusing = True
    endpoint.drop()
    assert waits[-1] == 1


def test_the_default_retry_policy_backs_off_to_at_most_16_s() -> None:
    assert 0.75 <= DEFAULT_RETRY_POLICY(1) <= 1.75
    assert DEFAULT_RETRY_POLICY(2) >= 1.125
    assert 15 <= DEFAULT_RETRY_POLICY(100) <= 16


def test_requests_made_while_disconnected_go_out_in_order_on_the_next_connection() -> None:
    endpoint, clock = FakeEndpoint(), Clock()
    client = started(endpoint, clock)
    endpoint.drop()
    assert not client.connected
    requests = [client.put("q", b"one"), client.kick("q", 3), client.reserve("q", 2, lease=5), client.info()]
    assert not any(request.called for request in requests)
    clock.advance(1)
    assert len(endpoint.connections) == 2
    assert endpoint.written() == (frame(b"Put", b"q", b"one") + frame(b"Kick", b"q", b"3")
                                  + frame(b"Reserve", b"q", b"2000", b"5000") + frame(b"Info"))


def test_a_connect_timeout_fails_a_request_that_found_no_connection() -> None:
    endpoint, clock = FakeEndpoint(), Clock()
    endpoint.refusing = True
    client = started(endpoint, clock, connect_timeout=2.5)
    putting = client.put("q", b"m")
    clock.advance(2.4)
    assert not putting.called
    clock.advance(0.1)
    error = failure(putting, errors.NotConnected)
    assert "within 2.5 s" in str(error) and "refused by the test" in str(error)
    # Nothing is left to go out once a connection comes.
    endpoint.refusing = False
    clock.advance(1)
    assert client.connected and endpoint.written() == b""


def test_each_request_may_choose_its_connect_timeout() -> None:
    endpoint, clock = FakeEndpoint(), Clock()
    endpoint.refusing = True
    client = started(endpoint, clock, connect_timeout=1)
    failure(client.get("q", connect_timeout=0), errors.NotConnected)  # at once
    patient = client.put("q", b"patient", connect_timeout=math.inf)
    short = client.info(connect_timeout=0.5)
    default = client.put("q", b"default")
    clock.advance(0.5)
    failure(short, errors.NotConnected)
    assert not default.called
    clock.advance(0.5)
    failure(default, errors.NotConnected)
    clock.pump([1] * 1000)
    assert not patient.called
    endpoint.refusing = False
    clock.advance(1)
    assert endpoint.written() == frame(b"Put", b"q", b"patient")


@pytest.mark.parametrize("connect_timeout", [-1, float("nan")])
def test_a_connect_timeout_must_be_a_number_from_0(connect_timeout: float) -> None:
    with pytest.raises(ValueError):
        ReconnectingClient(FakeEndpoint(), connect_timeout=connect_timeout, clock=Clock())


def test_a_request_the_server_would_refuse_fails_at_once_while_disconnected() -> None:
    endpoint, clock = FakeEndpoint(), Clock()
    endpoint.refusing = True
    client = started(endpoint, clock)
    failure(client.put("q" * 1025, b"m"), errors.InvalidArgument)
    failure(client.get("q", timeout=3601), errors.InvalidArgument)
    failure(client.reserve("q", lease=0), errors.InvalidArgument)
    failure(client.kick("q", 1.5), errors.InvalidArgument)  # type: ignore[arg-type]
    endpoint.refusing = False
    clock.advance(1)
    assert client.connected and endpoint.written() == b""


def test_cancelling_a_waiting_request_stops_its_wait() -> None:
    endpoint, clock = FakeEndpoint(), Clock()
    endpoint.refusing = True
    client = started(endpoint, clock, connect_timeout=10)
    putting = client.put("q", b"m")
    putting.cancel()
    failure(putting, defer.CancelledError)
    endpoint.refusing = False
    clock.advance(20)  # neither sent nor timed out a second time
    assert endpoint.written() == b""


# -- a connection that breaks --------------------------------------------------


def test_a_request_cut_off_by_a_broken_connection_fails_and_is_not_sent_again() -> None:
    endpoint, clock = FakeEndpoint(), Clock()
    client = started(endpoint, clock)
    putting = client.put("q", b"m")
    getting = client.get("q")
    assert endpoint.written() == frame(b"Put", b"q", b"m") + frame(b"Get", b"q", b"0")
    endpoint.drop()
    assert "dropped by the test" in str(failure(putting, errors.ConnectionClosed))
    failure(getting, errors.ConnectionClosed)
    clock.advance(1)
    assert len(endpoint.connections) == 2 and client.connected
    assert endpoint.written() == b""  # not sent again: a Put may have been stored


def test_a_request_made_from_a_cut_off_ones_errback_waits_for_the_next_connection() -> None:
    endpoint, clock = FakeEndpoint(), Clock()
    client = started(endpoint, clock)
    retried: list[defer.Deferred[None]] = []
    client.put("q", b"m").addErrback(lambda _: retried.append(client.put("q", b"again")))
    endpoint.drop()
    assert len(retried) == 1 and not retried[0].called
    assert endpoint.written(0) == frame(b"Put", b"q", b"m")
    clock.advance(1)
    assert endpoint.written() == frame(b"Put", b"q", b"again")
    endpoint.reply(b"OK")
    assert success(retried[0]) is None


def test_a_request_made_after_a_bad_reply_waits_for_the_next_connection() -> None:
    endpoint, clock = FakeEndpoint(), Clock()
    client = started(endpoint, clock)
    retried: list[defer.Deferred[None]] = []
    client.put("q", b"m").addErrback(lambda _: retried.append(client.put("q", b"again")))
    # A reply longer than any allowed: the rest of the stream cannot be read.
    endpoint.connections[0][0].dataReceived(pack(">I", 2**31 - 1))
    assert len(retried) == 1 and not retried[0].called
    assert endpoint.written(0) == frame(b"Put", b"q", b"m")  # nothing more on the dying one
    endpoint.connections[0][0].connectionLost(Failure(ConnectionLost("closed")))
    clock.advance(1)
    assert endpoint.written() == frame(b"Put", b"q", b"again")


def test_a_reply_timeout_gives_up_on_the_connection_and_connects_again() -> None:
    endpoint, clock = FakeEndpoint(), Clock()
    client = started(endpoint, clock, reply_timeout=5)
    putting = client.put("q", b"m")
    clock.advance(5)
    failure(putting, errors.ReplyTimeout)
    assert endpoint.connections[0][1].disconnecting
    endpoint.connections[0][0].connectionLost(Failure(ConnectionLost("aborted")))
    clock.advance(1)
    assert len(endpoint.connections) == 2 and client.connected


# -- reservations belong to their connection -------------------------------------


def test_a_delivery_of_a_broken_connection_fails_with_reservation_lost_sending_nothing() -> None:
    endpoint, clock = FakeEndpoint(), Clock()
    client = started(endpoint, clock)
    reserving = client.reserve("q")
    endpoint.reply(b"OK", b"message", b"7", b"1")
    delivery = success(reserving)
    endpoint.drop()
    clock.advance(1)
    assert client.connected
    for settling in (delivery.ack(), delivery.release(), delivery.touch(), delivery.bury()):
        error = failure(settling, errors.ReservationLost)
        assert "hands it out again" in str(error)
        assert isinstance(error, errors.ConnectionClosed)
    assert endpoint.written() == b""


def test_ack_and_its_kin_fail_at_once_with_no_connection_and_go_on_the_open_one() -> None:
    endpoint, clock = FakeEndpoint(), Clock()
    endpoint.refusing = True
    client = started(endpoint, clock)
    for settling in (client.ack("q", b"7"), client.release("q", b"7", 1), client.touch("q", b"7"),
                     client.bury("q", b"7")):
        failure(settling, errors.ReservationLost)
    failure(client.ack("q", 7), errors.InvalidArgument)  # type: ignore[arg-type]
    endpoint.refusing = False
    clock.advance(1)
    acking = client.ack("q", b"7")
    assert endpoint.written() == frame(b"Ack", b"q", b"7")
    endpoint.reply(b"Error", b"REQUEST_UNKNOWN_ID")
    assert failure(acking, errors.ServerError).error_type == errors.UNKNOWN_ID


# -- the service ---------------------------------------------------------------


def test_requests_made_before_the_start_wait_for_it() -> None:
    # As an application adds consumers to a client before starting its services.
    endpoint, clock = FakeEndpoint(), Clock()
    client = ReconnectingClient(endpoint, clock=clock, connect_timeout=5)
    putting = client.put("q", b"m")
    consumer = consume(client, "q", lambda delivery: None)
    clock.advance(1)
    assert endpoint.attempts == 0 and not putting.called and not consumer.done.called
    client.startService()
    assert endpoint.written() == frame(b"Put", b"q", b"m") + frame(b"Reserve", b"q", b"5000", b"30000")
    endpoint.reply(b"OK")
    assert success(putting) is None


def test_stopping_fails_waiting_requests_and_stops_connecting() -> None:
    endpoint, clock = FakeEndpoint(), Clock()
    endpoint.refusing = True
    client = started(endpoint, clock)
    putting = client.put("q", b"m")
    stopping = client.stopService()
    assert success(stopping) is None
    assert "stopped" in str(failure(putting, errors.NotConnected))
    endpoint.refusing = False
    clock.advance(100)
    assert endpoint.attempts == 1 and not client.connected
    assert "stopped" in str(failure(client.info(), errors.NotConnected))
    # Started again, it connects again.
    client.startService()
    assert client.connected and endpoint.attempts == 2


def test_stopping_lets_the_requests_in_flight_be_answered_then_closes() -> None:
    endpoint, clock = FakeEndpoint(), Clock()
    client = started(endpoint, clock)
    putting = client.put("q", b"m")
    stopping = client.disconnect()
    protocol, transport = endpoint.connections[0]
    assert transport.value() == frame(b"Put", b"q", b"m") + frame(b"Quit")
    assert not transport.disconnecting and not stopping.called
    failure(client.put("q", b"late"), errors.NotConnected)
    endpoint.reply(b"OK")
    assert success(putting) is None and transport.disconnecting
    protocol.connectionLost(Failure(ConnectionLost("closed")))
    assert success(stopping) is None
    clock.advance(100)
    assert endpoint.attempts == 1


def test_a_stop_closes_the_connection_after_its_grace_whatever_is_in_flight() -> None:
    endpoint, clock = FakeEndpoint(), Clock()
    client = started(endpoint, clock, stop_grace=5)
    getting = client.get("q", 3600)  # would wait an hour
    stopping = client.stopService()
    protocol, transport = endpoint.connections[0]
    clock.advance(4.9)
    assert not stopping.called and not transport.disconnected
    clock.advance(0.1)
    assert transport.disconnected  # aborted
    protocol.connectionLost(Failure(ConnectionLost("aborted")))
    failure(getting, errors.ConnectionClosed)
    assert success(stopping) is None
    assert not clock.getDelayedCalls()


def test_started_again_while_stopping_it_goes_on_connecting() -> None:
    endpoint, clock = FakeEndpoint(), Clock()
    client = started(endpoint, clock)
    putting = client.put("q", b"m")
    stopping = client.stopService()
    client.startService()  # before the stop has finished
    endpoint.reply(b"OK")
    endpoint.connections[0][0].connectionLost(Failure(ConnectionLost("closed")))
    assert success(putting) is None and success(stopping) is None
    clock.advance(1)
    assert client.running and client.connected and len(endpoint.connections) == 2
    client.put("q", b"n")
    assert endpoint.written() == frame(b"Put", b"q", b"n")


def test_waiters_behind_one_whose_callback_stops_the_client_fail() -> None:
    endpoint, clock = FakeEndpoint(), Clock()
    endpoint.refusing = True
    client = started(endpoint, clock)
    first, second = client.when_connected(), client.when_connected()
    first.addCallback(lambda _: client.stopService())
    endpoint.refusing = False
    clock.advance(1)
    failure(second, errors.NotConnected)
    assert not client._waiting


def test_it_runs_under_a_parent_service_and_starts_again() -> None:
    endpoint, clock = FakeEndpoint(), Clock()
    parent = MultiService()
    client = ReconnectingClient(endpoint, clock=clock, retry_policy=every_second)
    client.setServiceParent(parent)
    assert endpoint.attempts == 0
    parent.startService()
    assert client.running and client.connected
    stopping = parent.stopService()
    endpoint.connections[0][0].connectionLost(Failure(ConnectionLost("closed")))
    assert stopping.called and not client.running
    client.startService()
    assert client.connected and len(endpoint.connections) == 2


def test_reconnecting_client_connects_to_host_and_port() -> None:
    reactor = MemoryReactorClock()
    client = reconnecting_client(reactor, "127.0.0.1:4777", timeout=3, connect_timeout=1)
    assert client.clock is reactor and client.connect_timeout == 1
    client.startService()
    host, port, _, timeout, _ = reactor.tcpClients[0]
    assert (host, port, timeout) == ("127.0.0.1", 4777, 3)


def test_reconnecting_client_with_tls_speaks_tls() -> None:
    ssl = pytest.importorskip("twisted.internet.ssl")
    reactor = MemoryReactorClock()
    client = reconnecting_client(reactor, "127.0.0.1:4777", tls=ssl.optionsForClientTLS("localhost"))
    client.startService()
    _, _, factory, _, _ = reactor.tcpClients[0]
    protocol = factory.buildProtocol(PEER)
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert transport.value()[:1] == b"\x16"  # a TLS handshake record: the ClientHello


# -- against the server, in memory -------------------------------------------------


@implementer(IStreamClientEndpoint)
class SwitchedEndpoint:
    """Connects to a :class:`MemoryServer` while :attr:`up`; keeps the connections."""

    def __init__(self, server: MemoryServer) -> None:
        self.server = server
        self.up = True
        self.connections: list[IProtocol] = []

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        if not self.up:
            return defer.fail(ConnectionRefusedError("the server is down"))

        def made(protocol: IProtocol) -> IProtocol:
            self.connections.append(protocol)
            return protocol

        return self.server.endpoint().connect(protocolFactory).addCallback(made)

    def drop(self) -> None:
        """Break the last connection, as a crash of the server would."""
        self.connections[-1].transport.loseConnection()  # type: ignore[attr-defined]
        self.server.flush()


def test_an_id_reserved_on_an_earlier_connection_is_unknown_on_the_next() -> None:
    server = MemoryServer()
    endpoint = SwitchedEndpoint(server)
    client = started(endpoint, server.clock)
    server.client().put("jobs", b"one")
    reserving = client.reserve("jobs")
    server.flush()
    delivery = success(reserving)
    endpoint.drop()
    # The server gave the message back when the connection closed.
    assert server.broker.num_reserved == 0 and server.broker.num_messages == 1
    server.advance(1)
    acking = client.ack(delivery.queue, delivery.message_id)
    server.flush()
    assert failure(acking, errors.ServerError).error_type == errors.UNKNOWN_ID
    again = client.reserve("jobs")
    server.flush()
    redelivered = success(again)
    assert (redelivered.message, redelivered.deliveries) == (b"one", 2)


def test_a_consumer_resumes_after_the_connection_breaks() -> None:
    server = MemoryServer()
    endpoint = SwitchedEndpoint(server)
    client = started(endpoint, server.clock)
    producer = server.client()
    for message in (b"one", b"two", b"three"):
        producer.put("jobs", message)
    server.flush()
    handled: list[tuple[bytes, int]] = []
    hold: defer.Deferred[None] = defer.Deferred()

    def handle(delivery: Delivery) -> Optional[defer.Deferred[None]]:
        handled.append((delivery.message, delivery.deliveries))
        if delivery.message == b"two" and delivery.deliveries == 1:
            return hold
        return None

    consumer = consume(client, "jobs", handle, lease=10, wait=1)
    server.flush()
    assert handled == [(b"one", 1), (b"two", 1)]
    # The server goes down while "two" is being handled.
    endpoint.up = False
    endpoint.drop()
    hold.callback(None)  # its ack cannot be done: ReservationLost, logged
    server.advance(5)
    assert not consumer.done.called and consumer.acked == 1
    # Back up: "two" comes again (the server put it back), then "three".
    endpoint.up = True
    server.advance(1)
    server.advance(0)
    assert handled == [(b"one", 1), (b"two", 1), (b"two", 2), (b"three", 1)]
    assert consumer.acked == 3 and not consumer.done.called
    assert server.broker.num_messages == 0 and server.broker.num_reserved == 0
    # Stopped while waiting for a connection, it stops at once.
    endpoint.up = False
    endpoint.drop()
    stopping = consumer.stop()
    assert success(stopping) is None and success(consumer.done) is None


def test_a_consumer_ends_when_its_reconnecting_client_stops() -> None:
    server = MemoryServer()
    endpoint = SwitchedEndpoint(server)
    client = started(endpoint, server.clock)
    consumer = consume(client, "jobs", lambda delivery: None, wait=1)
    server.flush()
    endpoint.up = False
    endpoint.drop()
    client.stopService()
    failure(consumer.done, errors.NotConnected)


def test_a_consumer_of_a_plain_client_still_ends_with_its_connection() -> None:
    server = MemoryServer()
    client = server.client()
    consumer = consume(client, "jobs", lambda delivery: None, wait=1)
    server.flush()
    client.transport.loseConnection()
    server.flush()
    failure(consumer.done, errors.ConnectionClosed)


def test_a_plain_clients_delivery_after_its_connection_closed_is_reservation_lost() -> None:
    server = MemoryServer()
    client: MQClient = server.client()
    client.put("jobs", b"one")
    reserving = client.reserve("jobs")
    server.flush()
    delivery = success(reserving)
    client.transport.loseConnection()
    server.flush()
    failure(delivery.ack(), errors.ReservationLost)
