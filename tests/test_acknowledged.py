"""Acknowledged delivery on the wire, rule by rule (docs/protocol.md,
"Acknowledged (at-least-once) delivery"): fake transports, a fake clock."""

from __future__ import annotations

import pytest

from mqmq.broker.limits import Limits
from mqmq.stores.memory import MemoryStore
from wire import Connection, Server

#: Every rule, on the memory store and on the SQLite store.
pytestmark = pytest.mark.usefixtures("both_stores")

OK = [b"OK"]
UNKNOWN_ID = [b"Error", b"REQUEST_UNKNOWN_ID"]


def reserved(connection: Connection) -> list[tuple[bytes, bytes, int]]:
    """The (message, id, deliveries) of each Reserve reply since the last read."""
    replies = connection.replies()
    assert all(reply[0] == b"OK" and len(reply) == 4 for reply in replies), replies
    return [(reply[1], reply[2], int(reply[3])) for reply in replies]


def put(server: Server, queue: bytes, *messages: bytes) -> None:
    producer = server.connect()
    producer.send(*[[b"Put", queue, message] for message in messages])
    assert producer.replies() == [OK] * len(messages)


def test_a_reserved_message_stays_until_acked() -> None:
    server = Server()
    put(server, b"q", b"a", b"b")
    consumer = server.connect()
    consumer.send([b"Reserve", b"q", b"10", b"5000"])
    [(message, message_id, deliveries)] = reserved(consumer)
    assert (message, deliveries) == (b"a", 1)
    assert server.broker.num_messages == 1 and server.broker.num_reserved == 1
    consumer.send([b"Ack", b"q", message_id])
    assert consumer.replies() == [OK]
    # Gone for good: acked twice is an unknown id, and the connection stays open.
    consumer.send([b"Ack", b"q", message_id], [b"Get", b"q"])
    assert consumer.replies() == [UNKNOWN_ID, [b"OK", b"b"]]
    assert server.broker.num_reserved == 0 and server.broker.num_bytes == 0


def test_ids_are_unique_among_the_messages_held() -> None:
    server = Server()
    put(server, b"q", b"a", b"b")
    put(server, b"r", b"c")
    consumer = server.connect()
    consumer.send([b"Reserve", b"q"], [b"Reserve", b"q"], [b"Reserve", b"r"])
    ids = [message_id for _, message_id, _ in reserved(consumer)]
    assert len(set(ids)) == 3
    assert all(message_id.isdigit() and len(message_id) <= 64 for message_id in ids)


def test_a_lease_that_runs_out_puts_the_message_back_at_the_front() -> None:
    server = Server()
    put(server, b"q", b"first", b"second")
    lost, other = server.connect(), server.connect()
    lost.send([b"Reserve", b"q", b"10", b"1000"])
    [(_, message_id, _)] = reserved(lost)
    server.clock.advance(0.999)
    assert server.broker.num_reserved == 1
    server.clock.advance(0.001)
    # Back at the front, its deliveries counted; its old holder cannot ack it.
    other.send([b"Reserve", b"q"])
    assert reserved(other) == [(b"first", message_id, 2)]
    lost.send([b"Ack", b"q", message_id])
    assert lost.replies() == [UNKNOWN_ID]


def test_touch_restarts_the_lease_but_not_once_it_has_run_out() -> None:
    server = Server()
    put(server, b"q", b"m")
    consumer = server.connect()
    consumer.send([b"Reserve", b"q", b"10", b"1000"])
    [(_, message_id, _)] = reserved(consumer)
    server.clock.advance(0.9)
    consumer.send([b"Touch", b"q", message_id, b"1000"])
    assert consumer.replies() == [OK]
    server.clock.advance(0.9)  # 1.8 s after the Reserve: still held
    assert server.broker.num_reserved == 1 and server.broker.num_messages == 0
    server.clock.advance(0.1)  # the touched lease ends
    consumer.send([b"Touch", b"q", message_id, b"1000"])
    assert consumer.replies() == [UNKNOWN_ID]
    assert server.broker.num_messages == 1


def test_release_goes_to_the_front_at_once_or_after_its_delay() -> None:
    server = Server()
    put(server, b"q", b"a", b"b", b"c")
    consumer = server.connect()
    consumer.send([b"Reserve", b"q"], [b"Reserve", b"q"])
    (_, id_a, _), (_, id_b, _) = reserved(consumer)
    consumer.send([b"Release", b"q", id_a], [b"Release", b"q", id_b, b"500"])
    assert consumer.replies() == [OK, OK]
    # Released with a delay, it is nobody's: no Ack, and not handed out yet.
    consumer.send([b"Ack", b"q", id_b], [b"Get", b"q"], [b"Get", b"q"])
    assert consumer.replies() == [UNKNOWN_ID, [b"OK", b"a"], [b"OK", b"c"]]
    server.clock.advance(0.5)
    consumer.send([b"Reserve", b"q"])
    assert reserved(consumer) == [(b"b", id_b, 2)]


def test_a_closed_connection_s_reservations_go_back_to_the_front_oldest_first() -> None:
    server = Server()
    put(server, b"q", b"1", b"2", b"3", b"4")
    leaving, staying = server.connect(), server.connect()
    leaving.send([b"Reserve", b"q"], [b"Reserve", b"q"], [b"Reserve", b"q"])
    assert [message for message, _, _ in reserved(leaving)] == [b"1", b"2", b"3"]
    leaving.close()
    assert server.broker.num_reserved == 0
    staying.send(*[[b"Get", b"q"]] * 4)
    assert staying.replies() == [[b"OK", b"1"], [b"OK", b"2"], [b"OK", b"3"], [b"OK", b"4"]]


def test_a_returning_reservation_goes_to_the_waiters_first_get_and_reserve_in_one_order() -> None:
    server = Server()
    holder, getter, reserver = server.connect(), server.connect(), server.connect()
    put(server, b"q", b"m")
    holder.send([b"Reserve", b"q", b"10", b"100"])
    [(_, message_id, _)] = reserved(holder)
    reserver.send([b"Reserve", b"q", b"5000"])
    getter.send([b"Get", b"q", b"5000"])
    server.clock.advance(0.1)  # the lease ends: the first waiter, a Reserve, takes it
    assert reserved(reserver) == [(b"m", message_id, 2)]
    put(server, b"q", b"next")  # the next, a Get
    assert getter.replies() == [[b"OK", b"next"]]


def test_a_poison_message_is_buried_at_the_delivery_limit_and_kick_brings_it_back() -> None:
    server = Server(Limits(max_deliveries=2))
    put(server, b"q", b"poison", b"fine")
    consumer = server.connect()
    for deliveries in (1, 2):
        consumer.send([b"Reserve", b"q", b"10", b"100"])
        assert [(message, count) for message, _, count in reserved(consumer)] == [(b"poison", deliveries)]
        server.clock.advance(0.1)  # it crashed the consumer: the lease runs out
    # A third hand-out would pass the limit: buried instead; the next one goes.
    consumer.send([b"Reserve", b"q"])
    assert [message for message, _, _ in reserved(consumer)] == [b"fine"]
    assert server.broker.num_buried == 1 and server.broker.num_messages == 0
    consumer.send([b"Get", b"q"])
    server.clock.advance(0.001)
    assert consumer.replies() == [[b"Timeout"]]
    consumer.send([b"Kick", b"q", b"10"], [b"Kick", b"q"])
    assert consumer.replies() == [[b"OK", b"1"], [b"OK", b"0"]]
    consumer.send([b"Reserve", b"q"])
    assert [(message, deliveries) for message, _, deliveries in reserved(consumer)] == [(b"poison", 1)]


@pytest.mark.not_redis("a Get behind a waiting one starts its timeout a turn later there; the poison test kicks on Redis too")
def test_kick_brings_back_the_oldest_buried_first_to_the_back() -> None:
    server = Server()
    put(server, b"q", b"x", b"y", b"z")
    consumer = server.connect()
    consumer.send([b"Reserve", b"q"], [b"Reserve", b"q"])
    (_, id_x, _), (_, id_y, _) = reserved(consumer)
    consumer.send([b"Bury", b"q", id_x], [b"Bury", b"q", id_y], [b"Bury", b"q", id_y])
    assert consumer.replies() == [OK, OK, UNKNOWN_ID]
    consumer.send([b"Kick", b"q", b"0"])  # below 1 means 1: x
    assert consumer.replies() == [[b"OK", b"1"]]
    consumer.send(*[[b"Get", b"q"]] * 3)
    server.clock.advance(0.001)
    assert consumer.replies() == [[b"OK", b"z"], [b"OK", b"x"], [b"Timeout"]]
    assert server.broker.num_buried == 1


@pytest.mark.parametrize("command", [b"Ack", b"Release", b"Touch", b"Bury"])
def test_an_id_held_by_another_connection_or_on_another_queue_or_never_given_is_unknown(
    command: bytes,
) -> None:
    server = Server()
    put(server, b"q", b"m")
    holder, other = server.connect(), server.connect()
    holder.send([b"Reserve", b"q"])
    [(_, message_id, _)] = reserved(holder)
    other.send([command, b"q", message_id], [command, b"elsewhere", message_id],
               [command, b"q", b"99"], [command, b"q", b"01"], [command, b"q", b"id"])
    assert other.replies() == [UNKNOWN_ID] * 5
    holder.send([command, b"elsewhere", message_id], [command, b"q", message_id])
    assert holder.replies() == [UNKNOWN_ID, OK]
    assert not other.closed and not holder.closed


def test_limits_count_reserved_and_buried_messages_as_held() -> None:
    server = Server(Limits(max_queued_messages=2))
    put(server, b"q", b"a", b"b")
    consumer = server.connect()
    consumer.send([b"Reserve", b"q"], [b"Reserve", b"q"])
    (_, id_a, _), _ = reserved(consumer)
    consumer.send([b"Bury", b"q", id_a], [b"Put", b"q", b"c"])
    assert consumer.replies() == [OK, [b"Error", b"SERVER_STORAGE_FULL"]]


def test_a_reserve_that_times_out_answers_timeout() -> None:
    server = Server()
    consumer = server.connect()
    consumer.send([b"Reserve", b"q", b"100"])
    assert consumer.replies() == []
    server.clock.advance(0.1)
    assert consumer.replies() == [[b"Timeout"]]


def info(connection: Connection) -> bytes:
    connection.send([b"Info"])
    [[ok, body]] = connection.replies()
    assert ok == b"OK"
    return body


def test_info_is_the_original_s_until_a_message_is_reserved_then_counts_reserved_and_buried() -> None:
    server = Server()
    put(server, b"a", b"1", b"2", b"3")
    consumer = server.connect()
    consumer.send([b"Get", b"a"])
    consumer.replies()
    assert info(consumer) == (b'{"NumConnections":2,"NumQueues":1,"NumMessages":2,'
                              b'"Queues":{"a":{"NumMessages":2}}}')
    consumer.send([b"Reserve", b"a"], [b"Reserve", b"a"])
    [_, (_, second, _)] = reserved(consumer)
    consumer.send([b"Bury", b"a", second])
    consumer.replies()
    consumer.send([b"Get", b"b", b"1"])  # a second queue, empty
    server.clock.advance(0.001)
    consumer.replies()
    assert info(consumer) == (
        b'{"NumConnections":2,"NumQueues":2,"NumMessages":0,'
        b'"Queues":{"a":{"NumMessages":0,"NumReserved":1,"NumBuried":1},'
        b'"b":{"NumMessages":0,"NumReserved":0,"NumBuried":0}},"NumReserved":1,"NumBuried":1}'
    )
    # And from then on, even with nothing reserved or buried.
    consumer.close()
    other = server.connect()
    other.send([b"Kick", b"a", b"5"], [b"Get", b"a"], [b"Get", b"a"])
    assert other.replies() == [[b"OK", b"1"], [b"OK", b"2"], [b"OK", b"3"]]
    assert info(other).endswith(b'"NumReserved":0,"NumBuried":0}')


def test_the_extended_info_is_read_back_and_shown() -> None:
    from mqmq.wire.info import ServerInfo

    body = (b'{"NumConnections":2,"NumQueues":1,"NumMessages":3,'
            b'"Queues":{"a":{"NumMessages":3,"NumReserved":1,"NumBuried":2}},"NumReserved":1,"NumBuried":2}')
    info = ServerInfo.from_json(body)
    assert (info.num_reserved, info.num_buried, info.reserved, info.buried) == (1, 2, {"a": 1}, {"a": 2})
    assert info.format_text().splitlines()[3:] == [
        "Number of reserved messages: 1", "Number of buried messages: 2",
        "Queues:", "        a: 3 (reserved 1, buried 2)",
    ]
    plain = ServerInfo.from_json(b'{"NumConnections":0,"NumQueues":1,"NumMessages":3,'
                                 b'"Queues":{"a":{"NumMessages":3}}}')
    assert plain.format_text().splitlines()[3:] == ["Queues:", "        a: 3"]


def test_limits_hold_for_a_put_handed_to_a_waiting_reserve() -> None:
    server = Server(Limits(max_queued_messages=2))
    consumer, producer = server.connect(), server.connect()
    for round_ in range(2):
        consumer.send([b"Reserve", b"q", b"60000", b"60000"])
        producer.send([b"Put", b"q", b"%d" % round_])
        assert producer.replies() == [OK]
    consumer.send([b"Reserve", b"q", b"60000", b"60000"])
    producer.send([b"Put", b"q", b"one too many"])  # kept by the Reserve: it must fit
    assert producer.replies() == [[b"Error", b"SERVER_STORAGE_FULL"]]
    assert server.broker.num_reserved == 2


@pytest.mark.not_redis("a Kick through the Redis store asks Redis, which may hold buried messages other servers buried, so the server keeps the queue it names")
def test_queues_emptied_by_acks_may_be_forgotten_and_kick_makes_none() -> None:
    server = Server(Limits(max_queues=1))
    client = server.connect()
    client.send([b"Put", b"a", b"m"], [b"Reserve", b"a"])
    [_, [ok, _, message_id, _]] = client.replies()
    client.send([b"Ack", b"a", message_id], [b"Kick", b"elsewhere"], [b"Put", b"b", b"m"])
    # a holds nothing once acked: forgotten for b; Kick made no queue.
    assert client.replies() == [OK, [b"OK", b"0"], OK]
    assert server.broker.num_queues == 1


def test_a_queue_with_buried_or_reserved_messages_is_never_forgotten() -> None:
    server = Server(Limits(max_queues=2))
    client = server.connect()
    client.send([b"Put", b"a", b"1"], [b"Put", b"b", b"2"], [b"Reserve", b"a"], [b"Reserve", b"b"])
    replies = client.replies()
    client.send([b"Bury", b"b", replies[3][2]], [b"Put", b"c", b"3"])
    assert client.replies() == [OK, [b"Error", b"SERVER_TOO_MANY_QUEUES"]]


class _StoreWithoutReservations(MemoryStore):
    """A store that keeps no reservations (as the original server keeps none)."""

    acknowledged_delivery = False


@pytest.mark.parametrize("frame", [[b"Reserve", b"q"], [b"Ack", b"q", b"1"], [b"Release", b"q", b"1"],
                                   [b"Touch", b"q", b"1"], [b"Bury", b"q", b"1"], [b"Kick", b"q"]])
def test_a_store_without_reservations_knows_none_of_the_commands(frame: list[bytes]) -> None:
    server = Server(Limits(max_queues=1), store=lambda clock: _StoreWithoutReservations())
    client = server.connect()
    client.send(frame)
    assert client.replies() == [[b"Error", b"REQUEST_UNKNOWN_COMMAND"]]
    assert client.closed
    assert server.broker.num_queues == 0  # and made no queue
