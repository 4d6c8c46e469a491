"""A Redis Cluster client: slots, redirections, retries (not built yet)."""

from __future__ import annotations

from typing import Any, Sequence


class ClusterRedis:
    """Not built yet."""


def cluster(reactor: Any, seeds: Sequence[tuple[str, int]], timeout: float = 2.0, name: bytes = b"") -> ClusterRedis:
    """Not built yet."""
    raise NotImplementedError("redis+cluster:// is not built yet")
