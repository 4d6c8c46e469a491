"""Metrics: what the counters count, snapshots taken a slice of queues per
turn, and their Prometheus text, on fake transports and a fake clock."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mqmq.broker.limits import Limits
from mqmq.broker.stats import Snapshot, snapshot
from mqmq.stores.health import Histogram
from mqmq.web.prometheus import exposition
from mqmq.web.site import SharedSnapshots
from support import success
from wire import Server, sqlite_store


def take(server: Server, **options: Any) -> Snapshot:
    return success(snapshot(server.broker, server.factory.open_bytes, **options))


def samples(snapshot: Snapshot) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the snapshot's Prometheus text, parsed back: (name, labels) -> value."""
    text = exposition(snapshot, process=False).decode("utf-8")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_requests_deliveries_and_bytes_are_counted() -> None:
    server = Server()
    producer, consumer = server.connect(), server.connect()
    producer.send([b"Put", b"jobs", b"one"], [b"Put", b"jobs", b"two"], [b"Put", b"other", b"x"])
    consumer.send([b"Get", b"jobs"], [b"Reserve", b"jobs"])
    assert len(producer.replies()) == 3 and len(consumer.replies()) == 2
    stats = take(server)
    assert stats.requests["put"] == 3
    assert stats.requests["get"] == 1
    assert stats.requests["reserve"] == 1
    assert stats.counters["deliveries"] == 2
    assert stats.counters["redeliveries"] == 0
    assert stats.connections == 2 and stats.counters["connections"] == 2
    sent_in = len(producer.transport.value()) and sum(len(p.transport.value()) for p in (producer, consumer))
    assert stats.counters["bytes_out"] == sent_in
    # Bytes read: the frames as sent (each 4 bytes of length, then fields).
    put_bytes = sum(4 + 4 + 3 + 4 + len(q) + 4 + len(m) for q, m in ((b"jobs", b"one"), (b"jobs", b"two"),
                                                                      (b"other", b"x")))
    assert stats.counters["bytes_in"] > put_bytes
    # Closed connections keep their bytes counted.
    producer.close()
    consumer.close()
    after = take(server)
    assert after.counters["bytes_out"] == stats.counters["bytes_out"]
    assert after.counters["bytes_in"] == stats.counters["bytes_in"]
    assert after.connections == 0


def test_redeliveries_timeouts_errors_leases_burials_and_kicks() -> None:
    server = Server()
    connection = server.connect()
    connection.send([b"Put", b"q", b"m"], [b"Reserve", b"q", b"0", b"1000"])
    replies = connection.replies()
    message_id = replies[1][2]
    connection.send([b"Release", b"q", message_id], [b"Reserve", b"q", b"0", b"1000"])
    replies = connection.replies()
    assert replies[1][3] == b"2"  # delivered the second time
    message_id = replies[1][2]
    connection.send([b"Bury", b"q", message_id], [b"Kick", b"q", b"5"], [b"Reserve", b"q", b"0", b"1000"])
    connection.replies()
    server.clock.advance(1.5)  # its lease of one second runs out
    connection.send([b"Get", b"empty", b"100"])
    server.clock.advance(0.2)  # the Get waits its 100 ms and times out
    connection.send([b"Get", b"q", b"soon"], [b"Ack", b"q", b"999"])
    connection.replies()
    stats = take(server)
    assert stats.counters["redeliveries"] == 1  # (a kicked message comes back as new)
    assert stats.counters["deliveries"] == 3
    assert stats.counters["buried"] == 1 and stats.counters["kicked"] == 1
    assert stats.counters["lease_expirations"] == 1
    assert stats.counters["wait_timeouts"] == 1
    assert stats.errors["REQUEST_BAD_TIMEOUT"] == 1
    assert stats.errors["REQUEST_UNKNOWN_ID"] == 1
    assert stats.requests["release"] == 1 and stats.requests["bury"] == 1 and stats.requests["kick"] == 1
    assert stats.requests["ack"] == 1  # refused, but asked


def test_refused_connections_and_malformed_frames_are_counted() -> None:
    server = Server(Limits(max_connections=1))
    connection = server.connect()
    assert server.build() is None
    connection.send_raw(b"\x00\x00\x00\x01\x00")  # a frame too short to hold a field count
    stats = take(server)
    assert stats.counters["connections_refused"] == 1
    assert stats.counters["malformed"] == 1


def test_held_messages_and_waiting_consumers() -> None:
    server = Server()
    producer = server.connect()
    for index in range(30):
        for _ in range(index):
            producer.send([b"Put", b"q%02d" % index, b"m"])
    producer.send([b"Put", b"r", b"m"], [b"Put", b"r", b"m"])
    producer.send([b"Reserve", b"r", b"0"])
    waiters = [server.connect() for _ in range(3)]
    for waiter in waiters:
        waiter.send([b"Get", b"idle", b"10000"])
    stats = take(server, largest=5)
    assert stats.queues == 31  # q01 to q29, r, idle
    assert stats.waiting == 3
    assert stats.ready == sum(range(30)) + 1 and stats.reserved == 1 and stats.buried == 0
    assert [(q.name, q.ready) for q in stats.largest] == [("q29", 29), ("q28", 28), ("q27", 27),
                                                          ("q26", 26), ("q25", 25)]
    # At most the largest few carry a label of their own: bounded label values.
    metrics = samples(stats)
    queues = {labels for (name, labels) in metrics if name == "mqmq_queue_messages"}
    assert {dict(labels)["queue"] for labels in queues} == {"q29", "q28", "q27", "q26", "q25"}
    assert metrics[("mqmq_queue_messages", (("queue", "q29"), ("state", "ready")))] == 29
    assert metrics[("mqmq_messages", (("state", "reserved"),))] == 1
    assert metrics[("mqmq_waiting_consumers", ())] == 3
    assert metrics[("mqmq_queues", ())] == 31


def test_a_snapshot_walks_the_queues_a_slice_per_turn() -> None:
    server = Server()
    producer = server.connect()
    for index in range(10):
        producer.send([b"Put", b"q%d" % index, b"m" * index])
    taken: list[Snapshot] = []
    snapshot(server.broker, largest=3, per_turn=5).addCallback(taken.append)
    assert not taken  # five queues walked; the rest in a later turn
    producer.send([b"Put", b"q9", b"more"])  # between slices: the server serves on
    assert producer.replies()[-1] == [b"OK"]
    server.clock.advance(0)
    assert taken
    assert [q.name for q in taken[0].largest] == ["q9", "q0", "q1"]  # among equals, the first walked
    assert taken[0].largest[0].ready == 2


def test_prometheus_text_counts_requests_and_errors_by_label() -> None:
    server = Server()
    connection = server.connect()
    connection.send([b"Put", b"q", b"m"], [b"Get", b"q"], [b"Nope"])
    connection.replies()
    metrics = samples(take(server))
    assert metrics[("mqmq_requests_total", (("command", "put"),))] == 1
    assert metrics[("mqmq_requests_total", (("command", "get"),))] == 1
    assert metrics[("mqmq_errors_total", (("type", "REQUEST_UNKNOWN_COMMAND"),))] == 1
    assert metrics[("mqmq_deliveries_total", ())] == 1
    assert metrics[("mqmq_store_healthy", ())] == 1
    assert ("mqmq_store_commits_total", ()) not in metrics  # memory commits nothing


def test_durable_store_commits_are_histograms_observed_once_per_commit(tmp_path: Any) -> None:
    server = Server(store=sqlite_store(tmp_path / "q.db"), write_before_reading=True)
    connection = server.connect()
    connection.send(*[[b"Put", b"q", b"m%d" % n] for n in range(10)])  # one batch
    assert len(connection.replies()) == 10
    connection.send([b"Put", b"q", b"again"])
    connection.replies()
    metrics = samples(take(server))
    assert metrics[("mqmq_store_commits_total", ())] == 2
    assert metrics[("mqmq_store_commit_seconds_count", ())] == 2
    assert metrics[("mqmq_store_batch_rows_count", ())] == 2
    assert metrics[("mqmq_store_batch_rows_bucket", (("le", "+Inf"),))] == 2
    # The first commit wrote its ten messages and a queue (and the id mark):
    # in the bucket up to 16 rows, not below 8.
    assert metrics[("mqmq_store_batch_rows_bucket", (("le", "8.0"),))] == 1
    assert metrics[("mqmq_store_batch_rows_bucket", (("le", "16.0"),))] == 2
    assert metrics[("mqmq_store_rows_written_total", ())] >= 12
    assert ("mqmq_store_last_error_timestamp_seconds", ()) not in metrics


def test_a_failing_store_shows_in_health_and_the_last_error(tmp_path: Any) -> None:
    server = Server(store=sqlite_store(tmp_path / "q.db"), write_before_reading=True)
    store: Any = server.broker.store
    store._db.execute("PRAGMA query_only = ON")  # every write now fails, as on a full disk
    connection = server.connect()
    connection.send([b"Put", b"q", b"m"])
    assert connection.replies() == [[b"Error", b"SERVER_STORAGE_ERROR"]]
    stats = take(server)
    assert stats.store_failure is not None
    metrics = samples(stats)
    assert metrics[("mqmq_store_healthy", ())] == 0
    assert metrics[("mqmq_errors_total", (("type", "SERVER_STORAGE_ERROR"),))] == 1
    assert metrics[("mqmq_store_last_error_timestamp_seconds", ())] == server.store_clock.seconds()
    error = [labels for (name, labels) in metrics if name == "mqmq_store_last_error_info"]
    assert "readonly" in dict(error[0])["error"]
    assert stats.as_json()["store"]["healthy"] is False


@pytest.mark.parametrize("value, bucket", [(0.0, 0), (1.0, 0), (1.5, 1), (2.0, 1), (3.0, 2)])
def test_histogram_buckets_hold_up_to_their_bound(value: float, bucket: int) -> None:
    histogram = Histogram((1.0, 2.0))
    histogram.observe(value)
    assert histogram.counts.index(1) == bucket
    assert histogram.cumulative()[-1] == (float("inf"), 1)


def test_scrapes_that_come_together_share_one_walk() -> None:
    server = Server()
    producer = server.connect()
    producer.send(*[[b"Put", b"q%d" % n, b"m"] for n in range(1200)])  # three turns' walk
    snapshots = SharedSnapshots(server)  # type: ignore[arg-type]  # (its broker and factory)
    first, second = snapshots.take(), snapshots.take()
    assert not first.called and not second.called
    server.clock.advance(0)
    one, two = success(first), success(second)
    assert one is two and one.queues == 1200
    third = snapshots.take()  # after the walk: a new one
    server.clock.advance(0)
    assert success(third) is not one


def test_reservations_abandoned_with_their_connection_are_counted() -> None:
    server = Server()
    producer, consumer = server.connect(), server.connect()
    producer.send([b"Put", b"q", b"a"], [b"Put", b"q", b"b"])
    consumer.send([b"Reserve", b"q"], [b"Reserve", b"q"])
    assert len(consumer.replies()) == 2
    consumer.close()
    stats = take(server)
    assert stats.counters["abandoned"] == 2 and stats.counters["deliveries"] == 2
    assert stats.ready == 2 and stats.reserved == 0


def test_queues_whose_names_differ_only_in_invalid_bytes_stay_apart() -> None:
    server = Server()
    producer = server.connect()
    names = [b"\xff\xfe", b"\xfe\xff", b"\\xff\\xfe", "caf\u00e9".encode()]
    for name in names:
        producer.send([b"Put", name, b"m"])
    labels = [q.name for q in take(server).largest]
    assert sorted(labels) == sorted(["\\xff\\xfe", "\\xfe\\xff", "\\\\xff\\\\xfe", "caf\u00e9"])
    metrics = samples(take(server))
    assert len([key for key in metrics if key[0] == "mqmq_queue_messages"]) == 3 * len(names)
