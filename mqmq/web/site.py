"""The HTTP side of a server: ``/metrics`` for Prometheus, ``/stats`` as JSON,
and the dashboard at ``/``, served by ``twisted.web`` from the reactor thread.

A scrape takes a snapshot a slice of queues per reactor turn
(:func:`mqmq.broker.stats.snapshot`): clients are served between slices.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from typing import Any, Optional

from prometheus_client import ProcessCollector
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource
from twisted.web.static import File

from mqmq.broker.stats import Snapshot, snapshot
from mqmq.server.service import MQService
from mqmq.web.prometheus import CONTENT_TYPE, exposition


def take_snapshot(service: MQService, **options: Any) -> defer.Deferred[Snapshot]:
    """A snapshot of a running server, its open connections' bytes included."""
    return snapshot(service.broker, service.factory.open_bytes, **options)


def snapshot_now(service: MQService) -> Snapshot:
    """A snapshot taken in one go (every queue in this turn)."""
    taken: list[Snapshot] = []
    take_snapshot(service, per_turn=2**62).addCallback(taken.append)
    return taken[0]


def resident_bytes() -> Optional[float]:
    """The process's resident memory, where the system tells (Linux's /proc)."""
    for metric in ProcessCollector(registry=None).collect():
        if metric.name == "process_resident_memory_bytes" and metric.samples:
            return metric.samples[0].value
    return None


class SharedSnapshots:
    """Snapshots for the pages: requests that come while one is being taken
    share it, so that many scrapes at once cost one walk of the queues."""

    def __init__(self, service: MQService) -> None:
        self.service = service
        self._waiting: Optional[list[defer.Deferred[Snapshot]]] = None

    def take(self) -> defer.Deferred[Snapshot]:
        waiter: defer.Deferred[Snapshot] = defer.Deferred()
        if self._waiting is not None:
            self._waiting.append(waiter)
            return waiter
        self._waiting = [waiter]
        take_snapshot(self.service).addBoth(self._taken)
        return waiter

    def _taken(self, result: Any) -> None:
        waiting, self._waiting = self._waiting or [], None
        for waiter in waiting:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


class _SnapshotPage(Resource):
    """A page made from a snapshot: ``render`` bytes and their content type."""

    log = Logger()
    content_type = "text/plain"

    def __init__(self, snapshots: SharedSnapshots) -> None:
        super().__init__()
        self.snapshots = snapshots

    def page(self, taken: Snapshot) -> bytes:
        raise NotImplementedError

    def render_GET(self, request: server.Request) -> Any:
        gone: list[object] = []
        request.notifyFinish().addErrback(gone.append)

        def write(taken: Snapshot) -> None:
            if gone:
                return  # the client left while the snapshot was taken
            request.setHeader(b"content-type", self.content_type.encode("ascii"))
            request.setHeader(b"cache-control", b"no-store")
            request.write(self.page(taken))
            request.finish()

        def failed(failure: Failure) -> None:
            self.log.failure("taking a snapshot for {path} failed", failure, path=request.path)
            if not gone:
                request.setResponseCode(500)
                request.finish()

        self.snapshots.take().addCallback(write).addErrback(failed)
        return server.NOT_DONE_YET


class Metrics(_SnapshotPage):
    """``/metrics``: Prometheus's text format."""

    content_type = CONTENT_TYPE

    def page(self, taken: Snapshot) -> bytes:
        return exposition(taken)


class Stats(_SnapshotPage):
    """``/stats``: the snapshot as JSON, for the dashboard and scripts."""

    content_type = "application/json"

    def page(self, taken: Snapshot) -> bytes:
        stats = taken.as_json()
        stats["memory"] = {"resident_bytes": resident_bytes()}
        return json.dumps(stats, separators=(",", ":")).encode("utf-8")


def dashboard_directory() -> str:
    """Where the dashboard's files are (shipped in the package: no CDN)."""
    return str(resources.files("mqmq.web") / "dashboard")


class _DashboardFile(File):
    """One of the dashboard's files, revalidated on every load (a new
    version of the server serves a new page) and never sniffed."""

    def render_GET(self, request: server.Request) -> Any:
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-security-policy", _CONTENT_SECURITY_POLICY)
        return super().render_GET(request)


# The page loads its own script and style, and nothing from elsewhere.
_CONTENT_SECURITY_POLICY = b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"

#: The dashboard's files; nothing else in its directory is served.
DASHBOARD_FILES = ("index.html", "dashboard.js", "dashboard.css")


def site(service: MQService) -> server.Site:
    """The web site of a server: serve it on any endpoint, e.g.
    ``StreamServerEndpointService(serverFromString(reactor, "tcp:9477:interface=127.0.0.1"), site(service))``.
    """
    directory = dashboard_directory()
    root = Resource()
    root.putChild(b"", _DashboardFile(os.path.join(directory, "index.html")))
    for name in DASHBOARD_FILES:
        root.putChild(name.encode("ascii"), _DashboardFile(os.path.join(directory, name)))
    snapshots = SharedSnapshots(service)
    root.putChild(b"metrics", Metrics(snapshots))
    root.putChild(b"stats", Stats(snapshots))
    web = server.Site(root)
    web.displayTracebacks = False
    # One line per request would drown the server's own log.
    web.log = lambda request: None  # type: ignore[method-assign]
    return web
