"""A snapshot of the server in Prometheus's text format (``prometheus_client``'s
exposition), through a custom collector that reads it at scrape time."""

from __future__ import annotations

import math
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

import mqmq
from mqmq.broker.stats import Snapshot
from mqmq.stores.health import Histogram

#: The content type of :func:`exposition`'s text.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Events counted by the broker and the protocol: counter name, help.
_EVENTS = {
    "deliveries": ("mqmq_deliveries", "Messages handed out, by Get or Reserve."),
    "redeliveries": ("mqmq_redeliveries", "Messages handed out by Reserve that had been handed out before."),
    "wait_timeouts": ("mqmq_wait_timeouts", "Gets and Reserves that waited and were answered Timeout."),
    "lease_expirations": ("mqmq_lease_expirations", "Reservations whose lease ran out; their message went back."),
    "abandoned": ("mqmq_reservations_abandoned",
                  "Reservations whose connection closed before their Ack; their message went back."),
    "buried": ("mqmq_buried", "Messages buried (by Bury, or past --max-deliveries)."),
    "kicked": ("mqmq_kicked", "Buried messages kicked back."),
    "returned": ("mqmq_returned", "Messages handed out by Get put back: their reply never reached the consumer."),
    "malformed": ("mqmq_malformed_frames", "Connections closed for a frame that could not be read."),
    "bytes_in": ("mqmq_received_bytes", "Bytes read from client connections."),
    "bytes_out": ("mqmq_sent_bytes", "Bytes written to client connections."),
    "connections": ("mqmq_connections_accepted", "Client connections accepted."),
    "connections_refused": ("mqmq_connections_refused", "Client connections refused (--max-connections)."),
}


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    buckets = [("+Inf" if math.isinf(bound) else repr(float(bound)), float(count))
               for bound, count in histogram.cumulative()]
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=histogram.total)


def families(snapshot: Snapshot) -> Iterator[Metric]:
    """The metric families of one snapshot."""
    yield InfoMetricFamily("mqmq_server", "The server's version and store.",
                           value={"version": mqmq.__version__, "store": snapshot.store})
    yield GaugeMetricFamily("mqmq_uptime_seconds", "Seconds since the server started.", value=snapshot.uptime)
    yield GaugeMetricFamily("mqmq_connections", "Client connections open now.", value=snapshot.connections)
    yield GaugeMetricFamily("mqmq_waiting_consumers", "Gets and Reserves waiting for a message now.",
                            value=snapshot.waiting)
    yield GaugeMetricFamily("mqmq_queues", "Queues kept now.", value=snapshot.queues)
    messages = GaugeMetricFamily("mqmq_messages", "Messages held now, by state.", labels=["state"])
    messages.add_metric(["ready"], snapshot.ready)
    messages.add_metric(["reserved"], snapshot.reserved)
    messages.add_metric(["buried"], snapshot.buried)
    yield messages
    yield GaugeMetricFamily("mqmq_message_bytes", "Bytes of messages held now.", value=snapshot.held_bytes)
    largest = GaugeMetricFamily(
        "mqmq_queue_messages",
        "Messages held by each of the largest queues (20 by default), by state; "
        "the rest are counted only in mqmq_messages.",
        labels=["queue", "state"],
    )
    for queue in snapshot.largest:
        largest.add_metric([queue.name, "ready"], queue.ready)
        largest.add_metric([queue.name, "reserved"], queue.reserved)
        largest.add_metric([queue.name, "buried"], queue.buried)
    yield largest
    requests = CounterMetricFamily("mqmq_requests", "Requests, by command.", labels=["command"])
    for command, count in snapshot.requests.items():
        requests.add_metric([command], count)
    yield requests
    replies = CounterMetricFamily("mqmq_errors", "Error replies, by error type.", labels=["type"])
    for error_type, count in snapshot.errors.items():
        replies.add_metric([error_type], count)
    yield replies
    for key, (name, documentation) in _EVENTS.items():
        yield CounterMetricFamily(name, documentation, value=snapshot.counters[key])
    yield GaugeMetricFamily("mqmq_store_healthy", "1 while the store takes writes, 0 while they fail.",
                            value=0 if snapshot.store_failure else 1)
    health = snapshot.health
    if health is None:
        return
    yield CounterMetricFamily("mqmq_store_commits", "Transactions the store committed.", value=health.commits)
    yield CounterMetricFamily("mqmq_store_rows_written", "Rows the store's commits wrote.", value=health.rows)
    yield _histogram("mqmq_store_commit_seconds",
                     "A commit's time in the writer thread (with --fsync always, its fsync included).",
                     health.commit_seconds)
    yield _histogram("mqmq_store_sync_seconds", "A separate sync's time (--fsync everysec).",
                     health.sync_seconds)
    yield _histogram("mqmq_store_batch_rows", "Rows written by each commit.", health.batch_rows)
    if health.last_error is not None and health.last_error_time is not None:
        yield GaugeMetricFamily("mqmq_store_last_error_timestamp_seconds",
                                "When the store last failed to read or write (Unix time).",
                                value=health.last_error_time)
        yield InfoMetricFamily("mqmq_store_last_error", "The store's last error.",
                               value={"error": health.last_error})


class SnapshotCollector(Collector):
    """Collects one snapshot, taken before the scrape."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        return families(self.snapshot)


class LiveCollector(Collector):
    """Collects a snapshot taken when scraped, at once (all queues in one
    turn): for an application that serves its own Prometheus registry.

    ``take`` makes the snapshot, e.g. ``lambda: mqmq.web.site.snapshot_now(service)``.
    """

    def __init__(self, take: Callable[[], Snapshot]) -> None:
        self.take = take

    def collect(self) -> Iterator[Metric]:
        return families(self.take())


def exposition(snapshot: Snapshot, process: bool = True) -> bytes:
    """The text a scrape gets: the snapshot's metrics, and the process's
    (resident memory, CPU time, open files) from ``prometheus_client``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    if process:
        ProcessCollector(registry=registry)
    return generate_latest(registry)
