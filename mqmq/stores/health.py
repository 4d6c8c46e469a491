"""How a durable store's writes are going: commits, their sizes and times, the last error.

Observed once per commit (never per message), in the reactor thread, and
read when the server is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Optional, Sequence

#: Upper bounds, in seconds, of the commit and sync time buckets: from a
#: page-cache commit (tens of microseconds) to a disk that stalls.
SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Upper bounds of the rows-per-commit buckets.
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)


class Histogram:
    """Counts of observations by bucket, with their sum, as Prometheus keeps them.

    ``counts[i]`` counts the observations in bucket ``i`` alone (at most
    ``bounds[i]``, more than the bound before); the last counts those
    above every bound.
    """

    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at most it) for each bucket, ``inf`` last."""
        buckets: list[tuple[float, int]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            buckets.append((bound, running))
        return buckets


class StoreHealth:
    """A durable store's writes since it started."""

    __slots__ = ("commits", "rows", "commit_seconds", "sync_seconds", "batch_rows",
                 "last_error", "last_error_time", "failing")

    def __init__(self) -> None:
        self.commits = 0
        #: Rows written (messages added, moved, changed and removed; queues made and dropped).
        self.rows = 0
        #: A transaction's time in the writer thread, its sync included (``--fsync always``).
        self.commit_seconds = Histogram(SECONDS_BUCKETS)
        #: A separate sync's time (``--fsync everysec``).
        self.sync_seconds = Histogram(SECONDS_BUCKETS)
        self.batch_rows = Histogram(ROWS_BUCKETS)
        #: The last write or read error, and when (``time.time()``), kept after it clears.
        self.last_error: Optional[str] = None
        self.last_error_time: Optional[float] = None
        #: Whether writes fail now.
        self.failing = False

    def committed(self, rows: int, seconds: float) -> None:
        self.commits += 1
        self.rows += rows
        self.commit_seconds.observe(seconds)
        self.batch_rows.observe(rows)
        self.failing = False

    def failed(self, error: str, when: float, writing: bool = True) -> None:
        """A write (or, with ``writing`` false, a read) failed at ``when``."""
        self.last_error = error
        self.last_error_time = when
        if writing:
            self.failing = True
