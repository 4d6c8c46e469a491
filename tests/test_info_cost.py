"""What an ``Info`` may cost: bounded size, bounded reactor time, bounded memory.

A few bytes of request once bought hundreds of megabytes of reply, built in
one go while every other client waited.  Now a reply over ``--max-info-bytes``
is refused, a large one is built a slice per reactor turn, one connection's
at a time, and replies written but not yet sent count against a budget.
"""

from __future__ import annotations

import json
import socket
from typing import AsyncIterator

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.logger import capturedLogs, formatEvent

from mqmq.broker import broker as broker_module
from mqmq.wire.codec import MAX_FRAME_LENGTH
from mqmq.broker.limits import MAX_INFO_BYTES, Limits
from test_faults import Harness, RawClient, frame, logged_errors, pause, until
from wire import Server

# Every fake-transport server here runs on each store (conftest.both_stores).
pytestmark = pytest.mark.usefixtures("both_stores")

__all__ = ["logged_errors"]  # a fixture the tests here use

INFO_TOO_LARGE = [b"Error", b"SERVER_INFO_TOO_LARGE"]


def make_queues(server: Server, count: int, name_bytes: int = 16, fill: bytes = b"q") -> None:
    for index in range(count):
        name = (b"%08d" % index + fill * name_bytes)[:name_bytes]
        server.broker.put(name, b"m")


def one_turn(server: Server) -> None:
    """Run the calls due now, as one turn of the reactor would (``Clock.advance``
    would also run those they schedule for now)."""
    clock = server.clock
    due = [call for call in clock.getDelayedCalls() if call.getTime() <= clock.seconds()]
    for call in due:
        clock.calls.remove(call)
        call.func(*call.args, **call.kw)


def test_the_default_limit_is_what_one_frame_carries() -> None:
    assert Limits().max_info_bytes == MAX_INFO_BYTES
    assert 4 + 2 + 4 + MAX_INFO_BYTES == MAX_FRAME_LENGTH


def test_an_info_over_the_limit_is_refused_and_the_connection_goes_on() -> None:
    server = Server(Limits(max_info_bytes=1000))
    make_queues(server, 50)
    conn = server.connect()
    with capturedLogs() as events:
        conn.send([b"Info"], [b"Put", b"q", b"m"], [b"Get", b"q"])
    assert conn.replies() == [INFO_TOO_LARGE, [b"OK"], [b"OK", b"m"]]
    assert not conn.closed
    lines = [formatEvent(event) for event in events]
    assert any("SERVER_INFO_TOO_LARGE" in line and "1000" in line for line in lines), lines


def test_an_info_that_fits_exactly_is_sent() -> None:
    server = Server()
    make_queues(server, 50)
    size = len(server.broker.info_json())
    exact = Server(Limits(max_info_bytes=size))
    make_queues(exact, 50)
    conn = exact.connect()
    conn.send([b"Info"])
    ((status, body),) = conn.replies()
    assert status == b"OK" and len(body) == size
    below = Server(Limits(max_info_bytes=size - 1))
    make_queues(below, 50)
    conn = below.connect()
    conn.send([b"Info"])
    assert conn.replies() == [INFO_TOO_LARGE]


def test_a_hopelessly_large_info_is_refused_without_building_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 2,000 queues of 1,024 invalid UTF-8 bytes: at least 2 MB of JSON (each
    # byte escaped to six), over a 1 MB limit.  Known from the names' length alone.
    server = Server(Limits(max_info_bytes=1_000_000))
    for index in range(2000):
        server.broker.take(b"%04d" % index + b"\xff" * 1020)
    built: list[bytes] = []
    monkeypatch.setattr(broker_module, "encode_info_entry", lambda *a: built.append(a[0]) or b"")
    conn = server.connect()
    conn.send([b"Info"])
    assert conn.replies() == [INFO_TOO_LARGE]
    assert built == []


@pytest.mark.not_redis("counts the broker's turns, which the Redis store's test harness runs together")
def test_a_large_info_is_built_a_slice_per_reactor_turn_and_holds_up_what_follows() -> None:
    server = Server()
    slices = 3
    make_queues(server, broker_module.INFO_SLICE_QUEUES * (slices - 1) + 1)
    expected = server.broker.info_json()
    conn = server.connect()
    conn.send([b"Info"], [b"Get", b"00000000qqqqqqqq"])
    # One slice a turn: nothing is answered until the last.
    for _ in range(slices - 1):
        assert conn.replies() == []
        one_turn(server)
    (info,) = conn.replies()
    # Connections are counted at the end; nothing else changed meanwhile.
    assert info == [b"OK", expected.replace(b'"NumConnections":0', b'"NumConnections":1')]
    # The Get behind it goes on at the next turn.
    one_turn(server)
    assert conn.replies() == [[b"OK", b"m"]]


@pytest.mark.not_redis("counts the broker's turns, which the Redis store's test harness runs together")
def test_a_slice_is_bounded_by_bytes_too(monkeypatch: pytest.MonkeyPatch) -> None:
    server = Server()
    for index in range(200):
        server.broker.take(b"%04d" % index + b"\xff" * 1020)
    entries: list[int] = []
    real = broker_module.encode_info_entry

    def counted(name: bytes, count: int) -> bytes:
        entry = real(name, count)
        entries.append(len(entry))
        return entry

    monkeypatch.setattr(broker_module, "encode_info_entry", counted)
    conn = server.connect()
    conn.send([b"Info"])
    turns = 1
    while not conn.replies():
        one_turn(server)
        turns += 1
    # Each entry is about 6 KiB; a slice stops once past INFO_SLICE_BYTES.
    per_slice = broker_module.INFO_SLICE_BYTES // entries[0] + 1
    assert turns == -(-200 // per_slice)
    assert len(entries) == 200


@pytest.mark.not_redis("counts the broker's turns, which the Redis store's test harness runs together")
def test_an_info_sees_the_writes_made_before_it_on_its_connection() -> None:
    # One Info is built at a time: another connection's, waiting its turn,
    # starts after the one in progress and sees what was put before it.
    server = Server()
    make_queues(server, 2500)
    first = server.connect()
    first.send([b"Info"])
    second = server.connect()
    second.send([b"Put", b"00000000qqqqqqqq", b"more"], [b"Info"])
    assert second.replies() == [[b"OK"]]
    for _ in range(6):
        server.clock.advance(0)
    (first_info,) = first.replies()
    (second_info,) = second.replies()
    assert json.loads(first_info[1])["Queues"]["00000000qqqqqqqq"]["NumMessages"] in (1, 2)
    assert json.loads(second_info[1])["Queues"]["00000000qqqqqqqq"]["NumMessages"] == 2


def test_a_connection_lost_while_its_info_is_built_stops_the_build() -> None:
    server = Server()
    make_queues(server, 2500)
    conn = server.connect()
    conn.send([b"Info"])
    waiting = server.connect()
    waiting.send([b"Info"])
    conn.lose()
    # The build stopped, and the next connection's Info went ahead.
    for _ in range(3):
        server.clock.advance(0)
    assert server.clock.getDelayedCalls() == []
    assert waiting.replies()[0][0] == b"OK"
    assert conn.transport.value() == b""


def test_info_on_a_server_with_few_queues_is_answered_at_once() -> None:
    server = Server()
    make_queues(server, 10)
    conn = server.connect()
    conn.send(*([b"Info"] for _ in range(100)))
    assert len(conn.replies()) == 100
    assert server.clock.getDelayedCalls() == []


# --- over real TCP: replies written but not read count against a budget -------


@pytest_twisted.async_yield_fixture
async def budget(logged_errors: list) -> AsyncIterator[Harness]:  # noqa: F811
    running = Harness(Limits())
    running.service.factory.info_budget_bytes = 1024 * 1024
    # About 8.4 MB of Info: more than the kernel buffers of one connection.
    for index in range(8000):
        running.broker.take(b"%08d" % index + b"n" * 1016)
    try:
        yield running
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_clients_that_never_read_their_info_cannot_take_all_memory(budget: Harness) -> None:
    factory = budget.service.factory
    hoarder = await budget.connect()
    hoarder.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await hoarder.send(frame(b"Info"))
    await until(lambda: factory.info_unsent_bytes > factory.info_budget_bytes,
                "the unread Info fills the budget")
    held = factory.info_unsent_bytes

    # More clients asking for Info and never reading wait their turn instead
    # of each getting eight more megabytes.
    others = [await budget.connect() for _ in range(8)]
    for other in others:
        await other.send(frame(b"Info"))
    await pause(0.3)
    assert factory.info_unsent_bytes == held
    assert all(other.protocol is not None and other.protocol._info_waiting_turn for other in others)

    # Everyone else is served meanwhile.
    worker = await budget.connect()
    assert await worker.request(b"Put", b"jobs", b"j") == [b"OK"]
    assert await worker.request(b"Get", b"jobs", b"1000") == [b"OK", b"j"]

    # Once the hoarder has gone, the next Info goes out, and so on.
    hoarder.close()
    first = others[0]
    status, body = await first.read_frame(within=10)
    assert status == b"OK" and json.loads(body)["NumQueues"] == 8001


@pytest_twisted.ensureDeferred
async def test_an_info_read_as_it_comes_frees_the_budget(budget: Harness) -> None:
    factory = budget.service.factory
    reader = await budget.connect()
    for _ in range(3):
        status, body = (await reader.request(b"Info"))
        assert status == b"OK" and len(body) > 8_000_000
    await until(lambda: factory.info_unsent_bytes == 0, "nothing held once all was read")


def test_a_hopeless_info_is_refused_at_once_even_while_others_wait_their_turn() -> None:
    server = Server(Limits(max_info_bytes=10_000))
    for index in range(200):
        server.broker.take(b"%04d" % index + b"n" * 60)
    server.factory._info_building = server.build()  # another connection's Info is being built
    conn = server.connect()
    conn.send([b"Info"], [b"Put", b"q", b"m"])
    assert conn.replies() == [INFO_TOO_LARGE, [b"OK"]]


@pytest_twisted.ensureDeferred
async def test_a_client_that_reads_none_of_its_info_is_dropped_and_frees_the_budget(
    budget: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mqmq.server import protocol as server_module

    monkeypatch.setattr(server_module, "INFO_STALL_SECONDS", 0.5)
    factory = budget.service.factory
    hoarder = await budget.connect()
    hoarder.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await hoarder.send(frame(b"Info"))
    await until(lambda: factory.info_unsent_bytes > factory.info_budget_bytes,
                "the unread Info fills the budget")
    waiting = await budget.connect()
    await waiting.send(frame(b"Info"))
    # Half a second without reading anything: the hoarder is dropped, and
    # the next Info goes out.
    assert await hoarder.sees_close(within=5)
    status, body = await waiting.read_frame(within=10)
    assert status == b"OK" and json.loads(body)["NumQueues"] == 8000
